"""DETR detector model: deformable attention, pyramid, decoder with box refinement, end to end."""

from __future__ import annotations

import math

import pytest
import torch

from dinotune.backbone import DinoBackbone
from dinotune.tasks.detect.decoder import DeformableDecoder, position_encoding
from dinotune.tasks.detect.deformable import MSDeformAttn, level_start_index, multi_scale_deformable_attn
from dinotune.config import DetectModelConfig
from dinotune.models.pyramid import SimpleFeaturePyramid
from dinotune.tasks.detect.detr import DinoDetr, build_detr

SMALL = dict(num_queries=5, decoder_layers=2, hidden_dim=32, num_heads=2, ffn_dim=64, sampling_points=2,
             pyramid_scales=[2.0, 1.0, 0.5], decoder_dropout=0.0)


@pytest.fixture(scope="module")
def backbone():
    return DinoBackbone.from_spec("random:tiny").eval()


def make_detr(backbone, num_classes=3, seed=0, **overrides) -> DinoDetr:
    torch.manual_seed(seed)
    return build_detr(backbone, num_classes, DetectModelConfig(**{**SMALL, **overrides}))


# --- deformable attention core -------------------------------------------------------------------

def naive_msda(value, shapes, locations, weights):
    """Explicit bilinear interpolation, zeros outside, pixel centres at (j + 0.5) / W."""
    b, _, heads, dim = value.shape
    _, q, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, q, heads, dim, dtype=value.dtype)
    for n in range(b):
        for i in range(q):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(points):
                        x = locations[n, i, m, lvl, p, 0].item() * w - 0.5
                        y = locations[n, i, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(dim, dtype=value.dtype)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                wt = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                acc += wt * value[n, starts[lvl] + yy * w + xx, m]
                        out[n, i, m] += weights[n, i, m, lvl, p] * acc
    return out.flatten(2)


def test_msda_matches_naive_bilinear():
    torch.manual_seed(0)
    shapes = [(3, 5), (2, 3)]  # H != W on both levels
    b, q, heads, dim, points = 2, 3, 2, 4, 3
    value = torch.randn(b, sum(h * w for h, w in shapes), heads, dim, dtype=torch.float64)
    # some locations outside [0, 1] to exercise the zero padding
    locations = torch.rand(b, q, heads, len(shapes), points, 2, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(b, q, heads, len(shapes), points, dtype=torch.float64)
    got = multi_scale_deformable_attn(value, torch.tensor(shapes), locations, weights)
    assert got.shape == (b, q, heads * dim)
    torch.testing.assert_close(got, naive_msda(value, shapes, locations, weights), atol=1e-5, rtol=0)
    # float32 path too
    got32 = multi_scale_deformable_attn(value.float(), shapes, locations.float(), weights.float())
    torch.testing.assert_close(got32.double(), got, atol=1e-5, rtol=0)


def test_msda_pixel_centre_reads_that_pixel():
    shapes = [(3, 5), (2, 3)]
    value = torch.arange(sum(h * w for h, w in shapes), dtype=torch.float32).view(1, -1, 1, 1)
    starts = level_start_index(shapes).tolist()
    assert starts == [0, 15]
    for lvl, (h, w) in enumerate(shapes):
        for i in range(h):
            for j in range(w):
                loc = torch.zeros(1, 1, 1, 2, 1, 2)
                loc[..., lvl, 0, :] = torch.tensor([(j + 0.5) / w, (i + 0.5) / h])
                weights = torch.zeros(1, 1, 1, 2, 1)
                weights[..., lvl, 0] = 1.0
                out = multi_scale_deformable_attn(value, shapes, loc, weights)
                assert out.item() == pytest.approx(starts[lvl] + i * w + j, abs=1e-6)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_shapes_and_gradients(ref_dim):
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    query = torch.randn(2, 5, 16)
    ref = torch.rand(2, 5, 2, ref_dim) * 0.6 + 0.2
    value_in = torch.randn(2, sum(h * w for h, w in shapes), 16)
    out = attn(query, ref, value_in, torch.tensor(shapes), level_start_index(shapes))
    assert out.shape == (2, 5, 16)
    out.square().sum().backward()
    for name in ("value_proj", "sampling_offsets", "attention_weights", "output_proj"):
        grad = getattr(attn, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    # padding mask: masked tokens contribute nothing
    mask = torch.ones(2, value_in.shape[1], dtype=torch.bool)
    masked = attn(query, ref, value_in, shapes, padding_mask=mask)
    torch.testing.assert_close(masked, attn.output_proj.bias.expand_as(masked))


def test_msdeformattn_init_directions():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    bias = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    # head 0 points along +x, head 1 along +y; point i at distance i + 1; same on every level
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(bias[1, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0]]), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0


def _passthrough_attn(d_model, n_levels, n_heads, n_points, pixel_offsets):
    """An MSDeformAttn whose value / output projections are the identity, whose sampling offsets
    are the constant ``pixel_offsets`` (``heads x levels x points x 2``, in pixels of each level)
    and whose attention is uniform (zero logits)."""
    attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points).double()
    with torch.no_grad():
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(d_model))
            lin.bias.zero_()
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(pixel_offsets.flatten())
        attn.attention_weights.weight.zero_()
        attn.attention_weights.bias.zero_()
    return attn


