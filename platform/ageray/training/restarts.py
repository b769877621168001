"""Say why: what a stage's worker group went through, told where people look.

Why: under a load of ~11 on 2 cores a run lost its worker group to "A worker health check
failed", retried from its epoch-5 checkpoint and told the console only ``resumed at epoch
5``. Every failure of a Train worker group now prints its cause (worker rank, node, error,
retries left) on the job's console and lands in the stage's MLflow run (a tag per restart
and a ``restarts`` metric). Alongside, the first report of each worker group says which
node each rank is on, and every epoch's reports add up the samples the ranks read and
their key checksum (``ageray.data.loader.ReadTally``), logged as ``read_samples`` and
``read_keysum`` so a run on many nodes shows that each sample was read exactly once.

The callback runs in Ray Train's controller actor, not in the driver: its ``print`` reaches
the job's console through Ray's log forwarding (the ``[ageray]`` prefix passes the quiet
console's filter) and it talks to MLflow itself. The rules are plain functions, tested
without Ray.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["failure_line", "node_of", "pick_failure", "stage_watch", "sum_reads", "workers_line"]

_NODE_IP = re.compile(r"node_ip='([^']+)'")


def node_of(error: BaseException | str, known: Mapping[int, str], rank: int) -> str:
    """The failed worker's node: from Ray's worker info in the error (``node_ip='...'``),
    else where that rank last reported from, else ``unknown``."""
    m = _NODE_IP.search(str(error))
    return m.group(1) if m else known.get(rank, "unknown")


_DEATH_WORDS = ("actordied", "health check", "died", "unavailable", "node")


def pick_failure(worker_exceptions: Mapping[int, Any]) -> tuple[int, Any]:
    """The (rank, error) that says why a group failed: when a node dies, the ranks that
    survive fail too (their collective's peer is gone), so a rank whose error says a worker
    died comes first, then the lowest rank."""

    def dead(item: tuple[int, Any]) -> bool:
        text = f"{type(item[1]).__name__} {item[1]}".lower()
        return any(w in text for w in _DEATH_WORDS)

    items = sorted(worker_exceptions.items())
    return next((it for it in items if dead(it)), items[0])


def _first_line(error: BaseException | str, limit: int = 200) -> str:
    text = str(error).strip()
    name = type(error).__name__ if isinstance(error, BaseException) else "error"
    head = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{name}: {head[:limit]}" if head else name


def failure_line(
    *, stage: str, failure: int, max_failures: int, rank: int, node: str, error: Any
) -> str:
    """The console line for the ``failure``-th failure of a stage's worker group: who
    failed where and why, and what happens next (``max_failures`` -1: no limit)."""
    if max_failures < 0:
        then = "unlimited retries left; resuming from the latest checkpoint"
    elif failure <= max_failures:
        n = max_failures - failure
        then = f"{n} retr{'y' if n == 1 else 'ies'} left; resuming from the latest checkpoint"
    else:
        then = "no retries left: the stage fails"
    return (
        f"[ageray] {stage}: worker group failure {failure} "
        f"(train.max_failures={max_failures}): rank {rank} on node {node}: "
        f"{_first_line(error)}; {then}"
    )


def workers_line(stage: str, nodes: Mapping[int, str]) -> str:
    """Which node each rank of a starting worker group is on."""
    where = " ".join(f"{r}@{ip}" for r, ip in sorted(nodes.items()))
    distinct = len(set(nodes.values()))
    return f"[ageray] {stage}: {len(nodes)} workers on {distinct} node(s): {where}"


def sum_reads(metrics: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
    """(samples, key checksum) summed over the ranks' reports; None if a rank said nothing."""
    try:
        return (
            sum(int(m["read_samples"]) for m in metrics),
            sum(int(m["read_keysum"]) for m in metrics),
        )
    except (KeyError, TypeError, ValueError):
        return None


def stage_watch(
    *, stage: str, max_failures: int, tracking_uri: str | None, mlflow_run_id: str | None
):
    """A Ray Train ``UserCallback`` that tells the console and the MLflow run (when given)
    about each worker-group failure, the ranks' nodes and each epoch's reads."""
    from ray.train import UserCallback

    class StageWatch(UserCallback):
        def __init__(self) -> None:
            self.failures = 0
            self.nodes: dict[int, str] = {}
            self.announced = False

        def _mlflow(self):
            if not (tracking_uri and mlflow_run_id):
                return None
            import mlflow

            return mlflow.MlflowClient(tracking_uri)

        def _log(self, fn: str, *args: Any, **kw: Any) -> None:
            client = self._mlflow()
            if client is None:
                return
            try:
                getattr(client, fn)(mlflow_run_id, *args, **kw)
            except Exception as exc:  # the run goes on without this one record
                print(f"[ageray] {stage}: could not record {args[0]!r} in MLflow: {exc}")

        def after_report(self, run_context, metrics, checkpoint) -> None:
            del run_context, checkpoint
            nodes = {i: str(m.get("node_ip", "unknown")) for i, m in enumerate(metrics)}
            if not self.announced or nodes != self.nodes:
                self.nodes, self.announced = nodes, True
                print(workers_line(stage, nodes), flush=True)
                self._log("set_tag", "ageray.worker_nodes", json.dumps(nodes))
            reads = sum_reads(metrics)
            epoch = int(metrics[0].get("epoch", 0)) if metrics else 0
            if reads is not None:
                self._log("log_metric", "read_samples", float(reads[0]), step=epoch)
                self._log("log_metric", "read_keysum", float(reads[1]), step=epoch)

        def after_exception(self, run_context, worker_exceptions) -> None:
            del run_context
            if worker_exceptions:
                rank, error = pick_failure(worker_exceptions)
                self.failures += 1
                node = node_of(error, self.nodes, rank)
                line = failure_line(
                    stage=stage,
                    failure=self.failures,
                    max_failures=max_failures,
                    rank=rank,
                    node=node,
                    error=error,
                )
                print(line, flush=True)
                self._log("set_tag", f"ageray.restart.{self.failures}", line[:4900])
                self._log("log_metric", "restarts", float(self.failures), step=self.failures)
                self.announced = False  # the next group says where its ranks are

    return StageWatch()
