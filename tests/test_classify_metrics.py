"""ClassificationMetrics against scikit-learn and hand-computed numbers; plot helpers write valid PNGs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from dinotune.tasks.classify.metrics import ClassificationMetrics, format_per_class_table, roc_auc_binary
from dinotune.viz.plots import plot_bars, plot_confusion_matrix, plot_training_curves


def _sklearn_reference(logits: torch.Tensor, targets: torch.Tensor, k: int) -> dict:
    """The same metrics computed by scikit-learn from the full arrays."""
    scores = logits.double().numpy()
    y = targets.numpy()
    pred = scores.argmax(1)
    labels = list(range(k))
    p, r, f, _ = precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
    pc, rc, fc, sc = precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    with warnings.catch_warnings():
        # balanced_accuracy_score warns when a predicted class is absent from y_true.
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(y, pred)
    ref = {
        "top1": accuracy_score(y, pred),
        "precision_macro": p,
        "recall_macro": r,
        "f1_macro": f,
        "accuracy_balanced": bal,
        "per_class": list(zip(pc, rc, fc, sc)),
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
    }
    if k > 5:
        # top-k means something only for k < K (k >= K is always 1), so only then is it reported.
        ref["top5"] = top_k_accuracy_score(y, scores, k=5, labels=labels)
    return ref


def _assert_matches(res: dict, ref: dict) -> None:
    for key in ("top1", "precision_macro", "recall_macro", "f1_macro", "accuracy_balanced"):
        assert res[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ("top5" in res) == ("top5" in ref)
    if "top5" in ref:
        assert res["top5"] == pytest.approx(ref["top5"], abs=1e-12)
    assert res["confusion"] == ref["confusion"]
    for row, (p, r, f, s) in zip(res["per_class"], ref["per_class"]):
        assert row["precision"] == pytest.approx(p, abs=1e-12)
        assert row["recall"] == pytest.approx(r, abs=1e-12)
        assert row["f1"] == pytest.approx(f, abs=1e-12)
        assert row["support"] == int(s)


def test_hand_computed_example():
    # Six samples over classes a, b, c; argmax predictions and the rank of the true class:
    #   target a, logits [3, 2, 1] -> pred a (rank 0)
    #   target a, logits [1, 3, 2] -> pred b (rank 2: misses top-2 as well)
    #   target b, logits [1, 3, 2] -> pred b (rank 0)
    #   target b, logits [0, 3, 1] -> pred b (rank 0)
    #   target c, logits [3, 1, 2] -> pred a (rank 1: a top-2 hit)
    #   target a, logits [5, 0, 1] -> pred a (rank 0)
    # Confusion (rows true, cols predicted): a: [2, 1, 0], b: [0, 2, 0], c: [1, 0, 0].
    # top1 = 4/6, top2 = 5/6 (top3 and top5 are not reported: with K = 3 they are 1 whatever the model).
    # precision: a = 2/3 (column a sums to 3), b = 2/3, c = 0 (never predicted).
    # recall:    a = 2/3, b = 2/2 = 1, c = 0/1 = 0.
    # f1 = 2tp / (predicted + support): a = 4/6 = 2/3, b = 4/5, c = 0.
    # macro: precision (2/3 + 2/3 + 0)/3 = 4/9, recall (2/3 + 1 + 0)/3 = 5/9,
    #        f1 (2/3 + 4/5 + 0)/3 = 22/45; balanced accuracy = mean recall = 5/9.
    logits = torch.tensor(
        [[3, 2, 1], [1, 3, 2], [1, 3, 2], [0, 3, 1], [3, 1, 2], [5, 0, 1]], dtype=torch.float32
    )
    targets = torch.tensor([0, 0, 1, 1, 2, 0])
    m = ClassificationMetrics(3, ["a", "b", "c"], topk=(1, 2, 3, 5))
    m.update(logits, targets)
    res = m.compute()

    assert res["count"] == 6
    assert res["top1"] == pytest.approx(4 / 6)
    assert res["top2"] == pytest.approx(5 / 6)
    assert "top3" not in res and "top5" not in res
    assert res["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert res["precision_macro"] == pytest.approx(4 / 9)
    assert res["recall_macro"] == pytest.approx(5 / 9)
    assert res["f1_macro"] == pytest.approx(22 / 45)
    assert res["accuracy_balanced"] == pytest.approx(5 / 9)
    assert [r["class"] for r in res["per_class"]] == ["a", "b", "c"]
    assert [r["support"] for r in res["per_class"]] == [3, 2, 1]
    assert [r["precision"] for r in res["per_class"]] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert [r["recall"] for r in res["per_class"]] == pytest.approx([2 / 3, 1.0, 0.0])
    assert [r["f1"] for r in res["per_class"]] == pytest.approx([2 / 3, 4 / 5, 0.0])
    assert "roc_auc" not in res
    _assert_matches(res, _sklearn_reference(logits, targets, 3))
    assert top_k_accuracy_score(targets.numpy(), logits.numpy(), k=2, labels=[0, 1, 2]) == pytest.approx(5 / 6)


def test_result_is_plain_json():
    m = ClassificationMetrics(2)
    m.update(torch.randn(10, 2), torch.tensor([0, 1] * 5))
    res = m.compute()
    assert json.loads(json.dumps(res, allow_nan=False)) == res
    assert type(res["top1"]) is float and type(res["count"]) is int
    assert all(type(v) is int for row in res["confusion"] for v in row)
    assert type(res["roc_auc"]) is float


def test_class_never_predicted_and_class_without_support():
    # Class 2 is never predicted (precision 0 via zero_division); class 3 never occurs
    # (recall 0, and balanced accuracy averages only over the classes that occur).
    logits = torch.tensor(
        [[5, 0, 0, 0], [0, 5, 0, 0], [0, 5, 0, 0], [5, 0, 0, 0], [0, 0, 0, 5], [0, 5, 0, 0]], dtype=torch.float32
    )
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    m = ClassificationMetrics(4)
    m.update(logits, targets)
    res = m.compute()
    _assert_matches(res, _sklearn_reference(logits, targets, 4))
    assert res["per_class"][2]["precision"] == 0.0
    assert res["per_class"][3]["recall"] == 0.0 and res["per_class"][3]["support"] == 0
    assert res["accuracy_balanced"] != pytest.approx(res["recall_macro"])


def test_neither_predicted_nor_present_class_has_zero_f1():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    m = ClassificationMetrics(3)
    m.update(logits, torch.tensor([0, 1]))
    res = m.compute()
    assert res["per_class"][2] == {"class": "2", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert res["f1_macro"] == pytest.approx(2 / 3)


def test_topk_left_out_when_not_below_the_number_of_classes():
    # Worst case for top-1 (the true class always scores lowest) yet top-3 = top-5 = 1 with K = 3:
    # such a top-k says nothing about the model, so it is not reported at all.
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    targets = torch.tensor([0, 1, 2])
    m = ClassificationMetrics(3, topk=(1, 2, 3, 5))
    m.update(logits, targets)
    res = m.compute()
    assert res["top1"] == 0.0 and res["top2"] == 0.0
    assert "top3" not in res and "top5" not in res
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that k >= n_classes is trivially perfect
        assert top_k_accuracy_score(targets.numpy(), logits.numpy(), k=3, labels=[0, 1, 2]) == 1.0


def test_streaming_equals_single_batch_and_sklearn_k7():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(257, 7, generator=g)
    targets = torch.randint(0, 7, (257,), generator=g)
    whole = ClassificationMetrics(7)
    whole.update(logits, targets)
    streamed = ClassificationMetrics(7)
    for chunk_l, chunk_t in zip(logits.split(40), targets.split(40)):
        streamed.update(chunk_l, chunk_t)
    streamed.update(logits[:0], targets[:0])  # an empty batch is a no-op
    res = streamed.compute()
    assert res == whole.compute()
    assert res["count"] == 257
    ref = _sklearn_reference(logits, targets, 7)
    _assert_matches(res, ref)
    # top5 must really be the k=5 statistic, not clamped to 1.
    assert 0.0 < res["top5"] < 1.0
    assert res["top5"] == pytest.approx(top_k_accuracy_score(targets.numpy(), logits.numpy(), k=5, labels=range(7)))


def test_reset_forgets_everything():
    m = ClassificationMetrics(3)
    m.update(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    m.reset()
    with pytest.raises(RuntimeError):
        m.compute()
    m.update(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]))
    assert m.compute()["count"] == 1 and m.compute()["top1"] == 1.0


def test_half_precision_logits_and_int32_targets():
    logits = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]], dtype=torch.float16)
    m = ClassificationMetrics(3)
    m.update(logits, torch.tensor([1, 2], dtype=torch.int32))
    res = m.compute()
    assert res["top1"] == 0.5 and res["confusion"] == [[0, 0, 0], [0, 1, 0], [1, 0, 0]]


def test_tied_logits_top1_follows_argmax():
    # With ties, top-1 must agree with the confusion diagonal (argmax takes the first max).
    logits = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    m = ClassificationMetrics(3, topk=(1, 2))
    m.update(logits, torch.tensor([0, 1]))
    res = m.compute()
    assert res["top1"] == 0.5
    assert res["top1"] == sum(res["confusion"][i][i] for i in range(3)) / res["count"]
    assert res["top2"] == 1.0


def test_roc_auc_ties_hand_computed_and_sklearn():
    # Class-1 probabilities sigmoid(-2), 0.5, 0.5, sigmoid(2) for targets 0, 0, 1, 1.
    # Positive-negative pairs: (0.5 vs s(-2)) = 1, (0.5 vs 0.5) = 1/2 (tie),
    # (s(2) vs s(-2)) = 1, (s(2) vs 0.5) = 1  ->  AUC = 3.5 / 4 = 0.875.
    logits = torch.tensor([[0.0, -2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([0, 0, 1, 1])
    m = ClassificationMetrics(2, ["neg", "pos"])
    m.update(logits[:2], targets[:2])
    m.update(logits[2:], targets[2:])
    res = m.compute()
    probs = torch.softmax(logits.double(), 1)[:, 1].numpy()
    assert res["roc_auc"] == pytest.approx(0.875, abs=1e-12)
    assert res["roc_auc"] == pytest.approx(roc_auc_score(targets.numpy(), probs), abs=1e-12)
    assert "top5" not in res  # k = 5 >= K = 2 would cover both classes: not reported


def test_roc_auc_heavy_ties_random_matches_sklearn():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (300,), generator=g).double() / 4  # only 5 distinct values
    targets = torch.randint(0, 2, (300,), generator=g)
    assert roc_auc_binary(scores, targets) == pytest.approx(roc_auc_score(targets.numpy(), scores.numpy()), abs=1e-12)


def test_roc_auc_binary_streamed_matches_sklearn():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 2, generator=g) * 2
    targets = (torch.rand(200, generator=g) < 0.3).long()
    m = ClassificationMetrics(2)
    for chunk_l, chunk_t in zip(logits.split(64), targets.split(64)):
        m.update(chunk_l, chunk_t)
    res = m.compute()
    probs = torch.softmax(logits.double(), 1)[:, 1].numpy()
    assert res["roc_auc"] == pytest.approx(roc_auc_score(targets.numpy(), probs), abs=1e-12)
    _assert_matches(res, _sklearn_reference(logits, targets, 2))


def test_roc_auc_none_with_single_class():
    m = ClassificationMetrics(2)
    m.update(torch.randn(6, 2), torch.zeros(6, dtype=torch.long))
    assert m.compute()["roc_auc"] is None


@pytest.mark.parametrize(
    "logits, targets, match",
    [
        (torch.randn(4), torch.tensor([0, 1, 2, 0]), "B x 3"),
        (torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), "B x 3"),
        (torch.randn(4, 3, 1), torch.tensor([0, 1, 2, 0]), "B x 3"),
        (torch.randn(4, 3), torch.tensor([[0, 1, 2, 0]]), "1-D"),
        (torch.randn(4, 3), torch.tensor([0, 1, 2]), "1-D"),
        (torch.randn(4, 3), torch.tensor([0, 1, 3, 0]), r"\[0, 3\)"),
        (torch.randn(4, 3), torch.tensor([0, -1, 2, 0]), r"\[0, 3\)"),
        (torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 0.0]), "integer"),
        (torch.randint(0, 5, (4, 3)), torch.tensor([0, 1, 2, 0]), "floating"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([0]), "NaN"),
    ],
)
def test_invalid_inputs_raise(logits, targets, match):
    m = ClassificationMetrics(3)
    with pytest.raises(ValueError, match=match):
        m.update(logits, targets)
    assert m._count == 0  # a rejected batch must not leave partial state behind


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError):
        ClassificationMetrics(0)
    with pytest.raises(ValueError):
        ClassificationMetrics(3, ["a", "b"])
    with pytest.raises(ValueError):
        ClassificationMetrics(3, topk=(0,))


def test_per_class_table_is_aligned():
    m = ClassificationMetrics(3, ["cat", "a much longer name", "fox"])
    m.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 1, 1]))
    res = m.compute()
    table = m.summary_table(res)
    assert table == format_per_class_table(res)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert any(line.startswith("a much longer name") for line in lines)
    assert lines[-1].startswith("macro avg") and lines[-1].split()[-1] == "3"
    # Right-aligned numeric columns: every data row ends at the same column.
    data = [line for line in lines if not set(line) <= {"-", " "}]
    assert len({len(line) for line in data}) == 1


# --- plots ---------------------------------------------------------------------------------


def _assert_png(path, min_bytes=3000):
    assert path.exists()
    assert path.stat().st_size > min_bytes
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 200
    # The atomic write must not leave its temporary file behind.
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_plot_confusion_matrix_small_and_large(tmp_path):
    out = plot_confusion_matrix([[5, 1, 0], [2, 7, 1], [0, 0, 0]], ["cat", "dog", "fox"], tmp_path / "cm.png")
    assert out == tmp_path / "cm.png"
    _assert_png(out)

    rng = np.random.default_rng(0)
    big = rng.integers(0, 20, (32, 32)) + np.eye(32, dtype=np.int64) * 50
    out = plot_confusion_matrix(big, [f"class_{i}" for i in range(32)], tmp_path / "sub" / "cm32.png", normalize=False)
    _assert_png(out)

    with pytest.raises(ValueError):
        plot_confusion_matrix([[1, 2]], ["a"], tmp_path / "bad.png")


def test_plot_training_curves_with_missing_keys(tmp_path):
    history = [
        {"epoch": 1, "train/loss": 0.9, "val/loss": 1.0, "val/top1": 0.5, "lr/head": 1e-3},
        {"epoch": 2, "train/loss": 0.7, "val/top1": 0.6, "val/note": "resumed"},  # no val/loss
        {"epoch": 3, "train/loss": float("nan"), "val/loss": 0.8, "val/top1": 0.7, "val/f1_macro": 0.65},
        {"train/loss": 0.5},  # no epoch: placed at its position
        "not a record",
    ]
    _assert_png(plot_training_curves(history, tmp_path / "curves.png"))
    _assert_png(plot_training_curves([], tmp_path / "empty.png"), min_bytes=1000)
    _assert_png(plot_training_curves([{"epoch": 1, "lr/head": 0.1}], tmp_path / "nothing.png"), min_bytes=1000)


def test_plot_bars(tmp_path):
    _assert_png(plot_bars({"cat": 0.9, "dog": 0.75, "fox": float("nan")}, tmp_path / "f1.png", "F1 per class", "f1"))
    many = {f"benchmark_{i}": 1.0 + i / 10 for i in range(25)}
    _assert_png(plot_bars(many, tmp_path / "ratios.png", "speed ratio", "x baseline"))
    _assert_png(plot_bars({}, tmp_path / "none.png", "empty", "value"), min_bytes=1000)


def test_plot_overwrites_existing_file(tmp_path):
    path = tmp_path / "cm.png"
    path.write_bytes(b"old")
    plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b"], path)
    _assert_png(path)


def test_training_curves_tick_whole_epochs_and_show_equal_series_apart():
    """Epoch ticks are whole numbers (no 1.2, 1.4, ...), and a series equal to another (balanced
    accuracy is macro recall) is labelled as such instead of hiding under it."""
    from dinotune.viz.plots import training_curves_figure

    history = [{"epoch": e, "train/loss": 1 / e, "val/loss": 1.1 / e, "val/recall_macro": 0.1 * e,
                "val/accuracy_balanced": 0.1 * e, "val/top1": 0.05 * e} for e in (1, 2, 3)]
    fig = training_curves_figure(history)
    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    metrics = next(ax for ax in fig.axes if ax.get_title() == "validation metrics")
    labels = [line.get_label() for line in metrics.get_lines()]
    assert "val/recall_macro (= val/accuracy_balanced)" in labels and "val/top1" in labels
    ticks = [t for ax in fig.axes for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
