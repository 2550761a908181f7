"""Classification data: class-folder trees, CSV files, Hugging Face datasets -> one sample format.

Every source becomes a dataset whose items are ``{"image": C x H x W float tensor, "label": int}``
(``C`` = 3 for pictures, the band count for ``.npy`` / multi-band TIFF band arrays).
Class indices follow the sorted class names of the training data; evaluation data is mapped onto
those names, so a checkpoint and a dataset that disagree are caught by name, not by accident.
The input (band count, RGB bands, per-band statistics) is decided from the training files
(``data.bands.resolve_input_spec``); validation and evaluation files must fit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch.utils.data import Dataset

from dinotune.config import BandsConfig, ConfigError
from dinotune.data.arrays import BandLayout
from dinotune.data.bands import InputSpec, check_inputs, input_bands, make_spec, read_input, resolve_input_spec
from dinotune.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageReadError,
    SkipReport,
    list_image_files,
    scan_images,
    symlink_problem,
    to_rgb,
    upright_image,
)
from dinotune.data.image_lists import read_labelled_csv
from dinotune.data.splits import SPLIT_ALIASES, split_dirs, subset_indices
from dinotune.errors import DataError
from dinotune.utils import info, warn

VAL_DIRS = SPLIT_ALIASES["val"]



@dataclass
class Samples:
    """A list of ``(image path, class index)`` with the class names it indexes into."""

    items: list[tuple[Path, int]]
    class_names: list[str]
    source: str
    report: SkipReport = field(default_factory=SkipReport)


class ImageListDataset(Dataset):
    """Images (pictures or band arrays) from paths. A file that fails to decode at run time (or is
    over ``max_image_pixels``, or has another band count than ``bands``) is reported once and
    replaced by the next readable sample, so one bad file never stops an epoch."""

    def __init__(self, items: list[tuple[Path, int]], transform: Callable,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, layout: BandLayout = "auto",
                 bands: int | None = None):
        self.items = items
        self.transform = transform
        self.max_image_pixels = max_image_pixels  # held here so DataLoader workers get it too
        self.layout = layout
        self.bands = bands
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.items)):
            i = (index + offset) % len(self.items)
            if i in self._bad:
                continue
            path, label = self.items[i]
            try:
                image = read_input(path, self.max_image_pixels, self.layout)
                if self.bands is not None and input_bands(image) != self.bands:
                    raise ImageReadError(f"{path}: has {input_bands(image)} band(s), the model takes {self.bands}")
            except ImageReadError as exc:
                self._bad.add(i)
                warn(f"skipped {exc} (replaced by another sample)")
                continue
            return {"image": self.transform(image), "label": label, "index": i}
        raise DataError("no image in the dataset could be decoded")


class HFImageDataset(Dataset):
    """A Hugging Face ``datasets.Dataset`` with an image column and an integer label column."""

    def __init__(self, ds: Any, image_column: str, label_column: str, transform: Callable,
                 label_map: dict[int, int] | None = None):
        self.ds = ds
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.ds[index]
        label = int(row[self.label_column])
        if self.label_map is not None:
            label = self.label_map[label]
        image = to_rgb(upright_image(row[self.image_column]))  # upright, as files are read
        return {"image": self.transform(image), "label": label, "index": index}


# ----------------------------------------------------------------------------- class-folder trees
def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_class_folders(root: Path, class_names: list[str] | None = None) -> Samples:
    """``root/<class>/*`` -> samples. With ``class_names`` given, folders map onto those names."""
    report = SkipReport()
    dirs = _class_dirs(root)
    per_class = {d.name: list_image_files(d, report, recursive=True) for d in dirs}
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            report.add(p, "file outside any class folder")
        elif problem := symlink_problem(p):
            report.add(p, problem)
    if class_names is None:
        for name, files in per_class.items():
            if not files:
                warn(f"{root / name}: class folder has no images; the class is left out")
        class_names = [n for n, files in per_class.items() if files]
    else:
        unknown = [n for n in per_class if per_class[n] and n not in class_names]
        if unknown:
            raise DataError(
                f"{root}: class folder(s) {', '.join(unknown)} are not among the training classes "
                f"({', '.join(class_names)})"
            )
    index = {n: i for i, n in enumerate(class_names)}
    items = [(p, index[n]) for n, files in per_class.items() if n in index for p in files]
    return Samples(items, class_names, str(root), report)


# --------------------------------------------------------------------------------------- CSV files
def read_csv(path: Path, class_names: list[str] | None, image_column: str = "", label_column: str = "") -> Samples:
    """A CSV with a header row and a path and a label column (``dinotune.data.image_lists``), its
    labels mapped onto ``class_names`` (the sorted labels, numerically when all are integers, when
    None). A label outside ``class_names`` is refused."""
    pairs, report = read_labelled_csv(path, image_column, label_column)
    if class_names is None:
        labels = {lab for _, lab in pairs}
        numeric = all(lab.lstrip("-").isdigit() for lab in labels)
        class_names = sorted(labels, key=int) if numeric else sorted(labels)
    index = {n: i for i, n in enumerate(class_names)}
    unknown = sorted({lab for _, lab in pairs if lab not in index})
    if unknown:
        raise DataError(f"{path}: labels {', '.join(unknown[:10])} are not among the training classes "
                        f"({', '.join(class_names)})")
    return Samples([(p, index[lab]) for p, lab in pairs], class_names, str(path), report)


# ------------------------------------------------------------------------------ Hugging Face data
def is_hf_dataset_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def load_hf(spec: str, split: str) -> Any:
    """A split of a ``save_to_disk`` folder or of a hub dataset named ``hf:NAME``."""
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the extra: pip install 'dinotune[datasets]'") from None
    if spec.startswith("hf:"):
        name = spec[3:]
        try:
            return datasets.load_dataset(name, split=split)
        except Exception as exc:  # network, missing split, unknown name: all arrive as different types
            raise DataError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {exc}") from None
    loaded = datasets.load_from_disk(spec)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{spec}: no split {split!r} (splits: {', '.join(loaded)})")
        return loaded[split]
    return loaded


def hf_columns(ds: Any, image_column: str, label_column: str, where: str) -> tuple[str, str, list[str]]:
    """Find the image and class-label columns and the class names of a datasets.Dataset."""
    import datasets

    feats = ds.features
    img = image_column or next((k for k, f in feats.items() if isinstance(f, datasets.Image)), "")
    lab = label_column or next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), "")
    if img not in feats:
        raise DataError(f"{where}: no image column (columns: {', '.join(feats)}); pass --image-column")
    if lab not in feats:
        raise DataError(f"{where}: no class-label column (columns: {', '.join(feats)}); pass --label-column")
    feature = feats[lab]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        names = [str(v) for v in sorted(set(ds[lab]))]
    return img, lab, names


# -------------------------------------------------------------------------------------- top level
@dataclass
class ClassificationData:
    train: Dataset | None
    val: Dataset | None
    class_names: list[str]
    report: SkipReport
    spec: InputSpec = field(default_factory=InputSpec)


def _hf_spec(bands: BandsConfig) -> InputSpec:
    """Hugging Face image columns are pictures: RGB, ImageNet statistics unless given."""
    if bands.stats == "data" and not bands.mean:
        raise ConfigError("--band-stats data computes statistics from image files; a Hugging Face dataset is "
                          "normalised with ImageNet's, or with --band-mean / --band-std")
    if bands.in_channels not in (0, 3):
        raise ConfigError(f"--in-channels {bands.in_channels}: a Hugging Face dataset's images are read as RGB (3)")
    return make_spec(3, rgb_bands=bands.rgb_bands, mean=bands.mean, std=bands.std)


def _samples_for(path: Path, class_names: list[str] | None, image_column: str, label_column: str) -> Samples:
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return read_csv(path, class_names, image_column, label_column)
    if path.is_dir():
        return read_class_folders(path, class_names)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    raise DataError(f"{path}: expected a class-folder tree, a CSV file or a save_to_disk folder")


def _split_dirs(root: Path) -> tuple[Path | None, Path | None]:
    found = split_dirs(root)
    return found.get("train"), found.get("val")


def _check(samples: Samples, what: str, need_classes: bool = True) -> None:
    if not samples.items:
        raise DataError(
            f"{samples.source}: no readable images for {what} (expected <class>/<image> folders, "
            "or a CSV of path,label)"
        )
    present = {label for _, label in samples.items}
    if need_classes and len(present) < 2:
        only = samples.class_names[next(iter(present))]
        raise DataError(
            f"{samples.source}: only one class ({only!r}) in the {what} data; classification needs "
            "at least two"
        )


def _scan(samples: Samples, mode: Literal["full", "fast", "off"],
          max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, layout: BandLayout = "auto") -> Samples:
    ok = scan_images([p for p, _ in samples.items], samples.report, mode, max_pixels=max_pixels, layout=layout)
    samples.items = [s for s, good in zip(samples.items, ok) if good]
    return samples


def build_classification_data(
    *,
    data: str,
    val_data: str = "",
    val_fraction: float = 0.0,
    train_split: str = "train",
    val_split: str = "validation",
    image_column: str = "",
    label_column: str = "",
    check_images: Literal["full", "fast", "off"] = "full",
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    seed: int = 0,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    bands: BandsConfig | None = None,
    make_transforms: Callable[[InputSpec], tuple[Callable, Callable]] | None = None,
    class_names: Sequence[str] = (),
    subset: int = 0,
    val_subset: int = 0,
    subset_seed: int = 0,
) -> ClassificationData:
    """Read training (and validation) data from any supported source, check every image, and
    report what was skipped. Raises DataError on empty, one-class or inconsistent data.
    ``max_image_pixels``: larger images are skipped and reported, never decoded (0 = no limit).

    The input (``ClassificationData.spec``: band count, RGB bands, per-band statistics) is decided
    from the checked training files under ``bands`` (defaults: pictures as RGB with ImageNet
    statistics, band arrays with their own); ``make_transforms(spec)`` then gives the training and
    evaluation transforms (else ``train_transform`` / ``eval_transform`` are used as given).

    ``class_names``: train on these classes only, in this order (the others' images are left out);
    ``subset`` / ``val_subset``: a reproducible random subset of that many training / validation
    images (``subset_seed``), drawn before the images are checked."""
    if not data:
        raise DataError("no training data given (--data DIR, CSV or dataset)")
    bands = bands or BandsConfig()
    root = Path(data).expanduser()
    if data.startswith("hf:") or is_hf_dataset_folder(root):
        spec = _hf_spec(bands)
        if make_transforms is not None:
            train_transform, eval_transform = make_transforms(spec)
        if class_names or subset or val_subset:
            raise DataError(f"{data}: --class-names, --subset and --val-subset apply to class folders and CSVs; "
                            "select a Hugging Face dataset's classes or rows with datasets' own filter / select")
        return _build_hf(data, val_data, train_split, val_split, image_column, label_column,
                         train_transform, eval_transform)
    train_dir, val_dir = _split_dirs(root) if root.is_dir() else (None, None)
    train = _samples_for(train_dir or root, None, image_column, label_column)
    if not train.items:  # before the validation data is read against its (empty) class list
        train.report.print("files")
        _check(train, "training")
    if val_data:
        val = _samples_for(Path(val_data).expanduser(), train.class_names, image_column, label_column)
    elif val_dir is not None:
        val = read_class_folders(val_dir, train.class_names)
    else:
        val = None
    if class_names:
        train, val = _only_classes(train, class_names), _only_classes(val, class_names) if val else None
    train = _subset(train, subset, subset_seed, "--subset")
    val = _subset(val, val_subset, subset_seed, "--val-subset") if val else None
    report = SkipReport(train.report.skipped + (val.report.skipped if val else []))
    train.report = report  # before the scan, so bad training images land in the printed report
    train = _scan(train, check_images, max_image_pixels, bands.layout)
    if val is not None:
        val.report = report
        val = _scan(val, check_images, max_image_pixels, bands.layout)
    report.print("files")
    _check(train, "training")
    held_out = val is None and val_fraction > 0
    if held_out:
        train, val = _holdout(train, val_fraction, seed)
    # statistics from the training files only (a held-out validation part is not looked at)
    spec = resolve_input_spec([p for p, _ in train.items], in_channels=bands.in_channels, rgb_bands=bands.rgb_bands,
                              layout=bands.layout, stats=bands.stats, mean=bands.mean, std=bands.std,
                              max_pixels=max_image_pixels)
    if val is not None:
        check_inputs([p for p, _ in val.items], spec, "validation")
        _check(val, "validation", need_classes=False)
    info(f"classes ({len(train.class_names)}): {', '.join(train.class_names[:20])}"
         + (" ..." if len(train.class_names) > 20 else ""))
    info(f"images: {len(train.items)} train" + (f", {len(val.items)} val" if val else ", no validation set"))
    if spec.arrays:
        info(f"band arrays: {spec.in_channels} band(s), RGB bands {spec.rgb_bands}, per-band statistics "
             f"{'given' if bands.mean else 'from the training data'}")
    if make_transforms is not None:
        train_transform, eval_transform = make_transforms(spec)
    return ClassificationData(
        ImageListDataset(train.items, train_transform, max_image_pixels, spec.layout, spec.in_channels),
        ImageListDataset(val.items, eval_transform, max_image_pixels, spec.layout, spec.in_channels) if val else None,
        train.class_names,
        report,
        spec,
    )


def _only_classes(samples: Samples, names: Sequence[str]) -> Samples:
    """``samples`` of the classes ``names`` only, relabelled in that order; a name the data does not
    have is refused naming the ones it has."""
    missing = [n for n in names if n not in samples.class_names]
    if missing:
        raise DataError(f"{samples.source}: no class {', '.join(map(repr, missing))} (--class-names); it has "
                        f"{', '.join(samples.class_names[:30])}")
    if len(set(names)) != len(names):
        raise DataError(f"--class-names names a class twice: {', '.join(names)}")
    index = {samples.class_names.index(n): i for i, n in enumerate(names)}
    items = [(p, index[c]) for p, c in samples.items if c in index]
    left_out = len(samples.items) - len(items)
    if left_out:
        info(f"{samples.source}: {left_out} image(s) of the other {len(samples.class_names) - len(names)} classes "
             "left out (--class-names)")
    return Samples(items, list(names), samples.source, samples.report)


def _subset(samples: Samples, n: int, seed: int, flag: str) -> Samples:
    """A reproducible random subset of ``n`` of ``samples``' items (``subset_indices``: the subset
    of a seed holds that of any smaller ``n``); all of them for ``n`` 0 or above their count."""
    if not n or n >= len(samples.items):
        return samples
    picked = subset_indices(len(samples.items), n, seed)
    info(f"{samples.source}: {flag} {n} of {len(samples.items)} images (seed {seed})")
    return Samples([samples.items[i] for i in picked], samples.class_names, samples.source, samples.report)


def _holdout(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Stratified hold-out: ``fraction`` of each class (at least one image) goes to validation."""
    gen = torch.Generator().manual_seed(seed)
    train_items, val_items = [], []
    for c in range(len(samples.class_names)):
        items = [s for s in samples.items if s[1] == c]
        order = torch.randperm(len(items), generator=gen).tolist()
        n_val = min(len(items) - 1, max(1, round(fraction * len(items)))) if len(items) > 1 else 0
        val_items += [items[i] for i in order[:n_val]]
        train_items += [items[i] for i in order[n_val:]]
    return (Samples(train_items, samples.class_names, samples.source, samples.report),
            Samples(val_items, samples.class_names, f"{samples.source} (held out)", samples.report))


def _build_hf(data, val_data, train_split, val_split, image_column, label_column,
              train_transform, eval_transform) -> ClassificationData:
    train_ds = load_hf(data, train_split)
    img, lab, names = hf_columns(train_ds, image_column, label_column, data)
    if len(names) < 2:
        raise DataError(f"{data}: only {len(names)} class(es) {names}; classification needs at least two")
    if len(train_ds) == 0:
        raise DataError(f"{data}: split {train_split!r} is empty")
    val_ds = None
    try:
        val_ds = load_hf(val_data or data, val_split)
    except DataError as exc:
        if val_data:
            raise
        info(f"no validation split: {exc}")
    label_map = None
    if val_ds is not None:
        vimg, vlab, vnames = hf_columns(val_ds, image_column, label_column, val_data or data)
        missing = [n for n in vnames if n not in names]
        if missing:
            raise DataError(f"{val_data or data}: validation classes {missing} are not among the training classes")
        label_map = {i: names.index(n) for i, n in enumerate(vnames)}
    info(f"classes ({len(names)}): {', '.join(names[:20])}")
    return ClassificationData(
        HFImageDataset(train_ds, img, lab, train_transform),
        HFImageDataset(val_ds, vimg, vlab, eval_transform, label_map) if val_ds is not None else None,
        names,
        SkipReport(),
    )


def build_eval_dataset(
    data: str, class_names: list[str], transform: Callable, *, split: str = "val",
    image_column: str = "", label_column: str = "", hf_split: str = "validation",
    check_images: Literal["full", "fast", "off"] = "full", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    spec: InputSpec | None = None,
) -> Dataset:
    """Evaluation data mapped onto a checkpoint's classes. A folder with train/ and val/ (and test/)
    is read from its ``split`` folder; a plain class-folder tree or CSV is used whole. A Hugging Face
    dataset is read from ``hf_split``, or its ``test`` split for ``split="test"``. Its files must fit
    the checkpoint's input ``spec`` (kind and band count; default: RGB pictures)."""
    spec = spec or InputSpec()
    root = Path(data).expanduser()
    if data.startswith("hf:") or is_hf_dataset_folder(root):
        ds = load_hf(data, "test" if split == "test" else hf_split)
        img, lab, names = hf_columns(ds, image_column, label_column, data)
        _check_class_names(names, class_names, data)
        return HFImageDataset(ds, img, lab, transform, {i: class_names.index(n) for i, n in enumerate(names)})
    if root.is_dir():
        train_dir, val_dir = _split_dirs(root)
        if split == "test" and not (root / "test").is_dir() and (train_dir or val_dir):
            raise DataError(f"{root}: no test/ folder beside {(train_dir or val_dir).name}/ (--split test reads "
                            f"{root / 'test'})")
        test_dir = root / "test" if split == "test" and (root / "test").is_dir() else None
        root = {"train": train_dir, "val": val_dir, "test": test_dir}.get(split) or root
    samples = _samples_for(root, None, image_column, label_column)
    _check_class_names(samples.class_names, class_names, str(root))
    remap = [class_names.index(n) for n in samples.class_names]
    samples.items = [(p, remap[label]) for p, label in samples.items]
    samples = _scan(samples, check_images, max_image_pixels, spec.layout)
    samples.report.print("files")
    _check(samples, "evaluation", need_classes=False)
    check_inputs([p for p, _ in samples.items], spec, "evaluation")
    return ImageListDataset(samples.items, transform, max_image_pixels, spec.layout, spec.in_channels)


def _check_class_names(found: list[str], expected: list[str], where: str) -> None:
    if len(found) != len(expected):
        raise DataError(
            f"the checkpoint was trained for {len(expected)} classes ({', '.join(expected[:10])}) "
            f"but {where} has {len(found)} classes ({', '.join(found[:10])})"
        )
    unknown = [n for n in found if n not in expected]
    if unknown:
        raise DataError(f"{where}: classes {', '.join(unknown)} are not among the checkpoint's classes "
                        f"({', '.join(expected[:10])})")
