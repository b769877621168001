"""Every face, per CPU core: the one inference path with face detection against the bare model
forward at the same batch size, in one run.

    python -m benchmarks.faces_speed                                    # the full table
    python -m benchmarks.faces_speed --image-size 64 --seconds 1 --photos 1 4 --video-seconds 2
                                                                        # a check at tiny size

Rows (each measured in its own child process, pinned to one core with one torch thread, so a
row is "per core" and rows do not share caches or threads):

* **chips, faces=largest**: 200x200 UTKFace chips, one answer per image as datasets are
  answered (batch ``--batch-size``);
* **chips, faces=all**: the same chips with the detector run on each (one face each);
* **photo with N faces** (``--photos``, default 1, 4, 16): N chips composed on a plain
  background (a grid, 40 px apart), ``faces=all``: decode once, detect every face, crop each,
  one forward with the N faces as the batch;
* **video**: a clip written here (``--video-faces`` faces drifting on a background, 10 fps)
  read by :func:`ageray.inference.video.read_frames` at ``--fps``, each frame through the path
  in ``faces=all`` and the IoU tracker: frames/s.

Beside each: the bare forward (:meth:`ImagePredictor.forward`: image + flip, both heads, the
routing rule, on already-prepared tensors) at the batch the row's forward ran (the chips'
batch, the photo's faces, the video's faces per frame), in the same child, measured before
and after the row (mean). "vs bare" is the row's faces/s over the bare forward's faces/s: what
decoding, detection and cropping cost.

The model is GLAE's resnet18 with two heads at ``--image-size``, random weights (speed does
not depend on them; detections do not depend on the model); ``--model`` takes a real one. Run
it on an otherwise idle machine (the lead does; the numbers go to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- inputs
def grid_photo(chips: list[bytes], n: int, *, gap: int = 40) -> bytes:
    """``n`` chips (cycled) in a near-square grid on a plain background, as PNG."""
    import io
    import math

    from PIL import Image

    images = [Image.open(io.BytesIO(chips[i % len(chips)])).convert("RGB") for i in range(n)]
    side = images[0].width
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    photo = Image.new(
        "RGB", (gap + cols * (side + gap), gap + rows * (side + gap)), (200, 205, 210)
    )
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        photo.paste(im.resize((side, side)), (gap + c * (side + gap), gap + r * (side + gap)))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    return buf.getvalue()


def write_video(path: Path, chips: list[bytes], *, faces: int, seconds: float) -> None:
    """``faces`` chips drifting on a grey background, 10 fps, 640 px wide (mp4v)."""
    import io
    import math

    import cv2
    import numpy as np
    from PIL import Image

    size, width, height, fps = 120, 640, 360, 10.0
    arrays = [
        np.asarray(
            Image.open(io.BytesIO(chips[i % len(chips)])).convert("RGB").resize((size, size))
        )
        for i in range(faces)
    ]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"this OpenCV cannot write {path} (mp4v)")
    cols = min(faces, 4)
    for f in range(round(seconds * fps)):
        canvas = np.full((height, width, 3), 128, np.uint8)
        for i, face in enumerate(arrays):
            r, c = divmod(i, cols)
            x = int(20 + c * (width - 40) / cols + 10 * math.cos(f / 8 + i))
            y = int(20 + r * (size + 30) + 10 * math.sin(f / 8 + i))
            x, y = min(max(x, 0), width - size), min(max(y, 0), height - size)
            canvas[y : y + size, x : x + size] = face
        writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    writer.release()


# --------------------------------------------------------------------------- one row
def bare_forward(path: Any, images: list[bytes], batch: int, seconds: float) -> float:
    """Faces/s of the forward alone at ``batch`` (prepared chips, one thread)."""
    import torch

    tensors = [path.prepare(d, "bench").tensor for d in images[: max(1, batch)]]
    x = torch.stack([tensors[i % len(tensors)] for i in range(batch)])
    path.forward(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        path.forward(x)
        n += 1
    return batch * n / (time.perf_counter() - t0)


def timed(fn: Any, seconds: float) -> tuple[int, float, Any]:
    """Call ``fn`` until ``seconds`` passed (at least twice, after one warm-up): (calls,
    elapsed s, the last result)."""
    out = fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        out = fn()
        n += 1
    return n, time.perf_counter() - t0, out


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (pinned) process: the path's images/s and faces/s, the bare forward
    at the row's batch before and after."""
    import torch

    from ageray.inference import load_predictor
    from benchmarks.serve_load import load_images

    torch.set_num_threads(1)
    path = load_predictor(spec["model"], threads=1)
    chips, _ = load_images(max(16, spec["batch_size"]))
    kind, secs = spec["kind"], spec["seconds"]
    if kind.startswith("chips"):
        mode = kind.split(":", 1)[1]
        images = [chips[i % len(chips)] for i in range(spec["batch_size"])]

        def run() -> Any:
            return path.predict(images, faces=mode, batch_size=len(images))

        per_call = len(images)
    elif kind.startswith("photo"):
        photo = grid_photo(chips, int(kind.split(":", 1)[1]))
        images = [photo]

        def run() -> Any:
            return path.predict(images, faces="all", batch_size=64)

        per_call = 1
    else:  # video
        from ageray.inference.face_tracks import FaceTracker
        from ageray.inference.video import read_frames

        video = Path(spec["video"])

        def run() -> Any:
            tracker, rows = FaceTracker(), []
            for frame in read_frames(video, fps=spec["fps"]):
                got = path.predict([frame.image], faces="all", batch_size=64)
                faced = [r for r in got if r.get("face_box") is not None]
                tracker.update([r["face_box"] for r in faced], [r["age"] for r in faced])
                rows.append(got)
            return rows

        per_call = 0  # frames: counted from the result
    calls, elapsed, last = timed(run, secs)
    if kind == "video":
        frames = len(last)
        face_rows = sum(1 for rows in last for r in rows if r.get("error") is None)
        images_s = calls * frames / elapsed
        faces_s = calls * face_rows / elapsed
        batch = max(1, round(face_rows / max(1, frames)))
    else:
        answered = sum(1 for r in last if r.get("error") is None)
        images_s = calls * per_call / elapsed
        faces_s = calls * answered / elapsed
        batch = max(1, answered if kind.startswith("photo") else per_call)
    before = bare_forward(path, chips, batch, secs)
    after = bare_forward(path, chips, batch, secs)
    return {
        "kind": kind,
        "images_per_s": images_s,
        "faces_per_s": faces_s,
        "faces_per_image": faces_s / images_s if images_s else 0.0,
        "batch": batch,
        "bare_per_s": (before + after) / 2,
        "bare_before_after": [before, after],
    }


