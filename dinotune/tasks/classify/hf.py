"""A classification run as a transformers image classifier (``dinotune export RUN --format hf``;
``export/hf.py`` writes the folder and uploads it).

transformers' ``Dinov2ForImageClassification`` (and ``Dinov2WithRegistersForImageClassification``)
is exactly one of dinotune's heads: the last layer's CLS token and mean patch token (registers
excluded, after the final LayerNorm) concatenated, ``B x 2C``, into one ``nn.Linear``. A run with
``--pool cls_mean --head linear`` therefore maps onto it weight for weight, with LoRA / DoRA merged
into the base weights (``dinotune.load(merge=True)``); ``--pool cls`` maps too, its ``K x C``
weight zero-padded over the mean-patch half (``0 * mean`` adds nothing). The head's dropout is the
identity at inference. Everything else is refused with the reason: ``last4`` reads the CLS tokens of
four layers (``5C`` inputs), which the transformers class never computes; the ``mlp`` head
(LayerNorm, Linear, GELU, Linear) is not one linear layer; transformers has no image-classification
class for DINOv3; and only classification runs have such a head.

The image processor is read off the run's own evaluation transform (``ClassifyTask.eval_transform``),
never re-derived: ``BitImageProcessor`` (DINOv2's on the hub) with the shortest edge, the crop, the
interpolation (bilinear, antialiased: dinotune's, not the hub's bicubic) and the run's per-band mean /
std. Both resize the same uint8 (pictures) or float32 (band arrays) tensor with the same torchvision
kernel, so the pixels agree to float rounding, except for one difference no transformers setting
removes: torchvision's center crop rounds its offset, ``round((H - h) / 2)`` (half to even), and
transformers floors it, ``(H - h) // 2``. When a side exceeds the crop by ``3 (mod 4)`` pixels the
transformers crop sits one pixel higher / further left. DINOv2 sizes (multiples of 14) never hit it on
the short side (the margin is ``2 * size / 14``); on the long side it depends on the picture's aspect
ratio (62 of the 396 hymenoptera photos, at 28 and at 224 px), and there the probabilities differ.

N-band runs export too: ``num_channels`` and the widened patch embedding are in the model, the band
statistics in the processor (no rescaling, channels first); transformers cannot read ``.npy`` /
multi-band TIFF files, so the pipeline is given float32 ``C x H x W`` arrays in the files' units.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinotune.adapters import adapter_for
from dinotune.errors import ExportError
from dinotune.models.hf_processor import image_processor

# The exported model must give the run's logits on a random batch within this (it always does, to
# ~1e-6; a miss means the mapping is wrong, not the weights).
SELF_CHECK_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------ refusals
def check_exportable(pool: str, head: str) -> None:
    """Raise ExportError unless a classifier with this ``pool`` and ``head`` maps exactly onto
    transformers' DINOv2 image classifier (a linear layer on concat(CLS, mean patch token))."""
    if head != "linear":
        raise ExportError(f"--format hf: the run's head is {head!r} (pool {pool!r}); transformers' "
                          "Dinov2ForImageClassification has one linear layer, and the MLP head (LayerNorm, "
                          "Linear, GELU, Linear) is not one linear map. Train with --head linear to export it")
    if pool == "last4":
        raise ExportError("--format hf: the run's pool is 'last4' (head 'linear'): it reads the CLS tokens of the "
                          "last 4 layers and the mean patch token (5 x width inputs), and transformers' "
                          "Dinov2ForImageClassification computes only the last layer's CLS + mean patch token "
                          "(2 x width). Train with --pool cls_mean (or cls) to export it")
    if pool not in ("cls", "cls_mean"):
        raise ExportError(f"--format hf: unknown pool {pool!r} (cls_mean and cls can be exported)")


def _classifier_class(family: Any, model_type: str) -> tuple[type[nn.Module], str]:
    """The transformers class of ``model_type`` (its backbone ``family`` knows which class reads the
    CLS + mean patch token as the ``cls_mean`` pool does) and its base-model attribute."""
    import transformers

    found = family.classifier(model_type)
    if found is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

        theirs = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
        why = (f"transformers {transformers.__version__} has no image-classification class for it (only the "
               "backbone models)" if theirs is None else
               f"its transformers class {theirs} is not known to read the CLS + mean patch token as dinotune does")
        raise ExportError(f"--format hf: the run's backbone is a {model_type!r} model and {why}; "
                          "DINOv2 runs (with or without registers) can be exported")
    return getattr(transformers, found.class_name), found.base_attribute


# ------------------------------------------------------------------------------- the model
def to_transformers(run: Any, eval_transform: Any) -> tuple[nn.Module, Any, str]:
    """``(model, image processor, model card)`` of a loaded classification run (adapter merged, on
    the CPU) whose evaluation transform is ``eval_transform``; the model's logits are checked
    against the run's (``self_check``)."""
    hf_model = transformers_model(run.model, run.bundle.class_names, run.cfg.head.pool)
    processor = image_processor(run, eval_transform)
    self_check(run.model, hf_model, run.cfg.backbone.image_size)
    return hf_model, processor, model_card(run, hf_model)


