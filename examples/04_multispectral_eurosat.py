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
# # Multispectral classification: 13-band Sentinel-2 tiles
#
# Satellite tiles carry more than red, green and blue. This tutorial trains on 200 real EuroSAT-MS
# tiles (64 x 64 pixels, 13 Sentinel-2 bands, uint16 GeoTIFF, 10 land-cover classes) as class
# folders without a split:
#
# ```
# eurosat_ms/AnnualCrop/*.tif   eurosat_ms/Forest/*.tif   ...   eurosat_ms/SeaLake/*.tif
# ```
#
# dinotune reads every band (with `tifffile`; `.npy` arrays work the same way), widens the
# backbone's patch embedding from 3 to 13 input channels (the red, green and blue bands keep the
# pretrained RGB kernels, the others start from their mean, scaled down) and normalises each band
# with its own mean and standard deviation over the training tiles. The run remembers all of it, so
# evaluation, prediction and pictures read tiles the same way.
#
# It uses `random:tiny` (random weights), 56-pixel inputs and a few epochs, to run in about a minute
# on two CPU cores. With a network use `MODEL = "facebook/dinov2-small"` (or a DINOv3 satellite
# model, `facebook/dinov3-vitl16-pretrain-sat493m`, after accepting its licence on the hub).

# %%
import json
import os
from pathlib import Path

import dinotune
import dinotune.api
from dinotune.viz.show import show  # inline in a notebook, the path in a script

MODEL = "random:tiny"  # facebook/dinov2-small with a network
IMAGE_SIZE = 56        # tiles are 64 px; a multiple of 14 (224 with real weights)
EPOCHS = 3
DEVICE = "auto"
RGB_BANDS = "3,2,1"    # Sentinel-2 red, green, blue are bands B04, B03, B02: 0-based indices 3, 2, 1

if not os.environ.get("DINOTUNE_SHARED"):
    raise RuntimeError("set DINOTUNE_SHARED to the folder that holds data/eurosat_ms (e.g. "
                       "`export DINOTUNE_SHARED=../shared`), or set DATA below to your own tiles")
DATA = Path(os.environ["DINOTUNE_SHARED"]) / "data" / "eurosat_ms"
OUT = Path(os.environ.get("DINOTUNE_EXAMPLES_OUT", "runs/examples"))
print("data:", DATA, "| runs under:", OUT)



# %% [markdown]
# ## Train
#
# `val_fraction=0.2` holds out a stratified, seeded 20 % for validation, since the folders have no
# split. `rgb_bands` names the bands that get the pretrained R, G, B kernels and that pictures are
# drawn through. With `adapter="full"` the whole backbone trains (a random backbone has nothing to
# keep); with pretrained weights `adapter="lora"` keeps them and trains the adapter plus the widened
# patch embedding, which is new and always trains unless the backbone is frozen (`adapter="none"`).

# %%
result = dinotune.train(task="classify", data=str(DATA), val_fraction=0.2, rgb_bands=RGB_BANDS, model=MODEL,
                        adapter="full", image_size=IMAGE_SIZE, epochs=EPOCHS, batch_size=16, lr=1e-3,
                        backbone_lr=3e-4, device=DEVICE, workers=0, progress=False, out=str(OUT / "eurosat"))
RUN = result["run_dir"]
print("run folder:", RUN)
print({k: round(v, 4) for k, v in result["metrics"].items() if isinstance(v, float)})

# %% [markdown]
# The run's input description: band count, which bands are drawn as RGB, and the per-band
# statistics measured on the training tiles (in the files' units, raw reflectance x 10000 here).

# %%
run = dinotune.load(RUN, device=DEVICE)
spec = run.meta["input"]
print("bands:", spec["in_channels"], "| RGB bands:", spec["rgb_bands"])
print(json.dumps({k: [round(x, 1) for x in v] for k, v in spec.items() if k in ("mean", "std")}))

for name in ("training_curves.png", "confusion_matrix.png"):
    if (Path(RUN) / name).is_file():
        show(Path(RUN) / name)

# %% [markdown]
# ## Evaluate, predict, look
#
# `evaluate` scores any folder of tiles with the run's band statistics. Note that a folder without a
# `train/` / `val/` split is evaluated whole: below that is all 200 tiles, 160 of which the model
# trained on, so the number is optimistic. The honest figure is the validation metrics above (the
# 40 held-out tiles); for your own data keep a separate test folder and evaluate that.
#
# `predict` takes `.tif` / `.npy` files with the same 13 bands; a file with another band count is
# refused, naming it. `analyze` draws sample tiles through bands 3, 2, 1, each stretched from its
# 2nd to its 98th percentile, since raw reflectance is far from 8-bit RGB. (The data folder also
# holds a `SOURCE.md`, which is reported and skipped: files outside the class folders are not used.)

# %%
metrics = run.evaluate(str(DATA))
print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, "on", metrics["images"], "tiles (train + val)")

tiles = [next((DATA / c).glob("*.tif")) for c in ("Forest", "River", "SeaLake")]
for p in run.predict(tiles, top_k=3):
    print(Path(p["image"]).parent.name, "->", [(q["class"], round(q["score"], 3)) for q in p["predictions"]])

files = dinotune.api.analyze(RUN, samples=8, device=DEVICE)  # charts of the best epoch, samples from DATA
for f in files:
    if Path(f).name == "samples.png":
        show(f)

# %% [markdown]
# ## PCA of the patch features
#
# The same PCA picture as for photos: the run's backbone (with its 13-band patch embedding) on a
# few tiles, each shown through its RGB bands beside the first three components.

# %%
show(dinotune.api.pca(RUN, [str(t) for t in tiles], OUT / "eurosat-pca.png", device=DEVICE))

# %% [markdown]
# ## With a GPU and pretrained weights
#
# - `MODEL = "facebook/dinov2-small"`, `adapter="lora"`, `IMAGE_SIZE = 224`, 10+ epochs, the full
#   EuroSAT-MS (27,000 tiles).
# - How much do the 10 extra bands help? `benchmarks/bench_multispectral.py` trains the same tiles
#   with all 13 bands and with bands 3, 2, 1 only (docs/tasks/multispectral.md).
# - A common satellite recipe (ViT-L/14, last-4-layers head, LoRA rank 4):
#   `dinotune train classify --config configs/satellite-lora-vitl.yaml --data tiles/`.
