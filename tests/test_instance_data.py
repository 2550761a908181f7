"""Instance segmentation data: COCO polygon / RLE masks and YOLO-seg polygons read, checked and
carried with the image and boxes through augmentation, resize and pad (``dinotune.tasks.instance``)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.transforms import v2

from dinotune.data.transforms import denormalize
from dinotune.errors import DataError
from dinotune.tasks.detect.data import choose_subset, restrict
from dinotune.tasks.detect.transforms import resize_pad
from dinotune.tasks.instance import data as instance_data
from dinotune.tasks.instance.data import (
    InstanceDataset,
    canvas_masks,
    decode_segmentation,
    describe_instances,
    instance_collate,
    instance_train_transforms,
)
from dinotune.tasks.instance.sources import (
    InstanceSource,
    _compressed_counts,
    find_instance_data,
    read_coco_instances,
)
from tests.conftest import shared_data

MIN = 1.0
COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 230)]  # object k is drawn in COLOURS[k]


# ------------------------------------------------------------------------------------------ helpers
def _coco_from(d: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = json.loads(json.dumps(d))
        c.createIndex()
    return c


def _write_coco(root: Path, images: list[tuple[int, int]], annotations: list[dict], draw: bool = False) -> Path:
    """A COCO JSON at ``root/instances.json`` with images ``root/<id>.png`` (grey, or with each
    polygon annotation filled in its colour when ``draw``)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(images, start=1):
        im = Image.new("RGB", (w, h), (128, 128, 128))
        if draw:
            pen = ImageDraw.Draw(im)
            for k, a in enumerate(x for x in annotations if x["image_id"] == i):
                colour = COLOURS[k % len(COLOURS)]
                if isinstance(a["segmentation"], dict):  # an RLE: paint its pixels
                    mask = mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()})
                    im.paste(colour, mask=Image.fromarray(mask * 255))
                    continue
                for poly in a["segmentation"]:
                    pen.polygon(list(zip(poly[0::2], poly[1::2])), fill=colour)
        im.save(root / f"{i}.png")
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h}
                       for i, (w, h) in enumerate(images, start=1)],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _canvas_boxes(target: dict, size: int) -> torch.Tensor:
    """``N x 4`` xyxy canvas pixels of a target's normalised cxcywh boxes."""
    cx, cy, w, h = (target["boxes"] * size).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _check_aligned(image: torch.Tensor, target: dict, size: int, tol: float = 1.5) -> None:
    """Rows agree: each mask's tight box is its box (within ``tol`` canvas pixels), and the image
    under the mask has the colour of the object its label names (label k drawn in COLOURS[k])."""
    masks, labels = target["masks"], target["labels"]
    assert masks.shape == (len(labels), size, size) and masks.dtype == torch.uint8
    assert set(masks.unique().tolist()) <= {0, 1}
    pixels = denormalize(image) * 255
    for mask, box, label in zip(masks, _canvas_boxes(target, size), labels):
        assert mask.any()
        assert np.allclose(_tight_box(mask), box.tolist(), atol=tol), (_tight_box(mask), box.tolist())
        mean = pixels[:, mask.bool()].mean(1)
        assert torch.allclose(mean, torch.tensor(COLOURS[label], dtype=torch.float32), atol=25), (mean, label)


# ------------------------------------------------------------------------------------ decoding masks
def _mixed_annotations(w: int, h: int) -> list[dict]:
    full = np.zeros((h, w), dtype=np.uint8, order="F")
    full[5:15, 20:32] = 1
    rle = mask_utils.encode(full)
    crowd = np.zeros((h, w), dtype=np.uint8, order="F")
    crowd[20:28, 2:12] = 1
    crowd_rle = mask_utils.encode(crowd)
    runs = [int(v) for v in _compressed_counts(crowd_rle["counts"].decode())]  # uncompressed counts
    return [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2.0, 3.0, 14.0, 12.0], "iscrowd": 0,
         "segmentation": [[2.5, 3.0, 15.5, 4.0, 9.0, 14.5], _rect(3, 10, 8, 15)]},  # two parts
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20.0, 5.0, 12.0, 10.0], "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}},  # compressed string counts
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [2.0, 20.0, 10.0, 8.0], "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": runs}},  # uncompressed list counts
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 40.0, 30.0], "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": runs}},  # crowd region
    ]


