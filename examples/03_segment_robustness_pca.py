# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Semantic segmentation: robustness to corruptions and PCA feature maps
#
# This tutorial trains a segmentation decoder on COCO's polygons rasterised into semantic masks
# (`coco_tiny`: background 0 plus the 80 COCO categories; crowd regions are ignored), then
#
# 1. evaluates mIoU, predicts label maps and draws overlays,
# 2. measures robustness: the same evaluation under ImageNet-C corruptions (noise, blur, weather,
#    digital) at several severities, as a table and a chart,
# 3. shows PCA maps: the first three principal components of the patch features as RGB, for the
#    fine-tuned run and for a plain backbone.
#
# The same code reads Pascal VOC, ADE20K or a pair of `images/` + `masks/` folders: only `DATA`
# changes. It uses `random:tiny` (random weights), 84-pixel images, 8 training images and 2 epochs
# to run in about a minute on two CPU cores, so the mIoU is tiny and the PCA maps of a random
# backbone show colour and texture rather than objects. With a network use
# `MODEL = "facebook/dinov2-small"`: its PCA maps separate objects from background without any
# training, which is the picture DINOv2 is known for.

# %%
import os
from pathlib import Path

import dinotune
import dinotune.api
from dinotune.viz.show import show  # inline in a notebook, the path in a script
from dinotune.robustness import evaluate_corruptions

MODEL = "random:tiny"  # facebook/dinov2-small with a network
IMAGE_SIZE = 84        # multiple of 14; 448-518 for real weights
EPOCHS = 2
DEVICE = "auto"

if not os.environ.get("DINOTUNE_SHARED"):
    raise RuntimeError("set DINOTUNE_SHARED to the folder that holds data/coco_tiny (e.g. "
                       "`export DINOTUNE_SHARED=../shared`), or set DATA below to your own data")
DATA = Path(os.environ["DINOTUNE_SHARED"]) / "data" / "coco_tiny"
OUT = Path(os.environ.get("DINOTUNE_EXAMPLES_OUT", "runs/examples"))
print("data:", DATA, "| runs under:", OUT)



# %% [markdown]
# ## Train
#
# `decoder="linear"` is BatchNorm + a 1x1 convolution on the last layer's patch tokens (the official
# DINOv2 linear evaluation; `linear_layers=4` concatenates the last four). `decoder="fpn"` fuses
# features of four blocks at four strides for sharper masks. Training augments images and masks
# together (random scale, crop, flip; nearest neighbour on the masks). With 8 images at batch 4 the
# run makes only 4 optimizer steps, and dinotune warns about it: on real data train longer.

# %%
result = dinotune.train(task="segment", data=str(DATA), model=MODEL, adapter="lora", decoder="linear",
                        image_size=IMAGE_SIZE, epochs=EPOCHS, batch_size=4, subset=8, val_subset=4,
                        device=DEVICE, workers=0, progress=False, out=str(OUT / "seg"))
RUN = result["run_dir"]
m = result["metrics"]
print("run folder:", RUN)
print({k: round(m[k], 4) for k in ("mIoU", "pixel_accuracy", "mean_class_accuracy")})

# %% [markdown]
# ## Evaluate and predict
#
# mIoU comes from one confusion matrix accumulated over the whole evaluation set (never averaged
# per batch). `predict` returns the share of each class per image; `masks=` writes palette PNGs
# whose pixel values are the class indices, at the image's original size, and `draw=` colour overlays.

# %%
run = dinotune.load(RUN, device=DEVICE)
metrics = run.evaluate(str(DATA), split="val", subset=4)
print({k: round(metrics[k], 4) for k in ("mIoU", "pixel_accuracy", "mean_class_accuracy")})

images = sorted((DATA / "val2017").glob("*.jpg"))[:2]
for p in run.predict(images, masks=str(OUT / "seg-masks"), draw=str(OUT / "seg-overlays")):
    top = sorted(p["classes"].items(), key=lambda kv: -kv[1])[:3]
    print(Path(p["image"]).name, "->", p["mask"], "| largest classes:", top)
for f in sorted((OUT / "seg-overlays").glob("*.jpg")):
    show(f)

# %% [markdown]
# ## Robustness under corruptions
#
# `evaluate_corruptions` evaluates clean, then under each corruption and severity (1 mild .. 5
# strong), and writes `corruptions.json`, a Markdown table and a chart of mIoU against severity.
# For segmentation the elastic transform moves pixels only locally, so masks still fit. Here: three
# corruptions at severities 1, 3 and 5 on 4 images; `dinotune eval RUN --data D --corruptions` runs
# all 15 at all five severities. A model with random weights has little to lose, so expect flat
# curves here; a trained model's mIoU falls with severity.

# %%
robust = evaluate_corruptions(run, str(DATA), names=["gaussian_noise", "defocus_blur", "jpeg_compression"],
                              severities=[1, 3, 5], out_dir=OUT / "seg-robustness", subset=4)
print((OUT / "seg-robustness" / "corruptions.md").read_text())
show(OUT / "seg-robustness" / "corruptions.png")

# %% [markdown]
# ## PCA maps of the patch features
#
# `dinotune.api.pca` fits a PCA jointly over the patch features of the given images and shows the
# first three components as RGB. `model` is a backbone spec (`random:tiny`, a hub id, a `.pth`) or a
# run folder (its backbone with the adapter merged), so the two pictures below show what
# fine-tuning changed. `foreground_threshold` keeps only patches whose first component passes it,
# DINOv2's trick to mask the background (meaningful with pretrained weights).

# %%
pca_images = [str(p) for p in sorted((DATA / "val2017").glob("*.jpg"))[:3]]
show(dinotune.api.pca(RUN, pca_images, OUT / "pca-run.png", device=DEVICE))
show(dinotune.api.pca(MODEL, pca_images, OUT / "pca-backbone.png", image_size=IMAGE_SIZE, device=DEVICE))

# %% [markdown]
# ## With a GPU and pretrained weights
#
# - `MODEL = "facebook/dinov2-small"` (or `-base`), `IMAGE_SIZE = 518`, `decoder="fpn"`, the whole
#   dataset (`subset=500, val_subset=100` for a first look on COCO), tens of epochs.
# - `inference="slide"` evaluates with sliding windows over the full-resolution image.
# - All corruptions: `evaluate_corruptions(run, DATA, out_dir=...)` with the defaults, or
#   `dinotune eval RUN --data D --corruptions`.
