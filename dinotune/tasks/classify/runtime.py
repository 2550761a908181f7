"""Classification without torch: an exported classifier's input, records, files and page view.

The input is the run's evaluation transform (``data/transforms.classify_eval_transform``) in numpy:
the short side resized to ``round(S * 256 / 224)``, a center crop of ``S``, normalisation. The graph
returns ``logits`` ``B x K``; a record holds the top-k classes after a softmax. ``ClassifyTask``
writes its records and files through this module too, so both backends give the same text.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dinotune.runtime.postprocess import softmax
from dinotune.runtime.preprocess import eval_crop_input
from dinotune.runtime.task import Prediction, RuntimeTask


# the evaluation transform in numpy, shared with every task that crops like classification
classify_input = eval_crop_input


def top_k_record(image: str, logits: np.ndarray, names: Sequence[str], top_k: int) -> dict[str, Any]:
    """``{"image", "predictions": [{"class", "index", "score"}]}``: the ``min(top_k, K)`` best classes
    of one image's ``K`` logits after a softmax, best first (ties: the lower index)."""
    probs = softmax(np.asarray(logits)[None])[0]
    order = np.argsort(-probs, kind="stable")[: min(int(top_k), len(names))]
    return {"image": image, "predictions": [{"class": names[int(c)], "index": int(c), "score": float(probs[c])}
                                            for c in order]}


class ClassifyRuntime(RuntimeTask):
    """Top-k classes per image (see the module docstring)."""

    name = "classify"
    graph_outputs = {"logits": 2}
    check = "full"  # as the PyTorch path checks classification inputs: every file decoded

    def predict_arrays(self, names: list[str], arrays: list[np.ndarray], settings: dict[str, Any]) -> list[Prediction]:
        batch = np.stack([classify_input(a, self.info.image_size, self.spec, n, self.info.max_image_pixels)
                          for n, a in zip(names, arrays)])
        logits = self.graph(images=batch)["logits"]
        return [(top_k_record(n, row, self.class_names, int(settings["top_k"])), {}) for n, row in zip(names, logits)]

    @classmethod
    def csv_rows(cls, results: list[dict[str, Any]]) -> list[list[Any]]:
        """One row per image: ``image, class_1, score_1, ...`` (JSON: the top-k per image)."""
        k = max((len(r["predictions"]) for r in results), default=0)
        header = ["image"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"score_{i}")]
        return [header] + [[r["image"]] + [v for p in r["predictions"] for v in (p["class"], f"{p['score']:.6f}")]
                           for r in results]

    @classmethod
    def view(cls, record: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        bars = [{"name": p["class"], "score": p["score"]} for p in record["predictions"]]
        top = bars[0] if bars else None
        return {"bars": bars, "summary": f"{top['name']} ({100 * top['score']:.1f} %)" if top else "no prediction"}
