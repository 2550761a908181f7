"""Training and evaluating from a scene, the part detection, instance and semantic segmentation
share: the scene opened lazily in each DataLoader process, its input spec (a 3-band 8-bit scene is a
picture, anything else band arrays with per-band statistics from a sample of training windows), the
vector labels read and reported, the spatial split planned and reported, and the metadata a run
keeps. What a tile's target is belongs to each task (``tasks/<task>/scene_data.py``).

The split is a pure function of the scene's size, the tile, the block, ``--val-fraction`` and the
run's seed (``geo.sampling.plan_scene``), so ``eval`` finds the same validation blocks from the
run's config alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dinotune.data.input_spec import InputSpec
from dinotune.errors import DataError
from dinotune.geo.sampling import ScenePlan, TileSampler, plan_scene, window_statistics
from dinotune.geo.scene import Scene, Window, is_scene_file, open_scene
from dinotune.geo.tiles import tile_windows
from dinotune.tasks.tiling import as_tile_image
from dinotune.utils import info, warn


class SceneHandle:
    """A scene file opened on first use in the process that reads it: DataLoader workers are
    forked (or spawned) from the process that built the dataset, and a GDAL handle must not be
    shared between processes, so each one opens its own (the pid says whose it is)."""

    def __init__(self, path: str | Path, layout: str = "auto"):
        self.path, self.layout = Path(path), layout
        self._scene: Scene | None = None
        self._pid = -1

    def get(self) -> Scene:
        if self._scene is None or self._pid != os.getpid():
            self._scene, self._pid = open_scene(self.path, self.layout), os.getpid()
        return self._scene

    def read(self, window: Window) -> np.ndarray:
        """``bands x h x w`` samples of ``window`` (zeros outside the scene)."""
        return self.get().read(window)

    def image(self, window: Window, spec: InputSpec) -> torch.Tensor:
        """``window`` as the per-image readers give an image (``tiling.as_tile_image``)."""
        return as_tile_image(self.read(window), spec)

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker opens its own
        return {"path": self.path, "layout": self.layout, "_scene": None, "_pid": -1}


def is_scene_training(d: Any) -> bool:
    """The data section asks to train from a scene: ``--labels`` or ``--tile``, and ``--data`` a
    scene file (the config refused ``--labels`` beside anything else)."""
    return d.scene_requested() and is_scene_file(Path(d.data))


def is_scene_evaluation(data: str, labels: str, *, subset: int = 0, pre_transform: Any = None) -> bool:
    """``eval`` reads a scene: ``data`` is a scene file. ConfigError for ``--labels`` beside anything
    else, and for what applies to datasets of files only (``--subset``, corruptions)."""
    from dinotune.errors import ConfigError

    if not is_scene_file(Path(data)):
        if labels:
            raise ConfigError(f"--labels {labels} goes with a scene given as --data (a GeoTIFF, .npy ...), not with "
                              f"{data}")
        return False
    if subset:
        raise ConfigError(f"--subset picks images of a dataset; {data} is a scene, evaluated over its tiles")
    if pre_transform is not None:
        raise ConfigError(f"image corruptions apply to datasets of pictures; {data} is a scene")
    return True


def scene_tile(cfg: Any) -> int:
    """The training tile: ``--tile``, or the run's ``--image-size``."""
    return int(cfg.data.tile or cfg.backbone.image_size)


