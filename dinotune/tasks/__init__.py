"""Tasks: each supplies its data, model, loss, metrics, post-processing, export graph and runtime;
everything else is shared.

``registry.py`` is the one place that maps a task name to its classes; callers ask a task what it
is and does (``tasks/base.py``, ``runtime/task.py``), never which one it is. Importing this package
imports neither torch nor a task: ``get_task``, ``build_backbone``, ``Task`` and ``TaskData`` load
on first use.
"""

from __future__ import annotations

from typing import Any

from dinotune.tasks.registry import TaskEntry, entry, names, register, unregister


def task_names() -> list[str]:
    return names()


def get_task(cfg: Any) -> Any:
    """The Task object for a task config (looked up by ``cfg.task``)."""
    from dinotune.tasks.registry import task_for

    return task_for(cfg)


def __getattr__(name: str) -> Any:
    if name in ("Task", "TaskData", "build_backbone"):
        from dinotune.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module 'dinotune.tasks' has no attribute {name!r}")


__all__ = ["Task", "TaskData", "TaskEntry", "build_backbone", "entry", "get_task", "names", "register",
           "task_names", "unregister"]
