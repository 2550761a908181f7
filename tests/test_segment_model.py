"""Segmentation: confusion-matrix metrics, linear / FPN decoders, whole and sliding inference, the
loss (ignore pixels count for nothing), overfit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from dinotune.adapters import apply_adapter
from dinotune.backbone import DinoBackbone
from dinotune.config import AdapterConfig
from dinotune.config import SegmentModelConfig, build_config
from dinotune.tasks import get_task
from dinotune.tasks.segment.criterion import SegmentationLoss
from dinotune.tasks.segment.decoders import (
    FPNDecoder,
    LinearDecoder,
    build_segmenter,
    default_fpn_layers,
)
from dinotune.tasks.segment.inference import crop_and_resize, predict_logits, window_starts
from dinotune.tasks.segment.metrics import SegmentationMetrics, format_iou_table

IGNORE = 255


@pytest.fixture(scope="module")
def backbone():
    return DinoBackbone.from_spec("random:tiny").eval()  # 4 blocks, 64 channels


# --- metrics -------------------------------------------------------------------------------------

def hand_confusion(pred, target, k):
    cm = torch.zeros(k, k, dtype=torch.int64)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t != IGNORE:
            cm[t, p] += 1
    return cm


def test_metrics_hand_made_case_and_torchmetrics():
    # K = 4: class 2 predicted but never in the ground truth (IoU 0), class 3 neither (undefined)
    target = torch.tensor([[0, 0, 1, 1, IGNORE],
                           [0, 0, 1, 1, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 2, 3],   # the 3 lies on an ignore pixel: not counted
                         [0, 0, 1, 1, 0]])
    m = SegmentationMetrics(4, class_names=["a", "b", "c", "d"])
    m.update(pred, target)
    r = m.compute()
    cm = hand_confusion(pred, target, 4)
    assert r["confusion"] == cm.tolist() and r["pixels"] == 8
    # a: TP 3, FP 0, FN 1 -> 3/4; b: TP 3, FP 1, FN 1 -> 3/5; c: FP 1 -> 0; d: undefined
    assert r["per_class_IoU"] == pytest.approx({"a": 0.75, "b": 0.6, "c": 0.0, "d": None})
    assert r["mIoU"] == pytest.approx((0.75 + 0.6 + 0.0) / 3)
    assert r["pixel_accuracy"] == pytest.approx(6 / 8)
    assert r["mean_class_accuracy"] == pytest.approx((3 / 4 + 3 / 4) / 2)  # only a, b in the GT
    assert r["per_class_accuracy"] == pytest.approx({"a": 0.75, "b": 0.75, "c": None, "d": None})

    tm = MulticlassJaccardIndex(4, ignore_index=IGNORE, average=None)
    ref = tm(pred[None], target[None])
    for i, v in enumerate(r["per_class_IoU"].values()):
        if v is not None:  # torchmetrics says 0 for the undefined class; we say None
            assert v == pytest.approx(float(ref[i]))
    assert float(ref[3]) == 0.0 or math.isnan(float(ref[3]))
    # torchmetrics' macro average leaves out classes with an empty union, as our nanmean does
    macro = MulticlassJaccardIndex(4, ignore_index=IGNORE, average="macro")(pred[None], target[None])
    assert r["mIoU"] == pytest.approx(float(macro))

    table = format_iou_table(r)
    assert "a" in table and "75.00" in table and "mean" in table and "-" in table.splitlines()[5]


def test_metrics_random_against_references_and_accumulation():
    g = torch.Generator().manual_seed(0)
    k = 5
    target = torch.randint(0, k, (6, 17, 23), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE
    target[target == 4] = 3  # class 4 absent from the GT ...
    pred = torch.randint(0, k - 1, target.shape, generator=g)  # ... and never predicted
    pred[:, :5] = torch.where(target[:, :5] == IGNORE, pred[:, :5], target[:, :5])

    whole = SegmentationMetrics(k)
    whole.update(pred, target)
    parts = SegmentationMetrics(k)
    for i in range(0, 6, 2):
        parts.update(pred[i : i + 2], target[i : i + 2])
    single = SegmentationMetrics(k)
    for p, t in zip(pred, target):  # H x W updates
        single.update(p, t)
    r = whole.compute()
    assert parts.compute() == r == single.compute()

    cm = hand_confusion(pred, target, k).double()
    assert r["confusion"] == cm.long().tolist()
    tp, gt, pr = cm.diag(), cm.sum(1), cm.sum(0)
    defined = (gt + pr - tp) > 0
    iou = tp[defined] / (gt + pr - tp)[defined]
    assert r["mIoU"] == pytest.approx(float(iou.mean()))
    assert r["pixel_accuracy"] == pytest.approx(float(tp.sum() / cm.sum()))
    assert r["mean_class_accuracy"] == pytest.approx(float((tp[gt > 0] / gt[gt > 0]).mean()))
    assert r["per_class_IoU"]["4"] is None

    tm = MulticlassJaccardIndex(k, ignore_index=IGNORE, average=None)
    for i in range(0, 6, 2):
        tm.update(pred[i : i + 2], target[i : i + 2])
    ref = tm.compute()
    for i in range(k):
        if defined[i]:
            assert r["per_class_IoU"][str(i)] == pytest.approx(float(ref[i]), abs=1e-6)


def test_metrics_reject_bad_labels():
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="target values"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="target values"):
        m.update(torch.tensor([0, 1]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="predictions"):
        m.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    m.update(torch.tensor([7]), torch.tensor([IGNORE]))  # ignored pixel: anything goes
    with pytest.raises(RuntimeError):
        m.compute()


def per_batch_bitwise_miou(batches, k):
    """The public DINOv2-LoRA project's way: AND / OR per batch, mean IoU per batch, mean of batches."""
    scores = []
    for pred, target in batches:
        valid = target != IGNORE
        ious = []
        for c in range(k):
            inter = ((pred == c) & (target == c) & valid).sum()
            union = (((pred == c) | (target == c)) & valid).sum()
            if union > 0:
                ious.append(float(inter) / float(union))
        scores.append(sum(ious) / len(ious))
    return sum(scores) / len(scores)


