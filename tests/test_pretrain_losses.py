"""DINOv2's pretraining pieces against their formulas: Sinkhorn-Knopp targets, the DINO / iBOT / KoLeo /
distillation losses, block masks, the schedules and the DINO head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinotune.tasks.pretrain.heads import DINOHead
from dinotune.tasks.pretrain.losses import (
    cosine_schedule,
    dino_loss,
    distillation_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_momentum,
    teacher_temperature,
)
from dinotune.tasks.pretrain.masking import block_masks


def _logits(b: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed))


# --- Sinkhorn-Knopp -------------------------------------------------------------------------------

def _sinkhorn_reference(logits: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """The normalisations written out one by one, in float64."""
    q = torch.exp(logits.double() / temperature).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for r in range(k):
            q[r] = q[r] / q[r].sum() / k
        for c in range(b):
            q[:, c] = q[:, c] / q[:, c].sum() / b
    return (q * b).t()


def test_sinkhorn_matches_the_written_out_normalisations():
    logits = _logits(6, 4)
    for iterations in (0, 1, 3):
        torch.testing.assert_close(sinkhorn_knopp(logits, 0.5, iterations),
                                   _sinkhorn_reference(logits, 0.5, iterations).float(), rtol=1e-5, atol=1e-6)


def test_sinkhorn_rows_are_distributions_and_prototypes_balance():
    b, k = 12, 5
    logits = _logits(b, k)
    q = sinkhorn_knopp(logits, 0.5)  # the default 3 iterations end on the samples: rows exact
    assert q.shape == (b, k) and q.dtype == torch.float32 and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(b), rtol=0, atol=1e-5)
    q = sinkhorn_knopp(logits, 0.5, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(b), rtol=0, atol=1e-5)
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k), rtol=0, atol=1e-4)


def test_sinkhorn_shift_invariance():
    logits = _logits(8, 6)
    base = sinkhorn_knopp(logits, 0.3)
    # A constant for the whole batch, or one per prototype, is removed by the first normalisation.
    torch.testing.assert_close(sinkhorn_knopp(logits + 7.0, 0.3), base)
    torch.testing.assert_close(sinkhorn_knopp(logits + torch.linspace(-2, 2, 6), 0.3), base)
    # One per sample (per row of logits) only cancels at convergence: the first step normalises
    # prototypes over samples, so after 3 iterations it still leaves a trace.
    per_sample = torch.linspace(-2, 2, 8)[:, None]
    torch.testing.assert_close(sinkhorn_knopp(logits + per_sample, 0.3, 200), sinkhorn_knopp(logits, 0.3, 200),
                               rtol=0, atol=1e-4)


def test_sinkhorn_is_stable_at_a_sharp_temperature_and_in_half_precision():
    # The head's logits are cosines; far from 0 they would overflow exp at T = 0.04 without the shift.
    cosines = 2 * torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) - 1
    q = sinkhorn_knopp(cosines + 30, 0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q, sinkhorn_knopp(cosines, 0.04), rtol=1e-4, atol=1e-5)
    half = sinkhorn_knopp(cosines.half(), 0.04)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half.sum(1), torch.ones(4), rtol=0, atol=1e-5)


# --- DINO loss ------------------------------------------------------------------------------------

def _ce(t: list[float], s: list[float], temperature: float) -> float:
    z = math.log(sum(math.exp(v / temperature) for v in s))
    return -sum(tk * (sk / temperature - z) for tk, sk in zip(t, s))


def test_dino_loss_equals_the_pairs_written_out():
    student = [_logits(2, 3, seed) for seed in (1, 2, 3)]  # 2 global crops, 1 local
    teacher = [F.softmax(_logits(2, 3, seed), dim=-1) for seed in (4, 5)]
    pairs = [(i, j) for i in range(3) for j in range(2) if i != j]
    assert pairs == [(0, 1), (1, 0), (2, 0), (2, 1)]
    expected = sum(sum(_ce(teacher[j][b].tolist(), student[i][b].tolist(), 0.1) for b in range(2)) / 2
                   for i, j in pairs) / len(pairs)
    assert dino_loss(student, teacher, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_never_compares_a_global_crop_with_itself():
    student = [_logits(4, 6, seed).requires_grad_() for seed in (1, 2, 3)]
    teacher = [F.softmax(_logits(4, 6, seed), dim=-1) for seed in (4, 5)]
    grads = []
    for t0 in (teacher[0], F.softmax(5 * _logits(4, 6, 9), dim=-1)):
        grads.append(torch.autograd.grad(dino_loss(student, [t0, teacher[1]]), student[0])[0])
    # Student crop 0 meets teacher crop 0 only in the excluded pair: its gradient ignores that target.
    torch.testing.assert_close(grads[0], grads[1])


# --- iBOT loss ------------------------------------------------------------------------------------

def test_ibot_loss_equals_a_hand_computation():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    weights = torch.tensor([1.0, 0.5, 0.5])  # image 0 has 1 masked patch, image 1 has 2
    expected = sum(w * _ce(t, s, 1.0) for w, t, s in zip(weights.tolist(), teacher.tolist(), student.tolist())) / 3
    assert ibot_loss(student, teacher, weights, images=3, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_ibot_loss_counts_every_masked_image_once():
    one, other = _logits(1, 5, 1), _logits(1, 5, 2)
    target = F.softmax(_logits(1, 5, 3), dim=-1)
    # An image with 1 masked patch and one with 4 (the same patch 4 times) weigh the same.
    student = torch.cat([one, other.expand(4, -1)])
    weights = torch.tensor([1.0] + [0.25] * 4)
    loss = ibot_loss(student, target.expand(5, -1), weights, images=2)
    single = [ibot_loss(s, target, torch.ones(1), images=1) for s in (one, other)]
    torch.testing.assert_close(loss, (single[0] + single[1]) / 2)


def test_ibot_loss_without_masked_patches_is_zero_and_differentiable():
    student = torch.zeros(0, 7, requires_grad=True)
    loss = ibot_loss(student, torch.zeros(0, 7), torch.zeros(0), images=4)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.shape == (0, 7)


# --- KoLeo and distillation -----------------------------------------------------------------------

def test_koleo_on_points_of_a_circle():
    # Angles 0, 60 and 180 degrees (radius 3: the loss normalises): nearest chords 1, 1 and sqrt(3).
    angles = [0.0, math.pi / 3, math.pi]
    x = torch.tensor([[3 * math.cos(a), 3 * math.sin(a)] for a in angles])
    expected = -(math.log(1 + 1e-8) * 2 + math.log(math.sqrt(3) + 1e-8)) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, abs=1e-6)
    x.requires_grad_()
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all()


def test_distillation_is_zero_for_equal_features_and_positive_otherwise():
    cls, patches = _logits(3, 8), torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    same = distillation_loss(cls, cls.clone(), patches, patches.clone())
    assert set(same) == {"cls", "patch", "loss"} and all(v.item() == 0.0 for v in same.values())
    # Scale and shift are not the pattern: layer norm and the cosine ignore them.
    assert distillation_loss(2 * cls, cls, 3 * patches + 1, patches)["loss"].item() == pytest.approx(0, abs=1e-5)
    student_cls = cls.clone().requires_grad_()
    other = distillation_loss(student_cls, -cls, patches.flip(1), patches)
    assert other["cls"].item() == pytest.approx(2.0) and other["patch"].item() > 0
    assert other["loss"].item() == pytest.approx(other["cls"].item() + other["patch"].item())
    other["loss"].backward()
    assert student_cls.grad is not None
    orthogonal = distillation_loss(torch.eye(2), torch.eye(2).flip(1), patches, patches)
    assert orthogonal["cls"].item() == pytest.approx(1.0)


# --- block masks ----------------------------------------------------------------------------------

def test_block_masks_counts_share_and_determinism():
    batch, grid, ratio = 40, (8, 12), (0.1, 0.5)
    masks = block_masks(batch, grid, ratio, 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (batch, 96) and masks.dtype == torch.bool
    counts = masks.sum(1)
    masked = counts > 0
    assert masked.sum().item() == 20  # round(0.5 * 40) masked, the rest whole
    assert (counts[masked] >= int(0.1 * 96)).all() and (counts[masked] <= int(0.5 * 96)).all()
    # The stratified ratios cover the range: the fewest and the most masked patches lie near its ends.
    assert counts[masked].min().item() <= 0.2 * 96 and counts.max().item() >= 0.4 * 96
    again = block_masks(batch, grid, ratio, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    assert not torch.equal(masks, block_masks(batch, grid, ratio, 0.5, torch.Generator().manual_seed(1)))


def test_block_masks_counts_are_exact():
    # A narrow ratio range fixes the count; a 3 x 3 grid forces the top-up with single patches.
    for grid, ratio, count in (((10, 10), (0.37, 0.37), 37), ((3, 3), (0.9, 0.9), 8)):
        masks = block_masks(16, grid, ratio, 1.0, torch.Generator().manual_seed(3))
        assert (masks.sum(1) == count).all()


def test_block_masks_are_blocks():
    # Rectangles, not scattered patches: most masked patches have a masked neighbour.
    masks = block_masks(8, (16, 16), (0.3, 0.3), 1.0, torch.Generator().manual_seed(0)).view(8, 16, 16)
    padded = F.pad(masks.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    assert ((neighbours > 0) & masks).sum() >= 0.9 * masks.sum()


def test_block_masks_edge_probabilities():
    assert not block_masks(5, (4, 4), probability=0.0).any()
    assert (block_masks(5, (4, 4), ratio=(0.25, 0.5), probability=1.0).sum(1) >= 4).all()


# --- schedules ------------------------------------------------------------------------------------

def _monotone(values: list[float], increasing: bool) -> bool:
    steps = [b - a for a, b in zip(values, values[1:])]
    return all(s >= 0 for s in steps) if increasing else all(s <= 0 for s in steps)


def test_schedules_endpoints_and_monotonicity():
    grid = [i / 20 for i in range(21)]
    assert cosine_schedule(0, 1.0, 0.1) == pytest.approx(1.0) and cosine_schedule(1, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine_schedule(0.5, 1.0, 0.0) == pytest.approx(0.5)
    assert _monotone([cosine_schedule(p, 1.0, 0.1) for p in grid], increasing=False)
    assert teacher_momentum(0) == pytest.approx(0.992) and teacher_momentum(1) == pytest.approx(1.0)
    assert _monotone([teacher_momentum(p) for p in grid], increasing=True)
    temps = [teacher_temperature(p, warmup=0.3) for p in grid]
    assert temps[0] == pytest.approx(0.04) and teacher_temperature(0.3, 0.3) == pytest.approx(0.07)
    assert teacher_temperature(0.15, 0.3) == pytest.approx(0.055) and temps[-1] == pytest.approx(0.07)
    assert _monotone(temps, increasing=True)
    assert teacher_temperature(0.0, warmup=0.0) == pytest.approx(0.07)


# --- DINO head ------------------------------------------------------------------------------------

def test_dino_head_shapes_and_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(32, prototypes=64, hidden_dim=48, bottleneck_dim=16)
    assert head(torch.randn(4, 32)).shape == (4, 64)
    out = head(torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 64) and out.abs().max() <= 1 + 1e-5  # cosines
    torch.testing.assert_close(head.last_layer.normalized_weight().norm(dim=1), torch.ones(64))
    # No magnitude to train: the only last-layer parameter is the direction, and its scale is moot.
    assert [n for n, _ in head.named_parameters() if n.startswith("last_layer")] == ["last_layer.weight"]
    head.requires_grad_(True)
    x = torch.randn(3, 32)
    before = head(x)
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)
    torch.testing.assert_close(head(x), before)
    assert DINOHead(8, prototypes=10, layers=1)(torch.randn(2, 8)).shape == (2, 10)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all((m.bias == 0).all() for m in linears)
