"""MLflow pyfunc wrapper for an ageray model, logged as *code* ("models from code").

Why code and not a pickled object: ``mlflow.pyfunc.load_model("models:/ageray@candidate")``
then executes this file and reads ``model.safetensors`` + ``model.json``; nothing is
unpickled, so a registered model cannot smuggle arbitrary objects into the loader.

Every answer comes from the one inference path (:class:`ageray.inference.ImagePredictor`):
alignment as trained, the JPEG draft decode, evaluation's preprocessing, image + flip through
both heads, the model's routing rule; the same rows Serve answers and ``jobs.predict`` writes.

Input: a pandas DataFrame with an ``image`` column of encoded images (bytes, or base64
strings) and optionally a ``key`` column, or a numpy array of already-preprocessed images
``(N, 3, S, S)``. Output: a DataFrame with the answer rows' columns
(``ageray.inference.answers``: ``key``, ``age``, ``age_low``, ``age_high``, ``head``,
``weight_balanced``, ``rule``, ``age_vanilla``, ``kl_vanilla``, ``age_balanced``,
``kl_balanced``, ``gender``..., ``error``); an image that cannot be decoded gets a row with
``error`` set. ``params={"rule": ...}`` picks another servable rule, ``{"distribution":
True}`` adds the distribution column, ``{"faces": "all"}`` answers a row per detected face
(``face_index`` 0..n-1 largest first, ``face_box``, ``face_landmarks``, ``face_score``; a
photo without a face is one row with ``error`` ``no_face: ...``) where the default
``"largest"`` answers a row per image, as for face chips and datasets.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import mlflow
import numpy as np


class AgeRayPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ageray.inference import load_predictor

        self.predictor = load_predictor(context.artifacts["model"])
        self.model, self.info = self.predictor.model, self.predictor.info

    @staticmethod
    def _images(model_input: Any) -> tuple[list[bytes | None], list[str], list[str | None]]:
        column = model_input["image"] if hasattr(model_input, "columns") else model_input
        items = list(column)
        if hasattr(model_input, "columns") and "key" in model_input.columns:
            keys = [str(k) for k in model_input["key"]]
        else:
            keys = [f"row-{i}" for i in range(len(items))]
        images: list[bytes | None] = []
        errors: list[str | None] = []
        for i, item in enumerate(items):
            raw, err = item, None
            if isinstance(item, str):
                try:
                    raw = base64.b64decode(item, validate=True)
                except (binascii.Error, ValueError):
                    raw, err = None, f"not_base64: row {i}: 'image' is not valid base64"
            images.append(None if raw is None else bytes(raw))
            errors.append(err)
        return images, keys, errors

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from ageray.inference import ROW_FIELDS
        from ageray.model import check_servable

        params = params or {}
        rule = params.get("rule") or None  # None / "": the model's own (possibly fitted) rule
        if rule is not None:
            check_servable(str(rule), "pyfunc params.rule")
        distribution = bool(params.get("distribution", False))
        faces = str(params.get("faces") or "largest")
        if faces not in ("all", "largest"):
            raise ValueError(f"pyfunc params.faces={faces!r}: use 'all' or 'largest'")
        if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
            outputs = self.predictor.forward(model_input, rule)
            rows = self.predictor.rows(outputs, rule=rule, distribution=distribution)
        else:
            images, keys, errors = self._images(model_input)
            rows = self.predictor.predict(
                images, keys=keys, errors=errors, rule=rule, distribution=distribution, faces=faces
            )
        columns = [*ROW_FIELDS, "distribution"] if distribution else list(ROW_FIELDS)
        return pd.DataFrame.from_records(rows, columns=columns)


mlflow.models.set_model(AgeRayPyfunc())
