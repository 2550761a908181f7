"""The registry of tasks: name -> config class, task class (PyTorch), runtime class (numpy), help.

The one table every generic layer asks: the CLI builds its subcommands and choices from it, the
config layer its name -> config-class table, the torch-free runtime and the server the class that
pre- and post-processes an exported model's task. Entries name their classes as
``"module:Class"`` strings, imported on first use, so reading the registry imports neither torch
nor a task (``dinotune predict --backend onnx`` runs without torch).

A task outside the package registers itself with ``register`` (see ``tests/test_plugin_task.py``):

    register(TaskEntry("count", "Count objects", config=CountConfig, task=CountTask,
                       runtime=CountRuntime))
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from dinotune.errors import ConfigError


def _resolve(ref: str | type) -> type:
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TaskEntry:
    """One task.

    Attributes:
        name: the command-line name (``dinotune train NAME``), saved as ``task`` in every config.
        help: one line saying what the task trains and on what data (the CLI's help).
        config: the task's config dataclass, or ``"module:Class"``.
        task: its ``dinotune.tasks.base.Task`` subclass (PyTorch), or ``"module:Class"``.
        runtime: its ``dinotune.runtime.task.RuntimeTask`` subclass (numpy only: the exported
            model's pre- and post-processing, records, output files and what the server draws),
            or ``"module:Class"``.
        command: a command of its own besides ``dinotune train NAME`` (``dinotune pretrain``), or empty.
    """

    name: str
    help: str
    config: str | type
    task: str | type
    runtime: str | type
    command: str = ""

    def config_class(self) -> type:
        return _resolve(self.config)

    def task_class(self) -> type:
        return _resolve(self.task)

    def runtime_class(self) -> type:
        return _resolve(self.runtime)


_ENTRIES: dict[str, TaskEntry] = {}


def register(entry: TaskEntry, *, replace: bool = False) -> TaskEntry:
    """Add ``entry``; a name already taken is refused unless ``replace``."""
    if not entry.name or not entry.name.isidentifier():
        raise ConfigError(f"task name {entry.name!r}: use a plain word (letters, digits, _)")
    if entry.name in _ENTRIES and not replace:
        raise ConfigError(f"a task named {entry.name!r} is already registered")
    _ENTRIES[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a registered task (a test's plug-in task, when the test ends)."""
    _ENTRIES.pop(name, None)


def names() -> list[str]:
    """Registered task names, built-in ones first."""
    return list(_ENTRIES)


def entry(name: str) -> TaskEntry:
    """The entry of task ``name``; ConfigError naming the valid ones otherwise."""
    try:
        return _ENTRIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown task {name!r}; valid: {', '.join(_ENTRIES)}") from None


def default_name() -> str:
    """The task of a call that names none (``dinotune.train(data=...)``): the first registered."""
    return next(iter(_ENTRIES))


def task_for(cfg: Any) -> Any:
    """A ``Task`` object (PyTorch) for a task config (looked up by ``cfg.task``)."""
    return entry(cfg.task).task_class()(cfg)


# The built-in tasks. Each is one folder under dinotune/tasks/ plus its config in dinotune/config/.
register(TaskEntry(
    "classify", "Train an image classifier (class folders, CSV, or Hugging Face datasets)",
    config="dinotune.config.classify:ClassifyConfig", task="dinotune.tasks.classify.task:ClassifyTask",
    runtime="dinotune.tasks.classify.runtime:ClassifyRuntime"))
register(TaskEntry(
    "detect", "Train an object detector (COCO or YOLO data): DETR-style, Faster R-CNN, or single-object "
              "simple / improved",
    config="dinotune.config.detect:DetectConfig", task="dinotune.tasks.detect.task:DetectTask",
    runtime="dinotune.tasks.detect.runtime:DetectRuntime"))
register(TaskEntry(
    "segment", "Train a semantic segmenter (VOC, ADE20K, image/mask folders, COCO masks): linear or FPN decoder",
    config="dinotune.config.segment:SegmentConfig", task="dinotune.tasks.segment.task:SegmentTask",
    runtime="dinotune.tasks.segment.runtime:SegmentRuntime"))
register(TaskEntry(
    "instance", "Train an instance segmenter (COCO polygons / RLE, YOLO-seg): DETR-style with a mask per query, "
                "or Mask R-CNN",
    config="dinotune.config.instance:InstanceConfig", task="dinotune.tasks.instance.task:InstanceTask",
    runtime="dinotune.tasks.instance.runtime:InstanceRuntime"))
register(TaskEntry(
    "pretrain", "Self-supervised pretraining on unlabelled images (DINOv2's objective, or distillation of a "
                "larger backbone); the run is a backbone for every other task",
    config="dinotune.config.pretrain:PretrainConfig", task="dinotune.tasks.pretrain.task:PretrainTask",
    runtime="dinotune.tasks.pretrain.runtime:PretrainRuntime", command="pretrain"))
