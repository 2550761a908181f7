"""Instance segmentation without torch: mask logits to original pixels as PyTorch's interpolate-crop-
interpolate does, RLE round trips, records keeping the thresholded detections with their masks, the
files (COCO results pycocotools evaluates as segm, one CSV row per instance), the drawings and what
the server's page receives. The graph is faked: a callable returning the four arrays."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dinotune.data.input_spec import InputSpec
from dinotune.errors import ConfigError
from dinotune.runtime.metadata import ExportInfo
from dinotune.tasks.instance.drawing import outline, truth_figures
from dinotune.tasks.instance.masks import (area, canvas_part, decode, encode, encode_logits, logit, mask_box,
                                           original_masks)
from dinotune.tasks.instance.runtime import InstanceRuntime, instance_record, page_mask
from dinotune.viz.draw import class_colour

CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
S, GRID = 64, 16


def torch_masks(logits: np.ndarray, size: tuple[int, int], canvas: int) -> np.ndarray:
    """The PyTorch pipeline: bilinear to the canvas, the image's part, bilinear to the image (logits)."""
    nh, nw = canvas_part(size, canvas)
    x = F.interpolate(torch.from_numpy(logits)[None], size=(canvas, canvas), mode="bilinear", align_corners=False)
    return F.interpolate(x[..., :nh, :nw], size=size, mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize("size", [(37, 90), (101, 45), (64, 64)], ids=["landscape", "portrait", "square"])
def test_original_masks_equal_torch_interpolate_crop_interpolate(size):
    logits = (np.random.default_rng(sum(size)).normal(size=(7, GRID, GRID)) * 3).astype(np.float32)
    expected = torch_masks(logits, size, S)
    got = original_masks(logits, size, S)
    assert got.shape == (7, *size) and got.dtype == bool
    decided = np.abs(expected) >= 1e-4  # pixels at the threshold itself may fall either way
    assert np.array_equal(got[decided], (expected > 0)[decided])
    # a threshold moves the boundary as it moves torch's
    assert np.array_equal(original_masks(logits, size, S, 1.5)[decided], (expected > 1.5)[decided])
    rles, areas = encode_logits(logits, size, S)
    assert areas == [int(m.sum()) for m in got] and [decode(r).tolist() for r in rles] == [m.tolist() for m in got]
    assert original_masks(logits[:0], size, S).shape == (0, *size)


def test_rle_round_trip_area_and_box():
    masks = np.zeros((3, 20, 30), dtype=bool)
    masks[0, 2:7, 3:13] = True
    masks[1, 10:, 25:] = True  # touching the bottom right corner
    rles = encode(masks)
    assert [r["size"] for r in rles] == [[20, 30]] * 3 and all(isinstance(r["counts"], str) for r in rles)
    json.dumps(rles)  # JSON-ready
    for m, r in zip(masks, rles):
        assert np.array_equal(decode(r), m) and area(r) == int(m.sum())
    assert mask_box(rles[0]) == [3.0, 2.0, 10.0, 5.0] and mask_box(rles[2]) == [0.0, 0.0, 0.0, 0.0]
    polygon = [[3, 2, 13, 2, 13, 7, 3, 7]]
    assert decode(polygon, (20, 30)).shape == (20, 30) and area(polygon, (20, 30)) > 0
    with pytest.raises(ValueError, match="polygons need the image's size"):
        decode(polygon)


def _graph_output(k: int = 4) -> dict[str, np.ndarray]:
    """One image's top-k: object i is positive on grid rows 2..5 and columns 4i..4i+3 (left to right)."""
    masks = np.full((k, GRID, GRID), -6.0, dtype=np.float32)
    for i in range(k):
        masks[i, 2:6, 4 * i: 4 * i + 4] = 6.0
    return {"scores": np.array([0.9, 0.6, 0.2, 0.05], dtype=np.float32)[:k],
            "labels": np.array([0, 1, 0, 1])[:k].astype(np.int64),
            # in the pixels of _pictures' images (canvas x 4)
            "boxes": np.array([[64 * i, 32, 64 * i + 64, 96] for i in range(k)], dtype=np.float32),
            "masks": masks}


def test_instance_record_keeps_the_thresholded_detections_with_their_masks():
    out = _graph_output()
    record = instance_record("a.png", 1, (48, 64), out["scores"], out["labels"], out["boxes"], out["masks"], CATS,
                             threshold=0.3, top_k=10, category_ids="coco", canvas_size=S)
    assert [d["score"] for d in record["detections"]] == pytest.approx([0.9, 0.6])
    assert [d["category_id"] for d in record["detections"]] == [3, 7]
    for i, d in enumerate(record["detections"]):
        mask = decode(d["segmentation"])
        assert mask.shape == (48, 64) and d["area"] == int(mask.sum()) > 0
        ys, xs = np.nonzero(mask)  # grid column 4i..4i+3 of 16 over a 64-wide canvas = the image's 64 columns
        assert 16 * i - 2 <= xs.min() and xs.max() <= 16 * i + 17
    capped = instance_record("a.png", 1, (48, 64), out["scores"], out["labels"], out["boxes"], out["masks"], CATS,
                             threshold=0.0, top_k=3, category_ids="yolo", canvas_size=S)
    assert len(capped["detections"]) == 3 and capped["detections"][2]["category_id"] == 0
    assert np.array_equal(decode(capped["detections"][2]["segmentation"]),
                          original_masks(out["masks"][2:3], (48, 64), S)[0])
    with pytest.raises(ValueError, match="masks of shape"):
        instance_record("a.png", 1, (48, 64), out["scores"], out["labels"], out["boxes"], out["masks"][:2], CATS,
                        0.0, 10, "coco", S)


def _runtime(postprocess: dict | None = None) -> InstanceRuntime:
    info = ExportInfo(task="instance", class_names=["cat", "dog"], image_size=S, patch_size=16,
                      inputs=["images", "orig_sizes"], outputs=["scores", "labels", "boxes", "masks"],
                      postprocess={"top_k": 4, "min_score": 0.0, **(postprocess or {})}, categories=CATS)
    seen = {}

    def graph(images: np.ndarray, orig_sizes: np.ndarray) -> dict[str, np.ndarray]:
        seen["images"], seen["orig_sizes"] = images.shape, orig_sizes.tolist()
        out = _graph_output()
        return {k: np.stack([v] * len(images)) for k, v in out.items()}

    runtime = InstanceRuntime(info, graph)
    runtime.seen = seen
    return runtime


SETTINGS = {"score_threshold": 0.0, "draw_threshold": 0.3, "top_k": 100, "category_ids": "coco", "batch_size": 2}


def _pictures(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (h, w) in (("12.png", (192, 256)), ("34.png", (256, 160))):
        Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_runtime_records_files_and_pycocotools_segm(tmp_path):
    runtime = _runtime()
    assert runtime.graph_outputs == {"scores": 2, "labels": 2, "boxes": 3, "masks": 4}
    assert runtime.check_postprocess(runtime.info.postprocess) is None
    assert "mask_threshold" in runtime.check_postprocess({"top_k": 4, "mask_threshold": 1.5})
    assert runtime.check_postprocess({"top_k": 4, "mask_threshold": 0.4}) is None
    records = runtime.predict_files(_pictures(tmp_path), dict(SETTINGS), _read)
    assert runtime.seen == {"images": (2, 3, S, S), "orig_sizes": [[192, 256], [256, 160]]}
    assert [r["image_id"] for r in records] == [12, 34]  # numeric file names are COCO image ids
    assert [len(r["detections"]) for r in records] == [4, 4]  # every top-k detection (score threshold 0)
    for r in records:
        assert all(decode(d["segmentation"]).shape == (r["height"], r["width"]) for d in r["detections"])

    # COCO results: pycocotools reads the file as it is and evaluates it as segm
    coco_file = tmp_path / "results.json"
    coco_file.write_text(InstanceRuntime.format_predictions(records, "coco", SETTINGS))
    flat = json.loads(coco_file.read_text())
    assert len(flat) == 8 and all({"segmentation", "bbox", "score"} <= set(r) for r in flat)
    gt = {"images": [{"id": r["image_id"], "height": r["height"], "width": r["width"]} for r in records],
          "categories": CATS,
          "annotations": [{"id": n + 1, "image_id": r["image_id"], "category_id": d["category_id"], "iscrowd": 0,
                           "segmentation": d["segmentation"], "area": d["area"], "bbox": mask_box(d["segmentation"])}
                          for n, (r, d) in enumerate((r, d) for r in records for d in r["detections"] if d["area"])]}
    # 34.png is 160 wide: object 3 lies in the canvas padding, an empty mask (its weakest detection)
    assert len(gt["annotations"]) == 7
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(coco_file)), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # the predictions' own masks as truth

    # CSV: one row per instance shown to a person (draw_threshold 0.3), the RLE counts last
    rows = list(csv.reader(io.StringIO(InstanceRuntime.format_predictions(records, "csv", SETTINGS))))
    assert rows[0] == ["image", "image_id", "category", "category_id", "score", "x", "y", "width", "height", "area",
                       "rle"]
    assert len(rows) == 1 + 4  # two per image score at least 0.3
    first = records[0]["detections"][0]
    assert rows[1][-1] == first["segmentation"]["counts"] and int(rows[1][-2]) == first["area"]
    assert np.array_equal(decode({"size": [192, 256], "counts": rows[1][-1]}), decode(first["segmentation"]))
    assert len(InstanceRuntime.csv_rows(records)) == 1 + 8  # csv_rows itself: every instance of the records


def test_the_mask_threshold_is_a_probability(tmp_path):
    paths = _pictures(tmp_path)
    plain = _runtime().predict_files(paths[:1], dict(SETTINGS), _read)  # 0.5 when unset: logit 0
    half = _runtime().predict_files(paths[:1], {**SETTINGS, "mask_threshold": 0.5}, _read)
    strict = _runtime().predict_files(paths[:1], {**SETTINGS, "mask_threshold": 0.99}, _read)
    assert [d["area"] for d in plain[0]["detections"]] == [d["area"] for d in half[0]["detections"]]
    assert all(s["area"] < p["area"] for p, s in zip(plain[0]["detections"], strict[0]["detections"]))
    assert logit(0.5) == 0.0 and logit(0.99) == pytest.approx(np.log(99))
    with pytest.raises(ValueError, match="between 0 and 1"):
        logit(1.0)


def test_drawing_tints_the_masked_pixels(tmp_path):
    paths = _pictures(tmp_path / "in")
    runtime = _runtime()
    records = runtime.predict_files(paths, {**SETTINGS, "draw": str(tmp_path / "drawn")}, _read)
    drawn = sorted(p.name for p in (tmp_path / "drawn").glob("*.jpg"))
    assert drawn == ["12.jpg", "34.jpg"]
    picture = np.asarray(Image.open(tmp_path / "drawn" / "12.jpg").convert("RGB")).astype(int)
    shown = records[0]["detections"][:2]  # scoring at least draw_threshold 0.3; the others are not drawn
    inside = decode(shown[0]["segmentation"]) & ~outline(decode(shown[0]["segmentation"]), 2)
    colour = np.array(class_colour(0))
    expected = 128 * 0.55 + colour * 0.45
    assert np.abs(np.median(picture[inside], axis=0) - expected).max() < 12  # JPEG
    hidden = decode(records[0]["detections"][2]["segmentation"])
    assert np.abs(np.median(picture[hidden], axis=0) - 128).max() < 6  # below the threshold: not tinted
    band_runtime = _runtime()
    band_runtime.info.input = InputSpec(in_channels=4, arrays=True)
    with pytest.raises(ConfigError, match="draws pictures only"):
        band_runtime.predict_files(paths, {**SETTINGS, "draw": str(tmp_path / "x")}, _read)


def test_truth_figures_show_the_ground_truth_masks(tmp_path):
    paths = _pictures(tmp_path / "in")
    records = _runtime().predict_files(paths[:1], dict(SETTINGS), _read)
    # annotated at half the file's size: boxes and masks are drawn scaled up
    truth = {str(paths[0]): ([[10, 10, 30, 30]], [1], [[[10, 10, 30, 10, 30, 30, 10, 30]]], (128, 96))}
    files = truth_figures(records, truth, tmp_path / "samples", ["cat", "dog"], 0.3)
    assert [f.name for f in files] == ["12.jpg"]
    figure = np.asarray(Image.open(files[0]).convert("RGB")).astype(int)
    assert figure.shape[1] >= 2 * 256  # ground truth | prediction
    top = figure.shape[0] - 192  # under the titles
    tinted = figure[top + 30: top + 55, 30:55]  # inside the truth's mask (20..60 in the file's pixels)
    expected = 128 * 0.55 + np.array(class_colour(1)) * 0.45
    assert np.abs(np.median(tinted.reshape(-1, 3), axis=0) - expected).max() < 12


def test_the_page_view_carries_each_box_mask(tmp_path):
    record = _runtime().predict_files(_pictures(tmp_path)[:1], dict(SETTINGS), _read)[0]
    view = InstanceRuntime.view(record, {})
    assert [b["score"] for b in view["boxes"]] == [d["score"] for d in record["detections"]]
    for box, d in zip(view["boxes"], record["detections"]):
        x, y, w, h = box["mask"]["bbox"]
        shape = Image.open(io.BytesIO(base64.b64decode(box["mask"]["image"].split(",", 1)[1]))).convert("RGBA")
        assert shape.size == (w, h)
        opaque = np.asarray(shape)[..., 3] > 0
        assert np.array_equal(opaque, decode(d["segmentation"])[y: y + h, x: x + w])
    empty = {"size": [10, 10], "counts": encode(np.zeros((1, 10, 10), dtype=bool))[0]["counts"]}
    assert page_mask(empty, (10, 10)) is None
    big = encode(np.ones((1, 3000, 2000), dtype=bool))[0]
    assert Image.open(io.BytesIO(base64.b64decode(page_mask(big, (3000, 2000))["image"].split(",", 1)[1]))).size \
        == (683, 1024)  # at the page's resolution, not the photo's


def test_the_server_sends_the_masks_to_the_page(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dinotune.serve import create_app

    runtime = _runtime()

    class Served:  # an exported model's face (dinotune.runtime's predictor), over the fake graph
        task, class_names = "instance", ["cat", "dog"]

        def __init__(self):
            self.runtime = runtime

        def predict_view(self, array, name):
            return runtime.predict_arrays([name], [array], {**SETTINGS, "ids": {name: 1}})[0]

        def predict_array(self, array, name):
            return self.predict_view(array, name)[0]

        def view_settings(self):
            return runtime.view_settings(SETTINGS)

    sample = _pictures(tmp_path)[0]
    client = TestClient(create_app(Served()))
    answer = client.post("/predict?overlay=1", files={"file": (sample.name, sample.read_bytes())}).json()
    boxes = answer["overlay"]["view"]["boxes"]
    assert len(boxes) == 4 and all(b["mask"]["image"].startswith("data:image/png;base64,") for b in boxes)
    assert answer["overlay"]["mask"] is None  # no label map: the masks travel with their boxes
    assert client.get("/health").json()["view"] == {"threshold": 0.3}
