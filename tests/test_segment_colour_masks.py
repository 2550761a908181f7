"""Colour-coded masks (a class per colour) with a colour table: reading (JSON, CSV, 1-bit palette
PNGs), stray and absent colours, the refusal without a table, and a run end to end (train, eval,
predict with the table's colours and a legend); test splits of the segmentation layouts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinotune.cli import main
from dinotune.errors import DataError
from dinotune.tasks.segment import colours
from dinotune.tasks.segment.colours import ColourTable, pack_rgb, read_colour_table
from dinotune.tasks.segment.data import find_segmentation_data, load_mask, read_folders, read_voc, scan_source
from dinotune.tasks.segment.layouts import read_ade20k

pytestmark = pytest.mark.usefixtures("one_thread")

TABLE = {"ground": [20, 20, 20], "road": [128, 64, 128], "car": [0, 0, 255]}
STRAY = (255, 0, 255)  # a colour the table lacks: the border of some masks
SIZE = 28
TINY = ["--model", "random:tiny", "--image-size", str(SIZE), "--batch-size", "4", "--workers", "0", "--no-progress",
        "--device", "cpu", "--epochs", "1", "--check-images", "full", "--seed", "3"]


def make_colour_set(root: Path, counts: dict[str, int], seed: int = 0, index_root: Path | None = None) -> Path:
    """``root/<split>/images`` + ``root/<split>/masks`` with RGB masks in ``TABLE``'s colours (a
    stray-colour border in most); ``index_root``: the same set with index masks, 255 on the border."""
    rng = np.random.default_rng(seed)
    colours = np.array(list(TABLE.values()) + [STRAY], dtype=np.uint8)
    for split, n in counts.items():
        for base in [root] + ([index_root] if index_root else []):
            for sub in ("images", "masks"):
                (base / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
            pixels = rng.integers(90, 160, (SIZE, SIZE, 3)).astype(np.uint8)
            for label, rgb in ((1, (220, 40, 40)), (2, (40, 60, 220))):
                s = int(rng.integers(6, SIZE // 2))
                x, y = (int(v) for v in rng.integers(0, SIZE - s, 2))
                labels[y:y + s, x:x + s] = label
                pixels[y:y + s, x:x + s] = rgb
            border = int(rng.integers(0, 4))
            labels[:border] = 3  # the stray colour
            Image.fromarray(pixels).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(colours[labels]).save(root / split / "masks" / f"{i:03d}.png")
            if index_root:
                Image.fromarray(pixels).save(index_root / split / "images" / f"{i:03d}.png")
                Image.fromarray(np.where(labels == 3, 255, labels).astype(np.uint8), mode="L").save(
                    index_root / split / "masks" / f"{i:03d}.png")
    return root


def write_table(path: Path, table: dict = TABLE) -> Path:
    path.write_text(json.dumps(table))
    return path


@pytest.fixture(scope="module")
def colour_runs(tmp_path_factory):
    """A run trained on colour masks and one trained on the same set as index masks (stray = 255)."""
    tmp = tmp_path_factory.mktemp("colour")
    data = make_colour_set(tmp / "data", {"train": 8, "val": 4}, index_root=tmp / "index")
    table = write_table(tmp / "colours.json")
    runs = {}
    for name, args in (("colour", ["--data", str(data), "--mask-colors", str(table)]),
                       ("index", ["--data", str(tmp / "index"), "--class-names", *TABLE])):
        runs[name] = tmp / f"run-{name}"
        assert main(["train", "segment", *args, "--out", str(runs[name]), *TINY]) == 0
    return data, tmp / "index", table, runs


# ------------------------------------------------------------------------------ end to end
def test_a_colour_run_saves_its_table_and_equals_an_index_run_with_ignore(colour_runs, capsys):
    data, _, _, runs = colour_runs
    meta = json.loads((runs["colour"] / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["class_names"] == list(TABLE) and meta["mask_colors"] == list(TABLE.values())
    # the stray pixels are ignored: the colour run is the index run with those pixels = 255
    colour = json.loads((runs["colour"] / "best_metrics.json").read_text())
    index = json.loads((runs["index"] / "best_metrics.json").read_text())
    assert colour["confusion"] == index["confusion"] and colour["mIoU"] == index["mIoU"]
    capsys.readouterr()
    assert main(["eval", str(runs["colour"]), "--data", str(data), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    evaluated = json.loads(out.out)  # stdout stays JSON
    assert evaluated["mIoU"] == pytest.approx(colour["mIoU"])
    assert re.search(r"class\s+IoU\s+acc\s+pixels", out.err) and "road" in out.err  # the per-class table
    assert "not in" in out.err and "#ff00ff" in out.err  # the stray colour, reported


def test_predict_writes_table_coloured_label_pngs_and_overlays_with_a_legend(colour_runs, tmp_path, capsys):
    data, _, _, runs = colour_runs
    images = sorted((data / "val" / "images").glob("*.png"))[:2]
    from dinotune.utils import set_quiet

    set_quiet(False)
    try:
        assert main(["predict", str(runs["colour"]), *map(str, images), "--masks", str(tmp_path / "masks"),
                     "--draw", str(tmp_path / "draw"), "--out", str(tmp_path / "p.json"), "--device", "cpu"]) == 0
    finally:
        set_quiet(True)
    err = capsys.readouterr().err
    assert f"to {tmp_path / 'masks'}" in err and f"to {tmp_path / 'draw'}" in err  # where they went
    for path in images:
        mask = Image.open(tmp_path / "masks" / path.name)
        assert mask.mode == "P" and mask.getpalette()[:9] == [v for c in TABLE.values() for v in c]
        labels = np.asarray(mask)
        drawn = np.asarray(Image.open(tmp_path / "draw" / f"{path.stem}.jpg").convert("RGB")).astype(int)
        assert drawn.shape[1] > SIZE  # the legend panel, right of the overlay
        legend = drawn[:, SIZE:]
        for label, colour in enumerate(TABLE.values()):  # a swatch per class present, in its table colour
            if max(colour) > 100:  # (the dark one looks like the text)
                near = (np.abs(legend - np.array(colour)).max(axis=-1) < 40).sum()
                assert (near >= 20) == (label in labels), (label, near)


def test_the_legend_shows_the_classes_present_in_their_colours():
    from dinotune.viz.segmentation import palette, with_legend

    pal = palette(3, 255, list(TABLE.values()))
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 10:30] = 2  # car; no road
    mask[:5] = 255
    image = Image.new("RGB", (80, 60), (200, 200, 200))
    out = np.asarray(with_legend(image, mask, pal, list(TABLE)))
    assert out.shape[1] > 80 and np.array_equal(out[:60, :80], np.asarray(image))  # the picture is untouched
    legend = out[:, 80:].reshape(-1, 3)
    assert (legend == TABLE["car"]).all(-1).sum() >= 16 and (legend == TABLE["ground"]).all(-1).sum() >= 16
    assert not (legend == TABLE["road"]).all(-1).any()
    assert with_legend(image, np.full((60, 80), 255, np.uint8), pal, list(TABLE)) is image  # nothing to name


def test_eval_reads_the_test_split(colour_runs, tmp_path, capsys):
    _, _, _, runs = colour_runs
    data = make_colour_set(tmp_path / "d", {"train": 1, "test": 2}, seed=5)
    assert main(["eval", str(runs["colour"]), "--data", str(data), "--split", "test", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2


# ------------------------------------------------------------------------------ reading
def test_colour_masks_read_exactly_with_strays_ignored_and_reported(tmp_path, capfd):
    root = make_colour_set(tmp_path / "d", {"train": 3}, index_root=tmp_path / "i")
    src = read_folders(root, "train", colours=ColourTable(tuple(TABLE), tuple(map(tuple, TABLE.values()))))
    assert src.mask_kind == "colour" and src.class_names == list(TABLE)
    for k in range(len(src)):
        expected = np.asarray(Image.open(tmp_path / "i" / "train" / "masks" / src.pairs[k][1].name))
        assert np.array_equal(load_mask(src, k), expected)
    capfd.readouterr()
    scan_source(src, "fast")
    err = capfd.readouterr().err
    assert "#ff00ff (255, 0, 255)" in err and "ignored in loss and metrics" in err and "%" in err
    assert len([line for line in err.splitlines() if "#ff00ff" in line]) == 1  # one line


def test_lookup_is_exact_on_random_colours():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 3)).astype(np.uint8)
    table = ColourTable(tuple(f"c{i}" for i in range(30)), tuple(map(tuple, rgb[:30])))
    image = rgb[rng.integers(0, 40, (50, 60))]
    expected = {tuple(c): i for i, c in enumerate(rgb[:30].tolist())}
    want = np.array([[expected.get(tuple(p), 255) for p in row] for row in image.tolist()])
    assert np.array_equal(table.labels(pack_rgb(image), 255), want)


def test_without_a_table_colour_masks_are_refused_with_their_colours_and_a_table(tmp_path, capsys, monkeypatch):
    root = make_colour_set(tmp_path / "d", {"train": 4})
    assert main(["train", "segment", "--data", str(root), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "the masks are colour images" in capsys.readouterr().err
    with pytest.raises(DataError) as err:
        find_segmentation_data(root, "train")
    text = str(err.value)
    assert "--mask-colors FILE" in text and "4 colour(s) in the 4 masks" in text
    for colour in list(TABLE.values()) + [list(STRAY)]:
        assert re.search(re.escape(str(tuple(colour))) + r" \d+\.\d %", text)  # each colour with its share
    suggested = json.loads(text[text.index("{"):])  # a ready-to-use table
    assert set(suggested) == {f"class_{i}" for i in range(4)}
    assert sorted(map(tuple, suggested.values())) == sorted(map(tuple, list(TABLE.values()) + [list(STRAY)]))
    table = read_colour_table(write_table(tmp_path / "t.json", suggested))  # usable as it is
    assert len(find_segmentation_data(root, "train", colours=table)) == 4
    monkeypatch.setattr(colours, "SURVEY_MASKS", 2)  # many masks: a sample is read
    with pytest.raises(DataError, match=r"4 colour\(s\) in 2 masks sampled of 4"):
        find_segmentation_data(root, "train")


def test_table_colours_absent_from_the_masks_are_reported(tmp_path, capfd):
    root = make_colour_set(tmp_path / "d", {"train": 2})
    table = read_colour_table(write_table(tmp_path / "t.json", {**TABLE, "tree": "#00ff00"}))
    src = find_segmentation_data(root, "train", colours=table)
    capfd.readouterr()
    scan_source(src, "fast")
    err = capfd.readouterr().err
    assert "tree #00ff00 (0, 255, 0)" in err and "occur in no mask" in err and "(128, 64, 128)" in err
    wrong = read_colour_table(write_table(tmp_path / "w.json", {"a": [1, 2, 3], "b": [255, 64, 128]}))
    with pytest.raises(DataError, match=r"none of the 2 colours .* occurs in the masks, which hold .*\(0, 0, 255\)"):
        scan_source(find_segmentation_data(root, "train", colours=wrong), "fast")


def test_csv_tables_read_as_json(tmp_path):
    from_json = read_colour_table(write_table(tmp_path / "t.json", {"ground": "#141414", "road": [128, 64, 128],
                                                                     "car": "#0000FF"}))
    (tmp_path / "t.csv").write_text("name,r,g,b\nground,20,20,20\nroad, 128, 64, 128\n\ncar,#0000ff\n")
    from_csv = read_colour_table(tmp_path / "t.csv")
    assert from_csv.names == from_json.names == tuple(TABLE)
    assert from_csv.rgb == from_json.rgb == tuple(map(tuple, TABLE.values()))
    for bad, message in (('{"a": [1, 2, 3], "a": [4, 5, 6]}', "appear twice"),
                         ('{"a": [1, 2, 300]}', "three integers"), ('{"a": "#12345"}', "#rrggbb"),
                         ('{"a": [1, 2, 3], "b": "#010203"}', "same colour")):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(DataError, match=re.escape(str(tmp_path / "bad.json")) + ".*" + message):
            read_colour_table(tmp_path / "bad.json")
    (tmp_path / "bad.csv").write_text("road,1,2\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 1: expected name,r,g,b"):
        read_colour_table(tmp_path / "bad.csv")


def test_a_1bit_palette_png_reads_as_its_colours_with_a_table(tmp_path):
    root = tmp_path / "d"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8), (100, 100, 100)).save(root / "images" / "a.png")
    bits = (np.arange(64).reshape(8, 8) % 2).astype(np.uint8)
    mask = Image.fromarray(bits, mode="P")
    mask.putpalette([20, 20, 20, 0, 0, 255])
    mask.save(root / "masks" / "a.png", bits=1)
    assert (root / "masks" / "a.png").read_bytes()[24] == 1  # bit depth 1
    table = read_colour_table(write_table(tmp_path / "t.json"))  # car (blue) is label 2, not index 1
    assert np.array_equal(load_mask(read_folders(root, "train", colours=table), 0), np.where(bits, 2, 0))
    assert np.array_equal(load_mask(read_folders(root, "train"), 0), bits)  # without: indices, as before


def test_colour_tables_are_refused_where_masks_hold_indices(tmp_path):
    ade = tmp_path / "ade"
    for sub in ("images/training", "annotations/training"):
        (ade / sub).mkdir(parents=True)
    table = read_colour_table(write_table(tmp_path / "t.json"))
    with pytest.raises(DataError, match="--mask-colors .* not to ADE20K"):
        find_segmentation_data(ade, "train", colours=table)
    root = make_colour_set(tmp_path / "d", {"train": 1})
    with pytest.raises(DataError, match="differ from those of the colour table"):
        read_folders(root, "train", class_names=["a", "b", "c"], colours=table)


# ------------------------------------------------------------------------------ test splits
def test_layouts_read_a_test_split_or_say_they_have_none(tmp_path):
    voc = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for name in ("a", "b", "t"):
        Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(np.ones((8, 8), np.uint8), mode="L").save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"no VOC test list .*test\.txt"):
        read_voc(voc, "test")
    (voc / "ImageSets/Segmentation/test.txt").write_text("t\n")
    assert [p.stem for p, _ in find_segmentation_data(voc, "test").pairs] == ["t"]

    folders = make_colour_set(tmp_path / "f", {"train": 1, "val": 1})
    table = read_colour_table(write_table(tmp_path / "t.json"))
    with pytest.raises(DataError, match="no test segmentation data found"):
        find_segmentation_data(folders, "test", colours=table)
    make_colour_set(folders, {"test": 2}, seed=1)
    assert len(find_segmentation_data(folders, "test", colours=table)) == 2

    ade = tmp_path / "ade"
    for sub in ("images/training", "annotations/training"):
        (ade / sub).mkdir(parents=True)
    with pytest.raises(DataError, match="ADE20K has no annotated test split"):
        read_ade20k(ade, "test")
