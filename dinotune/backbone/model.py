"""``DinoBackbone``: a DINOv2 or DINOv3 model that returns features for heads, never logits.

Features follow the official ``get_intermediate_layers(x, n, reshape, return_class_token,
norm=True)`` of both families: intermediate layers pass through the final LayerNorm (DINOv2's
``layernorm``, DINOv3's ``norm``), register tokens are split off, and patch tokens can be read as a
``B x C x H/p x W/p`` map (``p`` = ``patch_size``, read from the model's config: 14 for DINOv2, 16
for DINOv3). Any input whose sides are multiples of ``p`` works, square or not: DINOv2's position
embeddings are interpolated by transformers, DINOv3's RoPE is computed for the grid at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from dinotune.backbone.families import BackboneFamily, family_for, hf_model_of
from dinotune.backbone.loading import load_backbone_model
from dinotune.errors import ConfigError


@dataclass
class Features:
    """Backbone output for a batch of ``B`` images of ``H x W`` pixels.

    Attributes:
        cls: ``B x C`` class token of the last layer (after the final norm).
        patch_tokens: ``B x N x C`` patch tokens of the last layer, ``N = h * w``.
        grid: ``(h, w) = (H / p, W / p)`` for patch size ``p``.
        layers_cls: class tokens of the requested layers, each ``B x C``, shallow to deep.
        layers_patch: patch tokens of the requested layers, each ``B x N x C``.
    """

    cls: Tensor
    patch_tokens: Tensor
    grid: tuple[int, int]
    layers_cls: list[Tensor]
    layers_patch: list[Tensor]

    @property
    def patch_mean(self) -> Tensor:
        """``B x C`` mean of the last layer's patch tokens."""
        return self.patch_tokens.mean(dim=1)

    @property
    def patch_map(self) -> Tensor:
        """``B x C x h x w`` last-layer patch tokens as a feature map."""
        return to_map(self.patch_tokens, self.grid)

    def layer_maps(self) -> list[Tensor]:
        """The requested layers' patch tokens as ``B x C x h x w`` maps."""
        return [to_map(t, self.grid) for t in self.layers_patch]


