"""Image classification as a Task: data, model, loss and evaluator for the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dinotune.config import ClassifyConfig
from dinotune.data.images import readable_images
from dinotune.data.loader import make_loader
from dinotune.data.transforms import classify_eval_transform, classify_train_transform
from dinotune.engine.device import autocast, to_device
from dinotune.engine.logging import progress
from dinotune.tasks.base import Task, TaskData, build_backbone
from dinotune.tasks.classify.data import (
    ImageListDataset,
    build_classification_data,
    build_eval_dataset,
)
from dinotune.tasks.classify.heads import build_head, pooled_dim
from dinotune.tasks.classify.losses import build_loss
from dinotune.tasks.classify.metrics import ClassificationMetrics
from dinotune.tasks.classify.model import Classifier
from dinotune.tasks.classify.probe import cached_features


class ClassifyTask(Task):
    name = "classify"
    monitor = "top1"
    monitor_mode = "max"

    def __init__(self, cfg: ClassifyConfig):
        super().__init__(cfg)
        h = cfg.head
        self.loss_fn = build_loss(h.loss, label_smoothing=h.label_smoothing, gamma=h.focal_gamma)

    # ---------------------------------------------------------------------------------- data
    def eval_transform(self):
        return classify_eval_transform(self.cfg.backbone.image_size)

    def build_data(self, run_dir: Path | None) -> TaskData:
        d, size = self.cfg.data, self.cfg.backbone.image_size
        augment = d.augment and not self.cfg.head.cache_features
        data = build_classification_data(
            data=d.data, val_data=d.val_data, val_fraction=d.val_fraction, train_split=d.train_split,
            val_split=d.val_split, image_column=d.image_column, label_column=d.label_column,
            check_images=d.check_images, train_transform=classify_train_transform(size, augment),
            eval_transform=self.eval_transform(), seed=self.cfg.train.seed,
        )
        meta = {"task": self.name, "class_names": data.class_names, "num_classes": len(data.class_names),
                "skipped_files": len(data.report)}
        return TaskData(data.train, data.val, meta)

    def eval_dataset(self, data: str, class_names: list[str], split: str = "val", pre_transform=None):
        """Evaluation data mapped onto ``class_names``; ``pre_transform`` (PIL -> PIL, e.g. a
        corruption) runs before the preprocessing."""
        d = self.cfg.data
        transform = self.eval_transform()
        if pre_transform is not None:
            from torchvision.transforms import v2

            transform = v2.Compose([pre_transform, transform])
        return build_eval_dataset(data, class_names, transform, split=split,
                                  image_column=d.image_column, label_column=d.label_column,
                                  hf_split=d.val_split, check_images=d.check_images)

    def loaders(self, data: TaskData) -> tuple[DataLoader, DataLoader | None]:
        t = self.cfg.train
        workers = 0 if self.cfg.head.cache_features else t.workers
        pin = torch.cuda.is_available()
        train = make_loader(data.train, t.batch_size, shuffle=True, workers=workers, seed=t.seed,
                            drop_last=False, pin_memory=pin)
        val = (make_loader(data.val, t.batch_size, shuffle=False, workers=workers, pin_memory=pin)
               if data.val is not None else None)
        return train, val

    # --------------------------------------------------------------------------------- model
    def build_model(self, meta: dict[str, Any], model_override: str | None = None) -> nn.Module:
        backbone = build_backbone(self.cfg, meta, model_override)
        self.class_names = meta["class_names"]
        h = self.cfg.head
        in_dim = pooled_dim(backbone.embed_dim, h.pool)
        head = build_head(h.head, in_dim, meta["num_classes"], h.mlp_hidden, h.head_dropout)
        return Classifier(backbone, head, h.pool)

    def prepare(self, model, data, run_dir, device, precision) -> TaskData:
        if not self.cfg.head.cache_features:
            return data
        h, t = self.cfg.head, self.cfg.train
        model.to(device)
        common = dict(
            cache_dir=Path(h.cache_dir) if h.cache_dir else run_dir / "cache",
            key_parts={"fingerprint": data.meta["backbone_fingerprint"], "model": self.cfg.backbone.model,
                       "size": self.cfg.backbone.image_size, "pool": h.pool},
            batch_size=t.batch_size, workers=t.workers, device=device, precision=precision,
            show_progress=t.progress,
        )
        train = cached_features(model, data.train, split="train", **common)
        val = cached_features(model, data.val, split="val", **common) if data.val is not None else None
        return TaskData(train, val, data.meta)

    # ------------------------------------------------------------------------- step and eval
    @staticmethod
    def _inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"features": batch["features"]} if "features" in batch else {"images": batch["image"]}

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = model(**self._inputs(batch))
        loss = self.loss_fn(logits.float(), batch["label"])
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    @torch.no_grad()
    def evaluate(self, model, loader, device, precision, show_progress=False) -> dict[str, Any]:
        logits, labels = self.predict_logits(model, loader, device, precision, show_progress)
        names = getattr(self, "class_names", None)
        metrics = ClassificationMetrics(logits.shape[1], names)
        metrics.update(logits, labels)
        out = {"loss": float(self.loss_fn(logits, labels))}
        out.update(metrics.compute())
        return out

    @torch.no_grad()
    def predict_logits(self, model, loader, device, precision, show_progress=False):
        """``N x K`` float32 logits and ``N`` labels over ``loader``, in order."""
        was_training = model.training
        model.eval()
        all_logits, all_labels = [], []
        for batch in progress(loader, show_progress, desc="evaluating"):
            batch = to_device(batch, device)
            with autocast(device, precision):
                all_logits.append(model(**self._inputs(batch)).float().cpu())
            all_labels.append(batch["label"].cpu())
        model.train(was_training)
        return torch.cat(all_logits), torch.cat(all_labels)

    # ------------------------------------------------------------------------------ inference
    def predict_images(self, loaded, images, top_k: int = 5, batch_size: int = 32, **_: Any) -> list[dict[str, Any]]:
        """Top-k classes per image: ``[{"image", "predictions": [{"class", "index", "score"}]}]``."""
        paths = readable_images(images, "full")
        ds = ImageListDataset([(p, -1) for p in paths], self.eval_transform())
        loader = make_loader(ds, batch_size, shuffle=False, workers=0)
        names = loaded.meta["class_names"]
        k = min(top_k, len(names))
        results: dict[int, dict[str, Any]] = {}
        loaded.model.eval()
        with torch.no_grad():
            for batch in progress(loader, len(paths) > batch_size, desc="predicting"):
                with autocast(loaded.device, loaded.precision):
                    logits = loaded.model(images=batch["image"].to(loaded.device)).float()
                scores, idx = logits.softmax(-1).topk(k, dim=-1)
                for i, s_row, c_row in zip(batch["index"].tolist(), scores.tolist(), idx.tolist()):
                    results[i] = {"image": str(paths[i]), "predictions": [
                        {"class": names[c], "index": c, "score": s} for s, c in zip(s_row, c_row)]}
        return [results[i] for i in sorted(results)]

    def format_predictions(self, results: list[dict[str, Any]], fmt: str) -> str:
        """JSON (top-k per image), or CSV with one row per image: image, class_1, score_1, ..."""
        import csv
        import io
        import json

        if fmt == "json":
            return json.dumps(results, indent=2) + "\n"
        k = max((len(r["predictions"]) for r in results), default=0)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"score_{i}")])
        for r in results:
            w.writerow([r["image"]] + [v for p in r["predictions"] for v in (p["class"], f"{p['score']:.6f}")])
        return buf.getvalue()

    def evaluate_data(self, loaded, data: str, split: str = "val", batch_size: int = 32,
                      pre_transform=None) -> dict[str, Any]:
        """Metrics of ``loaded`` on a dataset, classes matched to the checkpoint's by name."""
        self.class_names = loaded.meta["class_names"]
        ds = self.eval_dataset(data, self.class_names, split, pre_transform=pre_transform)
        loader = make_loader(ds, batch_size, shuffle=False, workers=self.cfg.train.workers)
        return self.evaluate(loaded.model, loader, loaded.device, loaded.precision, show_progress=True)

    def sample_charts(self, loaded, data: str, split: str, out_dir: Path, samples: int) -> list[Path]:
        """A grid of ``samples`` evaluation images titled predicted / true class (green right, red wrong)."""
        from dinotune.data.images import load_image
        from dinotune.viz.plots import plot_image_grid

        names = loaded.meta["class_names"]
        ds = self.eval_dataset(data, names, split)
        items = getattr(ds, "items", None)
        if not items:  # Hugging Face datasets have no file paths to show
            return []
        step = max(1, len(items) // samples)
        picked = items[::step][:samples]
        preds = self.predict_images(loaded, [p for p, _ in picked], top_k=1)
        truth = {str(p): names[label] for p, label in picked}
        titles, colours = [], []
        for r in preds:
            top = r["predictions"][0]
            titles.append(f"{top['class']} ({top['score']:.2f}) / {truth[r['image']]}")
            colours.append("green" if top["class"] == truth[r["image"]] else "red")
        return [plot_image_grid([load_image(r["image"]) for r in preds], titles, Path(out_dir) / "samples.png",
                                colours=colours)]

    def report(self, run_dir: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
        from dinotune.viz.plots import plot_bars, plot_confusion_matrix

        if "confusion" not in metrics:
            return []
        files = [plot_confusion_matrix(metrics["confusion"], meta["class_names"], run_dir / "confusion_matrix.png")]
        if "per_class" in metrics and len(metrics["per_class"]) > 2:
            f1 = {row["class"]: row["f1"] for row in metrics["per_class"]}
            files.append(plot_bars(f1, run_dir / "per_class_f1.png", "F1 per class", "F1"))
        return files
