"""Classification data sources, odd image formats, bad files and bad input: each is read, or refused
with a message that names the file / folder / option and what to do."""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinotune
import dinotune.utils as dutils
from dinotune.backbone import DinoBackbone, loading
from dinotune.backbone.loading import BackboneLoadError, hub_reachable, load_dinov2
from dinotune.cli import main
from dinotune.config import ConfigError, build_config
from dinotune.data.images import check_image, load_image
from dinotune.data.transforms import classify_eval_transform
from dinotune.tasks import get_task
from dinotune.tasks.classify.data import DataError, build_classification_data
from tests.conftest import make_class_folders, make_image, shared_data, tiny_options


@pytest.fixture(autouse=True)
def _keep_quiet_setting():
    """The CLI and some tests switch ``info()`` on; put the conftest setting back afterwards."""
    before = dutils._QUIET
    yield
    dutils.set_quiet(before)


def _build(data: str, **kw):
    t = classify_eval_transform(28)
    return build_classification_data(data=data, train_transform=t, eval_transform=t, **kw)


def _names(dataset, class_names):
    """``{(file name, class name)}`` of an ImageListDataset."""
    return {(p.name, class_names[c]) for p, c in dataset.items}


# ------------------------------------------------------------------------------ data sources
def test_train_val_class_folders(tiny_folder):
    data = _build(str(tiny_folder))
    assert data.class_names == ["blue", "red"]
    assert len(data.train) == 12 and len(data.val) == 6
    assert len(data.report) == 0
    # each file is labelled by its folder, in the train / val split it came from
    for ds, split in ((data.train, "train"), (data.val, "val")):
        for p, c in ds.items:
            assert p.parent.name == data.class_names[c] and p.parent.parent.name == split
    item = data.train[0]
    assert item["image"].shape == (3, 28, 28) and item["image"].dtype == torch.float32
    assert item["label"] in (0, 1)


def test_plain_tree_stratified_holdout(tmp_path):
    make_class_folders(tmp_path / "d", ["red", "green", "blue"], 8, size=16)
    data = _build(str(tmp_path / "d"), val_fraction=0.25, seed=3)
    train, val = _names(data.train, data.class_names), _names(data.val, data.class_names)
    assert not train & val
    assert len(train | val) == 24
    assert len(val) == 6  # 2 of each class's 8
    for c in data.class_names:
        assert sum(1 for _, n in val if n == c) == 2
        assert sum(1 for _, n in train if n == c) == 6
    again = _build(str(tmp_path / "d"), val_fraction=0.25, seed=3)
    assert _names(again.val, again.class_names) == val
    others = [_names(_build(str(tmp_path / "d"), val_fraction=0.25, seed=s).val, data.class_names)
              for s in range(4, 9)]
    assert any(o != val for o in others), "the seed does not change the hold-out split"


