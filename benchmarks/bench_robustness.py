"""Robustness under the 15 ImageNet-C corruptions, on a model that has learned something.

By default: scikit-learn's handwritten digits written at 224 px (the size ImageNet-C's constants are
meant for), ``random:tiny`` trained from scratch at 56 px exactly as the offline ``dinotune demo``
does, then ``dinotune eval --corruptions`` on the 359 validation digits at severities 1-5. A
sound pipeline shows the clean accuracy of the demo and a mean accuracy that falls with severity.
Expected exceptions: noise and pixelation barely matter, since the 224 px image is shrunk to 56 px
(averaging them away), and ``elastic_transform`` is worst at severities 1-2, ImageNet-C's large
affine warp (see ``dinotune/data/corruptions``).
With ``--run RUN --data DATA`` it evaluates an existing classification or segmentation run instead.

    python benchmarks/bench_robustness.py                 # writes results/robustness-digits.{json,md,png}
    python benchmarks/bench_robustness.py --run runs/seg --data ../shared/data/coco_tiny --out results/robustness-seg
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import machine_info

HERE = Path(__file__).resolve().parent


def train_digits(root: Path, epochs: int, device: str) -> tuple[Path, Path]:
    """The offline demo's model, trained on 224 px digits. Returns (run folder, data folder)."""
    import dinotune
    from dinotune.demo import write_digits

    data = root / "digits"
    write_digits(data, scale=28)
    result = dinotune.train(task="classify", data=str(data), model="random:tiny", adapter="full",
                            image_size=56, epochs=epochs, lr=2e-3, backbone_lr=1e-3, augment=False,
                            batch_size=32, pool="cls_mean", device=device, progress=False,
                            out=str(root / "run"))
    return Path(result["run_dir"]), data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="an existing run to evaluate (default: train the digits model)")
    p.add_argument("--data", default=None, help="evaluation data of --run")
    p.add_argument("--epochs", type=int, default=20, help="training epochs of the digits model")
    p.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="results file stem (default: results/robustness-digits)")
    args = p.parse_args()
    if bool(args.run) != bool(args.data):
        p.error("--run and --data go together")

    import dinotune
    from dinotune.robustness import evaluate_corruptions

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.run:
            run_dir, data = Path(args.run), Path(args.data)
        else:
            run_dir, data = train_digits(Path(tmp), args.epochs, args.device)
        train_seconds = time.perf_counter() - t0
        loaded = dinotune.load(run_dir, device=args.device)
        t1 = time.perf_counter()
        result = evaluate_corruptions(loaded, str(data), severities=args.severities, out_dir=Path(tmp) / "eval")
        eval_seconds = time.perf_counter() - t1
        out = Path(args.out) if args.out else HERE / "results" / "robustness-digits"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "eval" / "corruptions.png", out.with_suffix(".png"))
        table = (Path(tmp) / "eval" / "corruptions.md").read_text()
    metric = result["metric"]
    machine = machine_info(args.device)
    what = (f"run {args.run} on {args.data}" if args.run else
            f"digits (sklearn, 224 px), random:tiny trained from scratch, 56 px, {args.epochs} epochs")
    summary = {"what": what, "machine": machine, "train_seconds": round(train_seconds, 1),
               "eval_seconds": round(eval_seconds, 1), **result}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    rel = result["relative"]
    header = [f"# Robustness under ImageNet-C corruptions: {what}", "",
              f"{metric}: clean {result['clean']:.3f}; mean over the 15 corruptions per severity: "
              + ", ".join(f"s{s} {v:.3f}" for s, v in result["mean_by_severity"].items())
              + (f" ({rel:.0%} of clean on average)." if rel is not None else "."),
              f"Training {train_seconds:.0f} s, corruption evaluation {eval_seconds:.0f} s on {machine['device']} "
              f"({machine['cpu_threads']} threads). Chart: {out.with_suffix('.png').name}.", ""]
    # the table's own title line is replaced by the header above
    out.with_suffix(".md").write_text("\n".join(header) + "\n" + table.split("\n", 1)[1].lstrip("\n"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