def test_msdeformattn_offset_in_pixels_reads_that_pixel_on_a_non_square_map():
    # one 3 x 7 level (H x W); from pixel (row 1, col 2), an offset of (+3, +1) pixels (x, y)
    # must read pixel (row 2, col 5)
    h, w = 3, 7
    attn = _passthrough_attn(1, 1, 1, 1, torch.tensor([3.0, 1.0], dtype=torch.float64))
    value = torch.arange(h * w, dtype=torch.float64).view(1, h * w, 1)
    ref = torch.tensor([(2 + 0.5) / w, (1 + 0.5) / h], dtype=torch.float64).view(1, 1, 1, 2)
    out = attn(torch.zeros(1, 1, 1, dtype=torch.float64), ref, value, torch.tensor([[h, w]]))
    assert out.item() == pytest.approx(2 * w + 5, abs=1e-9), "offsets are not (x / W, y / H)"


def test_msdeformattn_sampling_matches_naive_reference_on_non_square_levels():
    torch.manual_seed(0)
    shapes = [(3, 7), (5, 2)]  # wide and tall levels
    heads, points, dim = 2, 3, 2
    d_model = heads * dim
    # fractional pixel offsets in both directions, different per head / level / point
    offsets = (torch.rand(heads, len(shapes), points, 2, dtype=torch.float64) * 4 - 2)
    attn = _passthrough_attn(d_model, len(shapes), heads, points, offsets)
    b, q = 2, 4
    value = torch.randn(b, sum(h * w for h, w in shapes), d_model, dtype=torch.float64)
    ref = torch.rand(b, q, len(shapes), 2, dtype=torch.float64) * 0.8 + 0.1
    out = attn(torch.randn(b, q, d_model, dtype=torch.float64), ref, value, torch.tensor(shapes),
               level_start_index(shapes))
    # reference: offsets normalised by (W, H) of each level, uniform weights over levels x points
    norm = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float64)
    locations = ref[:, :, None, :, None, :] + offsets[None, None] / norm[None, None, None, :, None, :]
    weights = torch.full((b, q, heads, len(shapes), points), 1.0 / (len(shapes) * points), dtype=torch.float64)
    expected = naive_msda(value.view(b, -1, heads, dim), shapes, locations, weights)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=0)


# --- pyramid, position encoding ------------------------------------------------------------------

@pytest.mark.parametrize("size,expected", [(6, [12, 6, 3]), (5, [10, 5, 3])])
def test_pyramid_sizes(size, expected):
    pyramid = SimpleFeaturePyramid(64, 32, [0.5, 2.0, 1.0], patch_size=14)  # given unsorted: output fine to coarse
    levels = pyramid(torch.randn(2, 64, size, size))
    assert [tuple(f.shape) for f in levels] == [(2, 32, s, s) for s in expected]
    assert pyramid.strides == [7.0, 14.0, 28.0]


def test_pyramid_extreme_scales():
    pyramid = SimpleFeaturePyramid(64, 32, [4, 0.25], patch_size=14)
    assert [f.shape[-2:] for f in pyramid(torch.randn(1, 64, 5, 7))] == [(20, 28), (2, 2)]
    with pytest.raises(ValueError, match="scale 3"):
        SimpleFeaturePyramid(64, 32, [3], patch_size=14)


