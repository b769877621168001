"""Training helpers without Ray: optimiser parameter groups and learning-rate scaling, the
per-iteration schedules and their resume, gradient clipping, checkpoint round trips, fault
injection, and the MLflow helpers (where the tracking store is, failing fast, digests,
epoch logging that a re-run epoch cannot duplicate).

Everything here runs in one process on tiny modules; the ResNet-18 checkpoint test is the
only one that builds a real model (64 px, a second or two on CPU).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ageray.config import Config, OptimConfig
from ageray.training.checkpoint import load_state, restore, save_checkpoint, unwrap
from ageray.training.context import fault_marker, maybe_inject_fault, registered_epoch
from ageray.training.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    effective_lr,
)

# --------------------------------------------------------------------------- helpers


def tiny_net() -> nn.Module:
    """Linear -> BatchNorm -> Linear: two 2-D weights, three 1-D tensors (2 biases, BN weight
    and BN bias make four)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def lr_trace(opt: torch.optim.Optimizer, sched, steps: int) -> list[float]:
    """The learning rate each of ``steps`` iterations trains with (read before stepping)."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def train_steps(net: nn.Module, opt: torch.optim.Optimizer, sched, n: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


# --------------------------------------------------------------------------- optimiser


def test_no_weight_decay_on_one_dimensional_parameters() -> None:
    net = tiny_net()
    opt = build_optimizer(net, OptimConfig(weight_decay=5e-4, lr=0.1), global_batch=256)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2}
    assert {p.ndim for p in no_decay["params"]} == {1}
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in net.parameters()}  # every parameter, exactly once
    assert len(decay["params"]) == 2 and len(no_decay["params"]) == 4
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9


def test_frozen_parameters_are_left_out_and_all_frozen_fails() -> None:
    net = tiny_net()
    for p in net[0].parameters():
        p.requires_grad_(False)
    opt = build_optimizer(list(net.parameters()), OptimConfig(), global_batch=32)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids.isdisjoint({id(p) for p in net[0].parameters()})
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(net, OptimConfig(), global_batch=32)


@pytest.mark.parametrize(
    ("lr", "batch", "scale", "expected"),
    [(0.1, 256, True, 0.1), (0.1, 512, True, 0.2), (0.8, 64, True, 0.2), (0.1, 64, False, 0.1)],
)
def test_learning_rate_scales_with_the_global_batch(
    lr: float, batch: int, scale: bool, expected: float
) -> None:
    cfg = OptimConfig(lr=lr, scale_lr=scale, scheduler="constant")
    assert effective_lr(cfg, batch) == pytest.approx(expected)
    opt = build_optimizer(tiny_net(), cfg, global_batch=batch)
    assert all(g["lr"] == pytest.approx(expected) for g in opt.param_groups)


def test_non_positive_global_batch_and_unknown_names_fail() -> None:
    with pytest.raises(ValueError, match="global batch"):
        effective_lr(OptimConfig(), 0)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(tiny_net(), OptimConfig(optimizer="lbfgs"), 32)  # type: ignore[arg-type]
    opt = build_optimizer(tiny_net(), OptimConfig(), 32)
    with pytest.raises(ValueError, match="scheduler"):
        build_scheduler(opt, OptimConfig(scheduler="poly"), 2, 5)  # type: ignore[arg-type]


def test_adamw_gets_one_cycle_without_momentum_cycling() -> None:
    cfg = OptimConfig(optimizer="adamw", lr=0.01, scale_lr=False)
    opt = build_optimizer(tiny_net(), cfg, 32)
    assert isinstance(opt, torch.optim.AdamW)
    sched = build_scheduler(opt, cfg, epochs=2, steps_per_epoch=5)
    assert max(lr_trace(opt, sched, 10)) == pytest.approx(0.01, rel=1e-6)


# --------------------------------------------------------------------------- schedules


def test_one_cycle_steps_per_iteration_and_peaks_at_pct_start() -> None:
    epochs, steps, pct = 4, 10, 0.3
    cfg = OptimConfig(lr=0.4, scale_lr=True, scheduler="onecycle", pct_start=pct)
    opt = build_optimizer(tiny_net(), cfg, global_batch=128)
    peak = 0.4 * 128 / 256
    sched = build_scheduler(opt, cfg, epochs, steps)
    trace, momentum = [], []
    for _ in range(epochs * steps):
        trace.append(opt.param_groups[0]["lr"])
        momentum.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    # torch's OneCycleLR ends its warm-up phase at step pct_start * total - 1.
    top = int(pct * epochs * steps) - 1
    assert trace.index(max(trace)) == top
    assert max(trace) == pytest.approx(peak, rel=1e-6)
    assert trace[0] == pytest.approx(peak / 25, rel=1e-6)  # div_factor 25
    assert trace[-1] < trace[0] / 100  # anneals far below the start
    # per iteration, not per epoch: the rate changes inside the first epoch
    assert len(set(trace[:steps])) == steps
    assert all(a < b for a, b in itertools.pairwise(trace[: top + 1]))
    # SGD momentum cycles against the learning rate: 0.9 at the start, 0.85 at the peak
    assert momentum[0] == pytest.approx(0.9) and momentum[top] == pytest.approx(0.85)
    assert min(momentum) == momentum[top]


def test_one_cycle_resumes_identically_after_a_state_dict_round_trip() -> None:
    cfg = OptimConfig(lr=0.2, scheduler="onecycle", pct_start=0.25)
    epochs, steps, cut = 3, 7, 9

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, object]:
        net = tiny_net()
        opt = build_optimizer(net, cfg, 64)
        return net, opt, build_scheduler(opt, cfg, epochs, steps)

    _, opt, sched = fresh()
    whole = lr_trace(opt, sched, epochs * steps)

    _, opt, sched = fresh()
    first = lr_trace(opt, sched, cut)
    blob = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    _, opt2, sched2 = fresh()
    opt2.load_state_dict(blob["optimizer"])
    sched2.load_state_dict(blob["scheduler"])
    rest = lr_trace(opt2, sched2, epochs * steps - cut)
    assert first + rest == pytest.approx(whole, rel=1e-12)


def test_step_schedule_milestones_are_counted_in_iterations() -> None:
    cfg = OptimConfig(lr=1.0, scale_lr=False, scheduler="step", milestones=[2, 3, 9], gamma=0.1)
    opt = build_optimizer(tiny_net(), cfg, 32)
    steps = 5
    sched = build_scheduler(opt, cfg, epochs=4, steps_per_epoch=steps)
    trace = lr_trace(opt, sched, 4 * steps)
    assert trace[: 2 * steps] == pytest.approx([1.0] * 2 * steps)
    assert trace[2 * steps : 3 * steps] == pytest.approx([0.1] * steps)
    assert trace[3 * steps :] == pytest.approx([0.01] * steps)  # milestone 9 >= epochs: ignored


def test_cosine_and_constant_schedules() -> None:
    cfg = OptimConfig(lr=1.0, scale_lr=False, scheduler="cosine")
    opt = build_optimizer(tiny_net(), cfg, 32)
    trace = lr_trace(opt, build_scheduler(opt, cfg, 2, 4), 8)
    assert trace[0] == pytest.approx(1.0) and trace[4] == pytest.approx(0.5)
    assert all(a > b for a, b in itertools.pairwise(trace))
    cfg = OptimConfig(lr=0.3, scale_lr=False, scheduler="constant")
    opt = build_optimizer(tiny_net(), cfg, 32)
    assert lr_trace(opt, build_scheduler(opt, cfg, 2, 4), 8) == pytest.approx([0.3] * 8)


# --------------------------------------------------------------------------- clipping


def test_gradient_clipping_returns_the_norm_before_clipping() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_gradients([a, b], max_norm=1.0) == pytest.approx(5.0)
    after = torch.cat([a.grad, b.grad]).norm().item()
    assert after == pytest.approx(1.0, rel=1e-4)

    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_gradients([a, b], max_norm=None) == pytest.approx(5.0)
    assert a.grad.tolist() == [3.0, 0.0]  # not clipped
    assert clip_gradients([a, b], max_norm=10.0) == pytest.approx(5.0)
    assert b.grad.item() == 4.0  # below the limit: unchanged
    assert clip_gradients([nn.Parameter(torch.zeros(3))], max_norm=1.0) == 0.0  # no grads


# --------------------------------------------------------------------------- checkpoints


def small_cfg() -> Config:
    cfg = Config()
    cfg.data.image_size = 64
    cfg.data.normalize = "glae"
    cfg.model.backbone = "resnet18"
    cfg.model.head = "glae"
    return cfg


def test_checkpoint_round_trip_restores_weights_optimizer_and_schedule(tmp_path: Path) -> None:
    from ageray.model import build_model, load_model

    cfg = small_cfg()
    optim_cfg = OptimConfig(lr=0.1, scheduler="onecycle")
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(model, optim_cfg, 32)
    sched = build_scheduler(opt, optim_cfg, epochs=2, steps_per_epoch=3)
    model.train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        loss = model(x, heads=["vanilla"])["vanilla"]["age"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    state = {"stage": "stage1", "epoch": 0, "global_step": 2, "mlflow_run_id": "abc"}
    folder = save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        cfg=cfg,
        state=state,
        optimizer=opt,
        scheduler=sched,
        meta={"val_mae": 7.5},
    )
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model.json", "model.safetensors", "optim.pt", "state.json"]
    # optim.pt holds tensors and numbers only: loadable without unpickling objects
    torch.load(folder / "optim.pt", map_location="cpu", weights_only=True)
    info = json.loads((folder / "model.json").read_text())
    assert info["meta"]["val_mae"] == 7.5 and info["meta"]["stage"] == "stage1"
    assert load_state(folder)["global_step"] == 2

    # the checkpoint is a model folder as it is
    loaded, _ = load_model(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k

    torch.manual_seed(1)  # a different start, so the restore has something to change
    model2 = build_model(cfg)
    opt2 = build_optimizer(model2, optim_cfg, 32)
    sched2 = build_scheduler(opt2, optim_cfg, epochs=2, steps_per_epoch=3)
    got = restore(folder, model2, opt2, sched2)
    assert got == json.loads((folder / "state.json").read_text())
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert sched2.last_epoch == sched.last_epoch == 2
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters() if p in opt.state]
    bufs2 = [opt2.state[p]["momentum_buffer"] for p in model2.parameters() if p in opt2.state]
    assert len(bufs) == len(bufs2) > 0
    assert all(torch.equal(a, b) for a, b in zip(bufs, bufs2))


def test_restore_rejects_other_architectures_and_non_checkpoints(tmp_path: Path) -> None:
    from ageray.model import build_model

    cfg = small_cfg()
    folder = save_checkpoint(
        tmp_path / "c", model=build_model(cfg), cfg=cfg, state={"stage": "stage1", "epoch": 0}
    )
    other = small_cfg()
    other.model.head = "linear"
    other.loss.name = "base"
    with pytest.raises(RuntimeError):
        restore(folder, build_model(other))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"state\.json"):
        load_state(tmp_path / "empty")


def test_unwrap_finds_the_bare_model() -> None:
    net = tiny_net()

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(Wrapper(net))) is net
    assert unwrap(net) is net


# --------------------------------------------------------------------------- fault injection


class _Run:
    fail_at_epoch = -1
    fail_at_step = 1
    fail_rank = 0


class _Killed(Exception):
    pass


def test_fault_injection_fires_once_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_exit(code: int) -> None:
        raise _Killed(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.delenv("AGERAY_FAIL_AT_EPOCH", raising=False)
    monkeypatch.setenv("AGERAY_FAIL_WAIT_S", "0.2")  # no controller here to register anything
    run = _Run()
    kw = dict(storage_path=str(tmp_path), name="r", stage="stage1", cfg_run=run)
    maybe_inject_fault(rank=0, epoch=1, step=1, **kw)  # disabled by default
    run.fail_at_epoch = 1
    maybe_inject_fault(rank=0, epoch=0, step=1, **kw)  # other epoch
    maybe_inject_fault(rank=0, epoch=1, step=0, **kw)  # other step
    maybe_inject_fault(rank=1, epoch=1, step=1, **kw)  # other rank
    assert not fault_marker(str(tmp_path), "r", "stage1").exists()
    with pytest.raises(_Killed):
        maybe_inject_fault(rank=0, epoch=1, step=1, **kw)
    assert fault_marker(str(tmp_path), "r", "stage1").is_file()
    maybe_inject_fault(rank=0, epoch=1, step=1, **kw)  # once: the restarted worker lives

    run.fail_at_epoch = -1
    monkeypatch.setenv("AGERAY_FAIL_AT_EPOCH", "2")  # the environment overrides the config
    with pytest.raises(_Killed):
        maybe_inject_fault(rank=0, epoch=2, step=1, **{**kw, "stage": "stage2"})


def test_fault_waits_for_the_previous_checkpoint_to_be_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault fires once the controller's snapshot holds epoch N-1, not before."""
    import json
    import threading

    fired: list[float] = []

    def fake_exit(code: int) -> None:
        fired.append(time.monotonic())
        raise _Killed(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.delenv("AGERAY_FAIL_AT_EPOCH", raising=False)
    monkeypatch.setenv("AGERAY_FAIL_WAIT_S", "60")
    run = _Run()
    run.fail_at_epoch = 2
    snap = tmp_path / "r" / "stage1" / "checkpoint_manager_snapshot.json"
    snap.parent.mkdir(parents=True)
    snap.write_text(json.dumps({"latest_checkpoint_result": {"metrics": {"epoch": 0.0}}}))
    assert registered_epoch(str(tmp_path), "r", "stage1") == 0
    assert registered_epoch(str(tmp_path), "r", "stage2") is None
    assert registered_epoch("s3://b/p", "r", "stage1") is None

    def register_epoch_1() -> None:
        time.sleep(0.6)
        snap.write_text(json.dumps({"latest_checkpoint_result": {"metrics": {"epoch": 1.0}}}))

    t0 = time.monotonic()
    writer = threading.Thread(target=register_epoch_1)
    writer.start()
    with pytest.raises(_Killed):
        maybe_inject_fault(
            storage_path=str(tmp_path),
            name="r",
            stage="stage1",
            rank=0,
            epoch=2,
            step=1,
            cfg_run=run,
        )
    writer.join()
    assert fired and 0.5 < fired[0] - t0 < 30  # waited for epoch 1, not for the 60 s limit


# --------------------------------------------------------------------------- tracking


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ageray.tracking import ensure_store_folder, resolve_tracking_uri

    cfg = Config()
    cfg.run.storage_path = str(tmp_path / "store")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(cfg)
    assert uri == f"sqlite:///{(tmp_path / 'store').resolve() / 'mlflow.db'}"
    assert not (tmp_path / "store").exists()  # resolving creates nothing ...
    ensure_store_folder(uri)
    assert (tmp_path / "store").is_dir()  # ... the tracker makes the folder when it opens it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(cfg) == "http://env:5000"
    cfg.tracking.uri = "http://config:5000"
    assert resolve_tracking_uri(cfg) == "http://config:5000"
    # S3 storage cannot hold sqlite: the embedded store goes under ./runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    cfg.tracking.uri = None
    cfg.run.storage_path = "s3://bucket/prefix"
    assert resolve_tracking_uri(cfg) == f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}"


