"""The LitServe peer: ONNX Runtime behind LitServe's own batching, in its own venv.

    /work/peers-venv/litserve/bin/python benchmarks/peers/litserve_onnx.py \
        --onnx DIR/export/onnx/model.onnx --port P [--max-batch 32 --batch-timeout 0.002]

``POST /predict`` with a raw image body answers ``{"age": ...}``. One inference worker
(``workers_per_device=1`` on the CPU), one API server process; LitServe reads the body in
the API server, decodes in the worker (``decode_request``), batches up to ``--max-batch``
waiting at most ``--batch-timeout`` s, and runs the exported graph with the given intra-op
threads. Preprocessing: benchmarks/peers/preprocess.py (ageray's, in numpy).
No ``from __future__ import annotations`` here: LitServe reads ``decode_request``'s
annotation as a type (a FastAPI dependency that hands over the raw body)."""

import argparse
import os
from typing import Annotated, Any

import litserve as ls
import numpy as np
from fastapi import Depends, Request
from preprocess import Preprocess, onnx_session


async def raw_body(request: Request) -> bytes:
    return await request.body()


class AgeAPI(ls.LitAPI):
    def setup(self, device: Any) -> None:
        path = os.environ["AGERAY_PEER_ONNX"]
        self.pre = Preprocess.from_export(path)
        self.session = onnx_session(path, int(os.environ.get("AGERAY_PEER_THREADS", "1")))
        self.input_name = self.session.get_inputs()[0].name
        self.names = [o.name for o in self.session.get_outputs()]

    def decode_request(self, request: Annotated[bytes, Depends(raw_body)]) -> np.ndarray:
        return self.pre(request)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:  # max_batch_size 1: no batch() call
            x = x[None]
        outs = self.session.run(None, {self.input_name: x})
        return outs[self.names.index("age")]

    def unbatch(self, output: np.ndarray) -> list[float]:
        return [float(v) for v in output]

    def encode_response(self, output: Any) -> dict[str, float]:
        value = output if np.isscalar(output) else np.asarray(output).reshape(-1)[0]
        return {"age": float(value)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-timeout", type=float, default=0.002)
    args = ap.parse_args()
    os.environ["AGERAY_PEER_ONNX"] = args.onnx
    os.environ["AGERAY_PEER_THREADS"] = str(args.threads)
    api = AgeAPI(max_batch_size=args.max_batch, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
