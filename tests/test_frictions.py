"""First-day frictions on real datasets: a VOC-layout set with its own classes, flags that must be
honoured or refused by name, classification that collapses to one class, top-k that says nothing,
sample titles that need no legend, and how many images a metric rests on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dinotune
from dinotune.config import ClassifyConfig, SegmentConfig
from dinotune.errors import DataError
from dinotune.tasks.classify.metrics import ClassificationMetrics, collapse_warning
from dinotune.tasks.classify.task import ClassifyTask
from dinotune.tasks.segment.data import VOC_CLASSES, find_segmentation_data, scan_source
from dinotune.tasks.segment.task import SegmentTask
from tests.conftest import COLOURS, make_coco_dataset, make_image, make_segmentation_folders, tiny_options

NAMES4 = ["background", "cell", "nucleus", "debris"]


def make_voc_layout(root: Path, counts: dict[str, int], labels: int = 4, size: int = 28, seed: int = 0) -> Path:
    """A VOC-layout set with its own ``labels`` classes, as labelling tools export them:
    ``JPEGImages/*.jpg`` (grayscale), ``SegmentationClass/*.png`` (label values 0..labels-1, a 255
    boundary), ``ImageSets/Segmentation/<split>.txt``. Each class k > 0 is a square of its own grey."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        ids = []
        for i in range(n):
            ident = f"{split}_{i:03d}"
            pixels = rng.integers(20, 60, (size, size)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            for label in range(1, labels):
                s = int(rng.integers(5, size // 3))
                x, y = (int(v) for v in rng.integers(0, size - s, 2))
                mask[y:y + s, x:x + s] = label
                pixels[y:y + s, x:x + s] = 60 + 190 * label // labels
            mask[0] = 255
            Image.fromarray(pixels, mode="L").save(root / "JPEGImages" / f"{ident}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{ident}.png")
            ids.append(ident)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


# ------------------------------------------------------------------- item 2: classes of a layout
def test_voc_layout_with_its_own_classes_is_not_read_as_pascal(tmp_path):
    root = make_voc_layout(tmp_path / "voc", {"train": 3, "val": 2})
    src = find_segmentation_data(root, "train")
    assert src.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert "aeroplane" not in src.class_names


def test_standard_voc_labels_keep_pascal_names(tmp_path):
    root = make_voc_layout(tmp_path / "voc", {"train": 2, "val": 1}, labels=21)
    assert find_segmentation_data(root, "train").class_names == VOC_CLASSES
    # a count of 21 without names means Pascal too; any other count its own classes
    assert find_segmentation_data(root, "train", num_classes=21).class_names == VOC_CLASSES


def test_voc_layout_honours_num_classes_and_class_names_end_to_end(tmp_path, capsys):
    root = make_voc_layout(tmp_path / "voc", {"train": 4, "val": 2})
    result = dinotune.train(task="segment", data=str(root), num_classes=4, class_names=NAMES4,
                            **tiny_options(tmp_path / "run", image_size=28, epochs=1))
    run = Path(result["run_dir"])
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["num_classes"] == 4 and meta["class_names"] == NAMES4
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["num_classes"] == 4 and config["data"]["class_names"] == NAMES4
    best = json.loads((run / "best_metrics.json").read_text())
    assert list(best["per_class_IoU"]) == NAMES4 and best["images"] == 2
    # evaluating the run reads the data with the checkpoint's classes
    metrics = dinotune.load(run, device="cpu").evaluate(str(root))
    assert list(metrics["per_class_IoU"]) == NAMES4 and metrics["images"] == 2


def test_class_flags_that_cannot_be_honoured_are_errors_naming_them(tmp_path):
    root = make_voc_layout(tmp_path / "voc", {"train": 2, "val": 1})
    with pytest.raises(DataError, match=r"--class-names gives 4 names but --num-classes is 3"):
        find_segmentation_data(root, "train", num_classes=3, class_names=NAMES4)
    # 3 classes, but the masks hold label 3: refused naming the mask, never widened silently
    src = find_segmentation_data(root, "train", num_classes=3)
    assert src.num_classes == 3
    with pytest.raises(DataError, match=r"train_00\d\.png: label values 3 are outside 0\.\.2"):
        scan_source(src)


def test_ade20k_layout_honours_class_names(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / split / "a.jpg")
        Image.fromarray(np.array([[0, 1, 2, 3]] * 16, np.uint8).repeat(4, 1), mode="L").save(
            root / "annotations" / split / "a.png")
    src = find_segmentation_data(root, "train", class_names=["sky", "road", "car"])
    assert src.class_names == ["sky", "road", "car"] and src.mask_kind == "ade20k"
    assert scan_source(src) is src  # values 1..3 are the 3 classes, 0 is ignored
    assert len(find_segmentation_data(root, "train").class_names) == 150  # the benchmark's own


@pytest.mark.parametrize("flags, named", [({"num_classes": 3}, "--num-classes"),
                                           ({"class_names": ["a", "b"]}, "--class-names")])
def test_coco_refuses_class_flags_by_name(tmp_path, flags, named):
    coco = make_coco_dataset(tmp_path / "coco", {"train": [1], "val": [1]})
    with pytest.raises(DataError, match=re.escape(named) + r".*cannot be applied to COCO data"):
        find_segmentation_data(coco, "train", **flags)


def test_validation_split_takes_the_training_classes(tmp_path):
    # the val masks lack the top label: read on their own they would count fewer classes
    root = make_segmentation_folders(tmp_path / "seg", {"train": 4})
    val = tmp_path / "seg" / "val"
    for sub in ("images", "masks"):
        (val / sub).mkdir(parents=True)
    Image.fromarray(np.full((28, 28, 3), 120, np.uint8)).save(val / "images" / "v.png")
    Image.fromarray(np.array([[0, 1] * 14] * 28, np.uint8), mode="L").save(val / "masks" / "v.png")
    cfg = dinotune.build_config("segment", data=str(root), **tiny_options(tmp_path / "run", image_size=28))
    data = SegmentTask(cfg).build_data(None, 14)
    assert data.meta["num_classes"] == 3 and data.val.source.class_names == data.train.source.class_names


# ------------------------------------------------------------- item 6: collapse, top-k, images
def _classify_parts(labels: list[int], predicted: int, k: int = 4) -> list[dict[str, torch.Tensor]]:
    logits = torch.zeros(len(labels), k)
    logits[:, predicted] = 3.0
    return [{"logits": logits, "labels": torch.tensor(labels), "index": torch.arange(len(labels))}]


def _bundle(names: list[str]) -> SimpleNamespace:
    return SimpleNamespace(criterion=torch.nn.CrossEntropyLoss(), class_names=names)


def test_collapse_to_one_class_is_warned_naming_the_class_and_majority_share(capsys):
    names = ["red", "green", "blue", "yellow"]
    labels = [0] * 40 + [1] * 12 + [2] * 8 + [3] * 4
    out = ClassifyTask(ClassifyConfig()).compute_metrics(_bundle(names), _classify_parts(labels, 0), None)
    err = capsys.readouterr().err
    assert "warning: all 64 evaluated images were predicted as 'red'" in err
    assert "'red' is the most common, 62.5% of them (40 of 64), so top-1 0.625" in err
    assert "--sampler balanced" in err and "--loss focal" in err and "--lr" in err
    assert out["top1"] == pytest.approx(0.625) and out["collapsed"] == 1


def test_collapse_onto_a_minority_class_quotes_its_share_beside_the_majority():
    """The trial's numbers: top-1 0.076 came from the PREDICTED (minority) class, which the warning
    once called "what answering one class gives" beside a 49.9% majority."""
    names = ["dog", "cat", "fox"]
    warning = collapse_warning([[0, 0, 211], [0, 0, 180], [0, 0, 32]], names)
    assert "predicted as 'fox'" in warning and "top-1 0.076 is the share of 'fox' (32 of 423)" in warning
    assert "below the 49.9% that answering the most common class, 'dog' (211 of 423), would give" in warning
    assert "--sampler balanced" in warning and "--loss focal" in warning


def test_no_collapse_warning_for_varied_predictions_or_one_class_data(capsys):
    names = ["a", "b", "c"]
    assert collapse_warning([[3, 1, 0], [0, 2, 0], [0, 0, 1]], names) is None
    assert collapse_warning([[5, 0, 0], [0, 0, 0], [0, 0, 0]], names) is None  # the labels hold one class
    ClassifyTask(ClassifyConfig()).compute_metrics(_bundle(names), _classify_parts([0, 1, 2], 0, 3)[:1], None)
    assert "collapsed" in capsys.readouterr().err  # the same data predicted as one class: warned
    logits = torch.eye(3)
    ClassifyTask(ClassifyConfig()).compute_metrics(
        _bundle(names), [{"logits": logits, "labels": torch.arange(3), "index": torch.arange(3)}], None)
    assert "collapsed" not in capsys.readouterr().err


def test_topk_only_below_the_number_of_classes():
    m = ClassificationMetrics(4)
    m.update(torch.randn(8, 4), torch.arange(8) % 4)
    assert "top5" not in m.compute() and "top1" in m.compute()
    m6 = ClassificationMetrics(6)
    m6.update(torch.randn(8, 6), torch.arange(8) % 6)
    assert 0.0 <= m6.compute()["top5"] <= 1.0


def test_compute_metrics_count_the_images():
    out = ClassifyTask(ClassifyConfig()).compute_metrics(_bundle(list("abcd")), _classify_parts([0, 1, 2], 1), None)
    assert out["images"] == 3 and type(out["images"]) is int
    k = 3
    parts = [{"confusion": torch.eye(k, dtype=torch.int64) * 5, "loss_sum": 1.0, "images": 2},
             {"confusion": torch.eye(k, dtype=torch.int64), "loss_sum": 2.0, "images": 1}]
    seg = SegmentTask(SegmentConfig()).compute_metrics(_bundle(["a", "b", "c"]), parts, None)
    assert seg["images"] == 3 and type(seg["images"]) is int and seg["loss"] == pytest.approx(1.0)


def make_imbalanced_rgba(root: Path, counts: dict[str, int], size: int = 32) -> Path:
    """``root/<class>/*.png`` RGBA images (conftest's colour fields, partly transparent), e.g.
    40 / 12 / 8 / 4: a majority class to collapse onto."""
    for c_index, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rgba = np.asarray(make_image(COLOURS[name], size, c_index * 100 + i, pattern=c_index).convert("RGBA")).copy()
            rgba[..., 3] = 255 - 40 * (i % 3)
            Image.fromarray(rgba, mode="RGBA").save(root / name / f"{name}_{i}.png")
    return root


IMBALANCED = {"red": 40, "green": 12, "blue": 8, "yellow": 4}


def test_documented_small_set_recipe_fits_an_imbalanced_set(tmp_path, capsys):
    # README recipe for a small set: head learning rate 1e-2 and a batch small enough for several
    # optimizer steps per epoch. LoRA on a random backbone is not what holds it still.
    data = make_imbalanced_rgba(tmp_path / "imb", IMBALANCED)
    result = dinotune.train(task="classify", data=str(data), val_data=str(data), adapter="lora", lr=1e-2,
                            **tiny_options(tmp_path / "run", epochs=3, batch_size=8, check_images="fast"))
    history = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["val/top1"] == 1.0 and history[-1]["val/images"] == 64
    assert "val/top5" not in history[-1]  # 4 classes: a top-5 would be 1.0 whatever the model does
    err = capsys.readouterr().err
    assert "collapsed" not in err and "optimizer steps" not in err  # 24 steps: enough


def test_too_few_optimizer_steps_are_warned_and_leave_the_loss_at_the_priors(tmp_path, capsys):
    # The defaults on the same 64 images: batch 32 makes 2 steps per epoch, 6 in 3 epochs, 2 of them
    # warm-up: the loss stays near the entropy of the class priors, which is what users saw.
    data = make_imbalanced_rgba(tmp_path / "imb", IMBALANCED)
    result = dinotune.train(task="classify", data=str(data), val_data=str(data), adapter="lora",
                            **tiny_options(tmp_path / "run", epochs=3, batch_size=32, check_images="fast"))
    err = capsys.readouterr().err
    assert "this run makes only 6 optimizer steps (2 per epoch at batch size 32, 2 of them warm-up)" in err
    history = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    priors = torch.tensor(list(IMBALANCED.values()), dtype=torch.float64) / 64
    entropy = float(-(priors * priors.log()).sum())
    assert history[-1]["train/loss"] > entropy * 0.9  # barely moved


# ------------------------------------------------------------------ item 12: pictures and counts
def test_classification_sample_titles_carry_their_legend(tiny_folder, tmp_path, monkeypatch):
    result = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "run", epochs=1))
    run = dinotune.load(result["run_dir"], device="cpu")
    seen = {}

    def grid(images, titles, path, colours=None, columns=6):
        seen.update(titles=list(titles), colours=list(colours))
        return Path(path)

    monkeypatch.setattr("dinotune.viz.plots.plot_image_grid", grid)
    run.task.sample_charts(run, str(tiny_folder), "val", tmp_path / "out", 4)
    assert seen["titles"] and all(re.fullmatch(r"pred (red|blue) \(\d\.\d\d\)\ntrue (red|blue)", t)
                                  for t in seen["titles"])
    for title, colour in zip(seen["titles"], seen["colours"]):
        pred, true = re.findall(r"(?:pred|true) (\w+)", title)
        assert colour == ("green" if pred == true else "red")


def test_segmentation_predict_draws_overlays_into_the_given_folder(tmp_path):
    root = make_voc_layout(tmp_path / "voc", {"train": 4, "val": 2})
    result = dinotune.train(task="segment", data=str(root), num_classes=4,
                            **tiny_options(tmp_path / "run", image_size=28, epochs=1))
    images = sorted((root / "JPEGImages").glob("val_*.jpg"))
    dinotune.load(result["run_dir"], device="cpu").predict(images, draw=str(tmp_path / "drawn"))
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == [f"{p.stem}.jpg" for p in images]


def test_classification_subsets_and_class_names(tmp_path, capsys):
    """``--class-names`` trains on those classes, in that order (the others' images left out);
    ``--subset`` / ``--val-subset`` draw reproducible subsets (recorded in RUN/subset.json); a
    class the data lacks is refused naming the ones it has; ``eval --subset`` works for classification."""
    from dinotune.cli import main as cli_main
    from tests.conftest import make_class_folders

    data = tmp_path / "data"
    make_class_folders(data / "train", ["red", "blue", "green"], 6, seed=1)
    make_class_folders(data / "val", ["red", "blue", "green"], 3, seed=2)
    run = dinotune.train(task="classify", data=str(data), class_names=["green", "red"], subset=8, val_subset=4,
                         subset_seed=3, **tiny_options(tmp_path / "run", epochs=1))
    meta = json.loads((Path(run["run_dir"]) / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["class_names"] == ["green", "red"]
    picked = json.loads((Path(run["run_dir"]) / "subset.json").read_text())["images"]
    assert len(picked) == 8 and all(Path(p).parent.name in ("green", "red") for p in picked)
    assert run["metrics"]["images"] == 4
    again = dinotune.train(task="classify", data=str(data), class_names=["green", "red"], subset=8, val_subset=4,
                           subset_seed=3, **tiny_options(tmp_path / "again", epochs=1))
    assert json.loads((Path(again["run_dir"]) / "subset.json").read_text())["images"] == picked
    with pytest.raises(DataError, match=r"no class 'purple' \(--class-names\); it has blue, green, red"):
        dinotune.train(task="classify", data=str(data), class_names=["purple"], **tiny_options(tmp_path / "bad"))
    capsys.readouterr()
    assert cli_main(["eval", run["run_dir"], "--data", str(data), "--subset", "2", "--device", "cpu"]) == 2
    # the run knows only green and red: blue's folder is refused by name, as another class count is
    assert "blue" in capsys.readouterr().err
    make_class_folders(tmp_path / "two" / "val", ["green", "red"], 3, seed=4)
    assert cli_main(["eval", run["run_dir"], "--data", str(tmp_path / "two"), "--subset", "2", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