def test_whole_set_iou_not_batch_average():
    # batch 1: one small perfectly segmented object; batch 2: a large object half missed
    t1 = torch.zeros(1, 10, 10, dtype=torch.long)
    t1[0, 0, 0] = 1
    p1 = t1.clone()
    t2 = torch.zeros(1, 10, 10, dtype=torch.long)
    t2[0, :, :6] = 1
    p2 = torch.zeros_like(t2)
    p2[0, :, :3] = 1
    batches = [(p1, t1), (p2, t2)]
    m = SegmentationMetrics(2)
    for p, t in batches:
        m.update(p, t)
    ours = m.compute()["mIoU"]
    cm = hand_confusion(torch.cat([p1, p2]), torch.cat([t1, t2]), 2).double()
    tp = cm.diag()
    whole_set = float((tp / (cm.sum(0) + cm.sum(1) - tp)).mean())
    buggy = per_batch_bitwise_miou(batches, 2)
    assert ours == pytest.approx(whole_set)
    assert abs(buggy - whole_set) > 0.05


# --- decoders ------------------------------------------------------------------------------------

def images(b=2, h=56, w=84, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_linear_decoder_shapes_and_layers(backbone):
    x = images()
    seg = build_segmenter(backbone, 3, SegmentModelConfig(decoder="linear", linear_layers=1))
    assert seg.layers == [3] and isinstance(seg.head, LinearDecoder)
    assert seg(x).shape == (2, 3, 4, 6) and seg.output_stride == 14
    seg4 = build_segmenter(backbone, 3, SegmentModelConfig(decoder="linear", linear_layers=4))
    assert seg4.layers == [0, 1, 2, 3] and seg4.head.bn.num_features == 64 * 4
    assert seg4.head.classifier.in_channels == 256
    assert seg4(x).shape == (2, 3, 4, 6)


def test_fpn_decoder_shapes_and_layers(backbone):
    assert default_fpn_layers(12) == [2, 5, 8, 11]
    assert default_fpn_layers(4) == [0, 1, 2, 3]
    assert default_fpn_layers(24) == [5, 11, 17, 23]
    seg = build_segmenter(backbone, 3, SegmentModelConfig(decoder="fpn", fpn_dim=32))
    assert seg.layers == [0, 1, 2, 3] and isinstance(seg.head, FPNDecoder)
    assert seg.head.scales == [4, 2, 1, 0.5] and seg.output_stride == 3.5
    assert seg(images()).shape == (2, 3, 16, 24)
    assert seg(images(1, 70, 98)).shape == (1, 3, 20, 28)  # odd 5 x 7 grid

    seen = []
    seg2 = build_segmenter(backbone, 3, SegmentModelConfig(decoder="fpn", fpn_layers=[3, 1], fpn_dim=32))
    handle = seg2.backbone.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["layers"]), with_kwargs=True
    )
    try:
        out = seg2(images())
    finally:
        handle.remove()
    assert seen == [[1, 3]] and seg2.layers == [1, 3] and seg2.head.num_levels == 2
    assert out.shape == (2, 3, 16, 24)
    with pytest.raises(ValueError):
        build_segmenter(backbone, 3, SegmentModelConfig(decoder="fpn", fpn_layers=[1, -3]))
    with pytest.raises(ValueError):
        build_segmenter(backbone, 3, SegmentModelConfig(decoder="unet"))


