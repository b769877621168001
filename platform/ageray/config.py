"""Typed run configuration: one YAML file per run, overridable from the command line.

Why dataclasses and not a dict: every job, the Tune driver and the Serve app read the same
fields, and a typo in a recipe (``model.backbon``) must fail at load time with a suggestion,
not silently fall back to a default hours into a run. Values are coerced to the declared
types, so ``--set train.stage1.epochs=3`` gives an ``int``.

Usage::

    cfg = load_config("recipes/demo.yaml", overrides=["model.backbone=resnet50"])
    cfg.model.backbone            # "resnet50"
    flatten(to_dict(cfg))         # {"model.backbone": "resnet50", ...} for MLflow params

Sections (each documented on its class): ``run``, ``data``, ``model``, ``loss``, ``train``
(``stage1``, ``stage2``), ``pretrain``, ``ray``, ``tracking``, ``eval``, ``routing``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

__all__ = [
    "RETIRED_KEYS",
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RayConfig",
    "RoutingConfig",
    "RunSection",
    "Stage1Config",
    "Stage2Config",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "build_dataclass",
    "config_from_dict",
    "config_keys",
    "dump_yaml",
    "flatten",
    "get_dotted",
    "load_config",
    "set_dotted",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and the fix."""


# ----------------------------------------------------------------------------- sections


@dataclass
class RunSection:
    """Identity and storage of a run.

    ``storage_path`` holds checkpoints, Ray Train state and (by default) the local MLflow
    store; a local folder or ``s3://bucket/prefix``. ``name`` is stable: resubmitting a run
    with the same name resumes it from its latest checkpoint.
    """

    name: str = "ageray"
    storage_path: str = "runs"
    seed: int = 0
    # Fault injection for tests: kill rank `fail_rank` once in epoch `fail_at_epoch` after
    # `fail_at_step` steps (-1: off; or AGERAY_FAIL_AT_EPOCH, so no recipe is needed).
    fail_at_epoch: int = -1
    fail_at_step: int = 1
    fail_rank: int = 0


@dataclass
class AugmentConfig:
    """Training augmentation (LAE 2.3 / GLAE V-A). Eval transforms ignore this section."""

    random_resized_crop: bool = True
    rrc_scale: tuple[float, float] = (0.8, 1.0)
    rrc_ratio: tuple[float, float] = (0.9, 1.1)
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    randaugment_n: int = 0  # 0 disables RandAugment; the papers use N=2, M=9
    randaugment_m: int = 9


@dataclass
class DataConfig:
    """Where the shards are and how they stream to each Ray Train worker.

    ``shards`` is a folder or ``s3://bucket/prefix`` holding ``manifest.json`` and the split
    shards written by ``jobs.make_shards``. ``batch_size`` is per worker; the global batch is
    ``batch_size * ray.num_workers`` (the learning rate scales with it, see OptimConfig).

    ``augment_on``: ``worker`` runs the training augmentation per image in the DataLoader
    workers (PIL); ``device`` has the workers only decode (uint8, one size) and runs it on the
    whole batch on the training device (``ageray.data.augment``), which frees a GPU node's
    CPUs. ``num_workers``: DataLoader processes per training process, or ``auto`` (this
    node's CPUs shared by its training processes, one left for each of them).
    """

    shards: str = "runs/shards/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    image_size: int = 112
    # "imagenet": mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225) (LAE);
    # "glae": (x - 127.5) / 128 (GLAE V-A).
    normalize: Literal["imagenet", "glae"] = "imagenet"
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int | Literal["auto"] = 2  # DataLoader worker processes per Ray Train worker
    shuffle_buffer: int = 1000
    steps_per_epoch: int | None = None  # None: derived from the manifest (same on every rank)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augment_on: Literal["worker", "device"] = "worker"
    s3_retries: int = 5