def test_plain_tree_without_val_fraction_has_no_val(tmp_path):
    make_class_folders(tmp_path / "d", ["red", "blue"], 3, size=16)
    data = _build(str(tmp_path / "d"))
    assert data.val is None and len(data.train) == 6


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_string_labels_relative_paths(tmp_path):
    make_class_folders(tmp_path / "imgs", ["red", "blue"], 4, size=16)
    rows = [f"imgs/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(3)]
    val_rows = [f"imgs/{c}/{c}_3.png,{c}" for c in ("red", "blue")]
    # the CSV lives in tmp_path; run from elsewhere so only CSV-relative resolution can work
    train_csv = _write_csv(tmp_path / "train.csv", "path,label", rows)
    val_csv = _write_csv(tmp_path / "val.csv", "path,label", val_rows)
    data = _build(str(train_csv), val_data=str(val_csv))
    assert data.class_names == ["blue", "red"]
    assert len(data.train) == 6 and len(data.val) == 2
    for ds in (data.train, data.val):
        for p, c in ds.items:
            assert p.is_file() and p.parent.name == data.class_names[c]
    assert data.train[0]["image"].shape == (3, 28, 28)


def test_csv_integer_labels_sort_numerically(tmp_path):
    make_class_folders(tmp_path / "imgs", ["red", "blue"], 3, size=16)
    label = {"red": "10", "blue": "2"}
    rows = [f"imgs/{c}/{c}_{i}.png,{label[c]}" for c in ("red", "blue") for i in range(3)]
    data = _build(str(_write_csv(tmp_path / "t.csv", "Filename,Class", rows)))  # auto-detected, any case
    assert data.class_names == ["2", "10"]  # numeric order, not "10" < "2"
    for p, c in data.train.items:
        assert data.class_names[c] == label[p.parent.name]


def test_csv_explicit_columns(tmp_path):
    make_class_folders(tmp_path / "imgs", ["red", "blue"], 2, size=16)
    rows = [f"x,imgs/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(2)]
    csv_path = _write_csv(tmp_path / "t.csv", "id,picture,kind", rows)
    with pytest.raises(DataError, match="no image path column"):
        _build(str(csv_path))
    data = _build(str(csv_path), image_column="picture", label_column="kind")
    assert data.class_names == ["blue", "red"] and len(data.train) == 4


def test_csv_missing_file_is_reported(tmp_path):
    make_class_folders(tmp_path / "imgs", ["red", "blue"], 2, size=16)
    rows = [f"imgs/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(2)] + ["imgs/red/gone.png,red"]
    data = _build(str(_write_csv(tmp_path / "t.csv", "path,label", rows)))
    assert len(data.train) == 4
    assert len(data.report) == 1
    path, reason = data.report.skipped[0]
    assert path.endswith("gone.png") and "line 6" in reason


def _hf_folder(tmp_path: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["red", "blue"])})

    def split(n: int, seed: int):
        colours = {0: (220, 40, 40), 1: (40, 60, 220)}
        rows = {"img": [], "label": []}
        for i in range(n):
            c = i % 2
            img = make_image(colours[c], 20, seed * 100 + i, pattern=c)
            rows["img"].append(img if i % 3 else img.convert("L"))  # a grayscale one too
            rows["label"].append(c)
        return datasets.Dataset.from_dict(rows, features=features)

    folder = tmp_path / "hfdata"
    datasets.DatasetDict({"train": split(8, 1), "validation": split(4, 2)}).save_to_disk(str(folder))
    return folder


def test_hf_save_to_disk_folder_loads_and_trains(tmp_path):
    folder = _hf_folder(tmp_path)
    data = _build(str(folder))
    assert data.class_names == ["red", "blue"]
    assert len(data.train) == 8 and len(data.val) == 4
    for i in range(len(data.train)):
        item = data.train[i]
        assert item["image"].shape == (3, 28, 28)
        assert item["label"] == i % 2
    result = dinotune.train(task="classify", data=str(folder), **tiny_options(tmp_path / "run", epochs=1))
    assert result["metrics"]["count"] == 4
    assert 0.0 <= result["metrics"]["top1"] <= 1.0
    assert (Path(result["run_dir"]) / "checkpoints" / "best" / "head.safetensors").is_file()


# ------------------------------------------------------------------------------ preprocessing
SOLID = {"red": (200, 30, 90), "blue": (20, 110, 240)}


def _imagenet_normalised(rgb: tuple[int, int, int], size: int) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as a ``3 x size x size`` image."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((torch.tensor(rgb, dtype=torch.float32) / 255 - mean) / std)[:, None, None].expand(3, size, size)


def _solid_folders(root: Path) -> Path:
    """``train/`` and ``val/`` class folders of solid-colour images, not square (resize + crop)."""
    for split, n in (("train", 2), ("val", 1)):
        for name, rgb in SOLID.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (45, 33), rgb).save(root / split / name / f"{i}.png")
    return root


def test_classify_eval_transform_normalises_with_imagenet_mean_and_std():
    img = Image.new("RGB", (50, 37), (200, 30, 90))
    out = classify_eval_transform(28)(img)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out, _imagenet_normalised((200, 30, 90), 28), atol=1e-5, rtol=0)


