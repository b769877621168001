"""ageray's eval preprocessing in numpy + Pillow only, for the peer servers whose venvs have
no torch (LitServe, BentoML): the same steps as ``ImagePredictor.prepare`` for a model
trained without alignment (``ageray.data.transforms.decode_image`` with the JPEG draft at the
input size, EXIF orientation, RGB; ``_ResizeSquare``: bilinear, ``reducing_gap=None``;
``ToNormalizedTensor``: ``(x - 255 mean) / (255 std)`` in float32). The benchmark checks the
answers against ageray's own path (1e-4) before it times anything."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

NORMALIZE: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "glae": ((127.5 / 255,) * 3, (128 / 255,) * 3),
}


class Preprocess:
    """JPEG/PNG bytes -> (3, S, S) float32, as ageray prepares an unaligned model's input."""

    def __init__(self, image_size: int, normalize: str) -> None:
        self.size = int(image_size)
        mean, std = NORMALIZE[normalize]
        # as torch.tensor(mean).mul(255.0): float32 first, then the float32 product
        self.mean = (np.array(mean, dtype=np.float32) * np.float32(255.0)).reshape(3, 1, 1)
        self.std = (np.array(std, dtype=np.float32) * np.float32(255.0)).reshape(3, 1, 1)

    @classmethod
    def from_export(cls, onnx_path: str | Path) -> Preprocess:
        """From the ``export.json`` beside ``model.onnx`` (its ``input`` spec)."""
        spec = json.loads((Path(onnx_path).parent / "export.json").read_text())["input"]
        if spec.get("align"):
            raise ValueError("aligned models need ageray's face aligner; not replicated here")
        return cls(spec["image_size"], spec["normalize"])

    def __call__(self, data: bytes) -> np.ndarray:
        img: Any = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (self.size, self.size))
        img.load()
        orientation = img.getexif().get(0x0112, 1) if "exif" in img.info else 1
        if orientation not in (1, None):
            img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, reducing_gap=None)
        chw = np.array(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
        return np.ascontiguousarray((chw - self.mean) / self.std)


def onnx_session(onnx_path: str | Path, threads: int) -> Any:
    """The session as ageray's OnnxBackend builds it (CPU, ``threads`` intra-op, 1 inter-op)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
