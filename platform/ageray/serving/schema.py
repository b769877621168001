"""The OpenAPI description of ``POST /v1/predict``'s answer (``build_prediction``'s dict).

Why by hand rather than a pydantic response model: the endpoint answers a ``JSONResponse``
built once per image by :func:`ageray.serving.model.build_prediction` (the same row every path
answers), and a response model would validate every answer a second time on the hot path.
The schema here is what ``/openapi.json`` and ``/docs`` show; a test checks it against real
answers, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from ageray.data.labels import GENDERS, RACES

__all__ = ["PREDICTION_SCHEMA", "PREDICT_RESPONSES"]

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


PREDICTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["age", "head", "heads", "interval", "rule", "model"],
    "properties": {
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
        "model": {"type": "object", "description": "registry name, version, alias, URI"},
        "gender": _trait("Gender", GENDERS, "Xing et al. 3.3"),
        "race": _trait("Race", RACES, "Xing et al. 3.3; UTKFace's five codes"),
        "distribution": {
            "type": ["array", "null"],
            "items": _NUM,
            "description": "probabilities over ages 0..100 (with ?distribution=true)",
        },
        "face": {"type": "object", "description": "detection, when the model was aligned"},
        "timing_ms": {"type": "object", "additionalProperties": _NUM},
        "batch_size": {"type": "integer", "description": "images that shared the forward"},
    },
}

#: ``responses=`` of the predict route: one answer, or ``{"predictions": [...]}`` for many.
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One answer per image (several images: {'predictions': [...]})",
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        PREDICTION_SCHEMA,
                        {
                            "type": "object",
                            "properties": {
                                "predictions": {"type": "array", "items": PREDICTION_SCHEMA}
                            },
                        },
                    ]
                }
            }
        },
    }
}
