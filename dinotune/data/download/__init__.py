"""``dinotune data download``: the official archives of COCO 2017, PASCAL VOC 2012, ADE20K and the
ants-vs-bees set, streamed, resumed, checksum-verified and extracted into the layout dinotune reads.

``catalog`` (URLs, sizes, checksums, splits), ``fetch`` (HTTP with resume and verification),
``extract`` (zip / tar without path traversal or links), ``dataset`` (the whole, idempotent).
The names below load on first use, so the CLI reads the catalog without the rest."""

from typing import Any

__all__ = ["CATALOG", "download_dataset"]


def __getattr__(name: str) -> Any:
    if name == "CATALOG":
        from dinotune.data.download.catalog import CATALOG

        return CATALOG
    if name == "download_dataset":
        from dinotune.data.download.dataset import download_dataset

        return download_dataset
    raise AttributeError(f"module 'dinotune.data.download' has no attribute {name!r}")
