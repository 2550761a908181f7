"""A pretrained backbone without torch: the exported graph gives each image's embedding (the class
token after the final norm, ``embedding`` ``B x D``), after classification's evaluation transform
(short side ``round(S * 256 / 224)``, center crop ``S``, normalisation). ``PretrainTask.predict``
makes the same records from PyTorch, so both backends write the same files."""

from __future__ import annotations

from typing import Any

import numpy as np

from dinotune.runtime.preprocess import eval_crop_input
from dinotune.runtime.task import Prediction, RuntimeTask


def embedding_record(image: str, embedding: np.ndarray) -> dict[str, Any]:
    """``{"image", "embedding": [D floats]}``."""
    return {"image": image, "embedding": [float(v) for v in np.asarray(embedding, np.float32)]}


class PretrainRuntime(RuntimeTask):
    """One embedding per image (see the module docstring)."""

    name = "pretrain"
    graph_outputs = {"embedding": 2}
    check = "full"

    def predict_arrays(self, names: list[str], arrays: list[np.ndarray], settings: dict[str, Any]) -> list[Prediction]:
        batch = np.stack([eval_crop_input(a, self.info.image_size, self.spec, n, self.info.max_image_pixels)
                          for n, a in zip(names, arrays)])
        rows = self.graph(images=batch)["embedding"]
        return [(embedding_record(n, row), {}) for n, row in zip(names, rows)]

    @classmethod
    def csv_rows(cls, results: list[dict[str, Any]]) -> list[list[Any]]:
        """One row per image: ``image, e0, e1, ...``."""
        width = max((len(r["embedding"]) for r in results), default=0)
        return [["image"] + [f"e{i}" for i in range(width)]] + [[r["image"]] + [f"{v:.7g}" for v in r["embedding"]]
                                                                for r in results]

    @classmethod
    def view(cls, record: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        return {"summary": f"a {len(record['embedding'])}-value embedding"}
