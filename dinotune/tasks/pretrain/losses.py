"""DINOv2's pretraining objectives and the schedules that drive them, as plain functions of tensors.

DINOv2 (Oquab et al. 2023) trains a student to match an EMA teacher with three terms: the DINO
loss on the class tokens of every crop, the iBOT loss on the masked patch tokens of the global
crops, and the KoLeo regulariser that spreads the class tokens of a batch apart; the teacher's
targets are centred by Sinkhorn-Knopp. ``distillation_loss`` is the simpler feature-matching
objective for distilling a frozen large model into a small one. The functions hold no state
(no centre, no teacher): the training step owns those and passes tensors in, so each term can be
checked here against its formula.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dinotune.errors import ConfigError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """``B x K`` teacher targets: every row (sample) sums to 1, every column (prototype) to ~``B / K``.

    DINOv2's ``sinkhorn_knopp_teacher`` (the SwAV centring): ``Q = exp(logits / T)``, taken as
    ``K x B``, is scaled to sum 1, then ``iterations`` times its prototype rows are scaled to sum
    ``1 / K`` and its sample columns to sum ``1 / B``. Ending on the samples makes each target an
    exact distribution; the prototype balance (no prototype takes the whole batch: no collapse) is
    reached only approximately after DINOv2's 3 iterations.

    Under ``torch.distributed`` the prototype sums (and ``B``) are over every process's samples,
    as in DINOv2, so several GPUs compute the targets one GPU would for the whole batch.

    The whole batch shares one shift before ``exp``, as any per-sample shift would change the
    result after finitely many iterations; so the logits' spread must stay within float32's exp
    range (about ``80 * T``), as the head's cosines (spread ``<= 2``) do.

    Args:
        logits: ``B x K`` teacher head outputs (any float dtype; computed in float32).
        temperature: the teacher temperature ``T`` (see ``teacher_temperature``).
        iterations: rounds of alternate normalisation.
    """
    scores = logits.float() / temperature
    peak = scores.max()
    distributed = _distributed()
    if distributed:
        # One shift for every process: shifts that differ between processes would no longer cancel
        # in the shared sums below.
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    # A single constant cancels in the first normalisation; without it exp overflows for T ~ 0.04.
    q = torch.exp(scores - peak).t()  # K x B
    prototypes = q.shape[0]
    samples = q.shape[1] * (dist.get_world_size() if distributed else 1)
    total = q.sum()
    if distributed:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)  # K x 1, summed over the global batch
        if distributed:
            dist.all_reduce(rows)
        q /= rows * prototypes
        q /= q.sum(dim=0, keepdim=True) * samples  # 1 x B: a sample's column is on this process
    return (q * samples).t()


def _cross_entropy(target: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """``...``: ``-sum_k target_k * log softmax(logits / temperature)_k`` over the last axis."""
    return -(target * F.log_softmax(logits.float() / temperature, dim=-1)).sum(dim=-1)


def dino_loss(student: list[Tensor], teacher: list[Tensor], temperature: float = 0.1) -> Tensor:
    """Scalar DINO loss: the student's crops predict the teacher's distributions of other crops.

    The mean over pairs ``(i, j)``, student crop ``i`` and teacher global crop ``j`` with ``i != j``,
    of the batch-mean cross-entropy ``-sum_k t_j log softmax(s_i / temperature)``. A global crop is
    never compared with itself (the same view on both sides teaches nothing); DINOv2 gets this by
    pairing each student global crop with the other teacher crop and divides the sum by the same
    count of terms, ``n_global * (n_crops - 1)``.

    Args:
        student: ``B x K`` logits of every crop, the ``len(teacher)`` global crops first (in the
            teacher's order), then the local crops.
        teacher: ``B x K`` target distributions of the global crops (rows sum to 1), e.g. from
            ``sinkhorn_knopp``.
        temperature: the student temperature.
    """
    if len(student) < len(teacher) or len(student) < 2 or not teacher:
        raise ValueError(f"dino_loss needs at least 2 student crops that start with the {len(teacher)} global "
                         f"ones; got {len(student)} student crops")
    total = student[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for i, s in enumerate(student):
        log_p = F.log_softmax(s.float() / temperature, dim=-1)  # once per crop, for every target
        for j, t in enumerate(teacher):
            if i == j:
                continue
            total = total - (t * log_p).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


def ibot_loss(student: Tensor, teacher: Tensor, weights: Tensor, images: int, temperature: float = 0.1) -> Tensor:
    """Scalar iBOT loss over the masked patches: ``sum_m weights_m * CE(t_m, s_m) / images``.

    DINOv2's ``iBOTPatchLoss.forward_masked``: with ``weights`` = 1 / (masked patches of the
    patch's image), each masked image adds the mean cross-entropy of its patches, so an image with
    few masked patches counts as much as one with many; dividing by every image of the batch (the
    unmasked ones too) keeps the scale from depending on how many images happened to be masked.

    Args:
        student: ``M x K`` logits of the masked patches only (all images, flattened).
        teacher: ``M x K`` target distributions of the same patches.
        weights: ``M``, each patch's weight.
        images: the number of images in the batch the masks were drawn for (``B``, masked or not).
        temperature: the student temperature.

    Returns a zero tensor that still depends on ``student`` when ``M == 0`` (no image masked), so a
    backward pass through it works.
    """
    if not student.shape[0] == teacher.shape[0] == weights.shape[0]:
        raise ValueError(f"ibot_loss: {student.shape[0]} student patches, {teacher.shape[0]} teacher patches, "
                         f"{weights.shape[0]} weights; expected the same count")
    return (_cross_entropy(teacher, student, temperature) * weights).sum() / images


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Scalar KoLeo regulariser over ``B x D`` features (``B >= 2``): ``-mean_i log(d_i + eps)``.

    The Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2019, "Spreading vectors for
    similarity search"), used by DINOv2 on the student's class tokens of each global crop: ``d_i``
    is the Euclidean distance from the L2-normalised ``x_i`` to its nearest other row, so the loss
    falls as the features spread uniformly over the sphere. Computed in float32, as DINOv2 turns
    autocast off for it.
    """
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows to find nearest neighbours; got {x.shape[0]}")
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        # On the unit sphere the nearest neighbour has the largest dot product; the diagonal is
        # set below any real cosine so a row never picks itself.
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


def distillation_loss(student_cls: Tensor, teacher_cls: Tensor, student_patches: Tensor,
                      teacher_patches: Tensor) -> dict[str, Tensor]:
    """Feature distillation from a frozen teacher: keys ``cls``, ``patch`` and ``loss`` (scalars).

    ``cls``: the mean of ``1 - cos(student, teacher)`` over the ``B x D`` class tokens. ``patch``:
    smooth L1 between the ``B x N x D`` patch tokens, each layer-normalised without affine
    parameters, so the loss matches their pattern rather than the teacher's scale (which differs
    from layer to layer and model to model). ``loss``: ``cls + patch``. The teacher's tensors are
    detached. Exactly zero when the student's tensors equal the teacher's.
    """
    teacher_cls, teacher_patches = teacher_cls.detach(), teacher_patches.detach()
    s, t = F.normalize(student_cls.float(), dim=-1), F.normalize(teacher_cls.float(), dim=-1)
    # For unit vectors 1 - cos(a, b) = |a - b|^2 / 2; the difference form is exactly 0 for equal
    # inputs, where 1 - a.b rounds to a few 1e-8.
    cls = 0.5 * (s - t).pow(2).sum(dim=-1).mean()
    width = student_patches.shape[-1]
    patch = F.smooth_l1_loss(F.layer_norm(student_patches.float(), (width,)),
                             F.layer_norm(teacher_patches.float(), (width,)))
    return {"cls": cls, "patch": patch, "loss": cls + patch}


def _progress(progress: float) -> float:
    """``progress`` clamped to ``[0, 1]``: a last step counted past the end holds the final value."""
    return min(max(progress, 0.0), 1.0)


def cosine_schedule(progress: float, start: float, end: float) -> float:
    """Half a cosine from ``start`` (progress 0) to ``end`` (progress 1), as DINOv2's ``CosineScheduler``."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * _progress(progress)))


def teacher_temperature(progress: float, warmup: float, start: float = 0.04, end: float = 0.07) -> float:
    """The teacher temperature: linear from ``start`` to ``end`` over the first ``warmup`` share of
    training, then ``end`` (DINOv2: 0.04 to 0.07 over 30 of 100 epochs; a sharper teacher early on
    keeps the targets from being uniform while the prototypes are still random)."""
    if not 0.0 <= warmup <= 1.0:
        raise ConfigError(f"teacher temperature warmup {warmup}: expected a share of training in [0, 1]")
    progress = _progress(progress)
    if progress >= warmup:
        return end
    return start + (end - start) * progress / warmup


def teacher_momentum(progress: float, start: float = 0.992, end: float = 1.0) -> float:
    """The EMA momentum of the teacher, cosine from ``start`` to ``end`` (DINOv2's defaults): the
    teacher follows the student quickly at first and freezes by the end."""
    return cosine_schedule(progress, start, end)