def test_compressed_counts_match_pycocotools():
    rng = np.random.default_rng(0)
    for h, w, p in [(7, 5, 0.5), (40, 31, 0.1), (64, 64, 0.9), (3, 3, 0.0), (300, 200, 0.02)]:
        m = np.asfortranarray((rng.random((h, w)) < p).astype(np.uint8))
        flat = m.flatten(order="F")
        change = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate(([0], change, [flat.size])))
        if flat[0]:
            runs = np.concatenate(([0], runs))
        got = _compressed_counts(mask_utils.encode(m)["counts"].decode())
        assert got.tolist() == runs.tolist()
    assert _compressed_counts("0d0").tolist() == [0, 20] and _compressed_counts("0d") is None  # cut off
    assert _compressed_counts("\x01\x02") is None
    assert _compressed_counts("0P") is None and _compressed_counts("0@") is None  # cut off; a negative run


def test_polygon_and_rle_masks_are_pycocotools_masks(tmp_path):
    w, h = 40, 30
    anns = _mixed_annotations(w, h)
    path = _write_coco(tmp_path, [(w, h)], anns)
    source = read_coco_instances(path, None, None, MIN)
    assert isinstance(source, InstanceSource) and source.mask_report.skipped == 0
    reference = _coco_from({"images": [{"id": 1, "width": w, "height": h, "file_name": "1.png"}],
                            "annotations": anns, "categories": [{"id": 1}, {"id": 2}, {"id": 3}]})
    for a in anns:
        mask = decode_segmentation(source.segmentations[a["id"]], h, w)
        assert mask.shape == (h, w) and mask.any()
        assert np.array_equal(mask, reference.annToMask(reference.anns[a["id"]]))
    # the dataset at S = the longer side: no resize, so the canvas holds the exact masks, padded
    ds = InstanceDataset(source, None, image_size=w)
    image, target = ds[0]
    assert image.shape == (3, w, w) and target["labels"].tolist() == [0, 1, 2]  # the crowd region is not a target
    for row, a in zip(target["masks"], anns[:3]):
        assert torch.equal(row[:h], torch.from_numpy(reference.annToMask(reference.anns[a["id"]])))
        assert not row[h:].any()
    batch = instance_collate([ds[0], ds[0]])
    assert batch["images"].shape == (2, 3, w, w) and batch["targets"][1]["masks"].shape == (3, w, w)


def test_crowd_regions_in_ground_truth_with_masks(tmp_path):
    w, h = 40, 30
    source = read_coco_instances(_write_coco(tmp_path, [(w, h)], _mixed_annotations(w, h)), None, None, MIN)
    assert [a.id for a in source.targets(1)] == [1, 2, 3]
    gt = source.coco_gt()
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(gt["annotations"]) == 4 and [a["id"] for a in crowd] == [4]
    assert all("segmentation" in a for a in gt["annotations"])
    # mask AP of the ground truth scored against itself is 1: the crowd region is ignored, not missed
    coco = _coco_from(gt)
    results = [{"image_id": 1, "category_id": a["category_id"], "score": 1.0,
                "segmentation": {k: v.decode() if isinstance(v, bytes) else v
                                 for k, v in coco.annToRLE(a).items()}}
               for a in gt["annotations"] if not a["iscrowd"]]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- validation
