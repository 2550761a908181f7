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
# # Classification on class folders: train, evaluate, predict
#
# This tutorial fine-tunes a DINOv2 backbone with LoRA on the ants / bees images of the PyTorch
# transfer-learning tutorial (`hymenoptera`), laid out as class folders:
#
# ```
# hymenoptera/train/ants/*.jpg   hymenoptera/train/bees/*.jpg
# hymenoptera/val/ants/*.jpg     hymenoptera/val/bees/*.jpg
# ```
#
# It runs in about a minute on two CPU cores because it uses `random:tiny`: a 4-block, width-64
# DINOv2 with **random weights**, small images and two epochs. Expect accuracy near chance: the
# point here is the workflow. With a network (and ideally a GPU), change the `MODEL` line to
# `facebook/dinov2-small` and raise `IMAGE_SIZE` to 224 and `EPOCHS` to 10: pretrained DINOv2 with
# LoRA separates ants from bees in a few epochs.
#
# Open it as a notebook with `jupytext --to notebook examples/01_classify_folders.py`, or run it as
# a script with `python examples/01_classify_folders.py`.

# %%
import json
import os
from pathlib import Path

import dinotune
import dinotune.api
from dinotune.viz.show import show  # inline in a notebook, the path in a script

MODEL = "random:tiny"  # facebook/dinov2-small with a network
IMAGE_SIZE = 56        # a multiple of the patch size (14); 224 for real weights
EPOCHS = 2             # 10 for real weights
DEVICE = "auto"        # picks CUDA when there is a GPU, else the CPU

if not os.environ.get("DINOTUNE_SHARED"):
    raise RuntimeError("set DINOTUNE_SHARED to the folder that holds data/hymenoptera (e.g. "
                       "`export DINOTUNE_SHARED=../shared`), or set DATA below to your own class folders")
DATA = Path(os.environ["DINOTUNE_SHARED"]) / "data" / "hymenoptera"
OUT = Path(os.environ.get("DINOTUNE_EXAMPLES_OUT", "runs/examples"))
print("data:", DATA, "| runs under:", OUT)



# %% [markdown]
# ## Train
#
# `dinotune.train` takes keyword options named like the CLI flags (`dinotune train classify --help`
# lists them). `adapter="lora"` trains low-rank updates of the attention projections plus the
# linear head; the backbone's own weights stay frozen. Every image is checked before training:
# `hymenoptera` holds a GIF placeholder (`imageNotFound.gif`) that is read like any other picture.
#
# The run folder holds the config, checkpoints (`best`, `last`), `metrics.jsonl`, TensorBoard logs
# and plots. A folder that already holds a run is never overwritten: the next free `NAME-2`,
# `NAME-3`, ... is used, and `result["run_dir"]` says which.

# %%
result = dinotune.train(task="classify", data=str(DATA), model=MODEL, adapter="lora", rank=8,
                        image_size=IMAGE_SIZE, epochs=EPOCHS, batch_size=16, lr=1e-3,
                        device=DEVICE, workers=0, progress=False, out=str(OUT / "ants"))
RUN = result["run_dir"]
print("run folder:", RUN)
print("trainable / total parameters:", result["parameters"])
print({k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))})

# %% [markdown]
# The training curves (loss and validation metrics per epoch) and the confusion matrix of the best
# epoch are written next to the checkpoints:

# %%
for name in ("training_curves.png", "confusion_matrix.png"):
    if (Path(RUN) / name).is_file():
        show(Path(RUN) / name)

# %% [markdown]
# ## Evaluate
#
# `dinotune.load` rebuilds the model from the run folder: base weights + the saved LoRA adapter +
# the head, with LoRA merged into the weights for inference. `evaluate` scores any data in a
# layout classification reads (class folders, a CSV, a Hugging Face dataset); here the `val` split.
# With two classes top-5 is meaningless, so it is not reported; `images` says how many images the
# numbers rest on.

# %%
run = dinotune.load(RUN, device=DEVICE)
metrics = run.evaluate(str(DATA), split="val")
print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=1))

# %% [markdown]
# ## Predict
#
# `predict` takes a file, a folder (searched recursively) or a list of files and returns the top-k
# classes per image with their probabilities.

# %%
images = sorted((DATA / "val" / "bees").glob("*.jpg"))[:3] + sorted((DATA / "val" / "ants").glob("*.jpg"))[:3]
for p in run.predict(images, top_k=2):
    print(Path(p["image"]).parent.name, Path(p["image"]).name, "->", p["predictions"])

# %% [markdown]
# ## Look at the run
#
# `dinotune.api.analyze` writes the charts of a run into `RUN/analysis`: training curves, the
# confusion matrix and per-class figures from evaluating `data`, and a grid of sample predictions
# titled `pred <class> (score)` over `true <class>`.

# %%
files = dinotune.api.analyze(RUN, data=str(DATA), samples=8, device=DEVICE)
for f in files:
    if Path(f).suffix == ".png":
        show(f)

# %% [markdown]
# ## A small sweep (optional)
#
# Which learning rate suits the head? With a frozen backbone (`adapter="none"`) the features are
# extracted once and cached, and `linear_grid` trains one head per setting on the same pass, so a
# grid of learning rates costs little more than one run. For adapters, ranks and backbone learning
# rates use `grid=` instead: each trial is then a full run folder, trained in its own process.
# Calling `sweep` again with the same `out` continues the sweep instead of starting over.

# %%
sweep = dinotune.api.sweep("classify", data=str(DATA), model=MODEL, adapter="none", image_size=IMAGE_SIZE,
                           epochs=EPOCHS, batch_size=16, device=DEVICE, workers=0, progress=False,
                           linear_grid={"lr": [1e-3, 1e-2]}, out=str(OUT / "ants-sweep"))
print(sweep["table"])
print("best head's run folder:", sweep["best_run"])

# %% [markdown]
# ## With a GPU and pretrained weights
#
# - `MODEL = "facebook/dinov2-small"` (or `-base`, `-large`; DINOv3 ids work too once their licence
#   is accepted on the hub), `IMAGE_SIZE = 224`, `EPOCHS = 10`, and a larger `batch_size`
#   (`batch_size="auto"` finds the largest that fits on CUDA).
# - The same run from a shell: `dinotune train classify --data hymenoptera/ --model
#   facebook/dinov2-small --adapter lora --epochs 10 --out runs/ants`, then `dinotune eval`,
#   `dinotune predict` and `dinotune analyze` on `runs/ants`.
