"""N-band input: the patch embedding widened from the pretrained RGB kernels.

The patch embedding is the one layer that sees bands: a ``p x p`` convolution with stride ``p``
from ``C`` input bands to the embedding width. For ``N`` bands it is rebuilt as timm's
``adapt_input_conv`` and RF-DETR's multispectral change do, from the pretrained kernels:

- the bands named as red, green and blue (``rgb_bands``) keep the pretrained R, G, B kernels
  exactly (a band named twice gets the sum of its kernels: one band for all three is a gray
  image, as timm's one-channel case);
- every other band starts from the mean of the three RGB kernels times ``3 / N`` (timm's
  per-channel factor), so the new bands together weigh less than the three RGB bands
  (``(N - 3) * 3 / N < 3`` kernels' worth): where every band carries the same normalised value,
  the tokens grow by a factor ``1 + (N - 3) / N`` (below 2 for any N), not ``N / 3``.

With the extra bands' kernels zeroed, the widened model gives the pretrained model's output on
the RGB bands exactly (tested), so training starts from the pretrained function. The new layer is
marked, trains with every adapter that trains the backbone (LoRA and DoRA included, see
``dinotune.adapters``) and is saved with the checkpoint.

Where the convolution lives is the backbone family's to say (``backbone/families``): transformers'
DINOv2 keeps it at ``embeddings.patch_embeddings.projection`` (and the band count it checks inputs
against at ``embeddings.patch_embeddings.num_channels``), DINOv3 at ``embeddings.patch_embeddings``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dinotune.backbone.families import family_for, hf_model_of
from dinotune.data.input_spec import InputSpec
from dinotune.errors import BackboneLoadError, ConfigError

# Set on a widened convolution: ``(in_channels, rgb_bands)``, so the layer can be found and saved.
_MARK = "dinotune_input_bands"

INPUT_EMBEDDING_WEIGHTS = "input_embedding.safetensors"


def patch_embedding(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """``(parent, attribute, conv)``: where the patch-embedding convolution of ``model`` (a
    ``DinoBackbone``, a PEFT model or a transformers DINOv2 / DINOv3 model) lives, as its family
    says. TypeError when there is none (a model of no known family included)."""
    try:
        family = family_for(model)
    except (BackboneLoadError, TypeError) as exc:
        raise TypeError(f"{type(model).__name__}: no patch-embedding convolution known ({exc})") from None
    return family.patch_embedding(model)


def widened_kernels(weight: torch.Tensor, in_channels: int, rgb_bands: Sequence[int]) -> torch.Tensor:
    """``D x N x p x p`` kernels from pretrained ``D x 3 x p x p`` ones (see the module docstring)."""
    if weight.shape[1] != 3:
        raise ValueError(f"the patch embedding takes {weight.shape[1]} bands; it can be widened from 3 (RGB) only")
    if len(rgb_bands) != 3 or any(not 0 <= b < in_channels for b in rgb_bands):
        raise ValueError(f"rgb_bands {list(rgb_bands)}: three band indices below {in_channels}")
    w = weight.detach().float()
    out = w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) * (3.0 / in_channels)
    named = sorted(set(rgb_bands))
    out[:, named] = 0
    for rgb, band in enumerate(rgb_bands):
        out[:, band] += w[:, rgb]
    return out.to(weight.dtype)


def widen_patch_embedding(model: nn.Module, in_channels: int, rgb_bands: Sequence[int]) -> nn.Conv2d:
    """Replace the RGB patch embedding of ``model`` by one taking ``in_channels`` bands, whose
    ``rgb_bands`` (red, green, blue) keep the pretrained kernels; update ``config.num_channels``.
    Returns the new convolution (bias and everything else as before; trainable)."""
    parent, name, old = patch_embedding(model)
    new = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                    padding=old.padding, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(widened_kernels(old.weight, in_channels, rgb_bands))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    setattr(new, _MARK, (int(in_channels), [int(b) for b in rgb_bands]))
    setattr(parent, name, new)
    hf_model_of(model).config.num_channels = int(in_channels)
    if hasattr(parent, "num_channels"):  # DINOv2's Dinov2PatchEmbeddings checks every input against it
        parent.num_channels = int(in_channels)
    return new


def adapt_input(backbone: nn.Module, in_channels: int, rgb_bands: Sequence[int], trainable: bool) -> nn.Conv2d | None:
    """Widen ``backbone``'s patch embedding for ``in_channels`` bands unless the input is plain RGB
    (3 bands, red-green-blue in order), where the pretrained layer stays untouched. ``trainable``:
    whether the new layer trains (the adapter trains the backbone). Returns the new layer or None."""
    if in_channels == 3 and list(rgb_bands) == [0, 1, 2]:
        return None
    takes = patch_embedding(backbone)[2].in_channels
    if takes != 3:  # a backbone already pretrained on band arrays (a dinotune pretrain run): kept as it is
        if takes != in_channels:
            raise ConfigError(f"the backbone's patch embedding takes {takes} bands and the data has {in_channels}")
        conv = patch_embedding(backbone)[2]
        setattr(conv, _MARK, (int(in_channels), [int(b) for b in rgb_bands]))
        conv.requires_grad_(trainable)
        return conv
    conv = widen_patch_embedding(backbone, in_channels, rgb_bands)
    conv.requires_grad_(trainable)
    return conv


def adapted_embedding(model: nn.Module) -> nn.Conv2d | None:
    """The widened patch embedding of ``model``, or None when it takes its pretrained RGB input."""
    try:
        conv = patch_embedding(model)[2]
    except TypeError:
        return None
    return conv if hasattr(conv, _MARK) else None


def input_embedding_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"weight", "bias"}`` of the widened patch embedding (empty when not widened), to save."""
    conv = adapted_embedding(model)
    if conv is None:
        return {}
    return {k: v.detach().contiguous().cpu() for k, v in conv.state_dict().items()}


def load_input_embedding_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load what ``input_embedding_state`` saved into an already widened ``model``; a model that was
    not widened, or to another band count, is refused naming ``where`` and both shapes."""
    conv = adapted_embedding(model)
    if conv is None:
        raise ValueError(f"{where}: holds a widened patch embedding ({tuple(state['weight'].shape)}) but the "
                         "model takes plain RGB input")
    if state["weight"].shape != conv.weight.shape:
        raise ValueError(f"{where}: patch embedding of shape {tuple(state['weight'].shape)}, but the model's is "
                         f"{tuple(conv.weight.shape)}")
    conv.load_state_dict(state, strict=True)


def adapt_input_to_meta(backbone: nn.Module, meta: dict, trainable: bool) -> nn.Conv2d | None:
    """``adapt_input`` for the bands a run's data (or checkpoint) recorded in ``meta["input"]``
    (``in_channels``, ``rgb_bands``); runs without that key read RGB pictures and stay as they are."""
    spec = InputSpec.from_meta(meta)
    return adapt_input(backbone, spec.in_channels, spec.rgb_bands, trainable)
