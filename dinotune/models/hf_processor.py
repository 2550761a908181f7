"""The transformers image processor of a run: ``BitImageProcessor`` (DINOv2's on the hub) set to
reproduce the run's evaluation transform, for ``dinotune export --format hf`` of any task whose
folder is read by transformers (a classifier, a pretrained backbone)."""

from __future__ import annotations

from typing import Any

from dinotune.errors import ExportError


def image_processor(loaded: Any, eval_transform: Any) -> Any:
    """``BitImageProcessor`` reproducing the run's evaluation transform, read off its steps (resize
    of the short side, center crop, scaling to [0, 1] for pictures, per-band normalisation)."""
    from torchvision.transforms import v2
    from transformers import BitImageProcessor
    from transformers.image_utils import pil_torch_interpolation_mapping

    from dinotune.data.bands import InputSpec

    spec = InputSpec.from_meta(loaded.meta)
    resample = {mode: pil for pil, mode in pil_torch_interpolation_mapping.items()}
    settings: dict[str, Any] = {"do_resize": False, "do_center_crop": False, "do_rescale": False,
                                "do_normalize": False}
    for step in eval_transform.transforms:
        if isinstance(step, v2.ToImage):
            continue
        # torchvision keeps the interpolation as the enum or as its string value, by version
        mode = v2.InterpolationMode(step.interpolation) if isinstance(step, v2.Resize) else None
        if (isinstance(step, v2.Resize) and len(step.size) == 1 and step.max_size is None and step.antialias
                and mode in resample):
            settings.update(do_resize=True, size={"shortest_edge": int(step.size[0])}, resample=int(resample[mode]))
        elif isinstance(step, v2.CenterCrop):
            h, w = step.size
            settings.update(do_center_crop=True, crop_size={"height": int(h), "width": int(w)})
        elif isinstance(step, v2.ToDtype) and step.scale:
            settings["do_rescale"] = not spec.arrays  # uint8 pictures / 255; float band arrays unchanged
        elif isinstance(step, v2.Normalize):
            settings.update(do_normalize=True, image_mean=[float(m) for m in step.mean],
                            image_std=[float(s) for s in step.std])
        else:
            raise ExportError(f"--format hf: the evaluation transform's step {step} has no transformers "
                              "image-processor equivalent")
    if spec.arrays:  # float32 bands, channels first; no RGB conversion (a 4-band array is not RGBA)
        settings.update(do_convert_rgb=False, input_data_format="channels_first")
    return BitImageProcessor(**settings)
