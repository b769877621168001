"""The application builder of the canary test (tests/integration/test_canary.py), for
``tests/serve_driver.py``: ``serve.app:app`` as ``serve run`` calls it (the builder's own
redaction and edge guard, in the ``serve run`` process), then the same deployment with a
``user_config`` whose ``model_uri`` carries the secret: the replica starts on the good
model, Serve applies the user_config (``reconfigure``), that swap fails and ``/v1/model``
reports it in ``swap_error``.

    python tests/serve_driver.py <port> tests.canary_app:app model_uri=<folder> swap_uri=<uri>
"""

from __future__ import annotations

from ray.serve import Application

from serve.app import AppArgs, build_app
from serve.app import app as serve_app


def app(args: dict[str, str]) -> Application:
    serve_app(AppArgs(model_uri=args["model_uri"], device="cpu"))  # serve run's side effects
    user_config = {
        "device": "cpu",
        "torch_threads": 1,
        "warmup_batch_sizes": [1],
        "model_uri": args["swap_uri"],
    }
    return build_app(args["model_uri"], {"device": "cpu"}, user_config=user_config)
