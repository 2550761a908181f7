"""The layering the README draws, read off the source (ast / tokenize), so it stays true.

Layers, lowest first; a module may import its own layer or lower ones, never higher:

    errors, utils, ops, config                 shared vocabulary
    backbone, data, viz, runtime               DINOv2 features, readers, pictures; torch-free ONNX inference
    adapters, models                           PEFT on the backbone; wrapper, pyramid, shared losses
    engine                                     training loop, checkpoints, devices, processes
    tasks                                      classify / detect / segment (siblings) over tasks.base
    robustness                                 evaluation under corruptions, of any task
    api, demo, export, sweep                   the Python API; export of a run (ONNX, TorchScript, HF); sweeps
    serve                                      the prediction server (a run through the API, or an export)
    cli, __main__, dinotune/__init__           the command line and the package face

and inside ``tasks`` no task imports another (each may import ``tasks.base``).
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import dinotune

ROOT = Path(dinotune.__file__).parent
LAYERS = [
    ("errors", "utils", "ops", "config"),
    ("backbone", "data", "viz", "runtime"),
    ("adapters", "models"),
    ("engine",),
    ("tasks",),
    ("robustness",),
    ("api", "demo", "export", "sweep"),
    ("serve",),
    ("cli", "__main__", "__init__"),
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
TASKS = ("classify", "detect", "segment")


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
            if module == "dinotune":  # from dinotune import api -> dinotune.api
                out.update(f"dinotune.{a.name}" for a in node.names)
            else:
                out.add(module)
    return out


def _unit(module: str) -> str:
    """The layer unit of a module: its first name under dinotune (``__init__`` for the package)."""
    parts = module.split(".")
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


def test_tasks_are_siblings():
    wrong = []
    for task in TASKS:
        for path in sorted((ROOT / "tasks" / task).rglob("*.py")):
            for target in _imports(path):
                parts = target.split(".")
                if len(parts) > 2 and parts[1] == "tasks" and parts[2] in TASKS and parts[2] != task:
                    wrong.append(f"{path.relative_to(ROOT.parent)} imports {target}")
    for path in (ROOT / "tasks" / "base.py", ROOT / "tasks" / "__init__.py"):
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
    assert {"dinotune.tasks.detect", "dinotune.tasks.segment"} <= _imports(tmp_path / "r.py", "dinotune.tasks.segment.r")


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