def transformers_model(model: nn.Module, class_names: list[str], pool: str) -> nn.Module:
    """The transformers classifier holding ``model``'s (merged) backbone and linear head (sharing
    their tensors: a giant backbone is not copied).

    Args:
        model: a dinotune ``Classifier`` whose backbone has no adapter left (merged), on the CPU.
        class_names: the run's classes, index order (``id2label``).
        pool: ``cls_mean`` (the head's ``K x 2C`` weight as it is) or ``cls`` (``K x C``, padded with
            zeros over the mean-patch half).
    """
    backbone = model.backbone
    hf = backbone.hf_model()
    if any("lora_" in n for n, _ in hf.named_parameters()):
        raise ExportError("internal: the adapter must be merged before export (dinotune.load(merge=True))")
    cls, attribute = _classifier_class(backbone.family, hf.config.model_type)
    config = copy.deepcopy(hf.config)  # num_channels included: a widened patch embedding stays widened
    config.id2label = dict(enumerate(class_names))
    config.label2id = {name: i for i, name in enumerate(class_names)}
    config.problem_type = "single_label_classification"  # the pipeline's softmax, as dinotune predict
    config.architectures = [cls.__name__]

    fc = model.head.fc
    weight = fc.weight.detach().float()
    if pool == "cls":
        weight = torch.cat([weight, torch.zeros_like(weight)], dim=1)  # the mean-patch half reads nothing
    if weight.shape[1] != 2 * backbone.embed_dim:
        raise ExportError(f"internal: a head of {weight.shape[1]} inputs for width {backbone.embed_dim}")
    state = {f"{attribute}.{k}": v.detach().float().contiguous() for k, v in hf.state_dict().items()}
    state["classifier.weight"] = weight.contiguous()
    state["classifier.bias"] = fc.bias.detach().float().contiguous()
    with torch.device("meta"):  # no random init of weights that are overwritten at once
        out = cls(config)
    out.load_state_dict(state, strict=True, assign=True)
    return out.eval()


@torch.no_grad()
def self_check(model: nn.Module, hf_model: nn.Module, image_size: int) -> float:
    """The largest logit difference between the run and the export on a random normalised batch;
    ExportError above ``SELF_CHECK_TOLERANCE`` (a wrong mapping must never be written)."""
    channels = hf_model.config.num_channels
    x = torch.randn(2, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    ours = model.eval()(images=x).float()
    theirs = hf_model(pixel_values=x).logits.float()
    diff = float((ours - theirs).abs().max())
    if not diff <= SELF_CHECK_TOLERANCE:
        raise ExportError(f"internal: the transformers model's logits differ from the run's by {diff:.3g}")
    return diff


# ------------------------------------------------------------------------------ model card
_CARD_METRICS = ("top1", "top5", "f1_macro", "precision_macro", "recall_macro", "accuracy_balanced", "roc_auc",
                 "loss", "images")


def model_card(loaded: Any, hf_model: nn.Module) -> str:
    """A short ``README.md``: task, classes, base model, adapter, head, input, validation metrics
    (``best_metrics.json``) and how to use the folder."""
    cfg, meta = loaded.cfg, loaded.meta
    base = cfg.backbone.model
    hub_base = (base.count("/") == 1 and not base.startswith(("random:", ".", "/", "~"))
                and Path(base).suffix not in (".pth", ".pt") and not Path(base).expanduser().exists())
    adapter = cfg.adapter.kind
    if adapter_for(adapter).merges:
        adapter = f"{adapter} (rank {cfg.adapter.rank}, alpha {cfg.adapter.alpha:g}), merged into the weights"
    names = loaded.bundle.class_names
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    bands = hf_model.config.num_channels
    size = cfg.backbone.image_size
    pictures = not loaded.input_spec.arrays  # else band arrays (.npy, multi-band TIFF)
    lines = ["---", "library_name: transformers", "pipeline_tag: image-classification",
             f"tags: [dinotune, image-classification, {hf_model.config.model_type}]",
             *([f"base_model: {base}"] if hub_base else []), "---", "",
             f"# {loaded.run_dir.name}", "",
             f"An image classifier fine-tuned with dinotune (run `{loaded.run_dir.name}`), exported as a "
             f"`{type(hf_model).__name__}`.", "",
             f"- **classes** ({len(names)}): {shown}",
             f"- **base model**: `{base}`" + ("" if hub_base else " (not a hub model)"),
             f"- **adapter**: {adapter}",
             f"- **head**: linear on the CLS + mean patch token (dinotune `--pool {cfg.head.pool} --head linear`)",
             f"- **input**: {size} x {size} pixels after resizing and center-cropping; " + (
                 "RGB pictures" if pictures else
                 f"{bands} bands, given as float32 `C x H x W` arrays in the training files' units"),
             ""]
    metrics_file = loaded.layout.best_metrics
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    rows = [f"| {k} | {metrics[k]:.4g} |" for k in _CARD_METRICS if isinstance(metrics.get(k), (int, float))]
    if rows:
        epoch = metrics.get("epoch", "?")
        which = (f"this checkpoint (epoch {epoch})" if epoch == meta.get("epoch") else
                 f"the run's best epoch ({epoch}; this export is epoch {meta.get('epoch', '?')})")
        lines += [f"Validation metrics of {which}:", "", "| metric | value |", "|---|---|", *rows, ""]
    call = ('classify("image.jpg", top_k=3)' if pictures else
            "classify(bands, top_k=3)  # bands: a float32 numpy array, C x H x W, in the files' units")
    lines += ["```python", "from transformers import pipeline", "",
              'classify = pipeline("image-classification", model="PATH_OR_REPO")',
              f"print({call})",
              "```", "",
              "The image processor resizes and center-crops as dinotune's evaluation does, with one difference: "
              "transformers floors the crop offset where torchvision rounds it, so for images whose resized side "
              "exceeds the crop by 3 (mod 4) pixels the crop sits one pixel higher or further left and the scores "
              "differ slightly from `dinotune predict`'s.", ""]
    return "\n".join(lines)