def test_bad_masks_skipped_and_reported(tmp_path, capsys):
    w, h = 40, 30
    good = [[5.0, 5.0, 20.0, 5.0, 20.0, 20.0]]
    short_rle = mask_utils.encode(np.zeros((h, w // 2), dtype=np.uint8, order="F"))["counts"].decode()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15], "segmentation": good},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15], "segmentation": [[1, 2, 3, 4]]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15], "segmentation": [[1, 2, 3, 4, 5, 6, 7]]},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15],
         "segmentation": [[1, 2, float("nan"), 4, 5, 6]]},
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15],
         "segmentation": {"size": [w, h], "counts": [w * h]}},  # size swapped
        {"id": 6, "image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15],
         "segmentation": {"size": [h, w], "counts": [10, 5]}},  # does not cover the image
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15],
         "segmentation": {"size": [h, w], "counts": short_rle}},  # compressed, half the image
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [5, 5, 15, 15]},  # no segmentation
        {"id": 9, "image_id": 1, "category_id": 2, "bbox": [5, 5, 15, 15],  # one good part of two: kept
         "segmentation": [[1, 2, 3, 4], good[0]]},
        {"id": 10, "image_id": 1, "category_id": 3, "segmentation": [_rect(2.5, 3, 12, 9.5)]},  # box from polygon
    ]
    path = _write_coco(tmp_path, [(w, h)], anns)
    source = read_coco_instances(path, None, None, MIN)
    err = capsys.readouterr().err
    assert [a.id for a in source.targets(1)] == [1, 9, 10]
    assert source.mask_report.skipped == 7 and source.mask_report.parts_dropped == 1
    assert source.mask_report.boxes_from_masks == 1
    assert source.segmentations[9] == good
    assert source.targets(1)[2].bbox == pytest.approx((2.5, 3, 12, 9.5))
    assert {a["id"] for a in source.coco_gt()["annotations"]} == {1, 9, 10}  # nothing unusable is evaluated
    # the warning names the file, the first entries and their problems, and counts the rest
    assert str(path) in err and "7 annotation(s) left out" in err and "and 2 more" in err
    for expect in ["annotations[1] (id 2): polygon 0 has 4 numbers", "annotations[2] (id 3): polygon 0 has an odd",
                   "annotations[3] (id 4): polygon 0 holds values that are not finite",
                   "annotations[4] (id 5): RLE size [40, 30] is not its image's [height, width] [30, 40]",
                   "annotations[5] (id 6): RLE counts cover 15 pixels"]:
        assert expect in err, expect
    rest = read_coco_instances(_write_coco(tmp_path / "rest", [(w, h)], [anns[0], anns[6], anns[7]]), None, None, MIN)
    assert rest.mask_report.examples == [
        "annotations[1] (id 7): RLE counts cover 600 pixels, not height x width = 1200",
        "annotations[2] (id 8): no segmentation"]
    with pytest.raises(DataError, match="none of its 1 annotations has a usable mask"):
        read_coco_instances(_write_coco(tmp_path / "det", [(w, h)], [anns[7]]), None, None, MIN)


def test_missing_and_duplicate_ids_get_fresh_ones(tmp_path):
    seg = [_rect(2, 2, 10, 10)]
    anns = [{"id": 5, "image_id": 1, "category_id": 1, "segmentation": seg},
            {"id": 5, "image_id": 1, "category_id": 2, "segmentation": [_rect(12, 2, 20, 10)]},
            {"image_id": 1, "category_id": 3, "segmentation": [_rect(22, 2, 30, 10)]}]
    source = read_coco_instances(_write_coco(tmp_path, [(40, 30)], anns), None, None, MIN)
    ids = [a.id for a in source.targets(1)]
    assert ids[0] == 5 and len(set(ids)) == 3 and source.mask_report.renumbered == 2
    assert [source.segmentations[i][0][0] for i in ids] == [2, 12, 22]


# ------------------------------------------------------------------------- masks move with the image
def test_flip_resize_pad_move_masks_with_boxes_and_pixels(tmp_path):
    w, h, size = 64, 48, 32  # downscaled by 2, padded at the bottom
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[4, 6, 30, 8, 12, 40]]},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [_rect(40, 10, 60, 30)]}]
    source = read_coco_instances(_write_coco(tmp_path, [(w, h)], anns, draw=True), None, None, MIN)
    plain = InstanceDataset(source, None, size)
    flipped = InstanceDataset(source, v2.RandomHorizontalFlip(p=1.0), size)
    (im0, t0), (im1, t1) = plain[0], flipped[0]
    _check_aligned(im0, t0, size)
    _check_aligned(im1, t1, size)
    nw = 32  # the image's width on the canvas; nothing below its 24 rows
    assert not t0["masks"][:, 24:].any() and not t1["masks"][:, 24:].any()
    for a, b in zip(t0["masks"], t1["masks"]):
        x0, y0, x1, y1 = _tight_box(a)
        assert np.allclose(_tight_box(b), [nw - x1, y0, nw - x0, y1], atol=1)  # mirrored
        iou = (a.bool() & b.flip(-1).bool()).sum() / (a.bool() | b.flip(-1).bool()).sum()
        assert iou > 0.8


def test_augmentation_keeps_masks_boxes_labels_aligned(tmp_path):
    w, h, size = 96, 72, 48
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(5, 5, 30, 25)]},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [[50, 10, 90, 12, 70, 40]]},
            {"id": 3, "image_id": 1, "category_id": 3, "segmentation": [_rect(10, 45, 40, 68)]}]
    source = read_coco_instances(_write_coco(tmp_path, [(w, h)], anns, draw=True), None, None, MIN)
    ds = InstanceDataset(source, instance_train_transforms(size), size)
    torch.manual_seed(0)
    counts = set()
    for _ in range(25):
        image, target = ds[0]
        counts.add(len(target["labels"]))
        _check_aligned(image, target, size, tol=2.0)
    assert len(counts) > 1  # some crops dropped objects (with their masks)


