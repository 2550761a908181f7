"""Robustness under the 15 ImageNet-C corruptions at severities 1-5 (``dinotune eval --corruptions``).

The corruption is applied to each evaluation image before the usual preprocessing; labels are
untouched. The metric the run's task monitors (mIoU for segmentation, top-1 for classification,
COCO AP for DETR-style detection) is reported per corruption and severity, with the clean value
and the mean over corruptions per severity, as a JSON file, a Markdown table and a chart of the
metric against severity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dinotune.config.base import check_ranges
from dinotune.config.commands import EvalConfig
from dinotune.config.io import coerce
from dinotune.data.corruptions import CATEGORY, CORRUPTIONS, Corruption
from dinotune.utils import info, write_json


def evaluate_corruptions(loaded: Any, data: str, *, split: str = EvalConfig.split, names: Sequence[str] | None = None,
                         severities: Sequence[int] | None = None, seed: int = EvalConfig.corruption_seed,
                         out_dir: Path, **eval_options: Any) -> dict[str, Any]:
    """Evaluate ``loaded`` (a ``LoadedRun``) clean and under each corruption / severity; write the
    table and chart. ``names``: the corruptions (default: all 15); ``severities``: default and valid
    range those of ``EvalConfig.severities`` (``eval --severities``)."""
    metric = loaded.task.monitor
    # ImageNet-C's elastic transform starts with a large affine warp that would move content away
    # from masks / boxes: tasks whose labels are tied to pixel positions get the dense variant
    dense = loaded.task.pixel_aligned_labels
    names = list(names or CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {', '.join(CORRUPTIONS)}")
    # whole numbers in the field's declared range; ConfigError (a ValueError) naming --severities
    severities = coerce(list(EvalConfig().severities if severities is None else severities), list[int], "--severities")
    check_ranges(EvalConfig(severities=severities))
    clean = loaded.evaluate(data, split=split, **eval_options)[metric]
    info(f"clean {metric}: {clean:.4f}")
    rows = []
    for name in names:
        for severity in severities:
            corruption = Corruption(name, severity, seed, dense=dense)
            m = loaded.evaluate(data, split=split, pre_transform=corruption, **eval_options)
            rows.append({"corruption": name, "category": CATEGORY[name], "severity": severity, metric: m[metric]})
            info(f"{name} severity {severity}: {metric} {m[metric]:.4f}")
    mean = {s: sum(r[metric] for r in rows if r["severity"] == s) / len(names) for s in severities}
    result = {"metric": metric, "clean": clean, "rows": rows, "mean_by_severity": mean,
              "mean_corrupted": sum(mean.values()) / len(mean),
              "relative": (sum(mean.values()) / len(mean)) / clean if clean else None}
    out_dir = Path(out_dir)
    write_json(out_dir / "corruptions.json", result)
    (out_dir / "corruptions.md").write_text(_table(result, names, severities))
    _chart(result, names, severities, out_dir / "corruptions.png")
    return result


def _table(result: dict[str, Any], names: Sequence[str], severities: Sequence[int]) -> str:
    metric = result["metric"]
    by = {(r["corruption"], r["severity"]): r[metric] for r in result["rows"]}
    head = "| corruption | category | " + " | ".join(f"s{s}" for s in severities) + " | mean |"
    lines = [f"# {metric} under ImageNet-C corruptions", "", f"clean {metric}: {result['clean']:.4f}; mean over "
             f"corruptions and severities: {result['mean_corrupted']:.4f} ({100 * (result['relative'] or 0):.1f}% "
             "of clean)", "", head, "|---" * (len(severities) + 3) + "|"]
    for n in names:
        vals = [by[(n, s)] for s in severities]
        lines.append(f"| {n} | {CATEGORY[n]} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")
    means = [result["mean_by_severity"][s] for s in severities]
    lines.append("| **mean** | | " + " | ".join(f"{v:.3f}" for v in means) + f" | {result['mean_corrupted']:.3f} |")
    return "\n".join(lines) + "\n"


# One colour per ImageNet-C category and a line style per member: 15 lines stay tell-apart-able.
_CATEGORY_COLOURS = {"noise": "tab:blue", "blur": "tab:green", "weather": "tab:orange", "digital": "tab:purple"}
_LINE_STYLES = ("-", "--", ":", "-.")


def _chart(result: dict[str, Any], names: Sequence[str], severities: Sequence[int], path: Path) -> Path:
    from dinotune.viz.plots import _new_figure, _save

    metric = result["metric"]
    fig = _new_figure(9.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = [0, *severities]
    seen: dict[str, int] = {}
    for n in names:
        ys = [result["clean"]] + [next(r[metric] for r in result["rows"] if r["corruption"] == n and r["severity"] == s)
                                  for s in severities]
        category = CATEGORY[n]
        style = _LINE_STYLES[seen.get(category, 0) % len(_LINE_STYLES)]
        seen[category] = seen.get(category, 0) + 1
        ax.plot(xs, ys, color=_CATEGORY_COLOURS[category], linestyle=style, alpha=0.8, linewidth=1.3,
                label=f"{n} ({category})")
    ax.plot(xs, [result["clean"]] + [result["mean_by_severity"][s] for s in severities], color="black",
            linewidth=2.5, marker="o", label="mean")
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against corruption severity")
    ax.set_xticks(xs)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, path)