def test_check_tracking_fails_fast_on_a_closed_port() -> None:
    from ageray.tracking import TrackingUnavailable, check_tracking

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as err:
        check_tracking(uri, timeout=1.5)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert uri in msg and "not reachable" in msg and "MLFLOW_TRACKING_URI" in msg
    check_tracking("sqlite:////tmp/x.db")  # embedded stores need no server
    check_tracking("file:///tmp/mlruns")


def test_manifest_digest_is_stable_and_content_sensitive() -> None:
    from ageray.tracking import manifest_digest

    a = {"format": "ageray-shards/1", "splits": {"train": {"count": 3, "age_hist": {"1": 3}}}}
    b = {"splits": {"train": {"age_hist": {"1": 3}, "count": 3}}, "format": "ageray-shards/1"}
    assert manifest_digest(a) == manifest_digest(b)
    assert len(manifest_digest(a)) == 16 and int(manifest_digest(a), 16) >= 0
    c = json.loads(json.dumps(a))
    c["splits"]["train"]["count"] = 4
    assert manifest_digest(c) != manifest_digest(a)
    # pinned: the digest is compared across runs and machines, so it must not drift
    assert manifest_digest(a) == "8667f4635c944863"


def test_epoch_logging_is_idempotent(tmp_path: Path) -> None:
    """A re-run epoch (restore from an earlier checkpoint) is not appended twice."""
    from mlflow.tracking import MlflowClient

    from ageray.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(exp).info.run_id

    first = RunLogger(uri, run_id)
    assert first.log_epoch({"val_mae": 9.0}, 0)
    assert first.log_epoch({"val_mae": 8.0}, 1)
    assert not first.log_epoch({"val_mae": 7.5}, 1)  # same worker, same epoch
    second = RunLogger(uri, run_id)  # the restarted worker: reads the history once
    assert not second.log_epoch({"val_mae": 7.0}, 1)
    assert second.log_epoch({"val_mae": 6.0}, 2)
    hist = client.get_metric_history(run_id, "val_mae")
    assert sorted((m.step, m.value) for m in hist) == [(0, 9.0), (1, 8.0), (2, 6.0)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "epoch")) == [0, 1, 2]
    assert not RunLogger(uri, run_id, enabled=False).log_epoch({"x": 1.0}, 3)
    assert not RunLogger(None, run_id).log_epoch({"x": 1.0}, 3)


# --------------------------------------------------------------------------- pipeline


def test_pipeline_refuses_stage2_without_a_stage1_model(tmp_path: Path):
    """Checked before any run is opened or any worker starts (no Ray, no MLflow needed)."""
    from ageray.tracking import Tracker
    from ageray.training.pipeline import PipelineError, run_pipeline

    cfg = Config()
    cfg.run.storage_path = str(tmp_path)
    tracker = Tracker(cfg, enabled=False)
    with pytest.raises(PipelineError, match="--from"):
        run_pipeline(cfg, tracker=tracker, stages=("stage2",))
    with pytest.raises(PipelineError, match="unknown stage"):
        run_pipeline(cfg, tracker=tracker, stages=("stage3",))