class _DropFirst:
    """Collapses the first box to a point, as ``RandomCropKeepBoxes`` zeroes a box it cuts away,
    then sanitizes: its mask row must go with it."""

    def __call__(self, image, target):
        target["boxes"][0] = 0
        return v2.SanitizeBoundingBoxes(min_size=1.0)(image, target)


def test_sanitize_drops_masks_of_dropped_boxes(tmp_path):
    w, h = 64, 48
    anns = [{"id": i + 1, "image_id": 1, "category_id": i + 1, "segmentation": [_rect(4 + 20 * i, 6, 18 + 20 * i, 30)]}
            for i in range(3)]
    source = read_coco_instances(_write_coco(tmp_path, [(w, h)], anns, draw=True), None, None, MIN)
    image, target = InstanceDataset(source, _DropFirst(), w)[0]
    assert target["labels"].tolist() == [1, 2]
    _check_aligned(image, target, w, tol=0.5)
    # a box that only the resize to the canvas makes degenerate leaves with its mask too
    thin = {"id": 9, "image_id": 1, "category_id": 1, "bbox": [40, 35, 0.0015, 8],
            "segmentation": [[40, 35, 40.0015, 35, 40.0015, 43, 40, 43]]}
    path = _write_coco(tmp_path / "thin", [(w, h)], [thin, *anns[1:]], draw=True)
    image, target = InstanceDataset(read_coco_instances(path, None, None, 1e-4), None, w // 2)[0]
    assert target["labels"].tolist() == [1, 2]
    _check_aligned(image, target, w // 2, tol=1.0)
    # torchvision itself: N x H x W masks lose the rows of the boxes it drops
    boxes = tv_tensors.BoundingBoxes([[0, 0, 5, 5], [3, 3, 3, 9], [1, 1, 8, 8]], format="XYXY", canvas_size=(10, 10))
    masks = tv_tensors.Mask(torch.arange(3).view(3, 1, 1).expand(3, 10, 10).clone())
    out = v2.SanitizeBoundingBoxes()({"boxes": boxes, "masks": masks, "labels": torch.tensor([0, 1, 2])})
    assert out["labels"].tolist() == [0, 2] and out["masks"][:, 0, 0].tolist() == [0, 2]


def test_canvas_masks_cover_the_image_part_of_the_canvas():
    for h, w, size in [(48, 64, 32), (37, 101, 56), (101, 37, 56), (20, 20, 64), (333, 500, 224)]:
        image = tv_tensors.Image(torch.full((3, h, w), 255, dtype=torch.uint8))
        canvas, _, _ = resize_pad(image, torch.zeros(0, 4), size)
        masks = canvas_masks(torch.ones((2, h, w), dtype=torch.uint8), size)
        assert torch.equal(masks[0].bool(), canvas[0] > 0) and torch.equal(masks[0], masks[1])


def _rle_rect(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> dict:
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    return {"size": [h, w], "counts": mask_utils.encode(m)["counts"].decode()}


def test_rescaled_file_gets_rescaled_masks(tmp_path):
    """A file at half its annotation's size: masks (like boxes) drawn on the file's grid."""
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(8, 8, 40, 32)]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [44, 8, 12, 32],
             "segmentation": _rle_rect(48, 64, 44, 8, 56, 40)}]
    path = _write_coco(tmp_path, [(64, 48)], anns, draw=True)
    Image.open(tmp_path / "1.png").resize((32, 24), Image.NEAREST).save(tmp_path / "1.png")
    source = read_coco_instances(path, None, None, MIN)
    image, target = InstanceDataset(source, None, 32)[0]
    assert [_tight_box(m) for m in target["masks"]] == [[4, 4, 20, 16], [22, 4, 28, 20]]
    _check_aligned(image, target, 32, tol=0.5)


def test_many_masks_on_a_big_image_work_at_a_smaller_size(tmp_path, monkeypatch):
    """Over ``MASK_BYTES``, image, boxes and masks are brought down together before augmentation."""
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_rect(8, 8, 60, 40)]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [70, 50, 40, 30],
             "segmentation": _rle_rect(96, 128, 70, 50, 110, 80)}]
    source = read_coco_instances(_write_coco(tmp_path, [(128, 96)], anns, draw=True), None, None, MIN)
    seen = []
    monkeypatch.setattr(instance_data, "MASK_BYTES", 2 * 64 * 48)  # half the side fits
    ds = InstanceDataset(source, lambda image, target: seen.append(target["masks"].shape) or (image, target), 48)
    image, target = ds[0]
    assert seen == [(2, 48, 64)]
    _check_aligned(image, target, 48, tol=1.0)


