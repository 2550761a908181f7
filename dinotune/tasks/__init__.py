"""Tasks: each supplies data, head, loss and evaluator; everything else is shared.

The registry below is the one place that maps a task name to its class; callers ask a task what
it is and does (``tasks/base.py``), never which one it is."""

from __future__ import annotations

import importlib
from typing import Any

from dinotune.tasks.base import Task, TaskData, build_backbone

_TASKS = {
    "classify": "dinotune.tasks.classify.task:ClassifyTask",
    "detect": "dinotune.tasks.detect.task:DetectTask",
    "segment": "dinotune.tasks.segment.task:SegmentTask",
}


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(cfg: Any) -> Task:
    """The Task object for a task config (looked up by ``cfg.task``)."""
    if cfg.task not in _TASKS:
        raise ValueError(f"unknown task {cfg.task!r}: choose {', '.join(_TASKS)}")
    module, cls = _TASKS[cfg.task].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)


__all__ = ["Task", "TaskData", "build_backbone", "get_task", "task_names"]
