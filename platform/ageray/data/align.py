"""Face detection and 5-point alignment, shared by shard writing and serving.

Why: the papers align every face with five landmarks (eyes, nose tip, mouth corners; MTCNN,
GLAE ref. [57]) before cropping. A model trained on aligned crops and served on unaligned
ones (or aligned differently) loses accuracy quietly, so the *same* :class:`FaceAligner`
runs in ``jobs.make_shards`` (training crops) and in the Serve app (request crops).

Pipeline for one image:

1. Pad the image (``pad`` x its longer side on each side, edge-replicated by default).
   Datasets such as UTKFace ship tight face chips; detectors need some context around a face
   and miss faces that touch the border. Coordinates are mapped back to the original image.
2. Detect with MTCNN (facenet-pytorch; its weights ship inside the wheel, nothing is
   downloaded) or, when facenet-pytorch is not installed (or ``detector="haar"``), with
   OpenCV Haar cascades (frontal face + eyes; nose and mouth corners are then placed from
   the eye positions with the template's proportions).
3. Estimate the similarity transform (rotation, uniform scale, translation; least squares,
   Umeyama) that maps the five points onto the ArcFace 112x112 template scaled to
   ``output_size`` (optionally zoomed out by ``margin`` to keep hair and chin: grey hair is
   an age cue), and warp to a fixed ``output_size`` square crop.
4. No face: keep the original (centre square crop resized to ``output_size``) or drop it
   (``on_no_face``); both are counted in :meth:`FaceAligner.stats`.

Every face or the main one: :meth:`FaceAligner.detect_faces` returns every face whose score
is at least ``min_score`` and whose shorter box side is at least ``min_face_px`` (original
pixels), largest first, from ONE detector call per image (MTCNN scores all candidate boxes of
an image in one batched pass per stage), together with the index of the *main* face:
"largest, slightly favouring the centre", the choice single-face alignment (:meth:`align`,
the shard writer) has always made. :meth:`align_all` warps each face exactly as
:meth:`align` warps the main one (same template, same :meth:`warp`), so a face cropped out
of a group photo and the same face aligned alone become the same crop up to what the
detector sees around it.

The detector is built lazily, once per process and thread, so an aligner is cheap to
construct, pickles small (to Ray workers, DataLoader workers) and is safe to share.
"""

from __future__ import annotations

import importlib.util
import io
import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps

from ageray.data.records import Record

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "CHIP_TEMPLATE_200",
    "AlignResult",
    "Face",
    "FaceAligner",
    "align_record",
    "chip_template",
    "decode_image",
    "estimate_similarity",
    "mtcnn_available",
    "template",
]

# ArcFace / InsightFace canonical 5 landmarks for a 112x112 crop: left eye, right eye, nose
# tip, left mouth corner, right mouth corner ("left" = image left).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

# Where UTKFace's 200x200 chips put the same five points: the median of MTCNN's landmarks
# over 199 chips spread across the whole tarball (utkface-dev.tar, every 70th in name order;
# each chip fits it within ~8 px after a similarity fit, scale 0.93-1.03 for 80% of them).
# The chips are tighter than the ArcFace crop and sit the eyes higher (at 29% of the height,
# not 46%); a model trained on such chips without alignment has only ever seen this framing.
CHIP_TEMPLATE_200 = np.array(
    [[60.0, 58.2], [138.7, 58.4], [98.7, 104.8], [63.9, 139.9], [133.5, 140.0]],
    dtype=np.float64,
)

Detector = Literal["mtcnn", "haar", "auto"]
Crop = Literal["arcface", "chip"]
OnNoFace = Literal["keep", "drop"]
_BORDERS = {
    "edge": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT_101,
    "constant": cv2.BORDER_CONSTANT,
}


def template(output_size: int = 112, margin: float = 0.0) -> np.ndarray:
    """The 5-point template for an ``output_size`` square crop.

    ``margin`` zooms out around the crop centre: 0 is the standard ArcFace crop (tight:
    forehead top and hair cut off), 0.2 shows 20% more on every side.
    """
    pts = ARCFACE_TEMPLATE_112 * (output_size / 112.0)
    centre = output_size / 2.0
    return centre + (pts - centre) / (1.0 + 2.0 * margin)