# ------------------------------------------------------------------------------------------- YOLO-seg
def _yolo_seg(root: Path, lines: str) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [a, b]\n")
    Image.new("RGB", (50, 40), (128, 128, 128)).save(root / "images" / "train" / "x.png")
    Image.new("RGB", (50, 40), (128, 128, 128)).save(root / "images" / "train" / "y.png")
    (root / "labels" / "train" / "x.txt").write_text(lines)
    return root


def test_yolo_seg_polygon_becomes_its_mask(tmp_path, capsys):
    root = _yolo_seg(tmp_path / "yolo", "0 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n1 0.7 0.5 0.2 0.2\n")
    source = find_instance_data(root, "train", min_box_size=MIN)
    err = capsys.readouterr().err
    (obj,) = source.targets(1)
    assert obj.label == 0 and obj.bbox == pytest.approx((5, 4, 25, 24))
    assert source.segmentations[obj.id] == [pytest.approx([5, 4, 25, 4, 25, 24, 5, 24])]
    mask = decode_segmentation(source.segmentations[obj.id], 40, 50)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (5, 4, 25, 24) and mask.sum() == 400
    assert obj.area == pytest.approx(400)
    assert source.mask_report.skipped == 1
    assert f"{root / 'labels' / 'train' / 'x.txt'}, line 2" in err and "no polygon" in err
    gt = source.coco_gt()
    assert gt["annotations"][0]["segmentation"] == source.segmentations[obj.id]
    _, target = InstanceDataset(source, None, 50)[0]
    assert np.array_equal(target["masks"][0, :40].numpy(), mask)
    with pytest.raises(DataError, match="every label line is a box"):
        find_instance_data(_yolo_seg(tmp_path / "boxes", "1 0.7 0.5 0.2 0.2\n"), "train", min_box_size=MIN)


# ------------------------------------------------------------------------------- finding data, subsets
def test_find_instance_data_and_subsets(tmp_path):
    root = tmp_path / "coco"
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": [_rect(2, 2, 10 + i, 12)]}
            for i in range(6)]
    path = _write_coco(root / "annotations", [(32, 24)] * 6, anns)
    path.rename(root / "annotations" / "instances_train.json")
    source = find_instance_data(root, "train", root / "annotations", min_box_size=MIN)
    assert len(source) == 6 and len(source.segmentations) == 6
    assert "6 images, 6 instances, 3 classes" in describe_instances(source)
    ids = choose_subset(source, 3, seed=0)
    sub = restrict(source, ids, "subset.json")
    assert isinstance(sub, InstanceSource) and sub.image_ids == ids
    assert set(sub.segmentations) == {a.id for i in ids for a in sub.targets(i)}
    assert len(sub.coco_gt()["annotations"]) == 3
    _, target = InstanceDataset(sub, None, 32)[1]
    assert target["masks"].shape == (1, 32, 32)
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "Annotations" / "a.xml").write_text("<annotation/>")
    with pytest.raises(DataError, match=f"{voc}: a Pascal VOC folder .* no instance masks"):
        find_instance_data(voc, "train", min_box_size=MIN)
    with pytest.raises(DataError, match="no val instance segmentation data found"):
        find_instance_data(root, "val", min_box_size=MIN)


# ------------------------------------------------------------------------------------ real COCO data
def test_coco_tiny_masks(tmp_path):
    root = shared_data("coco_tiny")
    source = find_instance_data(root, "val", min_box_size=MIN)
    assert source.mask_report.skipped == 0
    gt = source.coco_gt()
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert crowd and all("segmentation" in a for a in gt["annotations"])
    assert not any(a.iscrowd for im in source.images for a in source.targets(im.id))
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(str(root / "annotations" / "instances_val2017.json"))
    for im in source.images[:20]:
        for a in source.targets(im.id):
            mask = decode_segmentation(source.segmentations[a.id], im.height, im.width)
            assert np.array_equal(mask, reference.annToMask(reference.anns[a.id]))
    ds = InstanceDataset(source, None, 224)
    for i in range(5):
        _, target = ds[i]
        assert target["masks"].shape[0] == len(target["labels"]) == len(source.targets(source.images[i].id))
        for mask, box in zip(target["masks"], _canvas_boxes(target, 224)):
            if mask.sum() > 20:  # tiny objects: a pixel of rounding is a large share
                assert np.allclose(_tight_box(mask), box.tolist(), atol=2.0)