def require_labels(d: Any) -> None:
    if not d.labels:
        raise DataError(f"{d.data}: training from a scene needs its labels: --labels FILE (GeoJSON, GeoPackage, "
                        "shapefile polygons with a class property)")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Two paths name the same existing file."""
    try:
        return bool(str(a)) and bool(str(b)) and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def eval_labels(cfg: Any, data: str, labels: str) -> str:
    """The labels to evaluate a scene with: ``labels``, else the run's own when ``data`` is the
    scene it trained on; DataError when there are none."""
    if labels:
        return labels
    if cfg.data.labels and same_file(data, cfg.data.data):
        return cfg.data.labels
    raise DataError(f"{data}: evaluating on a scene needs its labels: --labels FILE")


def plan_for(cfg: Any, scene: Scene) -> ScenePlan:
    """The run's spatial split of ``scene`` (its tile, block, validation fraction and seed)."""
    d = cfg.data
    return plan_scene(scene.height, scene.width, scene_tile(cfg), d.block, d.val_fraction, cfg.train.seed)


def report_plan(plan: ScenePlan, val_fraction: float) -> None:
    info(plan.describe())
    if not plan.val_blocks:
        why = ("--val-fraction is 0" if val_fraction <= 0 else
               f"the scene holds a single block of {plan.block} px (lower --block)")
        warn(f"no validation blocks ({why}); training without evaluation. --val-fraction 0.2 holds out a fifth of "
             "the blocks")


def eval_windows(plan: ScenePlan, split: str, scene: Scene) -> list[Window]:
    """The tiles an evaluation reads: ``val`` the grid of the validation blocks, ``train`` that of
    the training blocks, ``test`` the whole scene (a scene held out whole). DataError when empty."""
    if split == "train":
        windows = plan.train_grid()
    elif split == "test":
        windows = tile_windows(scene.height, scene.width, plan.tile, 0.0)
    else:
        windows = plan.val_grid()
    if not windows:
        raise DataError(f"{scene.path}: the run held out no validation blocks of this scene (its --val-fraction is 0 "
                        "or the scene is a single block); --split test evaluates over the whole scene")
    return windows


def scene_spec(scene: Scene, windows: Sequence[Window], bands: Any) -> InputSpec:
    """The ``InputSpec`` of a training scene under the ``bands`` config: a 3-band 8-bit scene is a
    picture (ImageNet statistics unless ``--band-stats data``), anything else band arrays with each
    band's mean / std over a sample of ``windows`` (training windows: validation pixels are not
    looked at). ``--band-mean`` / ``--band-std`` win; ``--in-channels`` must be the scene's bands."""
    from dinotune.data.bands import make_spec

    picture = scene.rgb8
    if bands.in_channels and bands.in_channels != scene.bands:
        raise DataError(f"--in-channels {bands.in_channels} but {scene.path} has {scene.bands} band(s); pass "
                        f"--in-channels {scene.bands} or 0 (from the data)")
    mean, std = list(bands.mean), list(bands.std)
    if not mean and (not picture or bands.stats == "data"):
        mean, std = window_statistics(scene.read, windows, scene.height, scene.width,
                                      scale=1 / 255 if picture else 1.0)
    return make_spec(scene.bands, rgb_bands=bands.rgb_bands, layout=bands.layout, arrays=not picture,
                     stats=bands.stats, mean=mean, std=std)


def item_rng() -> np.random.Generator:
    """A generator for one training item's random window, seeded from torch's generator, which the
    loader seeds per worker and per epoch: runs repeat, resumed runs included."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ())))


@dataclass
class SceneInfo:
    """What a run records of its scene (``meta["scene"]``) and prints."""

    path: str
    labels: str
    crs: str | None
    plan: ScenePlan
    train_tiles: int
    val_tiles: int
    sampling: str

    def to_meta(self) -> dict[str, Any]:
        return {"file": self.path, "labels": self.labels, "crs": self.crs, **self.plan.to_meta(),
                "train_tiles_per_epoch": self.train_tiles, "val_tiles": self.val_tiles, "sampling": self.sampling}


def scene_info(scene: Scene, labels: str, plan: ScenePlan, sampler: TileSampler, val_tiles: int) -> SceneInfo:
    crs = scene.crs.to_string() if scene.georeferenced else None
    return SceneInfo(str(scene.path), str(labels), crs, plan, len(sampler), val_tiles, sampler.sampling)
