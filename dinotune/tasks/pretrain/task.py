"""Self-supervised pretraining as a Task: DINOv2's recipe on the user's unlabelled images, or the
distillation of a frozen teacher backbone, trained by the same engine as every task (AMP,
accumulation, exact resume, DDP, trackers).

One optimizer step, DINO objective (Oquab et al. 2023):

1. the teacher (``teacher.py``: the EMA of the student's trained weights) sees both global crops
   unmasked; its class-token logits and its logits of the patches the student will not see become
   targets through Sinkhorn-Knopp centring at the teacher's temperature (0.04 -> 0.07);
2. the student sees the global crops with some patches masked (``masking.py``) and the local
   crops; DINO's loss compares every student crop's class token with the other global crops'
   targets, iBOT's loss the masked patches with the teacher's, KoLeo spreads the class tokens;
3. after the optimizer step the teacher moves towards the student (momentum 0.992 -> 1).

Logged besides the losses: the teacher's target entropy as a share of its maximum (a teacher that
tells images apart no more drives it to 1) and the standard deviation of the student's normalised
class tokens over the batch (a collapse onto one point drives it to 0); a collapse is warned about
with what to change.

With ``--distill TEACHER`` the objective is instead the teacher backbone's class and patch tokens
on the first global crop (cosine on the class token, smooth L1 on layer-normalised patch tokens, the
student's projected onto the teacher's width and resized to its patch grid).

Every epoch with ``--val-data`` the student's class tokens of its ``train/`` images classify its
``val/`` images by the DINO k-NN protocol (``dinotune.ops.knn``): ``knn_top1`` picks the best
checkpoint. The run is a backbone: ``train --model RUN``, ``embed``, ``knn``, ``pca``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dinotune.adapters import trainable_backbone_parameters
from dinotune.backbone.model import DinoBackbone
from dinotune.config.pretrain import PretrainConfig
from dinotune.data.bands import InputSpec, check_inputs, read_input, resolve_input_spec
from dinotune.data.loader import make_loader
from dinotune.data.transforms import classify_eval_transform
from dinotune.engine.monitor import MonitorChoice
from dinotune.errors import ConfigError
from dinotune.models.bundle import ModelBundle
from dinotune.tasks.base import Task, TaskData, TrainedRun, files_fingerprint
from dinotune.tasks.pretrain.data import LOCAL_SCALE, MultiCropDataset, collate_multicrop, list_images
from dinotune.tasks.pretrain.evaluation import KnnImages, class_tokens, knn_items, knn_metrics
from dinotune.tasks.pretrain.losses import (
    dino_loss,
    distillation_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_momentum,
    teacher_temperature,
)
from dinotune.tasks.pretrain.masking import block_masks
from dinotune.tasks.pretrain.model import PretrainHead, Pretrainer
from dinotune.tasks.pretrain.teacher import TeacherWeights
from dinotune.utils import info, warn

# A collapse, a tenth of the way into training or later: the class tokens of a batch all alike
# (their spread below COLLAPSE_STD), or the teacher's targets uniform over the prototypes (their
# entropy above this share of its maximum: Sinkhorn-Knopp keeps the prototypes in use, so a teacher
# that says nothing about an image is the failure it leaves).
COLLAPSE_ENTROPY = 0.995
# DINOv2's local crops are 98 px beside 224 px global ones
LOCAL_SHARE = 98 / 224
COLLAPSE_STD = 1e-3


class PretrainTask(Task):
    name = "pretrain"
    monitor_mode = "max"

    cfg: PretrainConfig

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg)
        self.progress = 0.0  # share of the optimizer steps taken, for the schedules
        self.teacher_backbone: DinoBackbone | None = None  # --distill
        self._warned = False

    @property
    def monitor(self) -> str:
        return "knn_top1"

    def monitor_for(self, meta: dict[str, Any], val: Dataset | None) -> MonitorChoice:
        return MonitorChoice("knn_top1", "max", "", ("knn_top1", "knn_top5"), without_validation="last")

    # ---------------------------------------------------------------------------------- data
    def local_size(self, patch_size: int) -> int:
        size = self.cfg.data.local_size or max(1, round(self.cfg.backbone.image_size * LOCAL_SHARE / patch_size)) * patch_size
        if size % patch_size or size < patch_size:
            raise ConfigError(f"--local-size {size} must be a positive multiple of the patch size {patch_size}")
        return size

    def build_data(self, run_dir: Path | None, patch_size: int) -> TaskData:
        d, b = self.cfg.data, self.cfg.bands
        paths = list_images(d.data, check=d.check_images, max_pixels=d.max_image_pixels, layout=b.layout)
        spec = resolve_input_spec(paths, in_channels=b.in_channels, rgb_bands=b.rgb_bands, layout=b.layout,
                                  stats=b.stats, mean=b.mean, std=b.std, max_pixels=d.max_image_pixels)
        train = MultiCropDataset(paths, spec, self.cfg.backbone.image_size, self.local_size(patch_size),
                                 d.local_crops, max_image_pixels=d.max_image_pixels,
                                 global_scale=(d.global_scale, 1.0), local_scale=(LOCAL_SCALE[0], d.global_scale))
        val, classes = None, []
        if d.val_data:
            items, classes = knn_items(Path(d.val_data).expanduser())
            check_inputs([p for p, _, _ in items], spec, "k-NN evaluation")
            val = KnnImages(items, classes, classify_eval_transform(self.cfg.backbone.image_size, spec), spec)
        info(f"pretraining on {len(paths)} unlabelled images" +
             (f"; k-NN evaluation on {d.val_data} ({len(classes)} classes)" if val is not None else ""))
        meta = {"task": self.name, "class_names": [], "num_classes": 0, "images": len(paths),
                "data_fingerprint": files_fingerprint(paths), "input": spec.to_meta()}
        return TaskData(train, val, meta)

    def loaders(self, data: TaskData) -> tuple[DataLoader, DataLoader | None]:
        t = self.cfg.train
        if len(data.train) < 2:
            raise ConfigError(f"pretraining needs at least 2 images, {self.cfg.data.data} has {len(data.train)}")
        batch = min(int(t.batch_size), len(data.train))
        # whole batches only: KoLeo and Sinkhorn-Knopp compare the images of a batch with each other
        train = make_loader(data.train, batch, shuffle=True, workers=t.workers, collate_fn=collate_multicrop,
                            seed=t.seed, drop_last=True)
        val = None
        if data.val is not None:
            val = make_loader(data.val, self.cfg.inference.batch_size, shuffle=False, workers=t.workers)
        return train, val

    # ---------------------------------------------------------------------------------- model
    def build_model(self, meta: dict[str, Any], backbone: DinoBackbone) -> ModelBundle:
        s = self.cfg.ssl
        distill_width = 0
        if s.distill:
            self.teacher_backbone = self._distill_teacher(meta)
            distill_width = self.teacher_backbone.embed_dim
        head = PretrainHead(backbone.embed_dim, s.prototypes, s.head_hidden, s.head_bottleneck, distill_width)
        model = Pretrainer(backbone, head)
        if not s.distill:
            head.teacher = TeacherWeights(self.student_weights(model))
        # distillation passes no mask, so the backbone's mask token gets no gradient: DDP must know
        return ModelBundle(model=model, criterion=lambda *a, **k: {}, postprocess=None, class_names=[],
                           find_unused_parameters=bool(s.distill))

    def _distill_teacher(self, meta: dict[str, Any]) -> DinoBackbone:
        spec = InputSpec.from_meta(meta)
        if spec.in_channels != 3:
            raise ConfigError("--distill needs RGB pictures: the teacher backbone reads three bands")
        teacher = DinoBackbone.from_spec(self.cfg.ssl.distill).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        info(f"distilling {self.cfg.ssl.distill} ({teacher.num_layers} blocks, width {teacher.embed_dim})")
        return teacher

    def student_weights(self, model: Pretrainer) -> dict[str, torch.nn.Parameter]:
        """The weights that train and have a teacher copy: the DINO head and the backbone's trainable ones."""
        named = {f"dino.{n}": p for n, p in model.head.dino.named_parameters()}
        named.update({f"backbone.{n}": p for n, p in trainable_backbone_parameters(model.backbone, self.cfg.adapter)})
        return named

    # ---------------------------------------------------------------------------- the schedule
    def scheduled(self, step: int, total_steps: int) -> None:
        """Before optimizer step ``step`` (0-based) of ``total_steps``: the schedules' position."""
        self.progress = step / max(1, total_steps)

    def stepped(self, bundle: ModelBundle, step: int, total_steps: int) -> None:
        """After optimizer step ``step``: the teacher follows the student."""
        head = bundle.model.head
        if head.teacher is not None:
            momentum = teacher_momentum(step / max(1, total_steps), start=self.cfg.ssl.momentum)
            head.teacher.update(self.student_weights(bundle.model), momentum)

    # ---------------------------------------------------------------------------- training
    def training_step(self, bundle: ModelBundle, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        if self.teacher_backbone is not None:
            return self._distill_step(model, batch)
        s, raw = self.cfg.ssl, bundle.model
        crops, local = batch["global"], batch["local"]
        b = crops.shape[0] // 2
        grid = (crops.shape[-2] // raw.patch_size, crops.shape[-1] // raw.patch_size)
        masks = block_masks(2 * b, grid, (s.mask_ratio_min, s.mask_ratio_max), s.mask_probability).to(crops.device)
        if not s.ibot_weight:
            masks = torch.zeros_like(masks)
        temperature = teacher_temperature(self.progress, s.teacher_temperature_warmup, s.teacher_temperature_start,
                                          s.teacher_temperature)
        with torch.no_grad(), raw.head.teacher.swapped_in(self.student_weights(raw)):
            feats = raw.backbone(crops)
            cls_logits = raw.head.dino(feats.cls).float()
            targets = [sinkhorn_knopp(cls_logits[:b], temperature), sinkhorn_knopp(cls_logits[b:], temperature)]
            patch_targets = sinkhorn_knopp(raw.head.dino(feats.patch_tokens[masks]).float(), temperature) \
                if masks.any() else cls_logits.new_zeros((0, cls_logits.shape[1]))
        out = model(crops, local, masks)
        student = [out["global"][:b].float(), out["global"][b:].float()]
        if out["local"] is not None:
            student += list(out["local"].float().chunk(out["local"].shape[0] // b))
        losses = {"dino": dino_loss(student, targets, s.student_temperature)}
        total = losses["dino"]
        if s.ibot_weight:
            counts = masks.sum(dim=1, keepdim=True).expand_as(masks)[masks].float()
            losses["ibot"] = ibot_loss(out["patch"].float(), patch_targets, 1.0 / counts.clamp(min=1), 2 * b,
                                       s.student_temperature)
            total = total + s.ibot_weight * losses["ibot"]
        if s.koleo_weight:
            cls = out["cls"].float()
            losses["koleo"] = koleo_loss(cls[:b]) + koleo_loss(cls[b:])
            total = total + s.koleo_weight * losses["koleo"]
        with torch.no_grad():
            probs = torch.cat(targets)
            entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=1).mean() / math.log(probs.shape[1])
            spread = F.normalize(out["cls"].float(), dim=1).std(dim=0).mean()
        self._collapse_guard(float(entropy), float(spread))
        return {"loss": total, **losses, "teacher_entropy": entropy, "embedding_std": spread}

    def _distill_step(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        crops = batch["global"]
        crops = crops[: crops.shape[0] // 2]  # the first global crop of every image
        with torch.no_grad():
            teacher = self.teacher_backbone.to(crops.device)
            t = teacher(F.interpolate(crops, size=self._teacher_size(crops.shape[-1]), mode="bilinear",
                                      align_corners=False, antialias=True))
        out = model(crops)
        patches = out["patches"]
        if tuple(out["grid"]) != tuple(t.grid):  # another patch size: the student's map resized to the teacher's
            patches = F.interpolate(patches.transpose(1, 2).reshape(patches.shape[0], -1, *out["grid"]).float(),
                                    size=t.grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        losses = distillation_loss(out["cls"].float(), t.cls.float(), patches.float(), t.patch_tokens.float())
        return {"loss": losses["loss"], "distill_cls": losses["cls"], "distill_patch": losses["patch"]}

    def _teacher_size(self, side: int) -> int:
        """The teacher's input side: the student's rounded to the teacher's patch size."""
        p = self.teacher_backbone.patch_size
        return max(p, round(side / p) * p)

    def _collapse_guard(self, entropy: float, spread: float) -> None:
        if self._warned or self.progress < 0.1:
            return
        if entropy > COLLAPSE_ENTROPY or spread < COLLAPSE_STD:
            self._warned = True
            warn(f"the representation may be collapsing (teacher target entropy {entropy:.3f} of its maximum, "
                 f"class-token spread {spread:.2e}): lower --lr / --backbone-lr, raise --momentum (e.g. 0.996), "
                 "lower --teacher-temperature, or use more images and local crops")

    # ---------------------------------------------------------------------------- evaluation
    def evaluation_pass(self, bundle: ModelBundle, loader: DataLoader, device: torch.device, precision: str,
                        show_progress: bool) -> Any:
        return class_tokens(bundle.model.backbone, loader, device, precision, show_progress)

    def compute_metrics(self, bundle: ModelBundle, parts: Sequence[Any], dataset: Dataset) -> dict[str, Any]:
        return knn_metrics(parts, self.cfg.ssl.knn_k, self.cfg.ssl.knn_temperature)

    def finished(self, run_dir: Path, bundle: ModelBundle) -> list[Path]:
        """The best checkpoint's backbone (by k-NN top-1 with ``--val-data``, else the last epoch's;
        adapter merged, the widened patch embedding kept) as a transformers folder ``RUN/backbone``: what ``--model RUN``
        loads, the same weights ``dinotune load`` / ``embed RUN`` / ``knn RUN`` take."""
        import copy

        from dinotune.adapters import merge_adapter
        from dinotune.backbone.loading import RUN_BACKBONE, no_progress_bars
        from dinotune.engine import checkpoint
        from dinotune.engine.run_folder import RunLayout

        model = copy.deepcopy(bundle.model).cpu()
        best = RunLayout(run_dir).best
        if best.exists():
            checkpoint.load_weights(best, model, self.cfg.adapter)
        backbone = model.backbone
        merge_adapter(backbone)
        model = backbone.hf_model()
        model.config.num_channels = backbone.patch_embedding().in_channels
        folder = Path(run_dir) / RUN_BACKBONE
        with no_progress_bars():
            model.save_pretrained(folder, safe_serialization=True)
        info(f"the pretrained backbone: {folder} (use it as --model {run_dir})")
        return [folder]

    # ---------------------------------------------------------------------------- a trained run
    def check_transformers_export(self) -> None:
        """A pretraining run exports as what it is: the backbone (``Dinov2Model`` / ``DINOv3ViTModel``)."""

    def to_transformers(self, run: TrainedRun) -> tuple[Any, Any, str]:
        """The run's backbone (loaded merged) as a plain transformers model, the image processor of
        its evaluation transform, and a short model card."""
        import copy

        from dinotune.models.hf_processor import image_processor

        backbone = run.model.backbone
        hf_model = copy.deepcopy(backbone.hf_model()).cpu().eval()
        hf_model.config.num_channels = backbone.patch_embedding().in_channels
        spec = InputSpec.from_meta(run.meta)
        processor = image_processor(run, classify_eval_transform(self.cfg.backbone.image_size, spec))
        objective = f"distillation of `{self.cfg.ssl.distill}`" if self.cfg.ssl.distill else \
            "DINOv2's objective (DINO + iBOT + KoLeo, EMA teacher)"
        card = "\n".join([
            "---", "library_name: transformers", "pipeline_tag: image-feature-extraction",
            f"tags: [dinotune, self-supervised, {hf_model.config.model_type}]", "---", "",
            f"# {Path(run.run_dir).name}", "",
            f"A backbone pretrained with dinotune on {run.meta.get('images', '?')} unlabelled images by {objective}, "
            f"starting from `{self.cfg.backbone.model}`; {hf_model.config.num_channels} input bands, "
            f"{self.cfg.backbone.image_size} px.", "",
            "```python", "from transformers import AutoModel", "model = AutoModel.from_pretrained(FOLDER)",
            "features = model(pixel_values=x).last_hidden_state[:, 0]  # the class token", "```", ""])
        return hf_model, processor, card

    def predict(self, run: TrainedRun, images: Any, settings: Any, **options: Any) -> list[dict[str, Any]]:
        """One embedding per image (the class token after the final norm, the evaluation transform):
        ``[{"image", "embedding"}]``, the records of the exported model's runtime. For an embeddings
        file of a folder, ``dinotune embed RUN DATA`` (split and label columns, resumable)."""
        from dinotune.data.images import readable_images
        from dinotune.data.transforms import classify_eval_transform
        from dinotune.engine.device import autocast
        from dinotune.engine.logging import progress
        from dinotune.tasks.pretrain.runtime import embedding_record

        limit = self.cfg.data.max_image_pixels
        spec = InputSpec.from_meta(run.meta)
        paths = readable_images(images, "full", max_pixels=limit, layout=spec.layout)
        check_inputs(paths, spec, "prediction")
        transform = classify_eval_transform(self.cfg.backbone.image_size, spec)
        backbone = run.bundle.model.backbone.eval()
        out = []
        with torch.no_grad():
            for start in progress(range(0, len(paths), settings.batch_size), len(paths) > settings.batch_size,
                                  desc="embedding"):
                chunk = paths[start:start + settings.batch_size]
                x = torch.stack([transform(read_input(p, limit, spec.layout)).as_subclass(torch.Tensor)
                                 for p in chunk]).to(run.device)
                with autocast(run.device, run.precision):
                    cls = backbone(x).cls.float().cpu().numpy()
                out += [embedding_record(str(p), row) for p, row in zip(chunk, cls)]
        return out

    def export_graph(self, run: TrainedRun, model: torch.nn.Module, image_size: int) -> Any:
        from dinotune.tasks.pretrain.export import build_graph

        return build_graph(model, self.cfg.inference.batch_size)

    def evaluate_data(self, run: TrainedRun, data: str, split: str, settings: Any, *, images: str = "",
                      subset: int = 0, subset_seed: int = 0, pre_transform: Any = None) -> dict[str, Any]:
        raise ConfigError("a pretraining run is evaluated by the k-NN protocol: `dinotune knn RUN --data DIR`")
