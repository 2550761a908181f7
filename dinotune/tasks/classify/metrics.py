"""Classification metrics accumulated batch by batch, computed by hand from torch tensors.

``ClassificationMetrics`` keeps only small CPU state (a ``K x K`` int64 confusion matrix,
top-k hit counts and, for two classes, the class-1 probabilities), so an evaluation loop can
feed it every batch and call ``compute()`` once. The numbers match scikit-learn's
``accuracy_score``, ``top_k_accuracy_score``, ``precision_recall_fscore_support(average="macro",
zero_division=0, labels=range(K))``, ``balanced_accuracy_score``, ``confusion_matrix`` and
``roc_auc_score``; scikit-learn itself is only used as the reference in the tests.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["ClassificationMetrics", "collapse_warning", "collapsed", "format_per_class_table", "roc_auc_binary"]


class ClassificationMetrics:
    """Streaming accumulator of classification metrics over ``K`` classes.

    Args:
        num_classes: ``K``, the number of logits per sample (at least 1).
        class_names: ``K`` names used in ``per_class``; defaults to ``"0" .. "K-1"``.
        topk: the ``k`` of the top-k accuracies to report as ``top{k}``, for ``k < K`` only:
            with ``k >= K`` every true class is among the top ``k``, so ``top{k}`` would be 1.0
            whatever the model does (a ``top5`` of 1.0 printed for four classes reads as a
            result). ``top1`` is always reported.

    Example:
        >>> m = ClassificationMetrics(3, ["cat", "dog", "fox"])
        >>> m.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 1]))
        >>> m.compute()["top1"]
        0.5
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        topk: tuple[int, ...] = (1, 5),
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if class_names is None:
            class_names = [str(i) for i in range(num_classes)]
        class_names = [str(n) for n in class_names]
        if len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but num_classes is {num_classes}"
            )
        ks = []
        for k in topk:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"topk entries must be positive ints, got {k!r} in {topk!r}")
            ks.append(k)
        self.num_classes = num_classes
        self.class_names = class_names
        # top1 is always reported: it is the accuracy, the trainer's default metric on balanced classes.
        self.topk = tuple(kk for kk in sorted(set(ks) | {1}) if kk == 1 or kk < num_classes)
        self.reset()

    def score_keys(self) -> tuple[str, ...]:
        """The keys of ``compute()``'s scores, what a run may pick its best epoch by: ``top{k}``,
        macro precision / recall / F1, ``accuracy_balanced`` and, for two classes, ``roc_auc``."""
        keys = tuple(f"top{kk}" for kk in self.topk)
        keys += ("precision_macro", "recall_macro", "f1_macro", "accuracy_balanced")
        return keys + (("roc_auc",) if self.num_classes == 2 else ())

    def reset(self) -> None:
        """Forget every sample seen so far."""
        k = self.num_classes
        self._confusion = torch.zeros(k, k, dtype=torch.int64)
        self._hits = {kk: 0 for kk in self.topk}
        self._count = 0
        self._probs: list[Tensor] = []
        self._targets: list[Tensor] = []

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add one batch.

        Args:
            logits: ``B x K`` scores of any floating dtype on any device (softmax is not
                required: only the ranking and, for ``K == 2``, the softmax are used).
            targets: ``B`` integer class indices in ``[0, K)``, on any device.

        Raises:
            ValueError: wrong shapes or dtypes, NaN logits, or a target outside ``[0, K)``.
        """
        if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
            raise ValueError("logits and targets must be torch tensors")
        k = self.num_classes
        if logits.dim() != 2 or logits.shape[1] != k:
            raise ValueError(f"logits must be B x {k} (B x num_classes), got shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
        if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise ValueError(
                f"targets must be 1-D with one entry per logits row ({logits.shape[0]}), "
                f"got shape {tuple(targets.shape)}"
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"targets must be an integer tensor of class indices, got {targets.dtype}")
        if logits.shape[0] == 0:
            return

        logits = logits.detach()
        # Only B integers cross to the CPU; the B x K ranking stays on the logits' device.
        targets_cpu = targets.detach().to("cpu", torch.int64)
        lo, hi = int(targets_cpu.min()), int(targets_cpu.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"targets must lie in [0, {k}), got values in [{lo}, {hi}]")
        if torch.isnan(logits).any():
            # NaN compares false with everything, which would silently count as a top-1 hit.
            raise ValueError("logits contain NaN")

        t = targets_cpu.to(logits.device)
        target_score = logits.gather(1, t[:, None])
        cols = torch.arange(k, device=logits.device)
        # Rank of the true class with ties broken towards the lower index, the same rule as
        # argmax, so that top1 always equals the diagonal of the confusion matrix.
        rank = (logits > target_score).sum(1) + (
            (logits == target_score) & (cols[None, :] < t[:, None])
        ).sum(1)
        rank = rank.cpu()
        pred = logits.argmax(1).cpu()

        for kk in self.topk:
            self._hits[kk] += int((rank < kk).sum())
        # bincount on CPU: it has no deterministic CUDA kernel and B is small anyway.
        self._confusion += torch.bincount(targets_cpu * k + pred, minlength=k * k).view(k, k)
        self._count += int(targets_cpu.numel())
        if k == 2:
            # float64 on CPU: some accelerators (MPS) have no float64, and fewer spurious ties.
            p1 = torch.softmax(logits.to("cpu", torch.float64), dim=1)[:, 1]
            self._probs.append(p1)
            self._targets.append(targets_cpu)

    def compute(self) -> dict[str, Any]:
        """Metrics over every sample since construction or the last ``reset()``.

        Returns:
            A JSON-serialisable dict (plain floats, ints and lists):

            - ``top{k}`` for every requested ``k`` below ``K`` (``top1``, and ``top5`` from six
              classes on, by default): fraction of samples whose true class is among the ``k``
              highest logits.
            - ``precision_macro``, ``recall_macro``, ``f1_macro``: unweighted means over all
              ``K`` classes; a class never predicted has precision 0, a class with no
              support has recall 0, and f1 is 0 where both are 0.
            - ``accuracy_balanced``: mean recall over the classes that occur in the targets
              (scikit-learn's ``balanced_accuracy_score``; equals ``recall_macro`` when every
              class occurs).
            - ``per_class``: ``K`` dicts ``{"class", "precision", "recall", "f1", "support"}``.
            - ``confusion``: ``K x K`` ints, rows are true classes, columns predictions.
            - ``count``: number of samples.
            - ``collapsed``: 1 when every sample was predicted as one class though the targets
              hold several (see ``collapsed``), else 0; the engine never keeps such an epoch as
              best while a healthy one exists.
            - ``roc_auc`` (only when ``K == 2``): ROC-AUC of the class-1 softmax probability,
              or ``None`` when the targets hold a single class.

        Raises:
            RuntimeError: no sample has been seen, so every metric would be undefined.
        """
        if self._count == 0:
            raise RuntimeError("ClassificationMetrics.compute() called before any sample was added")
        cm = self._confusion.to(torch.float64)
        tp = cm.diag()
        predicted = cm.sum(0)
        support = cm.sum(1)
        precision = _safe_div(tp, predicted)
        recall = _safe_div(tp, support)
        # 2tp / (2tp + fp + fn) rather than 2pr / (p + r): the same value where both are
        # defined, and 0 (not 0/0) for a class that is neither present nor predicted.
        f1 = _safe_div(2 * tp, predicted + support)
        present = support > 0

        out: dict[str, Any] = {}
        for kk in self.topk:
            out[f"top{kk}"] = self._hits[kk] / self._count
        out.update(
            precision_macro=float(precision.mean()),
            recall_macro=float(recall.mean()),
            f1_macro=float(f1.mean()),
            accuracy_balanced=float(recall[present].mean()),
            per_class=[
                {
                    "class": name,
                    "precision": float(precision[i]),
                    "recall": float(recall[i]),
                    "f1": float(f1[i]),
                    "support": int(self._confusion[i].sum()),
                }
                for i, name in enumerate(self.class_names)
            ],
            confusion=self._confusion.tolist(),
            count=self._count,
            collapsed=int(collapsed(self._confusion)),
        )
        if self.num_classes == 2:
            out["roc_auc"] = roc_auc_binary(torch.cat(self._probs), torch.cat(self._targets))
        return out

    def summary_table(self, result: dict[str, Any]) -> str:
        """Per-class table of ``result`` (from ``compute()``); see ``format_per_class_table``."""
        return format_per_class_table(result)


def collapsed(confusion: Sequence[Sequence[int]] | Tensor) -> bool:
    """Every image was predicted as one class though the labels hold several (``confusion``: ``K x K``
    counts, rows true classes, columns predictions)."""
    cm = torch.as_tensor(confusion, dtype=torch.int64)
    return int((cm.sum(0) > 0).sum()) == 1 and int((cm.sum(1) > 0).sum()) >= 2


def collapse_warning(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> str | None:
    """A warning when every image was predicted as one class though the labels hold several, else None.

    Answering one class everywhere scores that class's share of the images as top-1: when it is
    the majority class this can look like a result on an imbalanced set (training loss then sits
    at the entropy of the class priors). Said once per evaluation, with top-1 beside the majority
    class's share (both classes named: the predicted one need not be the majority) and what usually
    gets training moving.

    Args:
        confusion: ``K x K`` counts, rows true classes, columns predictions (``compute()["confusion"]``).
        class_names: the ``K`` names.
    """
    cm = torch.as_tensor(confusion, dtype=torch.int64)
    if not collapsed(cm):
        return None
    predicted, support = cm.sum(0), cm.sum(1)
    n = int(support.sum())
    pred, major = int(predicted.argmax()), int(support.argmax())
    top1, share = int(cm[pred, pred]) / n, int(support[major]) / n
    head = (f"all {n} evaluated images were predicted as {class_names[pred]!r}, though their labels hold "
            f"{int((support > 0).sum())} classes; ")
    if int(support[pred]) == int(support[major]):  # the predicted class is (one of) the most common
        body = (f"{class_names[pred]!r} is the most common, {share:.1%} of them ({int(support[major])} of {n}), so "
                f"top-1 {top1:.3f} is only what answering the majority class everywhere gives")
    else:
        body = (f"top-1 {top1:.3f} is the share of {class_names[pred]!r} ({int(cm[pred, pred])} of {n}), below the "
                f"{share:.1%} that answering the most common class, {class_names[major]!r} ({int(support[major])} "
                f"of {n}), would give")
    return (head + body + ". The model has collapsed to one class: for imbalanced classes try --sampler balanced "
            "(every class drawn equally often) or --loss focal; otherwise more --epochs or a higher --lr (a small "
            "set makes few optimizer steps per epoch)")


def roc_auc_binary(scores: Tensor, targets: Tensor) -> float | None:
    """Binary ROC-AUC from the Mann-Whitney U statistic with average ranks for ties.

    AUC is the probability that a random positive scores above a random negative, counting
    ties as one half; with average ranks over the pooled scores that is
    ``(sum of positive ranks - P (P + 1) / 2) / (P N)``.

    Args:
        scores: ``B`` scores, higher meaning more likely class 1.
        targets: ``B`` labels in ``{0, 1}``.

    Returns:
        The AUC as a float, or ``None`` if ``targets`` holds only one class (AUC undefined).
    """
    scores = scores.detach().to("cpu", torch.float64).reshape(-1)
    targets = targets.detach().to("cpu").reshape(-1).to(torch.bool)
    n_pos = int(targets.sum())
    n_neg = int(targets.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    # A group of c tied values occupying ranks e-c+1 .. e (1-based) all get their mean.
    ends = counts.cumsum(0).to(torch.float64)
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2
    rank_sum_pos = float(avg_rank[inverse][targets].sum())
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def format_per_class_table(result: dict[str, Any]) -> str:
    """Render ``result["per_class"]`` as an aligned plain-text table for a terminal.

    Args:
        result: a dict from ``ClassificationMetrics.compute()``; needs ``per_class`` and uses
            ``precision_macro``, ``recall_macro``, ``f1_macro`` for a closing "macro avg" row
            when present.

    Returns:
        Lines ``class  precision  recall  f1  support``, one per class, then the macro row.
    """
    rows = [
        (str(r["class"]), f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", str(int(r["support"])))
        for r in result["per_class"]
    ]
    if all(key in result for key in ("precision_macro", "recall_macro", "f1_macro")):
        total = sum(int(r["support"]) for r in result["per_class"])
        rows.append(
            (
                "macro avg",
                f"{result['precision_macro']:.4f}",
                f"{result['recall_macro']:.4f}",
                f"{result['f1_macro']:.4f}",
                str(total),
            )
        )
    header = ("class", "precision", "recall", "f1", "support")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        # Names read left-aligned, numbers right-aligned so their decimal points line up.
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[: len(result["per_class"])]]
    if len(rows) > len(result["per_class"]):
        lines += ["  ".join("-" * w for w in widths), fmt(rows[-1])]
    return "\n".join(lines)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """Elementwise ``num / den`` with 0 where ``den == 0`` (scikit-learn's ``zero_division=0``)."""
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))
