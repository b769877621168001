"""MLflow tracking and the model registry, as the jobs use them.

Rules this module keeps:

* **Where**: ``tracking.uri`` from the config, else ``MLFLOW_TRACKING_URI``, else an embedded
  sqlite store under the run's storage folder (nothing to start). A remote server that does
  not answer fails the job at start (:func:`check_tracking`), not hours later.
* **Who**: only the driver and rank 0 talk to MLflow. The driver opens one parent run per
  pipeline and a child run per stage and hands the child's run id to the workers; rank 0
  logs per-epoch metrics to that id with a plain ``MlflowClient`` (:class:`RunLogger`).
* **Resume**: runs are found again by tags (``ageray.pipeline``, ``ageray.stage``): a
  resubmitted run continues the same MLflow runs (the run id is in each checkpoint too).
* **Models**: a model is a folder (``model.safetensors`` + ``model.json``) logged with a pyfunc
  wrapper written as *code* (MLflow "models from code"), so loading it never unpickles an
  object; it is registered under the configured name with an alias (``candidate``).
* **Secrets**: whatever goes out (params, tags, artifacts, messages) is ``redact``-ed first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ageray.config import Config, dump_yaml, flatten, to_dict
from ageray.redaction import http_request, redact, redact_data, redacted_path

log = logging.getLogger(__name__)

__all__ = [
    "FoundRun",
    "RunLogger",
    "Tracker",
    "TrackingUnavailable",
    "check_tracking",
    "ensure_store_folder",
    "git_commit",
    "log_model",
    "manifest_digest",
    "model_info",
    "package_versions",
    "registry_files",
    "resolve_tracking_uri",
]

PYFUNC_CODE = Path(__file__).parent / "registry" / "pyfunc_model.py"
TAG_PIPELINE = "ageray.pipeline"
TAG_STAGE = "ageray.stage"
_PACKAGES = ("ageray", "torch", "torchvision", "timm", "ray", "mlflow", "webdataset", "boto3")


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached or used."""


def resolve_tracking_uri(cfg: Config) -> str:
    """Config, then ``MLFLOW_TRACKING_URI``, then ``sqlite:///<storage>/mlflow.db``.

    A storage path on S3 cannot hold a sqlite file; then the embedded store goes under
    ``./runs``. Creates nothing: a job that resolves the URI but tracks nothing
    (``--no-tracking``) must not leave an empty ``runs/`` in its working folder
    (:func:`ensure_store_folder` makes the folder when a tracker opens the store).
    """
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    storage = cfg.run.storage_path
    base = Path(storage) if "://" not in storage else Path("runs")
    return f"sqlite:///{base.resolve() / 'mlflow.db'}"


def ensure_store_folder(uri: str) -> None:
    """The folder of an embedded sqlite store, created before MLflow opens it (sqlite
    creates the file, not its folders)."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def _local_artifact_root(uri: str) -> str | None:
    """Artifact root for an embedded sqlite store: next to the database file."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