def test_position_encoding():
    pos = position_encoding(torch.zeros(2, 8, 3, 5))
    assert pos.shape == (2, 8, 3, 5)
    # channel 0: sin of the normalised y, channel 4: sin of the normalised x (pixel centres)
    torch.testing.assert_close(pos[0, 0, :, 0], torch.sin((torch.arange(3) + 0.5) / 3 * 2 * math.pi))
    torch.testing.assert_close(pos[0, 4, 0, :], torch.sin((torch.arange(5) + 0.5) / 5 * 2 * math.pi))
    assert pos.view(2, 8, -1).transpose(1, 2)[0].unique(dim=0).shape[0] == 15  # every pixel distinct


# --- decoder -------------------------------------------------------------------------------------

def test_decoder_layers_are_independent():
    dec = DeformableDecoder(32, 2, 64, 3, 2, 0.0, num_layers=3, num_classes=4)
    names = [n for n, _ in dec.layers[0].named_parameters()]
    params = [dict(layer.named_parameters()) for layer in dec.layers]
    for name in names:
        ptrs = {p[name].data_ptr() for p in params}
        assert len(ptrs) == 3, name
    for heads in (dec.class_embed, dec.bbox_embed):
        ptrs = [p.data_ptr() for h in heads for p in h.parameters()]
        assert len(set(ptrs)) == len(ptrs)
    before = dec.layers[1].linear1.weight.detach().clone()
    with torch.no_grad():
        dec.layers[0].linear1.weight.add_(1.0)
    torch.testing.assert_close(dec.layers[1].linear1.weight, before)
    # parameters are counted once per layer (no sharing folded away by .parameters())
    per_layer = sum(p.numel() for p in dec.layers[0].parameters())
    assert sum(p.numel() for p in dec.layers.parameters()) == 3 * per_layer


def test_box_refinement(backbone):
    model = make_detr(backbone, decoder_layers=3).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for box in model.head.decoder.bbox_embed:
            box.layers[-1].weight.normal_(0, 0.1)
            box.layers[-1].bias.normal_(0, 0.1)
    images = torch.randn(2, 3, 56, 56)
    head = model.head
    patch_map = model.backbone_features(images).patch_map
    memory, shapes = head.memory(head.pyramid(patch_map))
    query_pos, tgt = head.query_embed.weight.split(head.hidden_dim, dim=1)
    query_pos, tgt = query_pos[None].expand(2, -1, -1), tgt[None].expand(2, -1, -1)
    init = head.reference_points(query_pos).sigmoid()
    out = head.decoder(tgt, query_pos, init, memory, shapes)
    # every layer moves its boxes; layer l attends around layer l - 1's (detached) boxes
    for a, b in zip(out.boxes[:-1], out.boxes[1:]):
        assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(out.references[0], init)
    for lvl in range(1, 3):
        torch.testing.assert_close(out.references[lvl], out.boxes[lvl - 1])
        assert not out.references[lvl].requires_grad
    # the head's output is the last layer, aux the earlier ones
    full = head(patch_map)
    torch.testing.assert_close(full["pred_boxes"], out.boxes[-1])
    torch.testing.assert_close(full["aux_outputs"][0]["pred_boxes"], out.boxes[0])
    # the last layer's boxes depend on layer 1's box head (through the reference) ...
    with torch.no_grad():
        head.decoder.bbox_embed[1].layers[-1].bias.add_(0.5)
    assert (head(patch_map)["pred_boxes"] - full["pred_boxes"]).abs().max() > 1e-4
    # ... but no gradient flows back through the detached reference
    model.zero_grad()
    head(patch_map)["pred_boxes"].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.decoder.bbox_embed[1].parameters())
    assert head.decoder.bbox_embed[2].layers[-1].weight.grad.abs().sum() > 0


