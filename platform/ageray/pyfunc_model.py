"""MLflow pyfunc wrapper for an ageray model, logged as *code* ("models from code").

Why code and not a pickled object: ``mlflow.pyfunc.load_model("models:/ageray@candidate")``
then executes this file and reads ``model.safetensors`` + ``model.json``; nothing is
unpickled, so a registered model cannot smuggle arbitrary objects into the loader.

Input: a pandas DataFrame with an ``image`` column of encoded images (bytes, or base64
strings), or a numpy array of already-preprocessed images ``(N, 3, S, S)``. Output: a
DataFrame with ``age``, ``head`` ("vanilla"/"balanced"), ``age_vanilla``, ``kl_vanilla`` and,
for two-head models, ``age_balanced``, ``kl_balanced``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import mlflow
import numpy as np


class AgeRayPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ageray.model import load_model

        self.model, self.info = load_model(context.artifacts["model"])
        self.model.eval()

    def _tensor(self, model_input: Any):
        import torch

        from ageray.data.transforms import decode_image, preprocess_for_eval
        from ageray.evaluation import eval_config

        if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
            return torch.as_tensor(model_input, dtype=torch.float32)
        column = model_input["image"] if hasattr(model_input, "columns") else model_input
        images = []
        for i, item in enumerate(list(column)):
            raw = item
            if isinstance(item, str):
                try:
                    raw = base64.b64decode(item, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise ValueError(f"row {i}: 'image' is not valid base64") from exc
            images.append(decode_image(bytes(raw)))
        cfg = eval_config(self.info, shards="", split="test")
        return preprocess_for_eval(images, cfg.data)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from ageray.model import check_servable

        x = self._tensor(model_input)
        rule = (params or {}).get("rule")  # None: the model's own (possibly fitted) rule
        if rule is not None:
            check_servable(str(rule), "pyfunc params.rule")
        pred = self.model.predict(x, flip=True, rule=rule)
        out: dict[str, Any] = {
            "age": pred.age.float().cpu().numpy(),
            "head": np.where(pred.head.cpu().numpy() == 1, "balanced", "vanilla"),
        }
        for name, res in pred.heads.items():
            out[f"age_{name}"] = res["age"].float().cpu().numpy()
            if res.get("kl") is not None:
                out[f"kl_{name}"] = res["kl"].float().cpu().numpy()
        return pd.DataFrame(out)


mlflow.models.set_model(AgeRayPyfunc())