@dataclass
class ModelConfig:
    """The network: a timm backbone and the heads a paper row needs.

    ``head``:
      * ``linear``  GAP + linear (LAE standard baseline; GLAE's l_kl and l_base rows)
      * ``glae``    Feature Rearrangement + Pixel-level Auxiliary learning (GLAE)
    ``formulation`` (Xing et al. 3.2): ``ldl`` (label distribution, softmax over ages with
    expectation), ``onehot`` (softmax CE), ``mse`` / ``mae`` (one regression output),
    ``ordinal`` (K-1 binary outputs, age = age_min + sum_k f_k). ``answer``: ``paper`` (one-hot
    argmax, ordinal count of f_k > 0.5, as Xing) or ``expectation`` (soft sums; ldl always).
    ``multitask`` (Xing et al. 3.3): ``none``, ``parallel``, ``deep`` (deeply supervised),
    ``hybrid`` (groups ``hybrid_groups``: ``morph`` BF/BM/WF/WM or ``race_gender`` all).
    """

    backbone: str = "resnet18"
    # Local weights file (.safetensors, .pth, .bin) or a timm/HF cache folder. Never a hub
    # name: nothing is downloaded at run time. None = random initialisation.
    pretrained: str | None = None
    head: Literal["linear", "glae"] = "glae"
    formulation: Literal["ldl", "onehot", "mse", "mae", "ordinal"] = "ldl"
    answer: Literal["paper", "expectation"] = "paper"
    multitask: Literal["none", "parallel", "deep", "hybrid"] = "none"
    hybrid_groups: Literal["morph", "race_gender"] = "morph"
    num_classes: int = 101  # ages 0..100
    age_min: int = 0  # ordinal thresholds start here (age_min=1 gives Xing's eq. 11 exactly)
    fr_r: int = 16
    fr_kernel: int = 16
    fr_stride: int = 16
    proj_depth: int = 0
    drop_rate: float = 0.0
    num_genders: int = 2
    num_races: int = 5
    channels_last: bool = False


@dataclass
class LossConfig:
    """Loss of the representation stage.

    ``name``: ``kl`` (eq. 2), ``base`` (l_kl + lambda * l_er, eq. 5; LAE L_fe eq. 3),
    ``sum`` (GLAE L_loc + L_hol, eq. 10; needs head=glae), ``ce`` (one-hot softmax),
    ``ldl_ce`` (label-distribution cross entropy, Xing eq. 8), ``mse``, ``mae``,
    ``ordinal_bce``. ``alpha`` / ``beta`` weight the gender / race terms (Xing eq. 12).
    """

    name: Literal["kl", "base", "sum", "ce", "ldl_ce", "mse", "mae", "ordinal_bce"] = "sum"
    sigma: float = 1.0
    lambda_er: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0


@dataclass
class OptimConfig:
    """SGD with Nesterov momentum as in the papers.

    The effective learning rate is ``lr * global_batch / 256`` when ``scale_lr`` is on
    (LAE 3.3: "LearningRate = base x BatchSize / 256"). OneCycle is stepped per iteration.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scale_lr: bool = True
    scheduler: Literal["onecycle", "step", "cosine", "constant"] = "onecycle"
    milestones: list[int] = field(default_factory=lambda: [20, 40, 60])
    gamma: float = 0.1
    pct_start: float = 0.3
    grad_clip: float | None = 5.0


@dataclass
class Stage1Config:
    """Representation learning: the recipe's head, instance-balanced stream."""

    epochs: int = 24
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampler: Literal["instance", "class", "age_aware"] = "instance"


@dataclass
class Stage2Config:
    """Classifier re-training on the frozen backbone with class-balanced sampling.

    ``trainable``: ``head`` retrains a copy of the whole head (GLAE) and ``classifier`` only
    the last linear layer (LAE). ``mae_term`` adds LAE's ``(L_er - mae)^2`` where ``mae`` is
    stage 1's validation MAE, read from stage 1's result, never a constant.
    """

    enabled: bool = True
    epochs: int = 8
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.001))
    sampler: Literal["instance", "class", "age_aware"] = "class"
    trainable: Literal["head", "classifier"] = "head"
    mae_term: bool = False


