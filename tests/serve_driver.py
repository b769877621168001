"""``serve run <import_path> key=value ...`` on a chosen port, for tests.

Does what the ``serve run`` CLI does, in its order: import the application builder and call
it with the arguments, then start a local Ray, then Serve, then run the application and
keep serving. The one difference is the HTTP port (the CLI always takes 8000, which a test
must not assume is free) and that the local Ray is sized for a small machine.

    python tests/serve_driver.py <port> serve.app:app model_uri=/path/to/model device=cpu

Prints ``SESSION_DIR <path>`` (Ray's logs are under it) and ``READY`` once the application
answers.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    port, import_path, *rest = argv
    sys.path.insert(0, str(Path.cwd()))  # `serve run --app-dir .`
    import ray
    from ray._common.utils import import_attr
    from ray.serve._private import api as serve_api

    args = dict(item.split("=", 1) for item in rest)
    # 1. the builder runs before Ray starts, exactly as under `serve run`
    app = serve_api.call_user_app_builder_with_args_if_necessary(import_attr(import_path), args)
    # 2. a fresh local Ray inherits this process's environment
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
    )
    node = ray._private.worker.global_worker.node
    print("SESSION_DIR", node.get_session_dir_path(), flush=True)
    # 3. Serve with default HTTP options except the port; 4. the application
    serve_api.serve_start(http_options={"host": "127.0.0.1", "port": int(port)})
    from ray import serve

    serve.run(app, blocking=False)
    print("READY", flush=True)
    # SIGTERM ends like Ctrl-C: Serve and the local Ray this process started go down too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(10)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
