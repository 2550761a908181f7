"""Round one of the hostile-input list (the first hardening review): pickles in run folders, paths
leaving their dataset, decompression bombs, broken images and symlinks, damaged checkpoints, saved
configs cut short, out-of-range flags, a full disk, data changed under a resumed run."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from hostile.common import FAST, case, classify_data, refused, run, trained_run, warned
from tests.conftest import make_coco_dataset, make_segmentation_folders


# ------------------------------------------------------------------------------------- security
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@case("1", "pickled trainer state with a payload, resumed")
def _(tmp: Path):
    data = classify_data(tmp)
    out = tmp / "run"
    code, err = run(["train", "classify", "--data", str(data), "--out", str(out), *FAST, "--epochs", "2"])
    last = out / "checkpoints" / "last"
    marker = tmp / "PAYLOAD_RAN"
    for f in last.glob("trainer_state*"):
        f.unlink()
    (last / "trainer_state.pt").write_bytes(pickle.dumps({"epoch": _Payload(marker)}))
    (last / "trainer_state.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    meta = json.loads((last / "meta.json").read_text())
    meta["epoch"] = 1  # make the run look unfinished, so resume reads the state
    (last / "meta.json").write_text(json.dumps(meta))
    code, err = run(["train", "--resume", str(out)])
    ok, why = refused(code, err, "trainer_state")
    return ok and not marker.exists(), ("PAYLOAD RAN; " if marker.exists() else "") + why


def _coco_with_file_name(tmp: Path, name: str) -> list[str]:
    root = make_coco_dataset(tmp / "coco", {"train": [1, 1], "val": [1]})
    ann = root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["images"][1]["file_name"] = name
    ann.write_text(json.dumps(data))
    return ["train", "detect", "--data", str(root), "--out", str(tmp / "run"), *FAST, "--image-size", "56"]


for _name, _path in (("../../../../etc/passwd", "../../../../etc/passwd"), ("../../x.jpg", "../../x.jpg"),
                     ("an absolute path", "/etc/hostname")):
    @case("2", f"COCO file_name {_name}")
    def _(tmp: Path, _path=_path):
        code, err = run(_coco_with_file_name(tmp, _path))
        return refused(code, err, "file_name", _path)


@case("2", "CSV row leaving the CSV's folder")
def _(tmp: Path):
    data = classify_data(tmp)
    csv = data / "list.csv"
    rows = [f"train/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(4)] + ["../outside.png,red"]
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    Image.new("RGB", (28, 28)).save(tmp / "outside.png")
    code, err = run(["train", "classify", "--data", str(csv), "--val-data", str(data / "val"), "--out",
                     str(tmp / "run"), *FAST])
    return refused(code, err, "list.csv", "../outside.png")


# --------------------------------------------------------------------------------------- images
@case("3", "16-bit PNG read as its values, not white")
def _(tmp: Path):
    from dinotune.data.images import load_image

    path = tmp / "deep.png"
    Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)).save(path)
    value = load_image(path).getpixel((0, 0))
    return value == (128, 128, 128), f"pixel {value}"


@case("4", "12000 x 12000 PNG (a decompression bomb) in a class folder")
def _(tmp: Path):
    data = classify_data(tmp)
    Image.new("1", (12000, 12000)).save(data / "train" / "red" / "bomb.png")
    code, err = run(["train", "classify", "--data", str(data), "--out", str(tmp / "run"), *FAST])
    return warned(code, err, "bomb.png", "pixels")


@case("4", "COCO width / height 20000 for a small image")
def _(tmp: Path):
    root = make_coco_dataset(tmp / "coco", {"train": [1, 1, 1], "val": [1]})
    ann = root / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["images"][0].update(width=20000, height=20000)
    ann.write_text(json.dumps(data))
    code, err = run(["train", "detect", "--data", str(root), "--out", str(tmp / "run"), *FAST, "--image-size", "56"])
    return warned(code, err, data["images"][0]["file_name"])


@case("5", "EXIF-rotated photo read upright")
def _(tmp: Path):
    from dinotune.data.images import load_image

    path = tmp / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.new("RGB", (100, 40), (200, 30, 30)).save(path, exif=exif)
    size = load_image(path).size
    return size == (40, 100), f"loaded as {size[0]} x {size[1]} (stored 100 x 40, EXIF orientation 6)"


@case("6", "broken and looping symlinks in a class folder")
def _(tmp: Path):
    data = classify_data(tmp)
    (data / "train" / "red" / "gone.png").symlink_to(tmp / "nowhere.png")
    loop = data / "train" / "blue" / "loop.png"
    loop.symlink_to(loop)
    code, err = run(["train", "classify", "--data", str(data), "--out", str(tmp / "run"), *FAST])
    a, why_a = warned(code, err, "gone.png", "broken symlink")
    b, why_b = warned(code, err, "loop.png", "loop")
    return a and b, f"{why_a} | {why_b}"


# ----------------------------------------------------------------------------------- data files
def _csv(tmp: Path, rows: list[str]) -> tuple[Path, Path]:
    data = classify_data(tmp)
    csv = data / "train.csv"
    csv.write_text("path,label\n" + "".join(r + "\n" for r in rows))
    return csv, data / "val"


@case("7", "duplicate CSV rows")
def _(tmp: Path):
    rows = [f"train/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(4)]
    csv, val = _csv(tmp, rows + rows[:2])
    code, err = run(["train", "classify", "--data", str(csv), "--val-data", str(val), "--out", str(tmp / "run"), *FAST])
    return warned(code, err, "train.csv", "repeat")


@case("7", "one image with two labels in a CSV")
def _(tmp: Path):
    rows = [f"train/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(4)] + ["train/red/red_0.png,blue"]
    csv, val = _csv(tmp, rows)
    code, err = run(["train", "classify", "--data", str(csv), "--val-data", str(val), "--out", str(tmp / "run"), *FAST])
    return refused(code, err, "red_0.png", "red", "blue")


@case("8", "header-only training CSV with a good --val-data")
def _(tmp: Path):
    csv, val = _csv(tmp, [])
    code, err = run(["train", "classify", "--data", str(csv), "--val-data", str(val), "--out", str(tmp / "run"), *FAST])
    return refused(code, err, "train.csv", "no rows")


def _seg_with_bad_mask(tmp: Path, label: int) -> Path:
    root = make_segmentation_folders(tmp / "seg", {"train": 6, "val": 2})
    mask = root / "train" / "masks" / "005.png"
    values = np.array(Image.open(mask)).astype(np.uint16)
    values[:4, :4] = label
    Image.fromarray(values if label > 255 else values.astype(np.uint8)).save(mask)
    return root


for _label in (77, 300):
    @case("9", f"segmentation mask with label {_label}, never in the first batch")
    def _(tmp: Path, _label=_label):
        root = _seg_with_bad_mask(tmp, _label)
        code, err = run(["train", "segment", "--data", str(root), "--out", str(tmp / "run"), *FAST,
                         "--num-classes", "3"])
        ok, why = refused(code, err, "005.png", str(_label))
        return ok and not (tmp / "run").exists(), why


@case("9", "an error inside a DataLoader worker (masks checked only when used, --workers 2)")
def _(tmp: Path):
    root = _seg_with_bad_mask(tmp, 77)
    argv = ["train", "segment", "--data", str(root), "--out", str(tmp / "run"), *FAST, "--check-images", "off",
            "--workers", "2", "--num-classes", "3", "--no-augment", "--batch-size", "2"]
    code, err = run(argv)
    ok, why = refused(code, err, "005.png", "77")
    return ok and "Original Traceback" not in err and "DataLoader worker" not in err, why


# ------------------------------------------------------------------------------------ arguments
_BAD = [("--lr", "-1"), ("--lr", "nan"), ("--lora-dropout", "2"), ("--label-smoothing", "2"), ("--workers", "-1"),
        ("--backbone-lr", "-1"), ("--weight-decay", "-1"), ("--grad-clip", "-1"), ("--alpha", "-5"),
        ("--warmup-epochs", "-1")]
for _flag, _value in _BAD:
    @case("10-11", f"{_flag} {_value}")
    def _(tmp: Path, _flag=_flag, _value=_value):
        code, err = run(["train", "classify", "--data", str(classify_data(tmp)), "--out", str(tmp / "run"), *FAST,
                         _flag, _value])
        ok, why = refused(code, err, _flag)
        return ok and not (tmp / "run").exists(), why


@case("10", "--out pointing at an existing file")
def _(tmp: Path):
    target = tmp / "notes.txt"
    target.write_text("mine")
    code, err = run(["train", "classify", "--data", str(classify_data(tmp)), "--out", str(target), *FAST])
    ok, why = refused(code, err, "--out", "is a file")
    return ok and target.read_text() == "mine", why


@case("10", "--out in a folder that cannot be written")
def _(tmp: Path):
    import dinotune.engine.run_folder as rf

    real = rf.os.access
    rf.os.access = lambda path, mode: False  # as root nothing is unwritable: pretend
    try:
        code, err = run(["train", "classify", "--data", str(classify_data(tmp)), "--out", str(tmp / "ro" / "run"),
                         *FAST])
    finally:
        rf.os.access = real
    return refused(code, err, "--out", "not writable")


@case("12", "--resume RUN with --data X")
def _(tmp: Path):
    out = trained_run(tmp)
    code, err = run(["train", "--resume", str(out), "--data", "X"])
    return refused(code, err, "--resume", "--data X")


@case("13", "a failed start leaves no folder behind")
def _(tmp: Path):
    csv, val = _csv(tmp, [])
    out = tmp / "out"
    run(["train", "classify", "--data", str(csv), "--val-data", str(val), "--out", str(out), *FAST])
    return not out.exists(), "nothing left at --out" if not out.exists() else f"left: {sorted(os.listdir(out))}"


# ------------------------------------------------------------------------- faults, run folders
@case("14", "killed between the checkpoint and the epoch's log line")
def _(tmp: Path):
    out = trained_run(tmp, epochs=2)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n")  # the epoch-2 line lost
    meta = out / "checkpoints" / "last" / "meta.json"
    record = json.loads(meta.read_text())
    record["epoch"] = 2
    meta.write_text(json.dumps(record))
    code, err = run(["train", "--resume", str(out)])
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return code == 0 and epochs == [1, 2], f"metrics.jsonl epochs after resume: {epochs}"


@case("15", "disk full while saving a checkpoint")
def _(tmp: Path):
    from dinotune.engine import checkpoint

    real = checkpoint.save_file  # every checkpoint file is written through it
    calls = {"n": 0}

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the first epoch's head and trainer state go through, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    checkpoint.save_file = full
    try:
        data = classify_data(tmp)
        code, err = run(["train", "classify", "--data", str(data), "--out", str(tmp / "run"), *FAST, "--epochs", "2",
                         "--adapter", "none"])
    finally:
        checkpoint.save_file = real
    leftovers = [p.name for p in (tmp / "run" / "checkpoints").glob(".*.tmp")]
    ok, why = refused(code, err, "no space left on device")
    return ok and not leftovers, why + (f"; left {leftovers}" if leftovers else "")


@case("16", "two resumes of one run at once")
def _(tmp: Path):
    from dinotune.engine.run_folder import RunFolder

    out = trained_run(tmp)
    holder = RunFolder.reopen(out)
    try:
        code, err = run(["train", "--resume", str(out)])
    finally:
        holder.release()
    return refused(code, err, "in use by process")


for _file in ("head.safetensors", "meta.json", "trainer_state.safetensors"):
    @case("17", f"truncated {_file}")
    def _(tmp: Path, _file=_file):
        out = trained_run(tmp, epochs=2)
        path = out / "checkpoints" / "last" / _file
        data = path.read_bytes()
        path.unlink()  # a new, shorter file (best shares the old one through a hard link)
        path.write_bytes(data[: len(data) // 2])
        if _file == "trainer_state.safetensors":
            meta = out / "checkpoints" / "last" / "meta.json"
            record = json.loads(meta.read_text())
            record["epoch"] = 1
            meta.write_text(json.dumps(record))
            code, err = run(["train", "--resume", str(out)])
        else:
            code, err = run(["eval", str(out), "--data", str(out.parent / "data"), "--checkpoint", "last",
                             "--device", "cpu"])
        return refused(code, err, _file)


@case("18", "a saved config cut down to a few keys")
def _(tmp: Path):
    out = trained_run(tmp)
    cfg = out / "checkpoints" / "best" / "config.yaml"
    cfg.write_text("task: classify\nbackbone:\n  model: random:tiny\n")
    code, err = run(["eval", str(out), "--data", str(out.parent / "data"), "--device", "cpu"])
    return refused(code, err, "config.yaml", "lacks")


@case("19", "the training data changed under a resumed run")
def _(tmp: Path):
    out = trained_run(tmp, epochs=2)
    meta = out / "checkpoints" / "last" / "meta.json"
    record = json.loads(meta.read_text())
    record["epoch"] = 1
    meta.write_text(json.dumps(record))
    image = next((out.parent / "data" / "train" / "red").iterdir())
    os.utime(image, (1, 1))
    code, err = run(["train", "--resume", str(out)])
    return warned(code, err, "training data changed")
