"""The minimal peer: uvicorn + a plain ASGI app + ONNX Runtime, in the project's venv.

    python benchmarks/peers/asgi_onnx.py --model-dir DIR --port P [--max-batch 32]

``POST /predict`` with a raw image body answers ``{"age": ..., "head": ...}`` (the row of
ageray's answer code). Preprocessing is ageray's own ``ImagePredictor.prepare`` and the
forward its ``OnnxBackend`` over the exported graph (``load_predictor(backend="onnxruntime",
threads=N)``). ``--max-batch 1``: each request is decoded and forwarded in one worker
thread. ``--max-batch N > 1``: its own micro-batching: decoding in one thread, tensors on an
asyncio queue, a batcher that takes what is waiting (up to N, waiting at most ``--wait-ms``
after the first) and runs the batch in one forward thread while the next one fills.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Scope = dict[str, Any]


def build_app(model_dir: str, threads: int, max_batch: int, wait_ms: float) -> Any:
    import torch

    from ageray.inference import load_predictor

    predictor = load_predictor(model_dir, backend="onnxruntime", threads=threads)
    decode_pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
    forward_pool = ThreadPoolExecutor(1, thread_name_prefix="forward")
    queue: asyncio.Queue[tuple[Any, asyncio.Future]] = asyncio.Queue()
    state: dict[str, Any] = {}

    def answer(tensors: list[Any]) -> list[dict[str, Any]]:
        outputs = predictor.forward(torch.stack(tensors))
        return [{"age": r["age"], "head": r["head"]} for r in predictor.rows(outputs)]

    def one(data: bytes) -> dict[str, Any]:
        return answer([predictor.prepare(data).tensor])[0]

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await queue.get()]
            deadline = loop.time() + wait_ms / 1000.0
            while len(items) < max_batch:
                left = deadline - loop.time()
                if left <= 0 and queue.empty():
                    break
                try:
                    items.append(
                        queue.get_nowait()
                        if left <= 0
                        else await asyncio.wait_for(queue.get(), left)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
            try:
                rows = await loop.run_in_executor(forward_pool, answer, [t for t, _ in items])
                for (_, fut), row in zip(items, rows):
                    if not fut.done():
                        fut.set_result(row)
            except Exception as exc:  # every waiting request gets the error
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)

    async def predict(data: bytes) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if max_batch <= 1:
            return await loop.run_in_executor(forward_pool, one, data)
        if "task" not in state:
            state["task"] = asyncio.create_task(batcher())
        prepared = await loop.run_in_executor(decode_pool, predictor.prepare, data)
        fut: asyncio.Future = loop.create_future()
        await queue.put((prepared.tensor, fut))
        return await fut

    async def send_json(send: Any, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await send_json(send, 200, {"ok": True})
            return
        if scope["path"] != "/predict" or scope["method"] != "POST":
            await send_json(send, 404, {"error": "POST /predict"})
            return
        chunks: list[bytes] = []
        more = True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        try:
            doc = await predict(b"".join(chunks))
        except Exception as exc:  # a bad image is a 400, never a crash
            await send_json(send, 400, {"error": f"{type(exc).__name__}: {exc}"})
            return
        await send_json(send, 200, doc)

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--wait-ms", type=float, default=2.0)
    args = ap.parse_args()
    import uvicorn

    app = build_app(args.model_dir, args.threads, args.max_batch, args.wait_ms)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
