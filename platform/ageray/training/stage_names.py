"""The names of the training stages, in a module that imports nothing.

Why apart from ``plans``: ``jobs.train`` offers these names as ``--stage`` choices when it
parses its arguments, before anything imports torch; ``plans`` (which builds the stages)
re-exports them, so there is one list.
"""

from __future__ import annotations

__all__ = ["HYBRID_STEPS", "STAGES"]

#: Xing 3.3.3's three-step training of the hybrid net, in order.
HYBRID_STEPS = ("hybrid_groups", "hybrid_ages", "hybrid_finetune")
STAGES = ("pretrain", "stage1", "stage2", *HYBRID_STEPS)
