"""The MLflow "models from code" definition of a graftline classifier.

MLflow runs this file to rebuild the model: no pickle is involved. The weights come from the
``checkpoint`` artifact (a state_dict plus its architecture config, loaded with
``weights_only=True``). Input: float pixels ``(N, C, H, W)`` in [0, 255], as the pipeline's
images; for a text model, a table with a ``text`` column (tokenized with the tokenizer the
checkpoint carries). Output: one row per item with the predicted class, its probability and
the probability of every class (and, for texts, whether each was truncated).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np


class GraftlineClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from graftline.models.checkpoint import input_transform, load_checkpoint

        self.model, ckpt = load_checkpoint(context.artifacts["checkpoint"])
        self.classes = list(ckpt["classes"])
        self.input_shape = tuple(ckpt["input_shape"])
        self.transform = input_transform(ckpt)

    # np.ndarray is a hint MLflow takes as "no schema from hints" (the logged signature
    # stays the one inferred from the input example); without a hint it warns on every load.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> Any:
        from graftline.serve.predict import is_text_model, predict_frame

        if is_text_model(self.transform):
            texts = model_input["text"] if hasattr(model_input, "columns") else model_input
            return predict_frame(
                self.model, self.classes, [str(t) for t in texts], transform=self.transform
            )
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 2 and x.shape[1] == int(np.prod(self.input_shape)):
            x = x.reshape(-1, *self.input_shape)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"expected images of shape {self.input_shape}, got {x.shape[1:]}")
        return predict_frame(self.model, self.classes, x)


mlflow.models.set_model(GraftlineClassifier())
