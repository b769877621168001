"""timm CNN trunks that return feature maps, and offline loading of their weights.

Why a wrapper and not ``timm.create_model(..., features_only=True)``: the papers' FR reads the
feature map of the *last convolutional layer* (GLAE III-B). For EfficientNets that is the
output of ``conv_head`` (1280 channels for ``tf_efficientnetv2_b0``), which ``features_only``
leaves out (it stops at the last block, 192 channels). ``num_classes=0, global_pool=""`` and
``forward_features`` give exactly that map for every timm CNN, and the state dict keys stay
those of the classifier model minus its classifier, so an ImageNet file loads unchanged.
Intermediate stage maps (for Xing's deeply supervised multi-task net) come from timm's
``forward_intermediates`` in the same pass.

Nothing here touches the network: timm is always called with ``pretrained=False`` and weights
come from a local file (``.safetensors``, or a ``.pth``/``.pt``/``.bin`` state dict read with
``torch.load(weights_only=True)``) or from a folder holding one (e.g. a timm/HF cache folder).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

__all__ = [
    "Backbone",
    "LoadReport",
    "create_backbone",
    "find_weights_file",
    "load_weights",
    "read_state_dict",
]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Preferred names inside a folder (HF/timm caches use these), before any other weights file.
PREFERRED_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Counters that old checkpoints (torchvision < 0.4) lack; harmless to leave at their init.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


@dataclass
class LoadReport:
    """What ``load_weights`` did: the file, how many tensors it loaded, what it ignored.

    ``ignored`` are keys in the file that the trunk does not have (typically the ImageNet
    classifier ``fc.*`` / ``classifier.*`` or an AM-softmax margin head).
    """

    source: str
    loaded: int
    ignored: list[str] = field(default_factory=list)
    missing_optional: list[str] = field(default_factory=list)
    # How the file's names met the trunk's: "names" (as they are, after wrapper prefixes),
    # "timm filter" (the timm module's checkpoint_filter_fn: an original repository's layout)
    # or "position" (another library's layout of the same network, e.g. torchvision's
    # efficientnet_b0 for timm's: same tensors in the same order and shapes, other names).
    mapping: str = "names"

    def summary(self) -> str:
        text = f"loaded {self.loaded} backbone tensors from {self.source}"
        if self.mapping != "names":
            text += f" (names mapped by {self.mapping})"
        if self.ignored:
            # every key by name: a user checking a face-recognition file wants to see that
            # only its classifier/margin head was left out, not "..."
            text += (
                f"; ignored {len(self.ignored)} key(s) absent from the backbone "
                f"({', '.join(self.ignored)})"
            )
        if self.missing_optional:
            text += f"; left at their init: {', '.join(self.missing_optional)}"
        return text


# --------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------


def find_weights_file(path: str | Path) -> Path:
    """The weights file that ``path`` names: the file itself, or the one inside a folder.

    A folder is searched recursively (timm/HF caches nest ``snapshots/<hash>/``). Preferred
    names win (``model.safetensors``, ``pytorch_model.bin``); otherwise exactly one weights
    file must be there, so we never guess between two checkpoints.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"pretrained weights {str(p)!r} do not exist; give a local .safetensors/.pth/.pt/.bin "
            "file or a folder holding one (nothing is downloaded at run time), or None for "
            "random initialisation"
        )
    if p.is_file():
        if not p.name.endswith(WEIGHT_SUFFIXES):
            raise ValueError(
                f"pretrained weights {str(p)!r}: unknown file type; expected one of "
                f"{', '.join(WEIGHT_SUFFIXES)}"
            )
        return p
    candidates = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    for name in PREFERRED_NAMES:
        named = [f for f in candidates if f.name == name]
        if len(named) == 1:
            return named[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(
            f"pretrained folder {str(p)!r} holds no weights file "
            f"({', '.join(WEIGHT_SUFFIXES)}); point model.pretrained at the file itself"
        )
    listing = ", ".join(str(f.relative_to(p)) for f in candidates[:8])
    raise ValueError(
        f"pretrained folder {str(p)!r} holds several weights files ({listing}); "
        "point model.pretrained at the one to use"
    )


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Peel ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers down to name -> tensor."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{source}: expected a state dict (name -> tensor), got {type(obj).__name__}"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"{source}: no tensors found (top-level keys: {list(obj)[:8]}); expected a state "
            f"dict, possibly under one of {WRAPPER_KEYS}"
        )
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file or folder into a flat state dict on the CPU (no arbitrary pickle)."""
    f = find_weights_file(path)
    if f.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(f), device="cpu")
    # weights_only=True: the restricted unpickler (tensors and plain containers only).
    obj = torch.load(str(f), map_location="cpu", weights_only=True)
    return _unwrap(obj, str(f))


def _strip_prefixes(
    state: Mapping[str, torch.Tensor], expected: set[str]
) -> dict[str, torch.Tensor]:
    """Drop the wrappers' key prefixes (DDP ``module.``, an AgeModel's ``backbone.model.``)."""
    state = dict(state)
    for prefix in ("module.", "backbone.model.", "model."):
        if expected & set(state):
            break
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if expected & set(stripped):
            state = stripped
    return state


# Top-level names of classifier / margin heads, which a trunk never has (timm's ``fc``,
# ``classifier``, ``head``; torchvision's ``fc``, ``classifier``; an AM-softmax ``margin``).
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.", "last_linear.", "margin.", "logits.")


def _suffix(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _map_by_position(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The file's tensors renamed to the trunk's, when the two are the same network laid out
    under other names: after dropping the file's head, the same count, and at every position
    the same shape and the same kind (``weight``, ``bias``, ``running_mean``, ...).

    Why this is safe enough to do unasked: two different networks that agree in the shape and
    kind of every one of hundreds of tensors, in order, do not occur in practice; a single
    disagreement returns None and the caller reports missing keys by name as before.
    """
    body = [(k, v) for k, v in state.items() if not k.startswith(HEAD_PREFIXES)]
    mine = list(own.items())
    if len(body) != len(mine) or not mine:
        return None
    for (fk, fv), (mk, mv) in zip(body, mine, strict=True):
        if tuple(fv.shape) != tuple(mv.shape) or _suffix(fk) != _suffix(mk):
            return None
    mapped = {mk: fv for (_fk, fv), (mk, _mv) in zip(body, mine, strict=True)}
    mapped.update({k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)})
    return mapped