def check_tracking(uri: str, timeout: float = 10.0) -> None:
    """Fail fast with a clear message when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    request = http_request(uri.rstrip("/") + "/health")  # user:password as a header
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=min(5.0, timeout)) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = exc
            if exc.code in (401, 403):  # behind auth: reachable; the client has credentials
                return
        except Exception as exc:  # connection refused, DNS, timeout
            last = exc
        time.sleep(0.5)
    raise TrackingUnavailable(
        f"MLflow tracking server {redact(f'{uri} is not reachable ({last})')}. Start it "
        "(mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000), "
        "fix tracking.uri / MLFLOW_TRACKING_URI, or unset both to use the embedded local store."
    )


def git_commit(root: str | Path | None = None) -> str:
    """The checkout's commit (``-dirty`` when modified), or 'unknown' outside git."""
    cwd = Path(root) if root else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """A stable digest of a dataset manifest (sorted JSON, sha256, first 16 hex)."""
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class RunLogger:
    """Metric logging into one existing run, for rank 0 of a Ray Train worker group.

    Constructed from plain strings (picklable into ``train_loop_config``); every other rank
    gets ``enabled=False`` and all calls are no-ops. Failures to log never kill training:
    the checkpoint, not MLflow, is the source of truth.

    **A tracking server that restarts loses no metric.** Each ``log_batch`` goes through
    MLflow's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, exponential
    backoff: about two minutes against a server that refuses connections), so a restart
    shorter than that only pauses rank 0. Metrics that still fail are *held*, in order and
    with their original step and timestamp, and sent ahead of the next call's (at most
    ``MAX_HELD`` of them; beyond that the oldest are dropped, with a warning saying how
    many). :meth:`flush` sends what is held (call it when a stage ends).
    """

    MAX_HELD = 100_000  # metrics; a ~30-key epoch is 30, so this is thousands of epochs

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool = True) -> None:
        self.uri = uri
        self.run_id = run_id
        self.enabled = bool(enabled and uri and run_id)
        self._client = None
        self._held: list[Any] = []  # mlflow.entities.Metric, oldest first
        self._dropped = 0
        self._failing = False  # between the first failure and the next success
        self._logged_epochs: set[int] | None = None

    def _c(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    @property
    def held(self) -> int:
        """How many metrics are waiting for the tracking server."""
        return len(self._held)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._held += [
            Metric(k, float(v), now, int(step))
            for k, v in metrics.items()
            if isinstance(v, int | float) and v == v  # drop NaN
        ]
        if len(self._held) > self.MAX_HELD:
            over = len(self._held) - self.MAX_HELD
            self._dropped += over
            del self._held[:over]
            log.warning("MLflow unreachable: dropped the %d oldest held metrics", over)
        self.flush()

    def flush(self) -> bool:
        """Send the held metrics in order, 500 a batch; True when none is left held."""
        if not self.enabled:
            return True
        try:
            while self._held:
                self._c().log_batch(self.run_id, metrics=self._held[:500])
                del self._held[:500]
        except Exception as exc:  # network blips must not kill training
            if not self._failing:
                log.warning(
                    "MLflow metric logging failed; holding %d metrics for the next call: %s",
                    len(self._held),
                    redact(f"{self.uri}: {exc}"),
                )
                self._failing = True
            return False
        if self._failing:
            log.warning("MLflow answers again (%s): held metrics sent", redact(str(self.uri)))
            self._failing = False
        return True

    def logged_steps(self, key: str = "epoch") -> set[int]:
        """Steps at which ``key`` is already in the run's metric history (empty if unknown)."""
        if not self.enabled:
            return set()
        try:
            return {int(m.step) for m in self._c().get_metric_history(self.run_id, key)}
        except Exception as exc:  # an unreadable history must not kill training either
            log.warning("MLflow history of %s in run %s unreadable: %s", key, self.run_id, exc)
            return set()

    def log_epoch(self, metrics: Mapping[str, float], epoch: int) -> bool:
        """Log one epoch's metrics at ``step=epoch`` unless that epoch is already logged.

        Why: Ray Train restarts a failed worker group from the last checkpoint the controller
        *registered*, and a report can reach storage without being registered (a worker dies
        between ``ray.train.report`` returning and the controller's next poll), so the same
        epoch may be trained and reported twice. MLflow appends metric history and cannot
        overwrite a step, so the first record of an epoch wins and the history holds every
        epoch exactly once. The run's ``epoch`` history is read once, on the first call that
        reaches the server. Returns whether anything was logged (or held).
        """
        if not self.enabled:
            return False
        if self._logged_epochs is None and self.flush():  # unknown while MLflow is away
            try:
                history = self._c().get_metric_history(self.run_id, "epoch")
                self._logged_epochs = {int(m.step) for m in history}
            except Exception as exc:  # read again at the next epoch
                log.warning("MLflow history of run %s unreadable: %s", self.run_id, exc)
        if self._logged_epochs is not None and int(epoch) in self._logged_epochs:
            log.info("epoch %d is already in MLflow run %s; not logged again", epoch, self.run_id)
            return False
        self.log_metrics({**metrics, "epoch": float(epoch)}, step=int(epoch))
        if self._logged_epochs is not None:
            self._logged_epochs.add(int(epoch))
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._c().log_artifact(self.run_id, str(path), artifact_path)


@dataclass(frozen=True)
class FoundRun:
    """A run found by its tags: its id, status and tags (plain data, no MLflow types)."""

    run_id: str
    status: str
    tags: dict[str, str]


@dataclass
class Tracker:
    """Driver-side MLflow: experiment, parent pipeline run, child stage runs, registry.

    ``enabled=False`` turns every call into a no-op, so jobs need no ``if`` around it.
    """

    cfg: Config
    enabled: bool = True

    def __post_init__(self) -> None:
        self.uri = resolve_tracking_uri(self.cfg)
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        if not self.enabled:
            return
        check_tracking(self.uri)
        ensure_store_folder(self.uri)
        if redact(self.uri) != self.uri:  # MLflow prints run links with the URI as given
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = _client(self.uri)
        try:
            exp = self.client.get_experiment_by_name(self.cfg.tracking.experiment)
            if exp is None:
                root = _local_artifact_root(self.uri)
                location = (
                    str(Path(root) / self.cfg.tracking.experiment) if root is not None else None
                )
                self.experiment_id = self.client.create_experiment(
                    self.cfg.tracking.experiment, artifact_location=location
                )
            else:
                self.experiment_id = exp.experiment_id
        except Exception as exc:
            raise TrackingUnavailable(
                f"MLflow at {redact(self.uri)} refused the experiment "
                f"{self.cfg.tracking.experiment!r}: {redact(str(exc))}"
            ) from exc

    # --------------------------------------------------------------- runs
    def find_run(self, tags: Mapping[str, str]) -> FoundRun | None:
        """The newest run of this experiment that carries every one of ``tags`` (None when
        there is none or tracking is off): how a resumed job finds its runs again."""
        if not self.enabled:
            return None
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs(
            [self.experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"]
        )
        if not runs:
            return None
        run = runs[0]
        return FoundRun(run.info.run_id, run.info.status, dict(run.data.tags))

    def _find(self, tags: Mapping[str, str]) -> str | None:
        found = self.find_run(tags)
        return found.run_id if found else None

    def open_tagged_run(
        self,
        tags: Mapping[str, str],
        *,
        run_name: str,
        stage: str,
        parent_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        attempts_tag: str | None = None,
    ) -> str | None:
        """The one run that ``tags`` name (a Tune trial: its search and trial id), found
        again or created.

        Found (a retried or resumed attempt): its status goes back to RUNNING and
        ``attempts_tag`` counts the attempt. Created: ``tags`` plus this pipeline's and
        ``stage``'s tags, under ``parent_id``, with the config and ``params`` logged. So
        every attempt of the same thing writes into one run.
        """
        if not self.enabled:
            return None
        found = self.find_run(tags)
        if found is not None:
            self.client.update_run(found.run_id, status="RUNNING")
            if attempts_tag:
                attempts = int(found.tags.get(attempts_tag, "1")) + 1
                self.set_tags(found.run_id, {attempts_tag: attempts})
            return found.run_id
        all_tags = {**tags, TAG_PIPELINE: self.cfg.run.name, TAG_STAGE: stage}
        if attempts_tag:
            all_tags[attempts_tag] = "1"
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
        self.log_config(run_id, extra=dict(params or {}))
        return run_id

    def start_pipeline(self, kind: str = "train", resume: bool = True) -> str | None:
        """The parent run for this pipeline (found again by run name when resuming)."""
        if not self.enabled:
            return None
        name = self.cfg.run.name
        tags = {TAG_PIPELINE: name, TAG_STAGE: "pipeline", "ageray.kind": kind}
        run_id = self._find(tags) if resume else None
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{name}",
                tags={**tags, "mlflow.source.git.commit": git_commit()},
            )
            run_id = run.info.run_id
            self.log_config(run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.parent_id = run_id
        return run_id

    def start_stage(self, stage: str, resume: bool = True) -> str | None:
        """A child run for one stage (``pretrain``, ``stage1``, ``stage2``, ``evaluate``).

        Resuming looks among the children of *this* parent run only, so a pipeline started
        afresh (``start_pipeline(resume=False)``) never picks up a stage run of an older one.
        """
        if not self.enabled:
            return None
        if self.parent_id is None:
            self.start_pipeline()
        tags = {TAG_PIPELINE: self.cfg.run.name, TAG_STAGE: stage}
        scope = {**tags, "mlflow.parentRunId": str(self.parent_id)}
        run_id = self._find(scope) if resume else None
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{self.cfg.run.name}/{stage}",
                tags={**tags, "mlflow.parentRunId": self.parent_id},
            )
            run_id = run.info.run_id
            self.log_config(run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id:
            self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def stage(self, stage: str, resume: bool = True) -> Iterator[str | None]:
        """``with tracker.stage("stage1") as run_id:`` ends the run FAILED on error."""
        run_id = self.start_stage(stage, resume=resume)
        try:
            yield run_id
        except BaseException:
            self.end(run_id, "FAILED")
            raise
        self.end(run_id, "FINISHED")

    # --------------------------------------------------------------- logging
    def log_config(self, run_id: str, extra: Mapping[str, Any] | None = None) -> None:
        """Params: the whole resolved config flattened, plus git commit and versions."""
        from mlflow.entities import Param

        params = flatten(to_dict(self.cfg))
        params["git.commit"] = git_commit()
        params.update({f"version.{k}": v for k, v in package_versions().items()})
        params.update(extra or {})
        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])
        self.client.log_text(run_id, redact(dump_yaml(self.cfg)), "config/resolved.yaml")

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        if not (self.enabled and run_id):
            return
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [
            Param(k, redact(str(v))[:6000])
            for k, v in params.items()
            if k not in existing  # MLflow params are immutable; resumed runs re-log
        ]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        RunLogger(self.uri, run_id, self.enabled).log_metrics(metrics, step)

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        if self.enabled and run_id:
            for k, v in tags.items():
                self.client.set_tag(run_id, k, redact(str(v)))

    def delete_tags(self, run_id: str | None, keys: Iterable[str]) -> None:
        """Remove tags that no longer hold (a stale error after a successful retry)."""
        if self.enabled and run_id:
            for key in keys:
                self.client.delete_tag(run_id, key)

    def logged_steps(self, run_id: str | None, key: str = "epoch") -> set[int]:
        """Steps at which ``key`` is in the run's metric history (what not to log again)."""
        return RunLogger(self.uri, run_id, self.enabled).logged_steps(key)

    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None):
        if not (self.enabled and run_id):
            return
        with redacted_path(path) as p:  # the local files keep what they hold
            if p.is_dir():
                self.client.log_artifacts(run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(run_id, str(p), artifact_path)

    def log_dict(self, run_id: str | None, data: Mapping[str, Any], artifact_file: str) -> None:
        if self.enabled and run_id:
            self.client.log_dict(run_id, redact_data(dict(data)), artifact_file)

    def log_manifest(self, run_id: str | None, manifest: Mapping[str, Any], name: str) -> str:
        """Log a dataset manifest and its digest param; returns the digest."""
        digest = manifest_digest(manifest)
        self.log_params(run_id, {f"data.{name}.manifest_digest": digest})
        self.log_dict(run_id, manifest, f"manifests/{name}.json")
        return digest

    def run_url(self, run_id: str | None) -> str:
        if not run_id:
            return "(tracking disabled)"
        if self.uri.startswith("http"):
            return f"{redact(self.uri)}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"{redact(self.uri)} run {run_id}"


# --------------------------------------------------------------------------- models


def _pyfunc_signature() -> Any:
    """The pyfunc's params (MLflow drops params a model was not logged with); no input schema:
    the wrapper takes encoded images or an (N, 3, S, S) array and checks them itself."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    specs = [
        ("faces", "string", "largest"),
        ("rule", "string", ""),
        ("distribution", "boolean", False),
    ]
    return ModelSignature(params=ParamSchema([ParamSpec(*spec) for spec in specs]))


def log_model(
    tracker: Tracker,
    run_id: str,
    model_dir: str | Path,
    metrics: Mapping[str, float] | None = None,
    register: bool | None = None,
) -> dict[str, Any]:
    """Log a saved model folder as a pyfunc (models-from-code) and register it.

    Only the model's own files are logged (:func:`registry_files`: ``model.safetensors``,
    ``model.json`` and an ONNX export made for these weights), never a checkpoint's
    ``optim.pt`` / ``state.json``: the registry holds no pickle-format file.

    Returns ``{"model_uri", "name", "version", "alias"}`` (version/alias None when
    registration is off).
    """
    import shutil

    import mlflow

    cfg = tracker.cfg
    if register is None:
        register = cfg.tracking.register
    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir} holds no model.safetensors; save_model() first")
    staging = Path(tempfile.mkdtemp(prefix="ageray-register-"))
    try:
        with mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={"model": str(registry_files(model_dir, staging / "model"))},
                pip_requirements=[
                    f"{k}=={v}" for k, v in package_versions().items() if v != "absent"
                ],
                metadata={"ageray_format": "ageray-model/1"},
                signature=_pyfunc_signature(),
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out: dict[str, Any] = {
        "model_uri": info.model_uri,
        "name": None,
        "version": None,
        "alias": None,
    }
    if register:
        name = cfg.tracking.registered_model
        with _quiet_stderr():  # MLflow prints "Successfully registered", "Created version"
            mv = mlflow.register_model(info.model_uri, name)
        client = tracker.client
        for k, v in (metrics or {}).items():
            client.set_model_version_tag(name, mv.version, f"metric.{k}", f"{float(v):.6g}")
        client.set_model_version_tag(name, mv.version, "run_id", run_id)
        client.set_model_version_tag(name, mv.version, TAG_PIPELINE, cfg.run.name)
        client.set_registered_model_alias(name, cfg.tracking.alias, mv.version)
        out.update(name=name, version=str(mv.version), alias=cfg.tracking.alias)
    return out


#: What a registered model folder may hold: the weights, their description, and exports
#: in formats without pickle (ONNX is protobuf). Checkpoint files (optim.pt: pickle-format;
#: state.json: training progress) stay in the run's checkpoints.
REGISTRY_FILES = ("model.safetensors", "model.json")
REGISTRY_EXPORTS = ("export/onnx/model.onnx", "export/onnx/export.json")


def registry_files(model_dir: str | Path, dst: str | Path) -> Path:
    """Copy the files a registered model holds (:data:`REGISTRY_FILES`, and
    :data:`REGISTRY_EXPORTS` when present) from a model or checkpoint folder into ``dst``
    (created); returns ``dst``. Why a copy: a checkpoint folder also holds ``optim.pt``
    (pickle-format optimiser state) and ``state.json``, which must not reach the registry."""
    import shutil

    src, out = Path(model_dir), Path(dst)
    for rel in REGISTRY_FILES + REGISTRY_EXPORTS:
        if (src / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, out / rel)
    return out


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence what MLflow ``print``s to stderr (not through logging) for one call, unless
    ``AGERAY_VERBOSE``: the job prints its own line about the same event."""
    if os.environ.get("AGERAY_VERBOSE", "").lower() not in ("", "0", "false", "no"):
        yield
        return
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        yield


