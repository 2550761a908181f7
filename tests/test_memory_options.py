"""Memory and speed options: activation checkpointing (same loss and gradients, fewer saved
activations, nothing kept or recomputed in a frozen prefix), ``--batch-size auto`` with a fake
out-of-memory, ``--compile``'s errors, and a run trained with checkpointing end to end."""

from __future__ import annotations

import pytest
import torch
import yaml

from dinotune.backbone.channels import adapt_input
from dinotune.config import ConfigError, build_config, save_yaml
from dinotune.engine import batch_size as auto_batch
from dinotune.engine import speed
from dinotune.engine.batch_size import find_batch_size
from dinotune.engine.speed import saved_activations
from dinotune.tasks import build_backbone, get_task

from .conftest import tiny_options

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"random:tiny": 28, "random:dinov3-tiny": 32}  # two patches a side


def _classifier(model: str = "random:tiny", **options):
    torch.manual_seed(0)
    cfg = build_config("classify", model=model, image_size=SIZES[model], **options)
    backbone, _ = build_backbone(cfg)
    bundle = get_task(cfg).build_model({"class_names": ["a", "b", "c"], "num_classes": 3}, backbone)
    bundle.model.train()
    return bundle


def _step(bundle, size: int):
    """Loss, gradients by name and what the forward kept for backward, on a fixed batch (and a
    fixed random state: DINOv3 jitters its RoPE coordinates in training mode)."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, bundle.model.backbone.patch_embedding().in_channels, size, size, generator=g)
    labels = torch.tensor([0, 2])
    bundle.model.zero_grad(set_to_none=True)
    with saved_activations(bundle.model) as saved:
        loss = bundle.criterion(bundle.model(images=images), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in bundle.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved


def _block_list(bundle) -> list[torch.nn.Module]:
    return bundle.model.backbone.blocks()


@pytest.mark.parametrize("model,adapter", [("random:tiny", "lora"), ("random:tiny", "full"),
                                           ("random:dinov3-tiny", "lora"), ("random:tiny", "dora")])
def test_checkpointing_keeps_loss_and_gradients_and_saves_activations(model, adapter):
    bundle = _classifier(model, adapter=adapter)
    loss, grads, plain = _step(bundle, SIZES[model])
    bundle.model.backbone.enable_grad_checkpointing()
    assert bundle.model.backbone.grad_checkpointing
    loss_ckpt, grads_ckpt, ckpt = _step(bundle, SIZES[model])
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and any("backbone" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert len(ckpt.recomputing) == len(_block_list(bundle))  # every block recomputes
    assert ckpt.bytes < 0.5 * plain.bytes, (ckpt.mb, plain.mb)


def _inner_calls(bundle) -> list[int]:
    """Forward calls of each block's first norm (a checkpointed block's recompute calls its
    ``forward`` directly, past the block's own hooks, but through its submodules')."""
    calls = [0] * len(_block_list(bundle))
    for i, block in enumerate(_block_list(bundle)):
        block.norm1.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("model", ["random:tiny", "random:dinov3-tiny"])
def test_frozen_prefix_keeps_and_recomputes_nothing(model):
    bundle = _classifier(model, adapter="lora", last_n_blocks=1)
    _, _, plain = _step(bundle, SIZES[model])
    bundle.model.backbone.enable_grad_checkpointing()
    calls = _inner_calls(bundle)
    _, grads, ckpt = _step(bundle, SIZES[model])
    blocks = _block_list(bundle)
    assert ckpt.recomputing == [blocks[-1]]  # the prefix kept no inputs for a recompute
    assert calls == [1] * (len(blocks) - 1) + [2]  # ... and ran once; the adapted block twice
    assert ckpt.bytes < plain.bytes
    assert all(".layer.3." in n for n in grads if "lora_" in n)


def test_trainable_widened_embedding_checkpoints_the_prefix_too():
    """A widened N-band patch embedding trains before the frozen prefix: the gradient must pass
    through it, so those blocks are checkpointed (and recomputed) too, with the same gradient."""
    bundle = _classifier(adapter="lora", last_n_blocks=1)
    adapt_input(bundle.model.backbone, 5, [2, 1, 0], trainable=True)
    _, grads, _ = _step(bundle, SIZES["random:tiny"])
    bundle.model.backbone.enable_grad_checkpointing()
    _, grads_ckpt, ckpt = _step(bundle, SIZES["random:tiny"])
    embed = [n for n in grads if "patch_embeddings" in n]
    assert embed and len(ckpt.recomputing) == len(_block_list(bundle))
    for name in embed:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- batch size
def _fake_trial(limit: int, tried: list[int]):
    def trial(n: int) -> None:
        tried.append(n)
        if n > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return trial


def test_find_batch_size_doubles_until_out_of_memory():
    tried: list[int] = []
    assert find_batch_size(_fake_trial(12, tried), limit=1024) == (8, 16)
    assert tried == [1, 2, 4, 8, 16]
    tried.clear()  # capped by the data: never tries past the limit
    assert find_batch_size(_fake_trial(1000, tried), limit=40) == (32, None)
    assert tried == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ConfigError, match="not even a batch of 1"):
        find_batch_size(_fake_trial(0, []), limit=64)

    def broken(n: int) -> None:
        raise ValueError("a bug, not memory")
    with pytest.raises(ValueError, match="a bug"):
        find_batch_size(broken, limit=64)


def test_auto_batch_size_on_the_real_model_prints_and_saves(tiny_folder, tmp_path, monkeypatch, capsys):
    """The real training step on real samples, with a fake out-of-memory above 4 images: the
    number is printed, set on the config and written to the run's config.yaml; the weights get
    no gradient and the random state is as before."""
    cfg = build_config("classify", **tiny_options(tmp_path / "run", data=str(tiny_folder), batch_size="auto"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_yaml(cfg, run_dir / "config.yaml")
    task = get_task(cfg)
    backbone, _ = build_backbone(cfg)
    data = task.build_data(run_dir, backbone.patch_size)
    bundle = task.build_model(data.meta, backbone)
    tried: list[tuple[int, float]] = []
    real_call = auto_batch.TrainingTrial.__call__

    def fake_memory(self, n):
        if n > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        real_call(self, n)
        tried.append((n, float(self.moments[0].numel())))

    monkeypatch.setattr(auto_batch.TrainingTrial, "__call__", fake_memory)
    monkeypatch.setattr("dinotune.utils._QUIET", False)
    cfg.train.batch_size = 1
    probe, _ = task.loaders(data)
    rng = torch.get_rng_state()
    size = auto_batch.resolve_auto_batch_size(cfg, task, bundle, probe.dataset, probe.collate_fn, run_dir,
                                              torch.device("cpu"), "fp32")
    assert size == 4 and cfg.train.batch_size == 4
    assert [n for n, _ in tried] == [1, 2, 4] and all(m > 0 for _, m in tried)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == 4
    assert "--batch-size auto: 4 images per batch" in capsys.readouterr().err
    assert all(p.grad is None for p in bundle.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------------------------- compile
def test_compile_without_a_compiler_is_refused_up_front(tiny_folder, tmp_path, monkeypatch):
    import dinotune

    monkeypatch.setattr(speed, "cpp_compiler", lambda: None)
    with pytest.raises(ConfigError, match=r"--compile: .*C\+\+ compiler.*drop --compile"):
        dinotune.train(task="classify", **tiny_options(tmp_path / "run", data=str(tiny_folder), compile=True))
    assert not (tmp_path / "run").exists()  # refused before a folder was claimed


def test_compile_failure_at_first_forward_is_a_config_error(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    backbone = _classifier(adapter="none").model.backbone
    backbone.compiled = True  # as compile_model leaves it; the failure is simulated below

    def fail(**kwargs):
        raise TorchDynamoException("inductor could not lower an op")
    monkeypatch.setattr(backbone.model, "forward", fail)
    with pytest.raises(ConfigError, match="--compile: torch.compile failed.*without --compile"):
        backbone(torch.zeros(1, 3, 28, 28))

    def out_of_memory(**kwargs):  # an out-of-memory inside compilation stays itself (batch-size search)
        raise TorchDynamoException("compiling failed") from torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(backbone.model, "forward", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        backbone(torch.zeros(1, 3, 28, 28))


# ------------------------------------------------------------------------------- end to end
def test_train_with_grad_checkpointing_end_to_end(tiny_folder, tmp_path, monkeypatch):
    import dinotune
    from dinotune.backbone.model import DinoBackbone

    enabled: list[DinoBackbone] = []
    real = DinoBackbone.enable_grad_checkpointing

    def spy(self):
        real(self)
        enabled.append(self)
    monkeypatch.setattr(DinoBackbone, "enable_grad_checkpointing", spy)
    result = dinotune.train(task="classify", **tiny_options(tmp_path / "run", data=str(tiny_folder), epochs=1,
                                                            grad_checkpointing=True, adapter="lora"))
    assert len(enabled) == 1 and enabled[0].grad_checkpointing
    assert result["last"] and torch.isfinite(torch.tensor(result["last"]["train/loss"]))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["grad_checkpointing"] is True