# --- full model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [56, 84])
def test_detr_output_contract(backbone, size):
    model = make_detr(backbone, num_classes=3)
    assert isinstance(model.backbone, DinoBackbone)
    assert not any(p is q for p in model.head.parameters() for q in model.backbone.parameters())
    out = model(torch.randn(2, 3, size, size))
    assert out["pred_logits"].shape == (2, 5, 3)
    assert out["pred_boxes"].shape == (2, 5, 4)
    assert len(out["aux_outputs"]) == SMALL["decoder_layers"] - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 5, 3) and aux["pred_boxes"].shape == (2, 5, 4)
    boxes = out["pred_boxes"]
    assert ((boxes > 0) & (boxes < 1)).all()
    # class prior: every score starts near 0.01
    assert out["pred_logits"].sigmoid().mean().item() == pytest.approx(0.01, abs=0.01)
    grid = size // 14
    levels = model.head.pyramid(model.backbone_features(torch.randn(1, 3, size, size)).patch_map)
    assert [f.shape[-1] for f in levels] == [2 * grid, grid, math.ceil(grid / 2)]


def test_frozen_backbone_gets_no_graph(backbone):
    model = make_detr(backbone)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    try:
        assert not model.backbone_features(torch.randn(1, 3, 56, 56)).patch_map.requires_grad
        out = model(torch.randn(1, 3, 56, 56))
        out["pred_boxes"].sum().backward()
        assert model.head.pyramid.stages[0][1].weight.grad is not None
    finally:
        for p in model.backbone.parameters():
            p.requires_grad_(True)


def test_overfit_boxes(backbone):
    """Two images, different targets for the first two queries: only a model that reads the
    image through pyramid, cross-attention and refinement can fit both."""
    model = make_detr(backbone, num_classes=2)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    try:
        torch.manual_seed(0)
        images = torch.randn(2, 3, 56, 56)
        targets = torch.tensor([[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]],
                                [[0.6, 0.3, 0.4, 0.2], [0.2, 0.7, 0.1, 0.4]]])
        with torch.no_grad():
            patch_map = model.backbone_features(images).patch_map  # frozen backbone: compute once
        opt = torch.optim.Adam(model.head.parameters(), lr=1e-3)
        losses = []
        for _ in range(100):
            out = model.head(patch_map)
            loss = sum((o["pred_boxes"][:, :2] - targets).abs().mean()
                       for o in [out, *out["aux_outputs"]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
        # the final layer fits each image's own targets
        final = (model(images)["pred_boxes"][:, :2] - targets).abs().mean().item()
        assert final < 0.03
    finally:
        for p in model.backbone.parameters():
            p.requires_grad_(True)


def test_pyramid_levels_of_a_two_patch_image_normalise(backbone):
    """A 2 x 2 patch grid gives a 1 x 1 coarsest level; its GroupNorm needs two values per group,
    so narrow widths get groups of two channels (wide ones keep 32 groups)."""
    from dinotune.models.pyramid import group_norm

    assert group_norm(256).num_groups == 32 and group_norm(16).num_groups == 8 and group_norm(2).num_groups == 1
    model = make_detr(backbone, hidden_dim=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 28, 28))
    assert torch.isfinite(out["pred_boxes"]).all()


@pytest.mark.parametrize("aux_loss", [True, False])
def test_ddp_is_told_about_parameters_without_gradient(backbone, aux_loss):
    """Without auxiliary losses the earlier decoder layers' class heads get no gradient, which DDP
    must be told (find_unused_parameters); with them every trainable parameter gets one, and DDP
    can skip the extra graph walk."""
    from dinotune.config import build_config
    from dinotune.tasks.detect.detectors import build_detector

    cfg = build_config("detect", image_size=56, aux_loss=aux_loss, **{k: v for k, v in SMALL.items()
                                                                      if k != "pyramid_scales"})
    meta = {"num_classes": 2, "class_names": ["a", "b"], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    torch.manual_seed(0)
    bundle = build_detector(cfg).build(backbone, 2, cfg, meta["class_names"], meta["categories"])
    assert bundle.find_unused_parameters is (not aux_loss)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])}]
    bundle.criterion(bundle.model(torch.randn(1, 3, 56, 56)), targets)["loss"].backward()
    no_grad = [n for n, p in bundle.model.head.named_parameters() if p.requires_grad and p.grad is None]
    assert bool(no_grad) is (not aux_loss), no_grad