@pytest.mark.parametrize("decoder", ["linear", "fpn"])
def test_frozen_backbone_no_graph_and_head_gradients(decoder):
    bb = DinoBackbone.from_spec("random:tiny")
    bb.requires_grad_(False)
    seg = build_segmenter(bb, 3, SegmentModelConfig(decoder=decoder, linear_layers=2, fpn_dim=32)).train()
    feats = []
    handle = bb.register_forward_hook(lambda mod, args, out: feats.append(out))
    try:
        logits = seg(images())
    finally:
        handle.remove()
    assert all(not t.requires_grad and t.grad_fn is None for t in feats[0].layers_patch)
    logits.sum().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.head.parameters())


# --- inference -----------------------------------------------------------------------------------

class PatchModel(nn.Module):
    """Equivariant to 14-pixel shifts: per-patch mean colour -> 1x1 conv, nearest to pixels."""

    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        y = self.conv(F.avg_pool2d(x, 14))
        return y.repeat_interleave(14, dim=2).repeat_interleave(14, dim=3)


class PatchLogits(PatchModel):
    """The same at stride 14 (what a linear decoder returns)."""

    def forward(self, x):
        return self.conv(F.avg_pool2d(x, 14))


class PixelModel(nn.Module):
    """Pointwise: equivariant to any shift."""

    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return self.conv(x)


def test_whole_mode_size_and_crop(backbone):
    seg = build_segmenter(backbone, 3, SegmentModelConfig(decoder="linear")).eval()
    assert predict_logits(seg, images(), (100, 150)).shape == (2, 3, 100, 150)
    x = images()
    model = PatchLogits()
    # grid-aligned crop of the padded region equals running on the unpadded image
    got = predict_logits(model, x, (56, 70), valid_size=(56, 70))
    want = F.interpolate(model(x[..., :56, :70]), size=(56, 70), mode="bilinear", align_corners=False)
    assert torch.allclose(got, want, atol=1e-6)
    # a crop off the logit grid: upsample to pixels, crop, resize
    got = crop_and_resize(model(x), (56, 84), (50, 75), (25, 30))
    full = F.interpolate(model(x), size=(56, 84), mode="bilinear", align_corners=False)[..., :50, :75]
    assert torch.allclose(got, F.interpolate(full, size=(25, 30), mode="bilinear", align_corners=False))