def test_classify_task_images_are_imagenet_normalised(tmp_path):
    """What the model sees: evaluation images and (without augmentation) training images."""
    data_dir = _solid_folders(tmp_path / "solid")
    cfg = build_config("classify", data=str(data_dir), **tiny_options(tmp_path / "run", augment=False))
    task = get_task(cfg)
    data = task.build_data(None, 14)
    names = data.meta["class_names"]
    for split, ds in (("val", data.val), ("train", data.train)):
        for i in range(len(ds)):
            item = ds[i]
            expected = _imagenet_normalised(SOLID[names[item["label"]]], 28)
            torch.testing.assert_close(item["image"], expected, atol=1e-5, rtol=0,
                                       msg=lambda m, s=split, i=i: f"{s} image {i}: {m}")
    # the transform used for evaluation and prediction runs
    out = task.eval_transform()(Image.new("RGB", (40, 60), SOLID["blue"]))
    torch.testing.assert_close(out, _imagenet_normalised(SOLID["blue"], 28), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ image formats
def _source_image() -> Image.Image:
    return make_image((200, 120, 40), 32, 0)


def _check_rgb(path: Path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 32)
    arr = np.asarray(img)
    assert arr.shape == (32, 32, 3)
    return arr


def test_gif_palette(tmp_path):
    src = _source_image()
    src.convert("P", palette=Image.ADAPTIVE, colors=32).save(tmp_path / "a.gif")
    with Image.open(tmp_path / "a.gif") as im:
        assert im.mode == "P"
    arr = _check_rgb(tmp_path / "a.gif")
    assert np.abs(arr.astype(int) - np.asarray(src).astype(int)).mean() < 20


def test_gif_with_transparency_composited_on_white(tmp_path):
    pal = _source_image().convert("P", palette=Image.ADAPTIVE, colors=32)
    pixels = pal.load()
    for x in range(8):  # a transparent block in the corner, using palette index 0
        for y in range(8):
            pixels[x, y] = 0
    pal.save(tmp_path / "t.gif", transparency=0)
    with Image.open(tmp_path / "t.gif") as im:
        assert im.mode == "P" and im.info.get("transparency") == 0
    arr = _check_rgb(tmp_path / "t.gif")
    assert (arr[:8, :8] == 255).all()


def test_real_gif_in_hymenoptera_is_an_image():
    gif = shared_data("hymenoptera") / "train" / "ants" / "imageNotFound.gif"
    assert check_image(gif) is None and check_image(gif, "fast") is None
    img = load_image(gif)
    assert img.mode == "RGB" and min(img.size) > 0


def test_grayscale_png(tmp_path):
    _source_image().convert("L").save(tmp_path / "g.png")
    arr = _check_rgb(tmp_path / "g.png")
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_rgba_png(tmp_path):
    rgba = _source_image().convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 255))
    rgba.save(tmp_path / "a.png")
    arr = _check_rgb(tmp_path / "a.png")
    assert (arr == np.asarray(_source_image())).all()


def test_cmyk_jpeg(tmp_path):
    _source_image().convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
    arr = _check_rgb(tmp_path / "c.jpg")
    assert np.abs(arr.astype(int) - np.asarray(_source_image()).astype(int)).mean() < 25


# ------------------------------------------------------------------------------------ bad files
def _add_bad_files(folder: Path) -> dict[str, str]:
    """Four unusable files in ``folder``'s class folders: ``{file name: expected reason word}``."""
    buf = io.BytesIO()
    make_image((10, 200, 10), 64, 5).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    (folder / "red" / "corrupt.jpg").write_bytes(b"\x00garbage" + np.random.default_rng(0).bytes(2000))
    (folder / "red" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "blue" / "empty.png").write_bytes(b"")
    (folder / "blue" / "notes.txt").write_text("collected from the web, 2023\n")
    return {"corrupt.jpg": "not an image", "truncated.jpg": "truncated", "empty.png": "empty file",
            "notes.txt": "not an image file"}


def test_bad_files_are_reported_and_skipped(tiny_folder, capsys):
    bad = _add_bad_files(tiny_folder / "train")
    dutils.set_quiet(False)
    data = _build(str(tiny_folder))
    err = capsys.readouterr().err
    assert len(data.report) == 4
    reasons = {Path(p).name: r for p, r in data.report.skipped}
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert word in reasons[name], (name, reasons[name])
        assert str(tiny_folder / "train" / ("red" if name.endswith(".jpg") else "blue") / name) in err
    assert "skipped 4 files" in err
    assert len(data.train) == 12 and len(data.val) == 6
    assert all(p.name not in bad for p, _ in data.train.items)


def test_bad_files_warnings_print_even_when_quiet(tiny_folder, capsys):
    bad = _add_bad_files(tiny_folder / "train")
    dutils.set_quiet(True)
    _build(str(tiny_folder))
    err = capsys.readouterr().err
    for name in bad:
        assert name in err


def test_training_runs_on_the_good_files(tiny_folder, tmp_path, capsys):
    bad = _add_bad_files(tiny_folder / "train")
    dutils.set_quiet(False)
    result = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "run", epochs=1))
    err = capsys.readouterr().err
    for name in bad:
        assert name in err
    assert "skipped 4 files" in err
    assert "images: 12 train, 6 val" in err
    assert result["metrics"]["count"] == 6
    meta = (Path(result["run_dir"]) / "checkpoints" / "last" / "meta.json").read_text()
    assert '"skipped_files": 4' in meta


