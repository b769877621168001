"""How a serving process stops: signals, then drain, then Serve, then Ray, in that order.

Why: ``serve run`` handles Ctrl-C by calling ``serve.shutdown()``, which kills Serve's HTTP
proxy with requests still in it (see :mod:`ageray.serving.drain`), and it has no SIGTERM
handler at all (the process dies mid-flight, ``Aborted``). Worse, the local Ray it starts
shares its process group, so a signal to the group (a terminal's Ctrl-C, a supervisor's
``kill -TERM -<pgid>``) reaches the raylet and the workers directly and no order of
shutdown is possible any more.

Two ways, one order (:func:`stop_serving`: drain the proxies, ``serve.shutdown()``, then
Ray):

* ``python -m serve.run serve.app:app model_uri=...`` (:func:`main`, THE way to run it):
  a small supervisor that holds the terminal and forwards the first SIGINT/SIGTERM, to
  itself or to its group, to the serving process, which runs in a session of its own with
  the local Ray beneath it, so no signal reaches Ray's processes directly. The serving
  process drains, stops Serve and Ray, and exits 0 within ``--drain-timeout-s`` plus
  Serve's own replica shutdown. A second signal skips the drain.
* plain ``serve run serve.app:app``: the app builder calls :func:`install_stop_handlers`
  before Ray starts, so SIGTERM to ``serve run``'s process behaves as Ctrl-C does, and
  both drain first. Signals to its process group still reach Ray's processes: use the
  first way under a supervisor.

The supervisor's forwarding rule (:class:`Forwarder`) is tested without processes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Forwarder",
    "install_stop_handlers",
    "keep_python_signal_handlers",
    "main",
    "stop_serving",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_DRAIN_TIMEOUT_S = 20.0  # = the deployment's graceful_shutdown_timeout_s


def _say(text: str) -> None:
    print(f"ageray serve: {text}", file=sys.stderr, flush=True)


def stop_serving(drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, *, ray_too: bool = True) -> None:
    """Drain every proxy, then ``serve.shutdown()`` (replicas finish their requests within
    ``graceful_shutdown_timeout_s``), then ``ray.shutdown()`` when ``ray_too``."""
    import ray
    from ray import serve

    from ageray.serving.drain import clear_drain, drain

    if ray.is_initialized():
        try:
            report = drain(drain_timeout_s)
            _say(f"drain: {report.line()}")
        except Exception as exc:  # draining is best effort; the shutdown below still runs
            _say(f"drain failed ({type(exc).__name__}: {exc}); stopping Serve anyway")
        serve.shutdown()
        _say("Serve stopped")
        with contextlib.suppress(Exception):  # a proxy started later ignores it anyway
            clear_drain()
        if ray_too:
            ray.shutdown()


def keep_python_signal_handlers() -> None:
    """Stop ``ray.init`` in THIS process from replacing Python's SIGTERM handling with its
    C++ crash handler (absl's failure signal handler: on SIGTERM it prints a stack and
    aborts, the ``Aborted`` ``serve run`` ends with). Only this driver process is affected;
    Ray's own processes keep their crash handler."""
    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


def install_stop_handlers(drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> bool:
    """For plain ``serve run``: SIGINT and SIGTERM drain, then raise KeyboardInterrupt, so
    ``serve run`` goes on with its own ``serve.shutdown()`` and a clean exit. A second
    signal raises at once. Only from the main thread (else False)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    keep_python_signal_handlers()
    stopping = False

    def handler(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if stopping:
            raise KeyboardInterrupt
        stopping = True
        import ray

        if ray.is_initialized():
            from ageray.serving.drain import drain

            _say(f"{signal.Signals(signum).name}: draining before Serve stops")
            try:
                _say(f"drain: {drain(drain_timeout_s).line()}")
            except Exception as exc:
                _say(f"drain failed ({type(exc).__name__}: {exc})")
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    return True


class Forwarder:
    """The supervisor's rule: the first stop signal becomes SIGTERM to the serving process
    (drain), a second one SIGINT (skip the drain), later ones are ignored; the serving
    process runs in its own session, so signals sent to the supervisor's group never
    reach it twice."""

    def __init__(self, send: Callable[[int], None]) -> None:
        self._send = send
        self.received: list[int] = []

    def __call__(self, signum: int, _frame: Any = None) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            self._send(signal.SIGTERM)
        elif len(self.received) == 2:
            self._send(signal.SIGINT)


# --------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve.run",
        description="Run a Serve application that drains on SIGINT/SIGTERM (README, "
        "Operations). Arguments after the import path are the builder's key=value pairs.",
    )
    p.add_argument("import_path", help="the application builder, e.g. serve.app:app")
    p.add_argument("args", nargs="*", help="key=value arguments for the builder")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--address",
        default=None,
        help="Ray address to join ('local' starts a private Ray; default: as ray.init())",
    )
    p.add_argument(
        "--proxy-location",
        choices=("HeadOnly", "EveryNode", "Disabled"),
        default=None,
        help="where Serve runs its HTTP proxies (default Serve's: EveryNode); HeadOnly on a "
        "cluster whose nodes share one host, where proxies on every node would all bind "
        "--host:--port",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument(
        "--object-store-mb", type=int, default=None, help="object store of a local Ray (MB)"
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="longest wait for in-flight requests on stop (default 20 s)",
    )
    p.add_argument("--serving-process", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = _parser().parse_args(argv)
    if opts.serving_process:
        return _serve(opts)
    return _supervise(argv)


def _supervise(argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "serve.run", "--serving-process", *argv]
    child = subprocess.Popen(cmd, start_new_session=True)
    forward = Forwarder(lambda sig: _signal(child, sig))
    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # pragma: no cover - handlers replace the default
            continue


def _signal(child: subprocess.Popen, sig: int) -> None:
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)


def _serve(opts: argparse.Namespace) -> int:
    """The serving process: builder, Ray, Serve, the app; then wait for a stop signal."""
    sys.path.insert(0, str(Path.cwd()))  # like `serve run --app-dir .`
    stop = threading.Event()
    hurry = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and stop.is_set():
            hurry.set()
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    keep_python_signal_handlers()
    import ray
    from ray._common.utils import import_attr
    from ray.serve._private import api as serve_api

    args = dict(item.split("=", 1) for item in opts.args)
    app = serve_api.call_user_app_builder_with_args_if_necessary(
        import_attr(opts.import_path), args
    )
    for sig in STOP_SIGNALS:  # the builder may have installed its own (plain serve run)
        signal.signal(sig, on_signal)
    init: dict[str, Any] = {"address": opts.address, "include_dashboard": False}
    if opts.num_cpus is not None:
        init["num_cpus"] = opts.num_cpus
    if opts.object_store_mb is not None:
        init["object_store_memory"] = opts.object_store_mb * 1024 * 1024
    ray.init(**init)
    for sig in STOP_SIGNALS:  # in case a Ray version installs its handler regardless
        signal.signal(sig, on_signal)
    from ray import serve

    serve_api.serve_start(
        http_options={"host": opts.host, "port": opts.port}, proxy_location=opts.proxy_location
    )
    serve.run(app, blocking=False)
    _say(f"READY on http://{opts.host}:{opts.port} (pid {os.getpid()})")
    while not stop.wait(0.5):
        pass
    t0 = time.monotonic()
    _say("stopping: drain, then Serve, then Ray")
    stop_serving(0.0 if hurry.is_set() else opts.drain_timeout_s)
    _say(f"stopped in {time.monotonic() - t0:.1f} s")
    return 0