@dataclass
class TrainConfig:
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    # Xing 3.3.3's steps (hybrid_groups, hybrid_ages, hybrid_finetune), stage 1's optimiser
    hybrid_epochs: tuple[int, int, int] = (4, 4, 8)
    init_from: str | None = None  # backbone weights from jobs.pretrain (folder/.safetensors)
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on GPU, off on CPU
    compile: bool = False  # torch.compile: one-off per process, for long GPU runs only
    sync_bn: bool = False
    checkpoint_keep: int = 2
    checkpoint_metric: str = "val_mae"
    checkpoint_mode: Literal["min", "max"] = "min"
    max_failures: int = 1
    log_every: int = 20


@dataclass
class PretrainConfig:
    """Identity pretraining with AM-softmax (LAE 2.3) on shards that carry identities."""

    shards: str | None = None  # None: data.shards
    epochs: int = 18
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=0.1, scheduler="step", milestones=[7, 14, 16])
    )
    am_scale: float = 30.0
    am_margin: float = 0.35
    embedding_dim: int = 512


@dataclass
class RayConfig:
    """Where and how wide the run is.

    ``address`` None starts (or joins, with ``auto``) a local Ray sized by ``num_cpus`` and
    ``object_store_mb`` so it fits a small machine; runs that do not fit fail at once.
    """

    address: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    num_cpus: int | None = None  # local Ray only; None = os.cpu_count()
    object_store_mb: int = 256
    memory_per_worker_gb: float | None = None  # Ray's "memory" resource per worker (None: none)
    autoscaling: bool | None = None  # None: ask the cluster whether an autoscaler runs
    resource_wait_s: float = 600.0  # waiting for an autoscaler (ageray.training.capacity)
    health_check_interval_s: float = 2.0  # Ray Train polls its workers this often
    health_check_timeout_s: float = 600.0  # a worker whose poll hangs longer counts as dead


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` None: ``MLFLOW_TRACKING_URI`` if set, else a local store under
    ``run.storage_path/mlruns`` (embedded, nothing to start)."""

    uri: str | None = None
    experiment: str = "ageray"
    registered_model: str = "ageray"
    alias: str = "candidate"
    register: bool = True


@dataclass
class EvalConfig:
    split: str = "test"
    flip_tta: bool = True
    aar_groups: Literal["lae", "decade"] = "lae"
    ccs_max: int = 10


#: Rules a model may apply to a request (``ageray.model.routing``; ``oracle`` never).
SERVABLE_ROUTING_RULES = ("smaller", "bigger", "threshold", "learned")
FITTED_ROUTING_RULES = ("threshold", "learned")


@dataclass
class RoutingConfig:
    """Which head answers each image (``ageray.model.routing``) and how the fitted rules fit.

    ``rule``: what the saved model applies by default (Serve, the pyfunc model, exports):
    ``smaller`` (GLAE eq. 11), ``bigger`` (Table IX's ablation), ``threshold`` (vanilla iff
    KL_van < tau * KL_bal) or ``learned`` (a small router on per-image features). ``fit``:
    the fitted rules to fit after stage 2 on ``fit_split`` and save in the model (the served
    one is fitted in any case), so the evaluation table has every row. ``oracle`` (the head
    closer to the true age) is an evaluation bound and never a choice here.
    ``weighting`` of the fit's objective: ``age`` (every age counts equally: CMAE),
    ``instance`` (every image: MAE), ``blend`` (``age_share`` of the first, the rest of the
    second) or ``auto`` (the share chosen by 5-fold cross-validation on ``fit_split``: the
    one that beats eq. 11 on both MAE and CMAE there by the widest margin). The learned
    router: ``mode`` ``soft`` (mixes the heads) or ``hard`` (picks one), ``hidden`` tanh
    units (0: logistic regression), ``weight_decay``, ``steps``.
    """

    rule: str = "smaller"
    fit: list[str] = field(default_factory=lambda: list(FITTED_ROUTING_RULES))
    fit_split: str = "val"
    weighting: Literal["age", "instance", "blend", "auto"] = "auto"
    age_share: float = 0.2
    mode: Literal["soft", "hard"] = "soft"
    hidden: int = 0
    weight_decay: float = 1e-3
    steps: int = 800


@dataclass
class Config:
    """A whole run. Every field has a default, so an empty YAML is a valid (tiny) run."""

    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def validate(self) -> Config:
        """Cross-field checks that a single type cannot express. Returns self."""
        m = self.model
        if m.num_classes < 2:
            raise ConfigError(f"model.num_classes={m.num_classes}: need at least 2 ages")
        if self.loss.name == "sum" and m.head != "glae":
            raise ConfigError(
                "loss.name=sum is GLAE's L_loc + L_hol and needs model.head=glae; "
                "use loss.name=base with model.head=linear"
            )
        dist_losses = {"kl", "base", "sum", "ldl_ce", "ce"}
        if m.formulation in ("mse", "mae") and self.loss.name in dist_losses:
            raise ConfigError(
                f"model.formulation={m.formulation} predicts one number; loss.name="
                f"{self.loss.name} needs a distribution. Use loss.name={m.formulation}"
            )
        if m.formulation == "ordinal" and self.loss.name != "ordinal_bce":
            raise ConfigError("model.formulation=ordinal needs loss.name=ordinal_bce")
        if self.train.stage2.mae_term and self.loss.name in ("mse", "mae", "ordinal_bce"):
            raise ConfigError(
                "train.stage2.mae_term is LAE's (L_er - mae)^2 on a label distribution; "
                f"loss.name={self.loss.name} has none. Set train.stage2.mae_term=false"
            )
        for name in ("batch_size", "eval_batch_size", "image_size"):
            if getattr(self.data, name) <= 0:
                raise ConfigError(f"data.{name} must be positive")
        if self.ray.num_workers < 1:
            raise ConfigError("ray.num_workers must be at least 1")
        self._validate_routing()
        return self

    def _validate_routing(self) -> None:
        r = self.routing
        if r.rule == "oracle":
            raise ConfigError(
                "routing.rule=oracle: the oracle reads the true age, so it is an evaluation "
                f"bound and never served; choose one of {list(SERVABLE_ROUTING_RULES)}"
            )
        if r.rule not in SERVABLE_ROUTING_RULES:
            raise ConfigError(
                f"routing.rule={r.rule!r} is not one of {list(SERVABLE_ROUTING_RULES)}"
            )
        bad = [n for n in r.fit if n not in FITTED_ROUTING_RULES]
        if bad:
            raise ConfigError(
                f"routing.fit={r.fit}: {bad} need no fitting or do not exist; fitted rules "
                f"are {list(FITTED_ROUTING_RULES)}"
            )
        if r.fit_split in (self.data.test_split, self.eval.split):
            raise ConfigError(
                f"routing.fit_split={r.fit_split!r} is the split the evaluation scores "
                f"(data.test_split={self.data.test_split!r}, eval.split={self.eval.split!r}): "
                "routers are fitted on a held-out split (val), never on the data they are "
                "scored on"
            )
        if not 0.0 <= r.age_share <= 1.0:
            raise ConfigError(f"routing.age_share={r.age_share} must be in [0, 1]")
        if r.hidden < 0 or r.steps < 1 or r.weight_decay < 0:
            raise ConfigError(
                f"routing.hidden={r.hidden} (>= 0), routing.steps={r.steps} (>= 1), "
                f"routing.weight_decay={r.weight_decay} (>= 0)"
            )


# ------------------------------------------------------------------- dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}")
        return build_dataclass(tp, value, prefix=key)
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int or tp is float:
        return _coerce_number(value, tp, key)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of ``X | Y`` that takes ``value``; None/none/null/~ if it allows None."""
    args = get_args(tp)
    if type(None) in args and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
    ):
        return None
    for arg in args:
        if arg is not type(None):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    raise ConfigError(f"{key}: {value!r} fits none of {_type_name(tp)}")


def _coerce_sequence(value: Any, tp: Any, key: str) -> list[Any] | tuple[Any, ...]:
    """A list/tuple from a sequence or its text (``a,b``, ``[1, 2]``), items coerced."""
    if isinstance(value, str):
        value = (
            yaml.safe_load(value)
            if value.strip().startswith("[")
            else [v for v in value.split(",") if v]
        )
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    args = get_args(tp)
    if get_origin(tp) is not tuple:
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
        raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _coerce_number(value: Any, tp: type, key: str) -> int | float:
    """An int/float from a number or its text; never a bool; an int only from a whole float."""
    if not isinstance(value, bool):
        if isinstance(value, int):
            return value if tp is int else float(value)
        if isinstance(value, float) and (tp is float or value.is_integer()):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")


#: Keys that configs written by earlier versions hold (checkpoints, model.json, Tune state)
#: but that no longer exist; they load with a warning instead of failing, so old runs
#: resume. The value says what decides the matter now.
RETIRED_KEYS: dict[str, str] = {
    "model.dual_head": "it was never read; train.stage2.enabled decides whether stage 2 "
    "adds the balanced head",
}


def build_dataclass(
    cls: type[T],
    data: Mapping[str, Any] | None,
    *,
    base: T | None = None,
    prefix: str = "",
    what: str = "config key",
    inline: tuple[str, ...] = (),
) -> T:
    """A ``cls`` instance from a (possibly partial) mapping: the one typed builder behind
    :class:`Config` and the Serve settings (``ageray.serving.settings``).

    Why one: every typed setting in ageray must fail the same way on a typo (an unknown key
    names the closest known one) and coerce the same way (``"8"`` -> ``8`` for an ``int``).
    Keys not given keep ``base``'s values (``base`` is not mutated) or the class defaults.
    A nested dataclass field takes a mapping, built on top of the base's section.
    ``inline`` names nested sections whose keys may also be written at this level (Serve's
    flat ``max_image_bytes`` for ``limits.max_image_bytes``); the nested form wins.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    items = dict(data or {})
    for section in inline:
        inner = {f.name for f in dataclasses.fields(hints[section])}
        flat = {k: items.pop(k) for k in list(items) if k in inner}
        nested = items.get(section)
        if flat:
            items[section] = {**flat, **nested} if isinstance(nested, Mapping) else flat
    kwargs: dict[str, Any] = {}
    for k, v in items.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in RETIRED_KEYS:
            message = f"config key '{key}' is retired and ignored: {RETIRED_KEYS[key]}"
            warnings.warn(message, UserWarning, stacklevel=2)
            continue
        if k not in names:
            known = names + [
                f.name for section in inline for f in dataclasses.fields(hints[section])
            ]
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown {what} '{key}'{hint} (known: {', '.join(known)})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, Mapping):
            section_base = getattr(base, k) if base is not None else None
            kwargs[k] = build_dataclass(tp, v, base=section_base, prefix=key, what=what)
        else:
            kwargs[k] = _coerce(v, tp, key)
    if base is None:
        return cls(**kwargs)
    return dataclasses.replace(copy.deepcopy(base), **kwargs)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict."""
    return build_dataclass(Config, data).validate()


def to_dict(obj: Any) -> Any:
    """Nested plain dict (tuples become lists) suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are JSON strings (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


def config_keys() -> dict[str, Any]:
    """Every leaf config key (``model.fr_kernel`` ...) -> its annotated type."""
    out: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".")
            else:
                out[key] = tp

    walk(Config, "")
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "model.fr_kernel", 16)`` on a nested config dict.

    Missing (or null) sections are created; a section that holds a value is an error, so
    ``model.fr_kernel.x=1`` cannot silently replace ``fr_kernel``.
    """
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"'{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def get_dotted(data: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``get_dotted(d, "model.fr_kernel")`` on a nested config dict; ``default`` if absent."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.path=value`` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        try:
            set_dotted(data, path, value)
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from exc
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or none: defaults), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; see recipes/ for examples")
        with p.open() as fh:
            loaded = yaml.safe_load(fh)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded or {}
    return config_from_dict(apply_overrides(data, overrides))


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML that ``load_config`` reads back to an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