def test_empty_folder_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        _build(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(e.value)


def test_class_folders_without_images_refused(tmp_path):
    for c in ("red", "blue"):
        (tmp_path / "d" / c).mkdir(parents=True)
    (tmp_path / "d" / "red" / "readme.txt").write_text("todo")
    with pytest.raises(DataError) as e:
        _build(str(tmp_path / "d"))
    assert str(tmp_path / "d") in str(e.value) and "no readable images" in str(e.value)


def test_one_class_refused(tmp_path):
    make_class_folders(tmp_path / "d", ["red"], 3, size=16)
    with pytest.raises(DataError) as e:
        _build(str(tmp_path / "d"))
    msg = str(e.value)
    assert str(tmp_path / "d") in msg and "'red'" in msg and "one class" in msg


def test_missing_data_path_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        _build(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------- CSVs
def test_csv_without_path_column(tmp_path):
    csv_path = _write_csv(tmp_path / "t.csv", "name,label", ["a.png,red", "b.png,blue"])
    with pytest.raises(DataError) as e:
        _build(str(csv_path))
    assert str(csv_path) in str(e.value) and "image path column" in str(e.value)
    assert "--image-column" in str(e.value)


def test_csv_empty_label_names_file_and_line(tmp_path):
    make_class_folders(tmp_path / "imgs", ["red", "blue"], 2, size=16)
    rows = ["imgs/red/red_0.png,red", "imgs/blue/blue_0.png,blue", "imgs/red/red_1.png,", "imgs/blue/blue_1.png,blue"]
    csv_path = _write_csv(tmp_path / "t.csv", "path,label", rows)
    with pytest.raises(DataError) as e:
        _build(str(csv_path))
    msg = str(e.value)
    assert str(csv_path) in msg and "line 4" in msg and "empty label" in msg


def test_csv_val_label_not_in_training(tmp_path):
    make_class_folders(tmp_path / "imgs", ["red", "blue", "green"], 2, size=16)
    train = _write_csv(tmp_path / "train.csv", "path,label",
                       [f"imgs/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(2)])
    val = _write_csv(tmp_path / "val.csv", "path,label", ["imgs/red/red_0.png,red", "imgs/green/green_0.png,green"])
    with pytest.raises(DataError) as e:
        _build(str(train), val_data=str(val))
    msg = str(e.value)
    assert str(val) in msg and "green" in msg and "blue, red" in msg


# ------------------------------------------------------------------ eval data vs the checkpoint
@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run2")
    make_class_folders(root / "data" / "train", ["red", "blue"], 4, size=24, seed=1)
    make_class_folders(root / "data" / "val", ["red", "blue"], 2, size=24, seed=2)
    result = dinotune.train(task="classify", data=str(root / "data"), **tiny_options(root / "run", epochs=1))
    return Path(result["run_dir"])


@pytest.fixture
def three_class_folder(tmp_path) -> Path:
    return make_class_folders(tmp_path / "three", ["red", "green", "blue"], 2, size=24)


def test_eval_class_count_mismatch_api(two_class_run, three_class_folder):
    with pytest.raises(DataError) as e:
        dinotune.evaluate(two_class_run, data=str(three_class_folder), device="cpu")
    msg = str(e.value)
    assert "2 classes" in msg and "3 classes" in msg and str(three_class_folder) in msg


def test_eval_class_count_mismatch_cli(two_class_run, three_class_folder, capsys):
    code = main(["eval", str(two_class_run), "--data", str(three_class_folder), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "dinotune: error:" in err and "2 classes" in err and "3 classes" in err
    assert "Traceback" not in err


def test_eval_matching_classes_works(two_class_run, tmp_path):
    folder = make_class_folders(tmp_path / "same", ["red", "blue"], 2, size=24, seed=7)
    metrics = dinotune.evaluate(two_class_run, data=str(folder), device="cpu")
    assert metrics["count"] == 4 and 0.0 <= metrics["top1"] <= 1.0


# --------------------------------------------------------------------------- options and models
def test_unknown_model_lists_choices():
    with pytest.raises(BackboneLoadError) as e:
        load_dinov2("foo")
    msg = str(e.value)
    assert "'foo'" in msg and "facebook/dinov2-small" in msg and "random:tiny" in msg and ".pth" in msg


def test_unknown_random_size_lists_choices():
    with pytest.raises(BackboneLoadError) as e:
        load_dinov2("random:huge")
    msg = str(e.value)
    assert "'huge'" in msg
    for spec in ("random:tiny", "random:small", "random:base", "random:large", "random:giant", "random:small-reg4"):
        assert spec in msg


def test_unknown_adapter_cli_lists_choices(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "classify", "--data", str(tiny_folder), "--adapter", "bogus", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "--adapter" in err
    for choice in ("none", "lora", "dora", "full"):
        assert choice in err
    assert not (tmp_path / "r").exists()


def test_unknown_adapter_config_lists_choices():
    with pytest.raises(ConfigError) as e:
        build_config("classify", adapter="bogus")
    msg = str(e.value)
    assert "adapter.kind" in msg and "bogus" in msg
    for choice in ("none", "lora", "dora", "full"):
        assert choice in msg


def test_image_size_not_multiple_of_patch(tmp_path):
    # the patch size is the backbone's own: checked when it is built, before any folder is made
    with pytest.raises(ConfigError) as e:
        DinoBackbone.from_spec("random:tiny").check_image_size(225, "backbone.image_size")
    msg = str(e.value)
    assert "backbone.image_size=225" in msg and "patch size 14" in msg and "224" in msg and "238" in msg
    with pytest.raises(ConfigError, match="224 or 238"):
        dinotune.train(task="classify", **tiny_options(tmp_path / "run", image_size=225, data="unused"))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- hub fail-fast
def _empty_hf_home(monkeypatch, tmp_path: Path) -> None:
    """An empty Hugging Face cache. huggingface_hub reads HF_HOME / HF_HUB_CACHE once, at import
    (``huggingface_hub.constants``), so the module constant is pointed at the empty folder too;
    ``hub_reachable`` reads HF_ENDPOINT / HF_HUB_OFFLINE at call time."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))


def _assert_hub_hint(msg: str) -> None:
    assert "facebook/dinov2-small" in msg
    assert "--model DIR" in msg and "random:" in msg


def _closed_port() -> int:
    with socket.socket() as s:  # bind, learn the port, close: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    _empty_hf_home(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.monotonic()
    with pytest.raises(BackboneLoadError) as e:
        load_dinov2("facebook/dinov2-small")
    assert time.monotonic() - t0 < 10
    _assert_hub_hint(str(e.value))


def test_hub_offline_env_fails_fast(monkeypatch, tmp_path):
    _empty_hf_home(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(BackboneLoadError) as e:
        load_dinov2("facebook/dinov2-small")
    assert time.monotonic() - t0 < 10
    _assert_hub_hint(str(e.value))


def test_hub_unreachable_fails_fast_patched(monkeypatch, tmp_path):
    """The same without relying on environment variables: hub_reachable() says no."""
    _empty_hf_home(monkeypatch, tmp_path)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.monotonic()
    with pytest.raises(BackboneLoadError) as e:
        load_dinov2("facebook/dinov2-small")
    assert time.monotonic() - t0 < 10
    _assert_hub_hint(str(e.value))


def test_hub_reachable_reads_env_at_call_time(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    assert hub_reachable(timeout=2.0) is False
    assert time.monotonic() - t0 < 5
    with socket.socket() as server:  # and a port that does listen is reachable
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable(timeout=2.0) is True
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert hub_reachable(timeout=2.0) is False


# --------------------------------------------------------------------------- local HF folders
def test_local_hf_folder_loads(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=28, patch_size=14))
    model.save_pretrained(tmp_path / "dino")
    loaded = load_dinov2(str(tmp_path / "dino"))
    assert isinstance(loaded, Dinov2Model) and not loaded.training
    assert loaded.config.hidden_size == 32 and loaded.config.num_hidden_layers == 2
    expected = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_folder_without_config_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(BackboneLoadError) as e:
        load_dinov2(str(tmp_path / "weights"))
    msg = str(e.value)
    assert str(tmp_path / "weights") in msg and "config.json" in msg


def test_folder_with_other_model_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)).save_pretrained(tmp_path / "vit")
    with pytest.raises(BackboneLoadError) as e:
        load_dinov2(str(tmp_path / "vit"))
    msg = str(e.value)
    assert str(tmp_path / "vit") in msg and "'vit'" in msg and "not DINOv2" in msg
