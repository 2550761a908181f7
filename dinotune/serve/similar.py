"""Similarity search in the server: ``POST /similar`` embeds the upload with the index's model and
answers the most similar indexed images; ``GET /similar/{row}.jpg`` is one of them as a thumbnail,
so the page can show the hits.

An index (``dinotune index``) names its images by absolute path on the server; a client sees them
relative to the folder they share (``name``) and fetches them by row number only, so no request
can name a file, and only images of the index are ever read.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dinotune.errors import ConfigError

# hits a request may ask for (the page asks for the default)
MAX_K = 100
DEFAULT_K = 8


class SimilarImages:
    """An index with its model, ready to answer uploads. Also a server ``Predictor`` (task
    ``similar``) when the index is served alone: ``/predict`` then answers the hits too."""

    task = "similar"

    def __init__(self, folder: str | Path, device: str = "auto"):
        from dinotune.embed.index import load_index
        from dinotune.embed.model import backbone_for

        self.folder = Path(folder).expanduser()
        self.index = load_index(self.folder)
        meta = self.index.meta
        model = Path(str(meta["model"]))
        if int(meta["in_channels"]) != 3 and not model.is_dir():
            # a spec's band statistics were those of the indexed files, which an upload cannot share
            raise ConfigError(f"{self.folder}: an index of {meta['in_channels']}-band arrays made with a backbone spec "
                              "cannot be served; index embeddings made with a trained run instead")
        self.backbone, _, self.input_spec = backbone_for(meta["model"], [], device)
        self.class_names: list[str] = sorted({label for label in self.index.labels if label})
        paths = self.index.paths
        self.root = os.path.commonpath(paths) if paths else ""
        if len(paths) == 1:
            self.root = os.path.dirname(self.root)

    def describe(self) -> dict[str, Any]:
        meta = self.index.meta
        model = Path(str(meta["model"]))
        return {"backend": "torch", "index": self.folder.name, "images": len(self.index), "kind": meta["kind"],
                "backbone": model.name if model.exists() else str(meta["model"])}

    def health(self) -> dict[str, Any]:
        return {"images": len(self.index), "k": DEFAULT_K, "max_k": MAX_K}

    def similar(self, array: np.ndarray, name: str, k: int = DEFAULT_K) -> dict[str, Any]:
        """``{"image": name, "hits": [{"rank", "row", "name", "score", "label", "split"}, ...]}`` for
        one upload (``H x W x 3`` uint8, or ``H x W x C`` bands), highest similarity first."""
        from PIL import Image

        from dinotune.embed.features import embed_images

        if not 1 <= k <= MAX_K:
            raise ConfigError(f"k must be between 1 and {MAX_K}, got {k}")
        meta = self.index.meta
        with tempfile.TemporaryDirectory(prefix="dinotune-similar-") as tmp:
            if self.input_spec.arrays:  # the layout the index's run reads
                path = Path(tmp) / "query.npy"
                np.save(path, np.moveaxis(array, -1, 0) if self.input_spec.layout == "chw" else array,
                        allow_pickle=False)
            else:
                path = Path(tmp) / "query.png"
                Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="RGB").save(path)
            vector = embed_images(self.backbone, [path], int(meta["image_size"]), pool=str(meta["pool"]),
                                  spec=self.input_spec, batch_size=1)
        scores, rows = self.index.search(vector, k)
        return {"image": name, "hits": [
            {"rank": r + 1, "row": int(i), "name": os.path.relpath(self.index.paths[i], self.root) if self.root
             else Path(self.index.paths[i]).name, "score": round(float(s), 6), "label": self.index.labels[i],
             "split": self.index.splits[i]} for r, (s, i) in enumerate(zip(scores[0], rows[0]))]}

    def predict_array(self, array: np.ndarray, name: str) -> dict[str, Any]:
        return self.similar(array, name)

    def thumbnail(self, row: int) -> bytes | None:
        """The JPEG thumbnail of indexed image ``row``; None for a row outside the index or a file
        that can no longer be read."""
        from dinotune.embed.pictures import thumbnail

        if not 0 <= row < len(self.index):
            return None
        picture = thumbnail(self.index.paths[row])
        if picture is None:
            return None
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
