"""The picture of a search: each query beside its hits (``dinotune search --picture``).

The hits are files of the indexed dataset that may have moved since it was embedded: a file that
cannot be read is drawn as a placeholder rather than failing the search. Each image is reduced to a
thumbnail as it is read (Pillow's draft mode for JPEGs), so a picture of large photos stays small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from dinotune.data.bands import is_band_file, read_input, stretch_to_rgb
from dinotune.errors import DinotuneError
from dinotune.viz.neighbours import neighbours_figure

THUMBNAIL = 256


def thumbnail(path: str | Path) -> Image.Image | None:
    """An RGB thumbnail of an image or band file (first three bands, stretched); None when unreadable."""
    try:
        if is_band_file(Path(path)):
            picture = stretch_to_rgb(read_input(Path(path)), (0, 1, 2))
        else:
            with Image.open(path) as image:
                image.draft("RGB", (THUMBNAIL, THUMBNAIL))
                picture = image.convert("RGB")
        picture.thumbnail((THUMBNAIL, THUMBNAIL))
        return picture
    except (OSError, ValueError, IndexError, DinotuneError, Image.DecompressionBombError):
        return None


def search_picture(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Draw ``search``'s results (``[{"query", "hits": [{"path", "score"}, ...]}, ...]``) at ``path``."""
    queries, hits = [], []
    for result in results:
        query = thumbnail(result["query"])
        queries.append((Path(result["query"]).name, query))
        hits.append([(Path(h["path"]).name, float(h["score"]), thumbnail(h["path"])) for h in result["hits"]])
    return neighbours_figure(queries, hits, path)