def test_window_starts_cover_everything():
    for size in range(14, 300, 14):
        for window, stride in [(56, 28), (56, 42), (112, 70), (42, 42)]:
            starts = window_starts(size, window, stride)
            covered = torch.zeros(max(size, window), dtype=torch.bool)
            for s in starts:
                covered[s : s + window] = True
            assert covered[:size].all() and starts[-1] + window == max(size, window)


def test_slide_one_window_equals_whole(backbone):
    seg = build_segmenter(backbone, 3, SegmentModelConfig(decoder="fpn", fpn_dim=32)).eval()
    x = images(1, 56, 56)
    for size in [(56, 56), (60, 75)]:
        whole = predict_logits(seg, x, size, mode="whole")
        slide = predict_logits(seg, x, size, mode="slide", window=56, stride=28)
        assert torch.allclose(whole, slide, atol=1e-5)
    # padded batch tensor, one-window valid region: cropped before sliding
    padded = F.pad(x, (0, 28, 0, 14), value=3.0)
    slide = predict_logits(seg, padded, (56, 56), mode="slide", window=56, valid_size=(56, 56))
    assert torch.allclose(predict_logits(seg, x, (56, 56)), slide, atol=1e-5)


def test_slide_covers_image_and_matches_equivariant_model(backbone):
    seg = build_segmenter(backbone, 3, SegmentModelConfig(decoder="linear")).eval()
    x = images(1, 98, 140)
    out = predict_logits(seg, x, (98, 140), mode="slide", window=56, stride=28)
    assert out.shape == (1, 3, 98, 140) and torch.isfinite(out).all()  # 0 / 0 would give NaN

    model = PatchModel()
    for window, stride in [(56, 28), (56, 42), (42, 0)]:
        slide = predict_logits(model, x, (49, 70), mode="slide", window=window, stride=stride, patch_size=14)
        whole = predict_logits(model, x, (49, 70), mode="whole")
        assert torch.allclose(slide, whole, atol=1e-5)
    # any stride, a padded batch of 2, an image smaller than the window: pointwise model
    pix = PixelModel()
    x2 = images(2, 70, 112)
    for window, stride, valid in [(56, 20, (70, 112)), (56, 33, (61, 100)), (84, 14, (42, 70))]:
        slide = predict_logits(pix, x2, (40, 50), mode="slide", window=window, stride=stride,
                               valid_size=valid, window_batch=3, patch_size=14)
        whole = predict_logits(pix, x2, (40, 50), mode="whole", valid_size=valid)
        assert torch.allclose(slide, whole, atol=1e-5)
    with pytest.raises(ValueError):
        predict_logits(pix, x2, (40, 50), mode="slide", window=50, patch_size=14)


# --- loss ----------------------------------------------------------------------------------------

def _logits_and_masks(seed=0, b=2, k=4, h=6, w=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g)  # the loss computes in float32
    masks = torch.randint(0, k, (b, h, w), generator=g)
    masks[0, :, :4] = IGNORE  # a block of ignore pixels ...
    masks[1, 2, 5] = IGNORE  # ... and a lone one
    return logits, masks


@pytest.mark.parametrize("weights", [(), (0.5, 2.0, 1.0, 3.0)])
def test_loss_ignores_255_pixels(weights):
    logits, masks = _logits_and_masks()
    labelled = masks != IGNORE
    loss_fn = SegmentationLoss(IGNORE, weights)
    loss = loss_fn(logits, masks)
    w = torch.tensor(weights) if weights else None
    # the reference: PyTorch's cross-entropy with ignore_index (a weighted mean over labelled pixels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, masks, weight=w, ignore_index=IGNORE))
    # the same by hand, over the labelled pixels only (the ignore pixels are not class 0)
    per_pixel = -logits.log_softmax(1).gather(1, masks.clamp(max=3)[:, None])[:, 0]
    pw = w[masks.clamp(max=3)] if w is not None else torch.ones_like(per_pixel)
    by_hand = (per_pixel * pw)[labelled].sum() / pw[labelled].sum()
    torch.testing.assert_close(loss, by_hand)
    as_class0 = F.cross_entropy(logits, masks.masked_fill(~labelled, 0), weight=w)
    assert not torch.isclose(loss, as_class0)

    # changing the logits under ignore pixels changes nothing, and they get no gradient
    moved = torch.where(labelled[:, None], logits, logits + 10 * torch.randn_like(logits))
    torch.testing.assert_close(loss_fn(moved, masks), loss)
    x = logits.clone().requires_grad_(True)
    loss_fn(x, masks).backward()
    assert torch.all(x.grad.permute(0, 2, 3, 1)[~labelled] == 0), "ignore pixels must get no gradient"
    assert torch.all(x.grad.permute(0, 2, 3, 1)[labelled].abs().sum(-1) > 0)