def chip_template(output_size: int = 200, margin: float = 0.0) -> np.ndarray:
    """The five points where a UTKFace chip has them (:data:`CHIP_TEMPLATE_200`), for an
    ``output_size`` square crop; ``margin`` zooms out as in :func:`template`.

    Why: a model trained on dataset chips without alignment (``model.json`` ``align:
    false``) must still get a face cut out of a photo; warping the photo's face onto the
    chips' own landmark positions reproduces the framing it was trained on (measured, not
    assumed), with the same least-squares similarity warp the ArcFace crop uses.
    """
    pts = CHIP_TEMPLATE_200 * (output_size / 200.0)
    centre = output_size / 2.0
    return centre + (pts - centre) / (1.0 + 2.0 * margin)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity matrix M minimising ``sum |M [src; 1] - dst|^2`` (Umeyama, no reflection).

    The classic least-squares fit of face alignment (skimage's SimilarityTransform does the
    same); written out so no extra dependency is needed.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching (N>=2, 2) point arrays, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0**2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("source landmarks coincide; cannot estimate a similarity transform")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def mtcnn_available() -> bool:
    """True when facenet-pytorch (the MTCNN detector) is installed. Looks the package up
    without importing it (importing pulls in torch: seconds), so constructing an aligner
    stays cheap."""
    return importlib.util.find_spec("facenet_pytorch") is not None


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image, EXIF orientation applied (phone photos arrive rotated)."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


@dataclass(frozen=True)
class Face:
    """One detected face, in the input image's pixel coordinates.

    ``box`` ``[x0, y0, x1, y1]``; ``landmarks`` (5, 2): left eye, right eye, nose tip, left
    and right mouth corner ("left" = image left); ``score``: MTCNN's face probability, or
    1.0 from the Haar fallback (a cascade has no calibrated confidence: 1.0 only says the
    detection passed its neighbour vote).
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    @property
    def side(self) -> float:
        """The shorter side of the box (what ``min_face_px`` compares)."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


@dataclass
class AlignResult:
    """What alignment did to one image.

    ``image``: the ``output_size`` crop (aligned when ``found``, the kept original otherwise)
    or None when dropped. ``box`` ``[x0, y0, x1, y1]`` and ``landmarks`` (5 x 2) are in the
    input image's pixel coordinates; ``matrix`` is the 2x3 input -> crop transform.
    """

    image: Image.Image | None
    found: bool
    box: list[float] | None = None
    landmarks: np.ndarray | None = None
    score: float | None = None
    matrix: np.ndarray | None = None
    detector: str = ""
    index: int | None = None  # the face's place in detect_faces' order (largest first)


