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
# # Object detection on COCO, compared with YOLO
#
# This tutorial trains the DETR-style detector (a ViTDet-style feature pyramid on the DINOv2 patch
# tokens, then a deformable-attention decoder) on `coco_tiny`: real COCO 2017 images and
# annotations in the official layout, 80 training and 80 validation images:
#
# ```
# coco_tiny/annotations/instances_{train,val}2017.json
# coco_tiny/{train,val}2017/*.jpg
# ```
#
# It then evaluates with pycocotools (AP, AP50, ...), predicts and draws boxes, and scores the
# trained run next to a YOLO model with `dinotune.api.compare`: the same images, the same metric code.
#
# To stay near a minute on two CPU cores it uses `random:tiny` (random weights, 4 blocks), a small
# decoder, 112-pixel images, 16 training images and 2 epochs, so the AP is near zero: this shows
# the workflow, not a result. With a GPU and a network use `MODEL = "facebook/dinov2-small"`, drop
# the small-decoder options (the defaults are the full detector, or use `lightweight=True`), set
# `IMAGE_SIZE = 518` (or 448), train on all of COCO, and compare against pretrained `yolov8n.pt`.

# %%
import json
import os
from pathlib import Path

import dinotune
import dinotune.api
from dinotune.viz.show import show  # inline in a notebook, the path in a script

MODEL = "random:tiny"  # facebook/dinov2-small with a network
IMAGE_SIZE = 112       # multiple of 14; 448-518 for real weights
EPOCHS = 2
DEVICE = "auto"
# a small decoder so the tutorial runs on a CPU; leave these out for the default detector
SMALL_DECODER = dict(hidden_dim=32, num_heads=2, ffn_dim=64, decoder_layers=2, num_queries=20, sampling_points=2)

if not os.environ.get("DINOTUNE_SHARED"):
    raise RuntimeError("set DINOTUNE_SHARED to the folder that holds data/coco_tiny (e.g. "
                       "`export DINOTUNE_SHARED=../shared`), or set DATA below to your own COCO folder")
DATA = Path(os.environ["DINOTUNE_SHARED"]) / "data" / "coco_tiny"
OUT = Path(os.environ.get("DINOTUNE_EXAMPLES_OUT", "runs/examples"))
print("data:", DATA, "| runs under:", OUT)



# %% [markdown]
# ## Train
#
# `subset=16, subset_seed=3` trains on a reproducible subset of the training images and writes
# their ids to `RUN/subset.json` (pass `subset_file=` to reuse them); `val_subset` does the same for
# validation. COCO's category ids (1..90, with gaps) are mapped to contiguous labels and back, so
# every result carries the original `category_id`. `adapter="lora"` trains LoRA on the backbone's
# attention projections; the pyramid and the decoder are trained in full.

# %%
result = dinotune.train(task="detect", data=str(DATA), model=MODEL, adapter="lora", image_size=IMAGE_SIZE,
                        epochs=EPOCHS, batch_size=8, subset=16, subset_seed=3, val_subset=12, device=DEVICE,
                        workers=0, progress=False, out=str(OUT / "det"), **SMALL_DECODER)
RUN = result["run_dir"]
print("run folder:", RUN)
print({k: round(v, 4) for k, v in result["metrics"].items() if isinstance(v, float)})

# %%
for name in ("training_curves.png", "per_class_ap.png", "precision_recall.png"):
    if (Path(RUN) / name).is_file():
        show(Path(RUN) / name)

# %% [markdown]
# ## Evaluate and predict
#
# `evaluate` runs the COCO protocol of pycocotools on the validation split (here a subset of 12
# images to keep it quick). `predict` returns boxes per image in original pixels; `draw=` writes the
# images with their boxes and a histogram of the confidences. An untrained detector's scores are
# low, so we lower the drawing threshold to see anything at all.

# %%
run = dinotune.load(RUN, device=DEVICE)
metrics = run.evaluate(str(DATA), split="val", subset=12)
print(json.dumps({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, indent=1))

# %%
images = sorted((DATA / "val2017").glob("*.jpg"))[:2]
predictions = run.predict(images, draw=str(OUT / "det-drawn"), draw_threshold=0.05)
for p in predictions:  # detections are sorted by score; bbox is COCO's [x, y, width, height] in pixels
    best = p["detections"][0] if p["detections"] else None
    print(Path(p["image"]).name, f"({p['width']}x{p['height']}):", len(p["detections"]), "detections; top:", best)
for f in sorted((OUT / "det-drawn").glob("*.jpg"))[:2]:
    show(f)

# %% [markdown]
# ## Compare with YOLO
#
# `dinotune.api.compare` runs every detector on the same images and scores all of them with the
# code training uses: the COCO suite against every object, and single-object metrics (each image's
# top detection against its largest object). It writes `compare.json`, `compare.md` and charts.
#
# The baseline here is a YOLOv8n **built from its YAML, with random weights** (no download). Such a
# model names its classes `0`..`79`, so we pass a class map: YOLO's COCO class `i` is the `i`-th
# COCO category in id order. With a network, pass `yolo=["yolov8n.pt"]` instead: the pretrained
# model carries the COCO class names and needs no map. Without ultralytics
# (`pip install 'dinotune[yolo]'`) only the dinotune run is scored.

# %%
try:
    import ultralytics  # noqa: F401
    categories = json.loads((DATA / "annotations" / "instances_val2017.json").read_text())["categories"]
    class_map = {i: c["name"] for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}
    yolo = ["yolov8n.yaml"]
except ImportError:
    print("ultralytics is not installed: comparing the dinotune run alone")
    class_map, yolo = None, []

table = dinotune.api.compare(data=str(DATA), runs=[RUN], yolo=yolo, out=str(OUT / "det-compare"), subset=8,
                             device=DEVICE, yolo_image_size=160, class_map=class_map)
print(table)

# %%
for f in sorted((OUT / "det-compare").glob("*.png")):
    show(f)

# %% [markdown]
# ## With a GPU and pretrained weights
#
# - `MODEL = "facebook/dinov2-small"`, `IMAGE_SIZE = 518`, `SMALL_DECODER = {}` (or `lightweight=True`
#   for a fast detector), the whole dataset (no `subset`), tens of epochs.
# - `dinotune train detect --data coco/ --overfit 4 --epochs 300` first proves the detector can fit
#   four images: a quick check that data and settings are sound.
# - Compare against trained baselines: `yolo=["yolov8n.pt", "yolov8x.pt"]`, and several runs at once
#   (`runs=[...]`), in one table.
