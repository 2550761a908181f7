"""What a run leaves for people: files readable under the umask, training curves one can read,
prediction and evaluation files named sensibly, and the offline hint naming every random size."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import dinotune
from dinotune.cli import main
from dinotune.cli.commands import _data_name
from dinotune.viz.plots import plot_training_curves, training_curve_panels
from tests.conftest import tiny_options


def test_run_files_keep_the_umask_permissions(tiny_folder, tmp_path):
    old = os.umask(0o022)
    try:
        result = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "run", epochs=1))
    finally:
        os.umask(old)
    run = Path(result["run_dir"])
    files = [p for p in run.rglob("*") if p.is_file() and p.name != ".dinotune.lock" and "tb" not in p.parts]
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {"config.yaml", "best_metrics.json", "training_curves.png", "checkpoints/best/head.safetensors",
            "checkpoints/last/trainer_state.safetensors", "metrics.jsonl"} <= set(modes)
    assert all(m == 0o644 for m in modes.values()), {k: oct(m) for k, m in modes.items() if m != 0o644}


def test_feature_cache_keeps_the_umask_permissions(tiny_folder, tmp_path):
    # safetensors writes its files 0600; the cache is shared across runs (--cache-dir), so a
    # teammate's run must be able to read it
    old = os.umask(0o022)
    try:
        dinotune.train(task="classify", data=str(tiny_folder), adapter="none", cache_features=True,
                       cache_dir=str(tmp_path / "cache"), **tiny_options(tmp_path / "run", epochs=1))
    finally:
        os.umask(old)
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in cached), \
        {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in cached}


def _detection_history(epochs: int = 3) -> list[dict]:
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    return [{"epoch": e, "train/loss": 30.0 - e, "train/loss_ce": 0.6, "train/loss_bbox": 0.4,
             "train/loss_giou": 0.5, "val/loss": 28.0 - e, "val/accuracy": 0.1 * e, "val/images": 50,
             **{f"val/{k}": 0.01 * e * (i + 1) for i, k in enumerate(keys)}} for e in range(1, epochs + 1)]


def test_detection_curves_get_one_panel_per_kind_of_number(tmp_path):
    panels = training_curve_panels(_detection_history())
    assert set(panels["loss"]) == {"train/loss", "val/loss"}  # the weighted total on its own axis
    assert set(panels["loss components"]) == {"train/loss_ce", "train/loss_bbox", "train/loss_giou"}
    assert len(panels["average precision (AP family)"]) == 6 and len(panels["average recall (AR family)"]) == 6
    assert set(panels["validation metrics"]) == {"val/accuracy"}  # counts are not curves
    path = plot_training_curves(_detection_history(), tmp_path / "curves.png")
    assert path.stat().st_size > 5000


def test_lines_of_one_panel_never_share_colour_and_dash(tmp_path):
    history = [{"epoch": 1, **{f"val/m{i:02d}": 0.1 * i for i in range(14)}}]
    path = plot_training_curves(history, tmp_path / "many.png")
    assert path.is_file()
    from dinotune.viz import plots

    styles = {(plots._COLOURS[j % len(plots._COLOURS)], plots._DASHES[(j // len(plots._COLOURS)) % len(plots._DASHES)])
              for j in range(14)}
    assert len(styles) == 14


def test_predict_out_without_an_extension_writes_json(tiny_folder, tmp_path, capsys):
    run = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "run", epochs=1))["run_dir"]
    out = tmp_path / "preds"
    assert main(["predict", run, str(tiny_folder / "val" / "red"), "--out", str(out), "--device", "cpu"]) == 0
    assert isinstance(json.loads(out.read_text()), list) and "(JSON)" in capsys.readouterr().err
    assert main(["predict", run, str(tiny_folder / "val" / "red"), "--out", str(tmp_path / "p.txt"),
                 "--device", "cpu"]) == 2
    assert "name the file *.json or *.csv" in capsys.readouterr().err


def test_evaluation_files_are_named_after_the_dataset_folder(tmp_path):
    (tmp_path / "roboflow" / "annotations").mkdir(parents=True)
    yaml_file = tmp_path / "roboflow" / "data.yaml"
    yaml_file.write_text("names: [a]\n")
    coco_json = tmp_path / "coco" / "annotations" / "instances_val.json"
    coco_json.parent.mkdir(parents=True)
    coco_json.write_text("{}")
    assert _data_name(str(yaml_file)) == "roboflow"
    assert _data_name(str(coco_json)) == "coco"
    assert _data_name(str(tmp_path / "coco")) == "coco"
    assert _data_name("hf:user/set").endswith("set")
    for name in ("a.csv", "b.csv"):  # two CSVs of one folder: two names
        (tmp_path / name).write_text("path,label\n")
    assert _data_name(str(tmp_path / "a.csv")) == "a" and _data_name(str(tmp_path / "b.csv")) == "b"


def test_evaluations_never_overwrite_each_other(tiny_folder, tmp_path, capsys):
    """The same data twice, and two CSVs of one folder: four evaluations, four folders of metrics and
    charts, each said where it went."""
    run = str(dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "run", epochs=1))
              ["run_dir"])
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted((tiny_folder / "val").rglob("*.png"))]
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    written = []
    for data in (str(tiny_folder), str(tiny_folder), str(tmp_path / "a.csv"), str(tmp_path / "b.csv")):
        capsys.readouterr()
        assert main(["eval", run, "--data", data, "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        written.append(next(line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("full metrics:")))
    names = [Path(w).parent.name for w in written]
    assert names == [f"{tiny_folder.name}-val", f"{tiny_folder.name}-val-2", "a-val", "b-val"]
    assert all(Path(w).is_file() and (Path(w).parent / "confusion_matrix.png").is_file() for w in written)
    out = tmp_path / "mine.json"  # --out: numbered too, and said
    for _ in range(2):
        assert main(["eval", run, "--data", str(tiny_folder), "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "mine-2.json").is_file()
    assert f"{out} exists; this evaluation goes to {tmp_path / 'mine-2.json'}" in capsys.readouterr().err


def test_offline_hint_names_every_random_size(monkeypatch, tmp_path):
    from dinotune.backbone import loading
    from dinotune.errors import BackboneLoadError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(BackboneLoadError, match=r"random:\{tiny\|small\|base\|large\|giant\}"):
        loading.load_dinov2("facebook/dinov2-small")


def test_the_model_is_resolved_before_any_data_is_scanned(tiny_folder, monkeypatch, tmp_path):
    """An offline hub id is refused in seconds, not after scanning thousands of images."""
    from dinotune.backbone import loading
    from dinotune.errors import BackboneLoadError
    from dinotune.tasks.classify import task as classify_task

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)

    def scanned(**_):
        raise AssertionError("the data was scanned before the model was resolved")

    monkeypatch.setattr(classify_task, "build_classification_data", scanned)
    opts = {**tiny_options(tmp_path / "run"), "model": "facebook/dinov2-small"}
    with pytest.raises(BackboneLoadError, match="cannot reach the Hugging Face hub"):
        dinotune.train(task="classify", data=str(tiny_folder), **opts)
    assert not (tmp_path / "run").exists()
