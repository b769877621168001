"""Backends that run the routed model on a batch: PyTorch, or the exported ONNX graph in ONNX
Runtime. Both take a (B, 3, S, S) float32 batch and return the named outputs of
:class:`~ageray.inference.graph.RoutedGraph` as numpy arrays, so the answer code
after them cannot tell them apart (the export's parity test bounds the difference).

Why ONNX Runtime at all: on CPU its fused graph can beat eager PyTorch on small batches, and
it is what people run outside Python; ``benchmarks/serve_backends.py`` measures both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .graph import RoutedGraph

__all__ = ["BACKENDS", "OnnxBackend", "TorchBackend", "autocast"]

BACKENDS = ("torch", "onnxruntime")


def autocast(device: torch.device, amp: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (``amp`` ``auto`` or ``bf16``, as ``train.amp``); full precision
    on CPU or with ``amp="off"``."""
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.is_floating_point():
        t = t.float()
    return t.cpu().numpy()


class TorchBackend:
    """The model in eager PyTorch on ``device`` (default: where its parameters are).

    ``rule`` per call overrides the model's own routing rule (the oracle is refused by the
    callers that serve: ``check_servable``); one :class:`RoutedGraph` per rule is kept.
    """

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        *,
        flip: bool = True,
        device: torch.device | str | None = None,
        amp: str = "auto",
    ) -> None:
        self.model = model
        self.flip = flip
        self.device = torch.device(device) if device is not None else _param_device(model)
        self.amp = amp
        self._predictors: dict[str | None, RoutedGraph] = {}
        self.rule = self.predictor().rule_name  # the model's own rule

    def predictor(self, rule: str | None = None) -> RoutedGraph:
        if rule not in self._predictors:
            self._predictors[rule] = RoutedGraph(self.model, rule=rule, flip=self.flip)
        return self._predictors[rule]

    def tensors(self, x: torch.Tensor, rule: str | None = None) -> dict[str, torch.Tensor]:
        """The named outputs as tensors on the device (evaluation scores rules from them)."""
        pred = self.predictor(rule)
        with torch.inference_mode(), autocast(self.device, self.amp):
            return pred.named(x.to(self.device, non_blocking=True))

    def __call__(self, x: Any, rule: str | None = None) -> dict[str, np.ndarray]:
        x = torch.as_tensor(x, dtype=torch.float32)
        return {k: _numpy(v) for k, v in self.tensors(x, rule).items()}

    def rule_name(self, rule: str | None = None) -> str:
        return self.predictor(rule).rule_name


def _param_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class OnnxBackend:
    """An exported ``model.onnx`` (a path, or its bytes) in ONNX Runtime (CPU unless
    ``providers`` say otherwise).

    The routing rule is part of the graph (recorded in its metadata as ``ageray.rule``), so a
    different rule per call is refused with a message, not silently ignored.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a dependency of ageray
            raise RuntimeError(
                "backend onnxruntime needs the onnxruntime package (pip install onnxruntime)"
            ) from exc
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        # bytes: the session is built from memory and no file is left behind (a swap-heavy
        # replica used to keep a ~90 MB copy per load in the temp folder)
        self.path = None if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(
            model if isinstance(model, bytes) else self.path,
            opts,
            providers=providers or ["CPUExecutionProvider"],
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        meta: Mapping[str, str] = self.session.get_modelmeta().custom_metadata_map
        self.meta = dict(meta)
        self.rule = self.meta.get("ageray.rule", "smaller")

    def _check_rule(self, rule: str | None) -> None:
        if rule is not None and rule != self.rule:
            raise ValueError(
                f"the ONNX export routes with {self.rule!r} (its fitted parameters are in the "
                f"graph); rule={rule!r} needs backend torch or an export made with that rule"
            )

    def __call__(self, x: Any, rule: str | None = None) -> dict[str, np.ndarray]:
        self._check_rule(rule)
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        arr = np.ascontiguousarray(x, dtype=np.float32)
        outs = self.session.run(None, {self.input_name: arr})
        return dict(zip(self.output_names, outs))

    def rule_name(self, rule: str | None = None) -> str:
        self._check_rule(rule)
        return self.rule