def child(spec: dict[str, Any], core: int) -> dict[str, Any]:
    """``measure(spec)`` in a fresh interpreter pinned to ``core``."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'platform'}"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.faces_speed", "--child", json.dumps(spec)]
    if hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", str(core), *cmd] if _has_taskset() else cmd
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['kind']} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _has_taskset() -> bool:
    import shutil

    return shutil.which("taskset") is not None


# --------------------------------------------------------------------------- table
ROW_NAMES = {
    "chips:largest": "one-face chips, faces=largest",
    "chips:all": "one-face chips, faces=all (detector on each)",
    "video": "video frames (faces=all + tracker)",
}


def table(rows: list[dict[str, Any]], *, video_faces: int, fps: float) -> str:
    lines = [
        "| input | images/s per core | faces/s per core | bare forward faces/s (batch) | vs bare |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        kind = r["kind"]
        n = kind.split(":", 1)[-1]
        name = ROW_NAMES.get(kind) or f"photo with {n} face{'' if n == '1' else 's'}, faces=all"
        if kind == "video":
            name += f", {video_faces} faces, {fps:g} fps sampled"
        unit = " frames/s" if kind == "video" else ""
        lines.append(
            f"| {name} | {r['images_per_s']:.2f}{unit} | {r['faces_per_s']:.1f} "
            f"| {r['bare_per_s']:.1f} ({r['batch']}) "
            f"| {100 * r['faces_per_s'] / max(r['bare_per_s'], 1e-9):.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model folder (default: random GLAE resnet18, two heads)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32, help="chips per call")
    p.add_argument("--photos", type=int, nargs="+", default=[1, 4, 16], help="faces a photo")
    p.add_argument("--video-faces", type=int, default=4)
    p.add_argument("--video-seconds", type=float, default=10.0)
    p.add_argument("--fps", type=float, default=2.0, help="video frames sampled a second")
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    p.add_argument("--core", type=int, default=0, help="the core every child is pinned to")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "platform")]
    if args.child:
        print(json.dumps(measure(json.loads(args.child))), flush=True)
        return 0

    from benchmarks.serve_load import load_images, make_model

    with tempfile.TemporaryDirectory(prefix="ageray-faces-bench-") as tmp:
        work = Path(tmp)
        model = args.model or str(make_model(work / "model", args.image_size))
        chips, what = load_images(16)
        video = work / "clip.mp4"
        write_video(video, chips, faces=args.video_faces, seconds=args.video_seconds)
        common = {"model": model, "seconds": args.seconds, "batch_size": args.batch_size}
        kinds = ["chips:largest", "chips:all", *(f"photo:{n}" for n in args.photos), "video"]
        rows = []
        for kind in kinds:
            spec = {**common, "kind": kind, "video": str(video), "fps": args.fps}
            rows.append(child(spec, args.core))
            print(f"[ageray] measured {kind}", file=sys.stderr, flush=True)
    print(
        f"faces: {what}; model {args.model or f'random GLAE resnet18 at {args.image_size} px'}; "
        f"one process per row pinned to core {args.core}, 1 torch thread; "
        f"{args.seconds:g} s a measurement"
    )
    print(table(rows, video_faces=args.video_faces, fps=args.fps))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
