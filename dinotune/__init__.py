"""dinotune: fine-tune DINOv2 / DINOv3 vision transformers (LoRA, DoRA, full or frozen) for vision
tasks from one CLI and API.

    import dinotune
    run = dinotune.train(task="classify", data="hymenoptera/", model="facebook/dinov2-small",
                         adapter="lora", epochs=5, out="runs/ants")
    run.predict("photos/", top_k=3)
    run.export("exported/")                  # ONNX + the torch-free runtime's description
    loaded = dinotune.load(run["run_dir"])   # the model itself, merged, for your own code
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["LoadedRun", "Run", "build_config", "evaluate", "export", "load", "predict", "train", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: importing transformers and peft takes seconds; `import dinotune.config` should not.
    if name in ("LoadedRun", "Run", "evaluate", "load", "predict", "train"):
        from dinotune import api

        return getattr(api, name)
    if name == "export":  # the package dinotune.export, callable as dinotune.export(run, out, format=...)
        import importlib

        return importlib.import_module("dinotune.export")
    if name == "build_config":
        from dinotune.config import build_config

        return build_config
    raise AttributeError(f"module 'dinotune' has no attribute {name!r}")
