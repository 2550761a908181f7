"""``dinotune demo``: an end-to-end run that needs no download.

It writes scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes) as a
class-folder tree, fine-tunes a DINOv2 on it through the same code path as any user dataset,
evaluates, predicts a few held-out images and points at the run folder and its plots. With the
hub reachable it uses pretrained ``facebook/dinov2-small`` + LoRA; offline it says so and trains
the few-layer ``random:tiny`` architecture from scratch (full fine-tuning, since LoRA on random
weights has nothing to adapt), which takes a couple of minutes on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dinotune.config.commands import DemoConfig
from dinotune.utils import info, warn


def write_digits(root: Path, val_fraction: float = 0.2, seed: int = 0, scale: int = 7) -> tuple[int, int]:
    """Digits as ``root/{train,val}/<digit>/<n>.png`` (upscaled ``scale`` times). Returns counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = [0, 0]
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for rank, i in enumerate(idx):
            split = "val" if rank < n_val else "train"
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            img = Image.fromarray(255 - pixels, mode="L").resize((8 * scale, 8 * scale), Image.BICUBIC)
            img.save(folder / f"{i:04d}.png")
            counts[split == "val"] += 1
    return counts[0], counts[1]


def run_demo(out: str = DemoConfig.out, epochs: int | None = DemoConfig.epochs, model: str = DemoConfig.model,
             device: str = DemoConfig.device) -> dict:
    from dinotune import api
    from dinotune.backbone.loading import BackboneLoadError, load_dinov2
    from dinotune.config import build_config
    from dinotune.tasks.classify.metrics import format_per_class_table
    from dinotune.viz.plots import plot_image_grid

    out_path = Path(out)
    data_dir = out_path.parent / f"{out_path.name}-digits"
    if not (data_dir / "train").is_dir():
        n_train, n_val = write_digits(data_dir)
        info(f"wrote scikit-learn's digits to {data_dir} ({n_train} train / {n_val} val images)")

    pretrained = not model.startswith("random:")
    if pretrained:
        try:
            load_dinov2(model)
        except BackboneLoadError as exc:
            warn(str(exc))
            warn("DEMO FALLBACK: no pretrained weights, so the demo trains the few-layer random:tiny "
                 "architecture from scratch (full fine-tuning, no augmentation: flips would turn digits "
                 "into other digits). It shows the whole pipeline; pretrained weights would reach "
                 "higher accuracy in fewer epochs.")
            model, pretrained = "random:tiny", False
    if pretrained:
        options = dict(adapter="lora", image_size=112, epochs=epochs or 3, lr=1e-3, backbone_lr=2e-4,
                       augment=False)
    else:
        options = dict(adapter="full", image_size=56, epochs=epochs or 20, lr=2e-3, backbone_lr=1e-3,
                       augment=False)
    cfg = build_config("classify", data=str(data_dir), model=model, out=str(out_path), batch_size=32,
                       device=device, pool="cls_mean", **options)
    result = api.train(cfg)

    run = api.load(result["run_dir"])
    sample = sorted((data_dir / "val").rglob("*.png"))[::15][:24]
    preds = run.predict(sample, top_k=1)
    grid = plot_image_grid(
        [Image.open(p["image"]) for p in preds],
        [f"pred {p['predictions'][0]['class']} ({p['predictions'][0]['score']:.2f}) / true "
         f"{Path(p['image']).parent.name}" for p in preds],
        Path(result["run_dir"]) / "sample_predictions.png",
        colours=["green" if p["predictions"][0]["class"] == Path(p["image"]).parent.name else "red"
                 for p in preds],
    )
    result["files"].append(str(grid))
    metrics = result["metrics"]
    print("\n=== dinotune demo: handwritten digits ===")
    print(f"backbone {model} ({'pretrained, LoRA' if pretrained else 'random init, full fine-tuning'})")
    print(f"validation top-1 accuracy {metrics.get('top1', float('nan')):.3f}, macro F1 "
          f"{metrics.get('f1_macro', float('nan')):.3f} (best epoch {metrics.get('epoch')})")
    print(format_per_class_table(metrics))
    print("sample predictions:")
    for p in preds[:6]:
        truth = Path(p["image"]).parent.name
        top = p["predictions"][0]
        print(f"  {p['image']}: predicted {top['class']} ({top['score']:.2f}), true {truth}")
    print(f"\nrun folder: {result['run_dir']}")
    for f in result["files"]:
        print(f"  plot: {f}")
    print(f"  metrics per epoch: {Path(result['run_dir']) / 'metrics.jsonl'}")
    print(f"  TensorBoard: tensorboard --logdir {Path(result['run_dir']) / 'tb'}")
    return result
