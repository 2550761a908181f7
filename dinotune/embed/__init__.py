"""Embeddings: one per image (``dinotune embed``), the DINO k-NN protocol on them (``knn``), a
FAISS index and search (``index``, ``search``), near duplicates (``duplicates``) and a 2-D map
(``map``).

``features`` finds the images of a folder and runs a backbone over them; ``pipeline`` embeds a list
resumably, shared out under ``torchrun``; ``store`` keeps the embeddings in a parquet file (the k-NN
classifier of the DINO papers is ``dinotune.ops.knn``, which pretraining evaluates with too); ``index`` the similarity index;
``duplicates`` and ``projection`` read an embeddings file; ``api`` holds the commands as calls.
Generic: no task is named.
"""

from typing import Any

# Lazy: ``dinotune.embed.index`` is read by the server of an exported model, which runs without torch.
_WHERE = {"POOLS": "dinotune.embed.features", "Item": "dinotune.embed.features",
          "embed_images": "dinotune.embed.features", "find_items": "dinotune.embed.features",
          "knn_classify": "dinotune.ops.knn", "knn_scores": "dinotune.ops.knn", "Embeddings": "dinotune.embed.store",
          "read_embeddings": "dinotune.embed.store",
          "write_embeddings": "dinotune.embed.store"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dinotune.embed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
