"""Shared fixtures. Service fixtures are session-scoped: one S3 server (SeaweedFS), one MLflow
server and one local Ray per test session, since each takes seconds to start."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

from services import MlflowServer, S3Server, mlflow_server, seaweed_server  # noqa: E402

SHARED = Path(os.environ.get("AGERAY_SHARED", ROOT.parent / "shared"))
UTKFACE_TAR = SHARED / "data" / "utkface-dev.tar"

# Keep Ray, torch and the DataLoaders inside a 2-core machine's means.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def utkface_tar() -> Path:
    """The real UTKFace tarball from ../shared/data; skips when it is not there."""
    if not UTKFACE_TAR.is_file():
        pytest.skip(
            f"real-data test: {UTKFACE_TAR} is absent (put ../shared/data/utkface-dev.tar "
            "beside the checkout or set AGERAY_SHARED)"
        )
    return UTKFACE_TAR


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) on loopback; its endpoint and test credentials are
    exported to the environment for the whole session, as a user would export them for S3."""
    with seaweed_server(tmp_path_factory.mktemp("seaweed")) as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_srv(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` (sqlite backend) whose artifacts live on the session's S3 server."""
    s3.make_bucket("mlflow")
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), "s3://mlflow/artifacts", s3.env) as srv:
        yield srv


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A fresh local Ray sized for a 2-core machine (never joins a `ray start` cluster)."""
    import ray

    from ageray.training.driver import loopback_only

    loopback_only()  # 127.0.0.1 stays 127.0.0.1: nothing of this Ray leaves loopback
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=True,
        )
    yield
    ray.shutdown()
