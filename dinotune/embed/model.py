"""The backbone a feature command runs (``embed``, ``knn``, ``search``, ``duplicates``, ``pca``).

A model is named the way ``--model`` names it everywhere (``random:tiny``, a hub id, an official
``.pth``, a local folder) or is a dinotune run folder: a fine-tuned or self-supervised run gives its
backbone with the adapter merged, its own image size and its input bands, so the features are the
ones that run computes. The string written into embeddings files and indexes (``model_name``) is
what a later ``search`` uses to embed its queries with the same model.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

from dinotune.engine.device import select_device
from dinotune.engine.run_folder import RunLayout
from dinotune.runs import load


def backbone_for(model: str | Path, paths: Sequence[Path], device: str) -> tuple[Any, int | None, Any]:
    """``(backbone, image_size, input spec)`` for ``paths`` under ``model``: a backbone spec or a
    dinotune run folder (its backbone with the adapter merged, its ``backbone.image_size``, its
    input spec; ``paths`` must fit it). A spec gives ``image_size`` None; band arrays under it get
    their own statistics, the first three bands as RGB."""
    from dinotune.backbone.channels import adapt_input
    from dinotune.backbone.model import DinoBackbone
    from dinotune.data.bands import InputSpec, check_band_counts, is_band_file, make_spec

    spec = Path(model).expanduser()
    if RunLayout.is_run(spec):
        loaded = load(spec, device=device)
        bands = InputSpec.from_meta(loaded.meta)
        check_band_counts(paths, bands.layout, expected=bands.in_channels)
        return loaded.model.backbone, loaded.cfg.backbone.image_size, bands
    backbone = DinoBackbone.from_spec(str(model)).to(select_device(device))
    count = check_band_counts(paths)  # one band count for all
    arrays = any(is_band_file(p) for p in paths)
    bands = make_spec(count, arrays=True, paths=paths) if arrays else InputSpec()
    adapt_input(backbone, bands.in_channels, bands.rgb_bands, trainable=False)
    return backbone, None, bands


def model_name(model: str | Path) -> str:
    """How files name ``model``: a path that exists absolute (so a later command finds it from
    another folder), a spec as given."""
    path = Path(model).expanduser()
    return str(path.absolute()) if path.exists() else str(model)


def dinotune_version() -> str:
    try:
        return version("dinotune")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