class FaceAligner:
    """Detect the main face, align it on the 5-point template, crop to a fixed size.

    Args:
        output_size: side of the square crop (the ArcFace template is scaled to it).
        margin: zoom-out around the template crop (0 = standard ArcFace crop).
        pad: padding added on each side before detection, as a fraction of the longer side.
        pad_mode: ``edge`` (replicate), ``reflect`` or ``constant`` (black).
        detector: ``mtcnn``, ``haar`` or ``auto`` (MTCNN when importable, else Haar).
        on_no_face: ``keep`` the original (centre square, resized) or ``drop`` it (None).
        min_score: detector score below which a detection is ignored (MTCNN's face
            probability; the Haar fallback scores every detection 1.0).
        min_face_px: smallest face kept, as the shorter side of its box in the input
            image's pixels (16: below that no face can be read at any model input size).
        min_confidence: the old name of ``min_score`` (kept for stored settings).
        min_face_frac: smallest face searched, as a fraction of the padded image's shorter
            side (MTCNN's ``min_face_size``); larger is faster. 0.1 suits photos with
            one main face; lower it for group photos.
        max_side: images are downscaled to this longer side for detection (speed); the crop
            is taken from the full-resolution image.
        border: how the warp fills outside the image: ``constant`` (black, as InsightFace)
            or ``edge`` (replicated).
        crop: the template the five points are warped onto: ``arcface`` (the papers'
            aligned crop, what the shard writer makes) or ``chip`` (where UTKFace's chips
            have them: :func:`chip_template`, for models trained on chips as they ship).
    """

    def __init__(
        self,
        output_size: int = 112,
        *,
        margin: float = 0.0,
        pad: float = 0.25,
        pad_mode: Literal["edge", "reflect", "constant"] = "edge",
        detector: Detector = "auto",
        on_no_face: OnNoFace = "keep",
        min_score: float = 0.9,
        min_face_px: float = 16.0,
        min_confidence: float | None = None,
        min_face_frac: float = 0.1,
        max_side: int = 640,
        border: Literal["edge", "constant"] = "constant",
        crop: Crop = "arcface",
    ) -> None:
        if output_size < 16:
            raise ValueError(f"output_size={output_size} is too small (use >= 16)")
        if detector not in ("mtcnn", "haar", "auto"):
            raise ValueError(f"detector={detector!r}: use 'mtcnn', 'haar' or 'auto'")
        if on_no_face not in ("keep", "drop"):
            raise ValueError(f"on_no_face={on_no_face!r}: use 'keep' or 'drop'")
        if pad_mode not in _BORDERS:
            raise ValueError(f"pad_mode={pad_mode!r}: use one of {sorted(_BORDERS)}")
        if border not in ("edge", "constant"):
            raise ValueError(f"border={border!r}: use 'edge' or 'constant'")
        if crop not in ("arcface", "chip"):
            raise ValueError(f"crop={crop!r}: use 'arcface' or 'chip'")
        if min_confidence is not None:
            min_score = min_confidence
        if not 0.0 <= min_score <= 1.0 or min_face_px < 0:
            raise ValueError(
                f"min_score={min_score} must lie in [0, 1] and min_face_px={min_face_px} be >= 0"
            )
        if not 0 <= pad <= 2 or margin < 0:
            raise ValueError(f"pad={pad} must lie in [0, 2] and margin={margin} be >= 0")
        if detector == "mtcnn" and not mtcnn_available():
            raise ImportError(
                "detector='mtcnn' needs facenet-pytorch: pip install --no-deps "
                "facenet-pytorch==2.6.0 (or use detector='auto' / 'haar')"
            )
        self.output_size = int(output_size)
        self.margin = float(margin)
        self.pad = float(pad)
        self.pad_mode = pad_mode
        self.detector = detector
        self.on_no_face = on_no_face
        self.min_score = float(min_score)
        self.min_face_px = float(min_face_px)
        self.min_face_frac = float(min_face_frac)
        self.max_side = int(max_side)
        self.border = border
        self.crop = crop
        if crop == "chip":
            self.template = chip_template(self.output_size, self.margin)
        else:
            self.template = template(self.output_size, self.margin)
        self._counts = {"detected": 0, "no_face_kept": 0, "no_face_dropped": 0}
        self._lock = threading.Lock()
        self._local = threading.local()

    # -- pickling: ship the settings, never the detector or the lock
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._local = threading.local()

    def __repr__(self) -> str:
        return (
            f"FaceAligner(output_size={self.output_size}, margin={self.margin}, pad={self.pad}, "
            f"detector={self.detector!r}, on_no_face={self.on_no_face!r}, "
            f"min_score={self.min_score}, min_face_px={self.min_face_px})"
        )

    @property
    def backend(self) -> str:
        """The detector that runs: ``mtcnn`` or ``haar``."""
        if self.detector == "auto":
            return "mtcnn" if mtcnn_available() else "haar"
        return self.detector

    def stats(self) -> dict[str, int]:
        """Counters since construction (or :meth:`reset_stats`), for the manifest."""
        with self._lock:
            return dict(self._counts)

    def reset_stats(self) -> None:
        with self._lock:
            for k in self._counts:
                self._counts[k] = 0

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    # -- detectors, one per process and thread, built on first use
    def _get_detector(self) -> Any:
        cached = getattr(self._local, "detector", None)
        if cached is not None and cached[0] == os.getpid():
            return cached[1]
        if self.backend == "mtcnn":
            from facenet_pytorch import MTCNN  # weights are files inside the wheel

            det: Any = MTCNN(keep_all=True, post_process=False, device="cpu")
            det.eval()
        else:
            root = cv2.data.haarcascades
            det = (
                cv2.CascadeClassifier(os.path.join(root, "haarcascade_frontalface_default.xml")),
                cv2.CascadeClassifier(os.path.join(root, "haarcascade_eye.xml")),
            )
            if det[0].empty() or det[1].empty():
                raise RuntimeError(f"OpenCV Haar cascades not found under {root}")
        self._local.detector = (os.getpid(), det)
        return det

    def detect_faces(self, rgb: np.ndarray) -> tuple[list[Face], int | None]:
        """Every face in an RGB uint8 array with score >= ``min_score`` and shorter side >=
        ``min_face_px`` (the array's coordinates), largest first, and the index of the main
        face (None when there is none). One detector call: pad, downsize, detect, map back."""
        h, w = rgb.shape[:2]
        shrink = min(1.0, self.max_side / max(h, w))
        small = rgb
        if shrink < 1.0:
            size = (max(1, round(w * shrink)), max(1, round(h * shrink)))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        p = round(self.pad * max(small.shape[:2]))
        if p > 0:
            small = cv2.copyMakeBorder(small, p, p, p, p, _BORDERS[self.pad_mode], value=0)
        min_side = self.min_face_px * shrink  # the smallest face kept, in detection pixels
        if self.backend == "mtcnn":
            boxes, points, scores = self._detect_mtcnn(small, min_side)
        else:
            boxes, points, scores = self._detect_haar(small, min_side)
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = (scores >= self.min_score) & (sides / shrink >= self.min_face_px)
        boxes, points, scores = boxes[keep], points[keep], scores[keep]
        if len(boxes) == 0:
            return [], None
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(-area, kind="stable")  # largest first, detector order on ties
        boxes, points, scores, area = boxes[order], points[order], scores[order], area[order]
        main = 0
        if self.backend == "mtcnn":
            # the main face: largest, slightly favouring the centre (dataset crops are
            # centred); measured in the padded detection image, as it always was
            hh, ww = small.shape[:2]
            ctr = np.stack(
                [
                    (boxes[:, 0] + boxes[:, 2]) / 2 - ww / 2,
                    (boxes[:, 1] + boxes[:, 3]) / 2 - hh / 2,
                ],
                1,
            )
            off = (ctr**2).sum(1) / max(hh, ww) ** 2
            main = int(np.argmax(area * (1.0 - off)))
        faces = [
            Face(box=(b - p) / shrink, landmarks=(pt - p) / shrink, score=float(sc))
            for b, pt, sc in zip(boxes, points, scores)
        ]
        return faces, main

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
        """The main face of an RGB uint8 array (:meth:`detect_faces`' choice):
        ``(box[4], landmarks[5, 2], score)`` in the array's coordinates, or None."""
        faces, main = self.detect_faces(rgb)
        if main is None:
            return None
        face = faces[main]
        return face.box, face.landmarks, face.score

    def _detect_mtcnn(
        self, rgb: np.ndarray, min_side: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every MTCNN detection: boxes (N, 4), landmarks (N, 5, 2), probabilities (N,)."""
        import torch

        det = self._get_detector()
        det.min_face_size = max(12, int(self.min_face_frac * min(rgb.shape[:2])), int(min_side))
        with torch.inference_mode():
            boxes, probs, points = det.detect(np.ascontiguousarray(rgb), landmarks=True)
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros(0)
        return (
            np.asarray(boxes, np.float64).reshape(-1, 4),
            np.asarray(points, np.float64).reshape(-1, 5, 2),
            np.asarray(probs, np.float64).reshape(-1),
        )

    def _detect_haar(
        self, rgb: np.ndarray, min_side: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every Haar face: boxes, landmarks (eyes from the eye cascade, the rest placed from
        the eyes), and a score of 1.0 each (see :class:`Face`)."""
        face_cc, eye_cc = self._get_detector()
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        hh, ww = gray.shape
        smallest = max(20, int(self.min_face_frac * min(hh, ww)), int(min_side))
        faces = face_cc.detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest)
        )
        if len(faces) == 0:
            return np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros(0)
        boxes = np.array([[x, y, x + fw, y + fh] for x, y, fw, fh in faces], np.float64)
        points = np.stack([_haar_landmarks(gray, eye_cc, *map(int, f)) for f in faces])
        return boxes, points, np.ones(len(faces))

    # -- the public calls
    def align(self, image: Image.Image) -> AlignResult:
        """Align the main face of one PIL image (any mode; converted to RGB)."""
        rgb = np.asarray(image.convert("RGB"))
        faces, main = self.detect_faces(rgb)
        if main is None:
            if self.on_no_face == "drop":
                self._count("no_face_dropped")
                return AlignResult(image=None, found=False, detector=self.backend)
            self._count("no_face_kept")
            return AlignResult(image=self._keep(image), found=False, detector=self.backend)
        self._count("detected")
        return self._aligned(rgb, faces[main], main)

    def align_all(self, image: Image.Image) -> list[AlignResult]:
        """Every face of one PIL image, largest first, each warped exactly as :meth:`align`
        warps the main face; an empty list when there is none (``on_no_face`` is the
        single-face policy: a photo without a face has no faces, not a kept centre crop)."""
        rgb = np.asarray(image.convert("RGB"))
        faces, _ = self.detect_faces(rgb)
        for _ in faces:
            self._count("detected")
        return [self._aligned(rgb, face, i) for i, face in enumerate(faces)]

    def _aligned(self, rgb: np.ndarray, face: Face, index: int) -> AlignResult:
        crop, m = self.warp(rgb, face.landmarks)
        return AlignResult(
            image=crop,
            found=True,
            box=[float(v) for v in face.box],
            landmarks=face.landmarks,
            score=face.score,
            matrix=m,
            detector=self.backend,
            index=index,
        )

    def warp(self, rgb: np.ndarray, landmarks: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        """Crop ``rgb`` so that ``landmarks`` land on the template; returns (crop, 2x3 M)."""
        m = estimate_similarity(landmarks, self.template)
        scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
        src, pre = rgb, 1.0
        if scale < 0.5:  # big downscale: shrink first with area averaging (no aliasing)
            pre = min(1.0, 2.0 * scale)
            size = (max(1, round(rgb.shape[1] * pre)), max(1, round(rgb.shape[0] * pre)))
            src = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        m_src = estimate_similarity(landmarks * pre, self.template) if pre != 1.0 else m
        border = cv2.BORDER_REPLICATE if self.border == "edge" else cv2.BORDER_CONSTANT
        out = cv2.warpAffine(
            src,
            m_src,
            (self.output_size, self.output_size),
            flags=cv2.INTER_LINEAR,
            borderMode=border,
            borderValue=(0, 0, 0),
        )
        return Image.fromarray(out, "RGB"), m

    def _keep(self, image: Image.Image) -> Image.Image:
        """No face: the centre square of the original, resized (aspect ratio kept)."""
        return ImageOps.fit(
            image.convert("RGB"), (self.output_size, self.output_size), Image.BICUBIC
        )

    def align_bytes(self, data: bytes, *, quality: int = 95) -> tuple[bytes | None, AlignResult]:
        """Encoded image in, JPEG of the crop out (None when dropped)."""
        res = self.align(decode_image(data))
        if res.image is None:
            return None, res
        return _jpeg(res.image, quality), res

    def align_all_bytes(self, data: bytes, *, quality: int = 95) -> list[tuple[bytes, AlignResult]]:
        """Encoded image in, every face's JPEG crop out (as :meth:`align_bytes` encodes
        the main one), largest first."""
        return [(_jpeg(r.image, quality), r) for r in self.align_all(decode_image(data))]


def _jpeg(image: Image.Image | None, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)  # type: ignore[union-attr]
    return buf.getvalue()


def _haar_landmarks(gray: np.ndarray, eye_cc: Any, x: int, y: int, fw: int, fh: int) -> np.ndarray:
    """Five points for one Haar face box: the eye cascade in the upper half of the box, one
    eye on each side of its centre (typical positions when either is missing), nose and
    mouth placed from the eyes (:func:`_five_from_eyes`)."""
    roi = gray[y : y + fh // 2 + fh // 10, x : x + fw]
    eyes = eye_cc.detectMultiScale(
        roi, scaleFactor=1.1, minNeighbors=4, minSize=(fw // 10, fw // 10)
    )
    left = [e for e in eyes if e[0] + e[2] / 2 < fw / 2]
    right = [e for e in eyes if e[0] + e[2] / 2 >= fw / 2]
    if left and right:
        le = max(left, key=lambda e: e[2] * e[3])
        re_ = max(right, key=lambda e: e[2] * e[3])
        eye_l = np.array([x + le[0] + le[2] / 2, y + le[1] + le[3] / 2])
        eye_r = np.array([x + re_[0] + re_[2] / 2, y + re_[1] + re_[3] / 2])
    else:  # typical eye positions inside an OpenCV frontal-face box
        eye_l = np.array([x + 0.31 * fw, y + 0.40 * fh])
        eye_r = np.array([x + 0.69 * fw, y + 0.40 * fh])
    return _five_from_eyes(eye_l, eye_r)


def _five_from_eyes(eye_l: np.ndarray, eye_r: np.ndarray) -> np.ndarray:
    """Nose tip and mouth corners placed from the eyes with the template's proportions
    (used when the detector finds eyes only): the warp then aligns the eyes exactly."""
    t = ARCFACE_TEMPLATE_112
    t_mid, t_vec = (t[0] + t[1]) / 2, t[1] - t[0]
    mid, vec = (eye_l + eye_r) / 2, eye_r - eye_l
    scale = np.linalg.norm(vec) / np.linalg.norm(t_vec)
    ang = np.arctan2(vec[1], vec[0]) - np.arctan2(t_vec[1], t_vec[0])
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    return mid + (t - t_mid) @ rot.T * scale


def align_record(
    record: Record, aligner: FaceAligner, *, quality: int = 95
) -> tuple[Record | None, AlignResult]:
    """Align a record's image; the new record carries the re-encoded JPEG crop (None when
    the face was dropped). ``result.box`` is what the shard writer stores as ``box``."""
    data, res = aligner.align_bytes(record.image, quality=quality)
    if data is None:
        return None, res
    return replace(record, image=data), res