def model_info(uri: str) -> dict[str, Any]:
    """Registry facts for a ``models:/`` URI: name, version, alias, run id, metrics tags."""
    if not uri.startswith("models:/"):
        return {"uri": uri}
    import mlflow

    client = _client(mlflow.get_tracking_uri())
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, version = ref.partition("/")
        alias = None
        mv = client.get_model_version(name, version) if version else None
        if mv is None:
            versions = client.search_model_versions(f"name='{name}'")
            mv = max(versions, key=lambda v: int(v.version))
    tags = dict(mv.tags or {})
    return {
        "uri": uri,
        "name": name,
        "version": str(mv.version),
        "alias": alias,
        "aliases": list(getattr(mv, "aliases", []) or []),
        "run_id": mv.run_id or tags.get("run_id"),
        "metrics": {
            k[len("metric.") :]: float(v) for k, v in tags.items() if k.startswith("metric.")
        },
    }


def logged_model_uri(tracker: Tracker, run_id: str) -> str:
    """The URI of the model logged by MLflow run ``run_id`` (newest first)."""
    client = tracker.client
    models = client.search_logged_models(
        experiment_ids=[tracker.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    if not models:
        raise FileNotFoundError(f"MLflow run {run_id} logged no model; pass a models:/ URI")
    newest = max(models, key=lambda m: m.creation_timestamp)
    return f"models:/{newest.model_id}"
