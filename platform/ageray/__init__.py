"""ageray: facial age estimators that are accurate for children and the elderly too.

The library behind the jobs, the Tune searches and the Serve app. Start with
``ageray.config`` (what a run is), ``ageray.model`` (the network), ``ageray.losses`` and
``ageray.metrics`` (the papers' equations), ``ageray.data`` (records -> shards -> streams),
``ageray.training`` (the per-worker loops) and ``ageray.tracking`` (MLflow).
"""

__version__ = "0.1.0"