def _timm_filter(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm module's own ``checkpoint_filter_fn`` (it converts the original repository's
    layout, e.g. Apple's FastViT, to timm's), or ``state`` unchanged when it has none."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        out = fn(dict(state), module)
    except Exception as exc:  # a filter written for another layout: not ours to crash on
        log.debug("checkpoint_filter_fn of %s failed: %s", type(module).__module__, exc)
        return state
    return {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _match_layout(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    *,
    ordered: bool,
) -> tuple[dict[str, torch.Tensor], str]:
    """The file's state with the trunk's names, and how they were matched (see LoadReport).

    ``ordered``: the state keeps the order its network registered its tensors in (a pickled
    state dict does; safetensors files store tensors sorted, so position means nothing there).
    """
    state = _strip_prefixes(state, set(own))
    needed = {k for k in own if not k.endswith(OPTIONAL_SUFFIXES)}
    if needed <= set(state):
        return state, "names"
    filtered = _timm_filter(module, state)
    if filtered is not state and needed <= set(filtered):
        return filtered, "timm filter"
    if not ordered:
        return state, "names"
    required = {k: v for k, v in own.items() if not k.endswith(OPTIONAL_SUFFIXES)}
    for candidate in (state, {k: v for k, v in state.items() if not k.endswith(OPTIONAL_SUFFIXES)}):
        mapped = _map_by_position(required, candidate)
        if mapped is not None:
            return mapped, "position"
    return state, "names"


def load_weights(
    module: nn.Module, source: str | Path | Mapping[str, torch.Tensor], *, name: str | None = None
) -> LoadReport:
    """Load ``source`` into ``module`` with strict checking of the module's own keys.

    The file's names are matched to the module's as they are (after wrapper prefixes), else
    through timm's ``checkpoint_filter_fn`` for the architecture, else by position when it is
    the same network under another library's names (``_map_by_position``). Then every key of
    ``module`` must be in the file (a missing one raises, naming the file and the keys),
    shapes must match, and keys the module lacks (the ImageNet classifier ``fc.*``,
    ``classifier.*``, an identity-pretraining margin head) are ignored and reported.
    """
    if isinstance(source, Mapping):
        label, state = (name or "<state dict>"), dict(source)
    else:
        label = str(find_weights_file(source))
        state = read_state_dict(label)
    own = module.state_dict()
    ordered = not label.endswith(".safetensors")
    state, mapping = _match_layout(module, state, own, ordered=ordered)
    missing = [k for k in own if k not in state]
    optional = [k for k in missing if k.endswith(OPTIONAL_SUFFIXES)]
    missing = [k for k in missing if k not in optional]
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        raise KeyError(
            f"pretrained weights {label}: {len(missing)} backbone key(s) missing ({shown}); "
            f"the file does not fit this architecture (it has {len(state)} tensors, e.g. "
            f"{', '.join(list(state)[:3])}), by name, by timm's filter for it or by "
            "position. Check model.backbone matches the file"
            + (
                "; a file of another library's layout maps by position only from a .pth/.pt "
                "(torch.save(model.state_dict())): safetensors does not keep tensor order"
                if not ordered
                else ""
            )
        )
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise ValueError(
            f"pretrained weights {label}: shape mismatch for {len(bad)} key(s): "
            f"{'; '.join(bad[:4])}. Check model.backbone matches the file"
        )
    ignored = sorted(k for k in state if k not in own)
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    report = LoadReport(label, len(own) - len(optional), ignored, optional, mapping)
    log.info(report.summary())
    return report


# --------------------------------------------------------------------------------------
# The trunk
# --------------------------------------------------------------------------------------


def _timm_model(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"model.backbone={name!r} is not a timm model{hint}") from exc


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class Backbone(nn.Module):
    """A timm CNN trunk: ``forward(x)`` is the last feature map F, (B, C, H, W).

    ``out_channels`` is C; ``feature_info`` lists the stage maps (channels, reduction) that
    ``forward_stages`` can also return; ``feature_size(image_size)`` is (H, W) for an input.
    """

    def __init__(self, name: str, **timm_kwargs: Any) -> None:
        super().__init__()
        self.name = name
        self._timm_kwargs = dict(timm_kwargs)
        self.model = _timm_model(name, **timm_kwargs)
        self.out_channels: int = int(self.model.num_features)
        info = getattr(self.model, "feature_info", None) or []
        self.feature_info: list[dict[str, int]] = [
            {"channels": int(i["num_chs"]), "reduction": int(i["reduction"])} for i in info
        ]
        self._sizes: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def forward(
        self, images: torch.Tensor, indices: Sequence[int] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """F for ``images``; with ``indices`` (into ``feature_info``) ``(F, {index: map})``.

        One pass either way; going through ``__call__`` keeps hooks (DDP, profilers) working.
        """
        if indices is None:
            return self.model.forward_features(images)
        return self.forward_stages(images, indices)

    def forward_stages(
        self, images: torch.Tensor, indices: Sequence[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The last feature map and the stage maps ``indices`` (into ``feature_info``), in
        one pass."""
        if not indices:
            return self.model.forward_features(images), {}
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"backbone {self.name!r} has no forward_intermediates in timm; the deeply "
                "supervised multi-task head needs stage maps. Use a resnet/efficientnet backbone"
            )
        idx = sorted({self._norm_index(i) for i in indices})
        final, inter = self.model.forward_intermediates(images, indices=idx)
        return final, dict(zip(idx, inter, strict=True))

    def _norm_index(self, index: int) -> int:
        levels = len(self.feature_info)
        if not -levels <= index < levels:
            raise IndexError(
                f"stage index {index} out of range for {self.name!r} ({levels} stages)"
            )
        return index % levels

    def stage_channels(self, index: int) -> int:
        return self.feature_info[self._norm_index(index)]["channels"]

    def feature_size(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """(H, W) of F for an input of ``image_size`` pixels.

        Computed by running the architecture on the ``meta`` device (shapes only, no memory,
        no arithmetic), so it is exact for any timm padding rule and costs milliseconds.
        """
        return self.stage_sizes(image_size)[-1]

    def stage_sizes(self, image_size: int | Sequence[int]) -> list[tuple[int, int]]:
        """(H, W) of every ``feature_info`` stage map and, last, of F."""
        key = _size2(image_size)
        if key not in self._sizes:
            with torch.device("meta"):
                probe = _timm_model(self.name, **self._timm_kwargs)
            probe.eval()
            x = torch.empty(1, 3, *key, device="meta")
            if hasattr(probe, "forward_intermediates"):
                final, inter = probe.forward_intermediates(x)
            else:
                final, inter = probe.forward_features(x), []
            self._sizes[key] = [(int(t.shape[-2]), int(t.shape[-1])) for t in [*inter, final]]
        return list(self._sizes[key])

    def load_pretrained(self, source: str | Path | Mapping[str, torch.Tensor]) -> LoadReport:
        """Load ImageNet / identity-pretrained weights into the trunk (see ``load_weights``)."""
        return load_weights(self.model, source)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_channels={self.out_channels}"


def create_backbone(
    name: str, pretrained: str | Path | None = None, **timm_kwargs: Any
) -> Backbone:
    """A timm trunk by name, with weights from a local file or folder when ``pretrained``.

    ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``drop_path_rate``). Never downloads.
    """
    backbone = Backbone(name, **timm_kwargs)
    if pretrained is not None:
        backbone.load_pretrained(pretrained)
    return backbone