def to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``B x N x C`` tokens -> ``B x C x h x w``."""
    b, n, c = tokens.shape
    h, w = grid
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def patch_embedding(model: nn.Module) -> nn.Conv2d:
    """The patch-embedding convolution of a transformers DINOv2 / DINOv3 model, PEFT-wrapped or not
    (where it lives is its family's to say)."""
    return family_for(model).patch_embedding(model)[2]


def final_norm(model: nn.Module) -> nn.Module:
    """The LayerNorm after the last block (DINOv2's ``layernorm``, DINOv3's ``norm``: its family's)."""
    return family_for(model).final_norm(model)


def _patch_side(patch_size: int | Sequence[int]) -> int:
    if isinstance(patch_size, int):
        return patch_size
    sides = set(patch_size)
    if len(sides) != 1:
        raise ConfigError(f"non-square patches {tuple(patch_size)} are not supported")
    return sides.pop()


def compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile (Dynamo and Inductor failures, a missing
    or failing C++ compiler): the errors ``--compile`` turns into a ConfigError."""
    from torch._dynamo.exc import TorchDynamoException  # Inductor's errors derive from it
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    return TorchDynamoException, CppCompileError, InvalidCxxCompiler


def _out_of_memory(exc: BaseException) -> BaseException | None:
    """The out-of-memory error a compilation failure wraps, if any: it stays itself, so that
    ``--batch-size auto`` still sees a batch that does not fit."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.OutOfMemoryError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class DinoBackbone(nn.Module):
    """Wraps a transformers DINOv2 or DINOv3 model (possibly inside a PEFT wrapper) as
    ``self.model``; ``family`` says where its pieces live. A model of no known family is refused
    (BackboneLoadError)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = self.config
        self._family = family_for(cfg.model_type)
        self.embed_dim: int = cfg.hidden_size
        self.patch_size: int = _patch_side(cfg.patch_size)
        self.num_layers: int = cfg.num_hidden_layers
        self.num_register_tokens: int = getattr(cfg, "num_register_tokens", 0) or 0
        self.compiled = False  # set by compile_model

    @classmethod
    def from_spec(cls, spec: str, init_seed: int = 0) -> "DinoBackbone":
        return cls(load_backbone_model(spec, init_seed=init_seed))

    @property
    def config(self):
        return self.model.config

    @property
    def family(self) -> BackboneFamily:
        """The backbone's family (``DINOV2`` or ``DINOV3``; equal to its name, ``"dinov2"``)."""
        return self._family

    def hf_model(self) -> nn.Module:
        """The underlying transformers model, unwrapped from PEFT if adapted."""
        return hf_model_of(self.model)

    def patch_embedding(self) -> nn.Conv2d:
        """The patch-embedding convolution (``C x in_channels x p x p``), either family."""
        return self.family.patch_embedding(self.model)[2]

    def enable_grad_checkpointing(self) -> None:
        """Recompute each block's activations during backward instead of keeping them: transformers'
        own switch (``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``),
        non-reentrant, set on the transformers model (under PEFT, the base model).

        Non-reentrant checkpointing keeps a block's inputs only when something inside it needs a
        gradient, so a frozen prefix (``--last-n-blocks``) keeps and recomputes nothing, and
        needs no ``enable_input_require_grads`` (the reentrant variant's crutch). It acts in
        training mode only; evaluation runs the blocks as they are."""
        model = self.hf_model()
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"--grad-checkpointing: {type(model).__name__} does not support activation "
                              "checkpointing; drop the flag")
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name in later 5.x releases
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether the blocks recompute their activations in backward (training mode only)."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.hf_model().modules())

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, shallow to deep (``Dinov2Layer``, ``DINOv3ViTLayer``: the modules
        transformers checkpoints), PEFT-wrapped or not."""
        return self.family.blocks(self.model)

    def compile_model(self, **options) -> None:
        """``torch.compile`` each transformer block in place (``nn.Module.compile``; PyTorch's
        "regional compilation"): blocks of one shape share their compiled code, so compiling takes
        about as long for 40 blocks as for 4, and parameter names, so checkpoints, stay as they
        are. The embeddings, the final norm and the head stay eager. Compilation happens at the
        first forward; a failure there is raised as a ConfigError naming ``--compile``.
        ``options`` go to ``torch.compile``."""
        for block in self.blocks():
            block.compile(**options)
        self.compiled = True

    def check_image_size(self, size: int, key: str = "image size") -> None:
        """Raise ConfigError unless ``size`` is a positive multiple of the patch size (naming
        ``key`` and the two nearest valid sizes)."""
        p = self.patch_size
        if size <= 0 or size % p:
            lower = max(p, size // p * p)
            raise ConfigError(f"{key}={size} is not a multiple of the patch size {p}; try {lower} or {lower + p}")

    def no_weight_decay(self) -> set[str]:
        """Names (within this module) of the learned tokens and position embeddings; AdamW's
        weight decay would pull them towards zero. 1-d parameters (norms, biases, LayerScale,
        DoRA magnitudes) are exempt anyway."""
        return {n for n, _ in self.named_parameters() if self.family.is_no_decay(n)}

    def resolve_layers(self, layers: int | Sequence[int]) -> list[int]:
        """``int n`` -> the last n block indices; a sequence -> those (0-based, negatives allowed)."""
        if isinstance(layers, int):
            if not 1 <= layers <= self.num_layers:
                raise ValueError(f"asked for the last {layers} layers of a {self.num_layers}-layer model")
            return list(range(self.num_layers - layers, self.num_layers))
        if any(not -self.num_layers <= i < self.num_layers for i in layers):
            raise ValueError(f"layer indices {list(layers)} outside 0..{self.num_layers - 1}")
        return [i % self.num_layers for i in layers]

    def forward(self, pixel_values: Tensor, layers: int | Sequence[int] = 1, masks: Tensor | None = None) -> Features:
        """Args:
            pixel_values: ``B x 3 x H x W`` normalised images, ``H`` and ``W`` multiples of the
                patch size.
            layers: the last ``n`` blocks, or explicit 0-based block indices, to return.
            masks: ``B x N`` bool, patches replaced by the model's mask token before the blocks
                (iBOT's masked image modelling), or None.
        """
        h, w = pixel_values.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}"
            )
        idx = self.resolve_layers(layers)
        # intermediate hidden states cost memory; ask for them only when a head needs them
        need_hidden = idx != [self.num_layers - 1]
        out = self._run(pixel_values, need_hidden, masks)
        # Both families: hidden_states[0] is the embedding output, hidden_states[i + 1] block i's
        # (pre-norm); last_hidden_state is the last block's after the final norm.
        norm = self.family.final_norm(self.model)
        first = 1 + self.num_register_tokens
        layer_tokens = [
            out.last_hidden_state if i == self.num_layers - 1 else norm(out.hidden_states[i + 1])
            for i in idx
        ]
        last = out.last_hidden_state
        return Features(
            cls=last[:, 0],
            patch_tokens=last[:, first:],
            grid=(h // self.patch_size, w // self.patch_size),
            layers_cls=[t[:, 0] for t in layer_tokens],
            layers_patch=[t[:, first:] for t in layer_tokens],
        )

    def _run(self, pixel_values: Tensor, need_hidden: bool, masks: Tensor | None = None):
        extra = {} if masks is None else {"bool_masked_pos": masks}
        if not self.compiled:
            return self.model(pixel_values=pixel_values, output_hidden_states=need_hidden, **extra)
        try:
            return self.model(pixel_values=pixel_values, output_hidden_states=need_hidden, **extra)
        except compile_errors() as exc:
            oom = _out_of_memory(exc)
            if oom is not None:
                raise oom from None
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ConfigError(f"--compile: torch.compile failed on this backbone ({type(exc).__name__}: "
                              f"{first_line}); train without --compile") from exc

    @torch.no_grad()
    def fingerprint(self) -> str:
        """A short hash of the base weights, to notice when a run is loaded onto other weights."""
        import hashlib

        hasher = hashlib.sha1()
        for name, p in sorted(self.hf_model().state_dict().items()):
            if "lora_" in name:
                continue
            name = name.replace(".base_layer", "")
            flat = p.detach().float().flatten()
            sample = flat[:: max(1, flat.numel() // 64)][:64]
            hasher.update(name.encode())
            hasher.update(sample.cpu().numpy().tobytes())
        return hasher.hexdigest()[:16]
