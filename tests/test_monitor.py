"""What picks ``checkpoints/best``: ``--monitor`` (checked against the metrics the task declares,
or the first evaluation's), the task's default for the data (classification: balanced accuracy on
imbalanced validation classes), and the rule that a collapsed epoch (one class for every image) is
never best while a healthy epoch exists: in ``Monitor`` on synthetic records, in early stopping, and
through the real ``Trainer`` with the real classification metrics on scripted predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import dinotune
from dinotune.config import ClassifyConfig, ConfigError, build_config, save_yaml
from dinotune.config.io import load_run_config
from dinotune.engine import Trainer, checkpoint
from dinotune.engine.monitor import EarlyStopping, Monitor, MonitorChoice, choose_monitor, epoch_line
from dinotune.tasks import build_backbone, get_task
from dinotune.tasks.classify.metrics import ClassificationMetrics
from dinotune.tasks.classify.task import ClassifyTask
from dinotune.tasks.detect.single_metrics import SINGLE_OBJECT_KEYS
from dinotune.utils import seed_everything
from tests.conftest import make_class_folders, make_trainer, tiny_options
from tests.test_frictions import IMBALANCED, make_imbalanced_rgba


@pytest.fixture
def loud():
    """Progress messages on (the test session runs quiet), for tests that read them."""
    from dinotune import utils

    before = utils._QUIET
    utils.set_quiet(False)
    yield
    utils.set_quiet(before)


def _rec(epoch: int, top1: float, collapsed: int | None = None, **extra) -> dict:
    record = {"epoch": epoch, "val/top1": top1, **extra}
    if collapsed is not None:
        record["val/collapsed"] = collapsed
    return record


def _best_epochs(monitor: Monitor, records: list[dict]) -> list[int]:
    """The best epoch after each record, as the trainer keeps it."""
    best, out = None, []
    for r in records:
        if monitor.improved(r, best):
            best = r
        out.append(best["epoch"] if best else None)
    return out


# ----------------------------------------------------------------- collapse, synthetic records
def test_a_healthy_epoch_beats_any_collapsed_one_whatever_its_metric():
    m = Monitor("val/top1", "max")
    records = [_rec(1, 0.499, 1), _rec(2, 0.55, 1),  # collapsed only: the better collapsed one is best
               _rec(3, 0.31, 0),  # the first healthy epoch is best, though lower
               _rec(4, 0.70, 1),  # collapsed again: never beats a healthy best
               _rec(5, 0.30, 0), _rec(6, 0.35, 0)]  # healthy epochs compete by their metric
    assert _best_epochs(m, records) == [1, 2, 3, 3, 3, 6]


def test_records_without_the_flag_compare_as_before_and_min_mode_too():
    m = Monitor("val/loss", "min")
    assert _best_epochs(m, [{"epoch": 1, "val/loss": 2.0}, {"epoch": 2, "val/loss": 1.0},
                            {"epoch": 3, "val/loss": 0.5, "val/collapsed": 1},
                            {"epoch": 4, "val/loss": 1.5}]) == [1, 2, 2, 2]
    # the training loss (no validation data) has no collapse to consult
    assert Monitor("train/loss", "min").collapsed({"val/collapsed": 1}) is False


def test_healthy_ema_weights_beat_collapsed_raw_ones_in_the_same_epoch():
    m = Monitor("val/top1", "max")
    record = {"epoch": 1, "val/top1": 0.6, "val/collapsed": 1, "val_ema/top1": 0.4, "val_ema/collapsed": 0}
    assert m.score(record) == (0.4, "ema")
    assert m.improved(record, {"epoch": 0, "val/top1": 0.9, "val/collapsed": 1}) == "ema"
    both_bad = {**record, "val_ema/collapsed": 1}
    assert m.score(both_bad) == (0.6, "raw")


def test_early_stopping_counts_the_first_healthy_epoch_as_an_improvement():
    m, early = Monitor("val/top1", "max"), EarlyStopping(patience=2, min_delta=0.0)
    assert not early.update(m, _rec(1, 0.6, 1), final=False)
    assert not early.update(m, _rec(2, 0.3, 0), final=False)
    assert (early.reference, early.reference_epoch, early.waited) == (0.3, 2, 0)
    assert not early.update(m, _rec(3, 0.9, 1), final=False) and early.waited == 1  # collapsed: no improvement
    assert early.update(m, _rec(4, 0.2, 0), final=False) and early.stopped == 4
    # an older run's state has no reference_collapsed: it loads as healthy
    state = early.state_dict()
    del state["reference_collapsed"]
    other = EarlyStopping(2, 0.0)
    other.load_state_dict(state)
    assert other.reference_collapsed is False and other.stopped == 4


def test_the_epoch_line_says_collapsed_in_words_not_as_a_score():
    m = Monitor("val/top1", "max")
    line = epoch_line({"epoch": 1, "phase": "train", "train/loss": 1.0, "val/top1": 0.5, "val/collapsed": 1,
                       "time_s": 1.0}, m, 3, "raw", False, 0.0)
    assert "val/collapsed" not in line and "collapsed (one answer for everything)" in line
    healthy = epoch_line({"epoch": 1, "phase": "train", "val/top1": 0.5, "val/collapsed": 0, "time_s": 1.0},
                         m, 3, None, False, 0.0)
    assert "collapsed" not in healthy


# ------------------------------------------------------------------------- choosing the metric
CHOICE = MonitorChoice("top1", "max", "validation classes balanced", ("loss", "top1", "f1_macro", "accuracy_balanced"))


def test_choose_monitor_auto_named_and_refused():
    auto = choose_monitor("auto", "auto", CHOICE, validating=True)
    assert (auto.key, auto.mode, auto.reason) == ("val/top1", "max", "validation classes balanced")
    loss = choose_monitor("loss", "auto", CHOICE, validating=True)
    assert (loss.key, loss.mode, loss.reason) == ("val/loss", "min", "--monitor loss")
    assert choose_monitor("val/f1_macro", "min", CHOICE, validating=True) == Monitor(
        "val/f1_macro", "min", "--monitor val/f1_macro")
    assert choose_monitor("f1_macro", "auto", CHOICE, validating=False).key == "train/loss"
    with pytest.raises(ConfigError, match=r"--monitor AP: .*choose from loss, top1, f1_macro, accuracy_balanced"):
        choose_monitor("AP", "auto", CHOICE, validating=True)
    undeclared = MonitorChoice("mae", "min")  # a task that declares no keys: only counts are refused here
    assert choose_monitor("rmse", "auto", undeclared, validating=True).mode == "max"
    assert choose_monitor("mae", "auto", undeclared, validating=True).mode == "min"  # the task's own direction
    with pytest.raises(ConfigError, match="--monitor images"):
        choose_monitor("images", "auto", undeclared, validating=True)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_classification_declares_exactly_the_scores_it_computes(k):
    m = ClassificationMetrics(k)
    m.update(torch.randn(12, k), torch.arange(12) % k)
    out = m.compute()
    scores = {key for key, v in out.items() if isinstance(v, float) or v is None}
    assert scores == set(m.score_keys())
    assert out["collapsed"] == 0 and type(out["collapsed"]) is int


def _folder_task(root: Path, counts: dict[str, int]):
    make_class_folders(root, list(counts), 1, size=8)
    cfg = ClassifyConfig()
    task = ClassifyTask(cfg)
    from dinotune.tasks.classify.data import ImageListDataset

    names = list(counts)
    items = [(root / n / f"{n}_0.png", i) for i, n in enumerate(names) for _ in range(counts[n])]
    return task, {"num_classes": len(names)}, ImageListDataset(items, None)


def test_classification_default_is_balanced_accuracy_on_imbalanced_validation_classes(tmp_path):
    task, meta, val = _folder_task(tmp_path, {"red": 312, "green": 58, "blue": 53})
    choice = task.monitor_for(meta, val)
    assert choice.default == "accuracy_balanced"
    assert choice.reason == "validation classes imbalanced: 312 / 58 / 53 images"
    assert "roc_auc" not in choice.keys and "top5" not in choice.keys and "accuracy_balanced" in choice.keys
    assert choose_monitor("auto", "auto", choice, True).describe() == (
        "best checkpoint by accuracy_balanced (validation classes imbalanced: 312 / 58 / 53 images)")
    # 1.5x is still balanced enough for top-1; a missing class does not count as the smallest
    task, meta, val = _folder_task(tmp_path / "b", {"red": 15, "green": 10, "blue": 0})
    assert (task.monitor_for(meta, val).default, task.monitor_for(meta, val).reason) == (
        "top1", "validation classes balanced: 15 / 10 images")
    assert task.monitor_for(meta, None).default == "top1"


def test_detection_declares_single_object_metrics_for_single_object_heads_only():
    from dinotune.tasks.detect.task import DetectTask

    detr = DetectTask(build_config("detect")).monitor_for({}, None)
    assert detr.default == "AP" and "AP50" in detr.keys and not set(SINGLE_OBJECT_KEYS) & set(detr.keys)
    single = DetectTask(build_config("detect", head="simple")).monitor_for({}, None)
    assert single.default == "map50" and set(SINGLE_OBJECT_KEYS) <= set(single.keys)


def test_old_run_configs_load_with_auto(tmp_path):
    path = tmp_path / "config.yaml"
    save_yaml(build_config("classify", monitor="f1_macro", monitor_mode="max"), path)
    data = yaml.safe_load(path.read_text())
    del data["train"]["monitor"], data["train"]["monitor_mode"]
    path.write_text(yaml.safe_dump(data))
    cfg = load_run_config(path)
    assert (cfg.train.monitor, cfg.train.monitor_mode) == ("auto", "auto")


# ------------------------------------------------------------------ through the real Trainer
def _imbalanced(tmp_path: Path) -> Path:
    return make_imbalanced_rgba(tmp_path / "imb", IMBALANCED)  # 40 / 12 / 8 / 4 images


class _ScriptedPredictions:
    """Trains with the real task; each evaluation scores scripted predictions (one class index per
    validation image) with the real classification metrics, so ``collapsed`` comes from the code
    that computes it for real runs."""

    def __init__(self, task, script):
        self.task, self.script = task, list(script)
        self.monitor, self.monitor_mode = task.monitor, task.monitor_mode

    def training_step(self, bundle, model, batch):
        return self.task.training_step(bundle, model, batch)

    def evaluate(self, bundle, loader, device, precision, show_progress=False):
        labels = torch.tensor([label for _, label in loader.dataset.items])
        predicted = self.script.pop(0)(labels)
        logits = torch.nn.functional.one_hot(predicted, len(bundle.class_names)).float() * 5
        return self.task.compute_metrics(bundle, [{"logits": logits, "labels": labels,
                                                   "index": torch.arange(len(labels))}], loader.dataset)


def _majority(labels):  # the most common class for every image: top-1 0.625, balanced accuracy 0.25
    return torch.full_like(labels, int(torch.bincount(labels).argmax()))


def _wrong_but_varied(labels):  # healthy, yet worse by both: top-1 12 / 64 = 0.1875, balanced accuracy 0.075
    out = (labels + 1) % 4
    majority = int(torch.bincount(labels).argmax())
    out[(labels == majority).nonzero()[:12, 0]] = majority  # 12 of its 40 images right, every other image wrong
    return out


@pytest.mark.parametrize("monitor", ["auto", "top1"])
def test_trainer_never_keeps_a_collapsed_epoch_when_a_healthy_one_follows(tmp_path, monitor, capsys, loud):
    data = _imbalanced(tmp_path)
    cfg = build_config("classify", data=str(data), val_data=str(data), monitor=monitor,
                       **tiny_options(tmp_path / "run", epochs=3, batch_size=16, check_images="fast"))
    trainer = make_trainer(cfg, tmp_path / "run")
    key = "val/accuracy_balanced" if monitor == "auto" else "val/top1"
    assert trainer.monitor.key == key  # auto: the validation classes are 40 / 12 / 8 / 4
    trainer.task = _ScriptedPredictions(trainer.task, [_majority, _wrong_but_varied, _majority])
    result = trainer.fit()
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/collapsed"] for r in history] == [1, 0, 1]
    assert history[0][key] > history[1][key]  # the collapsed epochs score higher: the old rule kept them
    assert result["best"]["epoch"] == 2
    best = json.loads((tmp_path / "run" / "best_metrics.json").read_text())
    assert best["epoch"] == 2 and best["collapsed"] == 0 and best["monitor"]["key"] == key
    assert checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "best")["epoch"] == 2
    err = capsys.readouterr().err
    expected = ("best checkpoint by accuracy_balanced (validation classes imbalanced: 40 / 12 / 8 / 4 images)"
                if monitor == "auto" else "best checkpoint by top1 (--monitor top1)")
    assert expected in err
    assert "--sampler balanced" in err  # the collapse warning's advice
    assert result["monitor"]["key"] == key


def test_a_run_that_collapses_at_first_keeps_its_first_healthy_epoch(tmp_path):
    data = _imbalanced(tmp_path)
    cfg = build_config("classify", data=str(data), val_data=str(data), monitor="top1",
                       **tiny_options(tmp_path / "run", epochs=4, batch_size=16, check_images="fast", patience=2))
    trainer = make_trainer(cfg, tmp_path / "run")
    trainer.task = _ScriptedPredictions(trainer.task, [_majority, _majority, _wrong_but_varied, _majority])
    result = trainer.fit()
    assert result["best"]["epoch"] == 3 and result["stopped_early"] is None  # epoch 3 improved: waited 1 of 2


def test_an_unknown_monitor_is_refused_before_training_and_leaves_no_folder(tiny_folder, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--monitor AP: .*choose from loss, top1, precision_macro, .*roc_auc"):
        dinotune.train(task="classify", data=str(tiny_folder), monitor="AP", **tiny_options(out, epochs=1))
    assert not out.exists()


class _Undeclared:
    """A task that declares no metric keys: ``--monitor`` is checked against the first evaluation."""

    monitor, monitor_mode = "top1", "max"

    def __init__(self, task):
        self.task = task

    def training_step(self, bundle, model, batch):
        return self.task.training_step(bundle, model, batch)

    def evaluate(self, *args, **kwargs):
        return {"top1": 0.5, "loss": 1.0, "images": 6}


def test_a_monitor_the_task_did_not_declare_is_checked_at_the_first_evaluation(tiny_folder, tmp_path):
    cfg = build_config("classify", data=str(tiny_folder), monitor="mae", **tiny_options(tmp_path / "run", epochs=2))
    seed_everything(0)
    task = get_task(cfg)
    backbone, _ = build_backbone(cfg)
    data = task.build_data(None, backbone.patch_size)
    bundle = task.build_model(data.meta, backbone)
    train_loader, val_loader = task.loaders(data)
    (tmp_path / "run").mkdir()
    trainer = Trainer(bundle=bundle, task=_Undeclared(task), train_loader=train_loader, val_loader=val_loader,
                      cfg=cfg, run_dir=tmp_path / "run", meta=data.meta, device=torch.device("cpu"), precision="fp32")
    assert trainer.monitor.key == "val/mae"
    with pytest.raises(ConfigError, match=r"--monitor mae: .*choose from top1, loss or auto"):
        trainer.fit()
