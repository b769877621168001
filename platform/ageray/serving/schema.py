"""The OpenAPI description of ``POST /v1/predict``'s answers: per face (``faces=all``, the
default: ``build_faces_answer``'s dict) or one flat answer per image (``faces=largest``:
``build_prediction``'s dict).

Why by hand rather than a pydantic response model: the endpoint answers a ``JSONResponse``
built once per image by :func:`ageray.serving.model.build_prediction` (the same row every path
answers), and a response model would validate every answer a second time on the hot path.
The schema here is what ``/openapi.json`` and ``/docs`` show; a test checks it against real
answers, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from ageray.data.labels import GENDERS, RACES

__all__ = ["FACES_SCHEMA", "FACE_SCHEMA", "PREDICTION_SCHEMA", "PREDICT_RESPONSES"]

_NUM = {"type": "number"}


def _trait(name: str, labels: tuple[str, ...], paper: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"{name} of a multi-task model ({paper}); absent for age-only models",
        "required": ["label", "index", "probs"],
        "properties": {
            "label": {"type": "string", "enum": list(labels), "description": "most likely"},
            "index": {"type": "integer", "description": f"its code: {list(labels)}"},
            "probs": {
                "type": "array",
                "items": _NUM,
                "description": f"flip-averaged probabilities in code order {list(labels)}",
            },
        },
    }


#: What every answer holds, per face or per image (``ageray.inference.answer_json``).
_ANSWER_PROPERTIES: dict[str, Any] = {
    "age": {**_NUM, "description": "the answer in years (the routed head's)"},
    "head": {"type": "string", "enum": ["vanilla", "balanced"]},
    "heads": {
        "type": "object",
        "description": "each head's flip-averaged age and KL(p || p_flip)",
        "additionalProperties": {
            "type": "object",
            "properties": {"age": _NUM, "kl": {"type": ["number", "null"]}},
        },
    },
    "interval": {
        "type": ["object", "null"],
        "description": "90% interval from the age distribution (null for regression)",
        "properties": {"level": _NUM, "low": _NUM, "high": _NUM},
    },
    "rule": {"type": ["string", "null"], "description": "the routing rule that answered"},
    "gender": _trait("Gender", GENDERS, "Xing et al. 3.3"),
    "race": _trait("Race", RACES, "Xing et al. 3.3; UTKFace's five codes"),
    "distribution": {
        "type": ["array", "null"],
        "items": _NUM,
        "description": "probabilities over ages 0..100 (with ?distribution=true)",
    },
}
_META_PROPERTIES: dict[str, Any] = {
    "model": {"type": "object", "description": "registry name, version, alias, URI"},
    "timing_ms": {"type": "object", "additionalProperties": _NUM},
    "batch_size": {"type": "integer", "description": "faces/images that shared the forward"},
}

#: ``faces=largest``: one flat answer per image (the answer for face chips).
PREDICTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["age", "head", "heads", "interval", "rule", "model"],
    "properties": {
        **_ANSWER_PROPERTIES,
        "face": {"type": "object", "description": "detection, when the model was aligned"},
        "quality": {
            "type": "string",
            "description": "present when the image cannot hold a usable face (e.g. 1x1 px): "
            "the age is then no reading of a face",
        },
        **_META_PROPERTIES,
    },
}

#: One face of ``faces=all``: where it is, then everything a single answer has.
FACE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["index", "box", "landmarks", "score", "age", "head", "heads", "interval"],
    "properties": {
        "index": {"type": "integer", "description": "0..n-1, largest face first"},
        "box": {
            "type": "array",
            "items": _NUM,
            "minItems": 4,
            "maxItems": 4,
            "description": "[x0, y0, x1, y1] in the original image's pixels",
        },
        "landmarks": {
            "type": "array",
            "items": {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2},
            "minItems": 5,
            "maxItems": 5,
            "description": "[x, y] of the left eye, right eye, nose, left and right mouth "
            "corner (original pixels)",
        },
        "score": {
            "type": ["number", "null"],
            "description": "the detector's confidence (MTCNN; 1.0 from the Haar fallback)",
        },
        **_ANSWER_PROPERTIES,
    },
}

#: ``faces=all`` (the default): an answer per face of the photo.
FACES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["faces", "reason", "image", "model"],
    "properties": {
        "faces": {"type": "array", "items": FACE_SCHEMA, "description": "largest first"},
        "reason": {
            "type": ["string", "null"],
            "description": "why 'faces' is empty ('no face found: ...'); null otherwise",
        },
        "image": {
            "type": "object",
            "properties": {"width": {"type": "integer"}, "height": {"type": "integer"}},
            "description": "the original image's size: the frame of every box",
        },
        **_META_PROPERTIES,
    },
}

_ONE = {"oneOf": [FACES_SCHEMA, PREDICTION_SCHEMA]}

#: ``responses=`` of the predict route: one answer, or ``{"predictions": [...]}`` for many.
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One answer per image: faces=all (default) {'faces': [...], 'reason', "
        "'image', ...}, faces=largest the flat answer; several images: {'predictions': [...]}",
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        FACES_SCHEMA,
                        PREDICTION_SCHEMA,
                        {
                            "type": "object",
                            "properties": {"predictions": {"type": "array", "items": _ONE}},
                        },
                    ]
                }
            }
        },
    }
}
