"""The layering the README draws, read off the source (ast / tokenize), so it stays true.

Layers, lowest first; a module may import its own layer or lower ones, never higher:

    errors, utils, threads, ops, config,        shared vocabulary; CPU threads; the task registry (names, lazy
    tasks.registry                              references)
    backbone, data, viz, runtime                DINOv2 / DINOv3 features, readers, pictures; torch-free inference
    adapters, models                            PEFT on the backbone; wrapper, pyramid, export graph, losses
    engine                                      training loop, checkpoints, devices, processes, the run layout
    tasks                                       classify / detect / segment / instance (siblings) over tasks.base
    runs                                        a trained run loaded (LoadedRun, load, checkpoint resolution)
    robustness, export, sweep, embed            corruptions; export of a run (ONNX, TorchScript, HF); sweeps;
                                                embeddings and the k-NN protocol
    api, demo                                   the Python API
    serve                                       the prediction server (a run, or an export)
    cli, __main__, dinotune/__init__            the command line and the package face

Besides: no unit-level import cycle; inside ``tasks`` no task imports another (each may import
``tasks.base`` and the registry) except the one it is built on (``BUILDS_ON``: instance on detect); the shared layers name no task (no task-name string, no import of
a task's folder); the run folder's names live in one module; the registry imports no torch.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import dinotune

ROOT = Path(dinotune.__file__).parent
LAYERS = [
    ("errors", "utils", "threads", "ops", "config", "tasks.registry"),
    ("backbone", "data", "viz", "runtime", "geo"),
    ("adapters", "models"),
    ("engine",),
    ("tasks",),
    ("runs",),
    ("robustness", "export", "sweep", "embed"),
    ("api", "demo"),
    ("serve",),
    ("cli", "__main__", "__init__"),
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
TASKS = ("classify", "detect", "segment", "instance", "pretrain")
# The sibling a task is built on and may import (instance segmentation extends detection, as Mask
# R-CNN extends Faster R-CNN); the rest stay apart, and a task built on stays unaware of its users.
BUILDS_ON = {"instance": ("detect",)}
# Generic layers: they ask a task (or the registry) what it does, never which one it is.
SHARED = ("api.py", "cli", "runs.py", "robustness.py", "export", "runtime", "serve", "sweep", "engine", "embed")


def _module_name(path: Path) -> str:
    """``dinotune.tasks.detect.coco``; a package's ``__init__.py`` keeps the name ``__init__``
    (``dinotune.__init__`` is the package face, a layer of its own)."""
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)


def _imports(path: Path, module: str | None = None) -> set[str]:
    """Every dinotune module ``path`` (named ``module``) imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (module or _module_name(path)).rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "dinotune")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "dinotune":
                continue
            for alias in node.names:  # from dinotune.tasks import registry -> dinotune.tasks.registry
                sub = f"{module}.{alias.name}"
                out.add(sub if module == "dinotune" or _is_module(sub) else module)
    return out


def _is_module(name: str) -> bool:
    """``dinotune.a.b`` names a module file or a package of the source tree."""
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _unit(module: str) -> str:
    """The layer unit of a module: its first name under dinotune (``__init__`` for the package);
    the task registry (``tasks.registry``) is a unit of its own, in the lowest layer."""
    parts = module.split(".")
    if parts[1:3] == ["tasks", "registry"]:
        return "tasks.registry"
    return parts[1] if len(parts) > 1 else "__init__"


def _sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_every_module_is_in_a_layer():
    units = {_unit(_module_name(p)) for p in _sources()}
    assert units <= set(LEVEL), f"modules outside the layer table: {sorted(units - set(LEVEL))}"