def test_loss_upsamples_stride_logits_and_ignores_255():
    _, masks = _logits_and_masks(seed=1, h=12, w=18)
    coarse = torch.randn(2, 4, 3, 4, generator=torch.Generator().manual_seed(2))
    up = F.interpolate(coarse, size=(12, 18), mode="bilinear", align_corners=False)
    torch.testing.assert_close(SegmentationLoss(IGNORE)(coarse, masks),
                               F.cross_entropy(up, masks, ignore_index=IGNORE))


def test_loss_of_an_all_ignore_mask_is_zero():
    logits = torch.randn(1, 3, 4, 5)
    masks = torch.full((1, 4, 5), IGNORE)
    x = logits.requires_grad_(True)
    loss = SegmentationLoss(IGNORE)(x, masks)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def test_segment_training_step_ignores_255_pixels():
    """The loss the engine back-propagates for a segmentation batch: ignore pixels count for nothing."""
    cfg = build_config("segment", data="unused", model="random:tiny", image_size=28)
    task = get_task(cfg)
    torch.manual_seed(0)
    bundle = task.build_model({"num_classes": 3, "class_names": ["a", "b", "c"]},
                              DinoBackbone.from_spec("random:tiny"))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 28, 28, generator=g)
    masks = torch.randint(0, 3, (2, 28, 28), generator=g)
    masks[:, :, 14:] = IGNORE  # the right half is padding / boundary
    loss = task.training_step(bundle, bundle.model, {"images": images, "masks": masks})["loss"]
    with torch.no_grad():
        logits = F.interpolate(bundle.model(images).float(), size=(28, 28), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, masks, ignore_index=IGNORE))
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits[..., :14], masks[..., :14]))


# --- overfit -------------------------------------------------------------------------------------

def test_overfit_one_image_linear_lora():
    torch.manual_seed(0)
    bb = DinoBackbone.from_spec("random:tiny")
    apply_adapter(bb, AdapterConfig(kind="lora", rank=4, alpha=8))
    seg = build_segmenter(bb, 2, SegmentModelConfig(decoder="linear"))
    mask = torch.zeros(1, 56, 56, dtype=torch.long)
    mask[:, 14:42, 14:42] = 1  # a 2 x 2-patch square
    mask[:, 0:14, 42:56] = 1
    image = torch.empty(1, 3, 56, 56)
    image[:] = torch.tensor([1.5, -0.5, -1.0])[None, :, None, None]
    image[:, :, mask[0] == 1] = torch.tensor([-1.0, 0.2, 1.5])[:, None]
    image += 0.1 * torch.randn(image.shape)
    params = [{"params": seg.head.parameters(), "lr": 1e-2},
              {"params": [p for p in bb.parameters() if p.requires_grad], "lr": 1e-3}]
    opt = torch.optim.Adam(params)
    # decaying to 0 lets BatchNorm's running statistics settle on the final features (eval mode)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 150)
    seg.train()
    for _ in range(150):
        logits = F.interpolate(seg(image), size=(56, 56), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    seg.eval()
    m = SegmentationMetrics(2)
    m.update(predict_logits(seg, image, (56, 56)).argmax(1), mask)
    assert m.compute()["mIoU"] > 0.9
