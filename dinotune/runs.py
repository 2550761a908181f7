"""A trained run, loaded: ``load`` rebuilds the model of a run folder (base backbone + saved adapter +
head, the adapter optionally merged) as a ``LoadedRun`` that evaluates and predicts with its task.

The folder's layout is ``engine/run_folder.RunLayout``'s (the engine writes it); this module resolves
which checkpoint a call means and reads it. The API, the export, the server, the sweep and
robustness evaluation all load runs through here, and none of them knows the folder's names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dinotune.adapters import merge_adapter
from dinotune.backbone.channels import adapt_input_to_meta
from dinotune.config import ConfigError, check_ranges
from dinotune.data.input_spec import InputSpec
from dinotune.engine import checkpoint
from dinotune.engine.device import resolve_precision, select_device
from dinotune.engine.run_folder import BEST, CHECKPOINT_NAMES, LAST, RunLayout
from dinotune.errors import CheckpointError
from dinotune.models.bundle import ModelBundle
from dinotune.tasks import Task, build_backbone, get_task
from dinotune.utils import warn


@dataclass
class LoadedRun:
    """A trained model ready for inference: ``bundle`` (model on ``device``, post-processing,
    class names), plus its config, checkpoint metadata and task.

    Attributes:
        run_dir: the run folder (or the checkpoint folder, for one standing alone).
        checkpoint: the checkpoint folder the weights came from.
    """

    run_dir: Path
    cfg: Any
    meta: dict[str, Any]
    task: Task
    bundle: ModelBundle
    device: torch.device
    precision: str
    checkpoint: Path | None = None

    @property
    def model(self) -> nn.Module:
        return self.bundle.model

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def input_spec(self) -> InputSpec:
        """How images enter the model (bands, statistics), as the run saved it."""
        return InputSpec.from_meta(self.meta)

    def settings(self, **overrides: Any) -> tuple[Any, dict[str, Any]]:
        """The run's inference section with ``overrides`` of its fields applied, and the overrides
        that are not its fields (task options such as ``draw``), checked by name."""
        fields = {f.name for f in dataclasses.fields(self.cfg.inference)}
        given = {k: v for k, v in overrides.items() if v is not None}
        settings = dataclasses.replace(self.cfg.inference, **{k: v for k, v in given.items() if k in fields})
        check_ranges(settings, "inference.")
        return settings, {k: v for k, v in given.items() if k not in fields}

    def predict_option_names(self) -> set[str]:
        """The options ``predict`` takes for this run: its inference fields and its task's options."""
        return {f.name for f in dataclasses.fields(self.cfg.inference)} | set(self.task.predict_options)

    def predict(self, images: str | Path | Sequence[str | Path], **options: Any) -> list[dict[str, Any]]:
        """Task outputs per image (classification: top-k classes; detection: boxes; segmentation:
        class shares and label maps). Options: the fields of the config's ``inference`` section
        (``batch_size``, ``top_k``, ``score_threshold``, ...) and the task's ``predict_options``."""
        settings, extra = self.settings(**options)
        unknown = sorted(set(extra) - self.task.predict_options)
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: not an option of {self.task.name} predictions "
                              f"(valid: {', '.join(sorted(self.predict_option_names()))})")
        return self.task.predict(self, images, settings, **extra)

    def evaluate(self, data: str, split: str = "val", *, batch_size: int | None = None, images: str = "",
                 subset: int = 0, subset_seed: int = 0, pre_transform: Any = None, labels: str = "") -> dict[str, Any]:
        """Metrics on ``data`` in any layout the task reads; ``subset``: a reproducible random
        subset of that many images (tasks with ``supports_subset``); ``labels``: the labels of a
        scene given as ``data`` (tasks with ``supports_labels``)."""
        if subset and not self.task.supports_subset:
            raise ConfigError(f"--subset does not apply to {self.task.name} runs")
        if labels and not self.task.supports_labels:
            raise ConfigError(f"--labels does not apply to {self.task.name} runs")
        settings, _ = self.settings(batch_size=batch_size)
        extra = {"labels": labels} if labels else {}  # tasks without scenes take no such keyword
        return self.task.evaluate_data(self, data, split, settings, images=images, subset=subset,
                                       subset_seed=subset_seed, pre_transform=pre_transform, **extra)


def checkpoint_folder(run: str | Path, which: str = BEST, *, quiet: bool = False) -> Path:
    """The checkpoint folder a call on ``run`` (a run folder, or a checkpoint folder itself) means:
    ``RUN/checkpoints/<which>``, or the other one when it is missing (said, unless ``quiet``).
    CheckpointError when the run has none."""
    run = Path(run).expanduser()
    if RunLayout.is_checkpoint(run):  # a checkpoint folder itself
        return run
    if which not in CHECKPOINT_NAMES:
        raise ConfigError(f"--checkpoint {which!r}: choose {' or '.join(CHECKPOINT_NAMES)}")
    layout = RunLayout(run)
    folder = layout.checkpoint(which)
    try:
        return checkpoint.resolve(folder)
    except CheckpointError:
        try:
            found = checkpoint.resolve(layout.checkpoint(LAST if which == BEST else BEST))
        except CheckpointError:
            raise CheckpointError(f"{run}: no checkpoints (expected {folder})") from None
        if not quiet:
            warn(f"{folder} is missing; using {found}")
        return found


def run_root(folder: Path) -> Path:
    """The run folder a checkpoint folder belongs to (itself for one standing alone)."""
    layout = RunLayout.of_checkpoint(folder)
    return layout.root if layout is not None else folder


def read_config(run: str | Path) -> Any:
    """A run's saved config (complete: a missing key is an error), from its folder or a checkpoint's."""
    from dinotune.config.io import load_run_config

    path = Path(run).expanduser()
    if RunLayout.is_checkpoint(path):
        return checkpoint.read_config(path)
    if not RunLayout(path).config.is_file():
        raise FileNotFoundError(f"{path}: not a run folder (no {RunLayout(path).config.name})")
    return load_run_config(RunLayout(path).config)


def load(run: str | Path, *, checkpoint_name: str = BEST, device: str = "auto", merge: bool = True,
         model: str | None = None, precision: str = "auto") -> LoadedRun:
    """Rebuild a run's model: base backbone + saved adapter + head, optionally merged.

    Args:
        run: a run folder, or one of its checkpoint folders.
        checkpoint_name: ``best`` or ``last``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        merge: fold LoRA / DoRA into the backbone weights (same outputs, faster inference).
        model: a different location of the base weights (e.g. a local copy of the hub model).
        precision: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16``.
    """
    folder = checkpoint_folder(Path(run), checkpoint_name)
    cfg = checkpoint.read_config(folder)
    meta = checkpoint.read_meta(folder)
    task = get_task(cfg)
    backbone, fingerprint = build_backbone(cfg, model_override=model)
    if meta.get("backbone_fingerprint") and fingerprint != meta["backbone_fingerprint"]:
        warn(f"the base backbone weights ({model or cfg.backbone.model}) differ from the ones this run "
             "was trained on; predictions will not match the training results")
    adapt_input_to_meta(backbone, meta, trainable=cfg.adapter.kind != "none")  # the run's bands, if not RGB
    bundle = task.build_model(meta, backbone)
    checkpoint.load_weights(folder, bundle.model, cfg.adapter)
    if merge:
        merge_adapter(bundle.model.backbone)
    dev = select_device(device)
    bundle.model.to(dev).eval()
    return LoadedRun(run_root(folder), cfg, meta, task, bundle, dev, resolve_precision(precision, dev), folder)