def test_no_module_imports_a_higher_layer():
    wrong = []
    for path in _sources():
        here = _unit(_module_name(path))
        for target in _imports(path):
            there = _unit(target)
            if LEVEL[there] > LEVEL[here]:
                wrong.append(f"{path.relative_to(ROOT.parent)} imports {target} ({there} is above {here})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_units():
    """Units may share a layer; even then none imports another that imports it back (the API and the
    export once did: ``api`` imported ``export`` and ``export`` imported ``api.load``)."""
    edges: dict[str, set[str]] = {}
    for path in _sources():
        here = _unit(_module_name(path))
        edges.setdefault(here, set()).update(u for u in map(_unit, _imports(path)) if u != here)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(unit: str, trail: list[str]) -> bool:
        state[unit] = 1
        for nxt in sorted(edges.get(unit, ())):
            if state.get(nxt) == 1:
                cycle.extend(trail[trail.index(nxt):] + [unit, nxt] if nxt in trail else [unit, nxt])
                return True
            if not state.get(nxt) and visit(nxt, trail + [unit]):
                return True
        state[unit] = 2
        return False

    for unit in sorted(edges):
        if not state.get(unit) and visit(unit, []):
            break
    assert not cycle, " -> ".join(cycle)


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """``(line, value)`` of every string literal in a Python file (f-strings' literal parts included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _shared_files() -> list[Path]:
    out = []
    for name in SHARED:
        target = ROOT / name
        out += sorted(p for p in target.rglob("*") if p.suffix in (".py", ".js", ".html")) if target.is_dir() else [target]
    return out


def test_shared_layers_name_no_task():
    """No task-name string and no import of a task's own folder in the generic layers: adding a task
    is a folder under ``tasks/`` and a registry entry, not an edit of these files."""
    import re

    from dinotune.tasks import registry

    names = set(registry.names()) | set(TASKS)
    wrong = []
    for path in _shared_files():
        where = path.relative_to(ROOT.parent)
        if path.suffix == ".py":
            wrong += [f"{where}:{line} {value!r}" for line, value in _string_literals(path) if value in names]
            for target in _imports(path):
                parts = target.split(".")
                if len(parts) > 2 and parts[1] == "tasks" and parts[2] in names:
                    wrong.append(f"{where} imports {target}")
        else:  # the page: a quoted task name in its script or markup
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if any(re.search(rf"""["'`]{name}["'`]""", line) for name in names):
                    wrong.append(f"{where}:{i} {line.strip()}")
    assert not wrong, "\n".join(wrong)


def test_the_run_folder_names_live_in_one_module():
    """``"checkpoints"`` and ``"config.yaml"`` (and the checkpoint names) as string literals appear in
    ``engine/run_folder.py`` alone: everything else asks ``RunLayout``."""
    home = ROOT / "engine" / "run_folder.py"
    wrong = []
    for path in _sources():
        if path == home:
            continue
        wrong += [f"{path.relative_to(ROOT.parent)}:{line} {value!r}" for line, value in _string_literals(path)
                  if value in ("checkpoints", "config.yaml")]
    assert not wrong, "\n".join(wrong)
    literals = {value for _, value in _string_literals(home)}
    assert {"checkpoints", "config.yaml", "best", "last"} <= literals


def test_the_registry_imports_nothing_heavy():
    """Reading the registry (the CLI, the torch-free runtime) imports no torch and no task."""
    targets = _imports(ROOT / "tasks" / "registry.py")
    assert targets <= {"dinotune.errors"}, targets
    code = ("import sys, dinotune.tasks.registry as r; r.names(); r.entry('classify').config_class(); "
            "assert 'torch' not in sys.modules and not any(m.startswith('dinotune.tasks.') and m != "
            "'dinotune.tasks.registry' for m in sys.modules), sorted(sys.modules)")
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent)


def test_the_shared_layer_checks_see_violations(tmp_path):
    """The task-name and layout checks find what they are written to find."""
    src = tmp_path / "m.py"
    src.write_text('def f(task):\n    if task == "detect":\n        return f"{task}" + "config.yaml"\n')
    assert {value for _, value in _string_literals(src)} >= {"detect", "config.yaml"}


def test_tasks_are_siblings():
    assert all(base in TASKS and task not in BUILDS_ON.get(base, ()) for task, bases in BUILDS_ON.items()
               for base in bases), "a task may build on another, never on one built on it"
    assert set(TASKS) == {p.name for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").is_file()}, \
        "every task folder is listed in TASKS"
    wrong = []
    for task in TASKS:
        for path in sorted((ROOT / "tasks" / task).rglob("*.py")):
            for target in _imports(path):
                parts = target.split(".")
                if (len(parts) > 2 and parts[1] == "tasks" and parts[2] in TASKS and parts[2] != task
                        and parts[2] not in BUILDS_ON.get(task, ())):
                    wrong.append(f"{path.relative_to(ROOT.parent)} imports {target}")
    for path in (ROOT / "tasks" / "base.py", ROOT / "tasks" / "__init__.py", ROOT / "tasks" / "registry.py"):
        for target in _imports(path):
            parts = target.split(".")
            if len(parts) > 2 and parts[1] == "tasks" and parts[2] in TASKS:
                wrong.append(f"{path.relative_to(ROOT.parent)} imports {target} (the shared layer knows no task)")
    assert not wrong, "\n".join(wrong)


def test_the_engine_imports_no_task_and_nothing_below_api_imports_it():
    for path in _sources():
        unit = _unit(_module_name(path))
        targets = {_unit(t) for t in _imports(path)}
        if unit == "engine":
            assert "tasks" not in targets, f"{path} imports a task"
        if LEVEL[unit] < LEVEL["api"]:
            assert "api" not in targets, f"{path} imports the API"


def test_the_import_reader_sees_violations(tmp_path, monkeypatch):
    """The checks above are only worth something if the reader finds imports in all their forms."""
    src = tmp_path / "m.py"
    src.write_text("import dinotune.api\nfrom dinotune import api, cli\ndef f():\n"
                   "    from dinotune.tasks.detect.coco import read_coco\n")
    assert {"dinotune.api", "dinotune.cli", "dinotune.tasks.detect.coco"} <= _imports(src, "dinotune.models.m")
    (tmp_path / "r.py").write_text("from ..detect import coco\nfrom . import base\n")
    assert {"dinotune.tasks.detect.coco", "dinotune.tasks.segment"} <= _imports(tmp_path / "r.py", "dinotune.tasks.segment.r")


def test_no_patch_size_literal_outside_the_backbone_registry():
    """The patch size comes from the backbone (DINOv2 14, DINOv3 16): no number 14 in the code
    outside ``backbone/registry.py`` (docstrings and comments may explain with it)."""
    found = []
    for path in _sources():
        if path == ROOT / "backbone" / "registry.py":
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.NUMBER and ast.literal_eval(tok.string) == 14:
                found.append(f"{path.relative_to(ROOT.parent)}:{tok.start[0]}")
    assert not found, found


def test_tasks_keep_nothing_between_calls(tmp_path):
    """A task holds its config and nothing else: what it builds is handed back (bundle, data), so
    one task object serves every model it built, whichever was built last."""
    import torch

    from dinotune.config import build_config
    from dinotune.tasks import build_backbone, get_task
    from tests.conftest import make_class_folders, make_coco_dataset, make_segmentation_folders

    make_class_folders(tmp_path / "cls" / "train", ["red", "blue"], 2)
    make_class_folders(tmp_path / "cls" / "val", ["red", "blue"], 1)
    data = {"classify": (tmp_path / "cls", {}),
            "detect": (make_coco_dataset(tmp_path / "coco", {"train": [1, 2], "val": [1, 2]}),
                       dict(image_size=56, num_queries=3, decoder_layers=1, hidden_dim=16, num_heads=2,
                            ffn_dim=16, sampling_points=1)),
            "segment": (make_segmentation_folders(tmp_path / "seg", {"train": 2, "val": 2}), dict(decoder="fpn",
                                                                                                  fpn_dim=16))}
    for name, (root, extra) in data.items():
        cfg = build_config(name, data=str(root), **{"model": "random:tiny", "image_size": 28, "batch_size": 2,
                                                    "workers": 0, "progress": False, "device": "cpu", **extra})
        task = get_task(cfg)
        backbone, _ = build_backbone(cfg)
        built = task.build_data(None, backbone.patch_size)
        first = task.build_model(built.meta, backbone)
        other_meta = {**built.meta, "class_names": [f"c{i}" for i in range(5)], "num_classes": 5,
                      "categories": [{"id": i + 1, "name": f"c{i}"} for i in range(5)]}
        task.build_model(other_meta, build_backbone(cfg)[0])  # a second model from the same task
        metrics = task.evaluate(first, task.loaders(built)[1], torch.device("cpu"), "fp32")
        assert task.monitor in metrics, name
        assert set(vars(task)) == {"cfg"}, f"{name} task keeps {sorted(set(vars(task)) - {'cfg'})}"
