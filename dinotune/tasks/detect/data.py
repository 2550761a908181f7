"""Detection data: find a split (COCO folder / JSON, a Roboflow COCO split folder, YOLO folder,
Pascal VOC XML folder), subsets, the torch Dataset and its collate. Items and batches follow the
contract in ``dinotune/tasks/detect/__init__.py``.

Readers live in ``coco.py`` (also the in-memory ``DetectionSource``), ``yolo.py`` and ``voc.py``;
everything is re-exported here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from dinotune.data.coco import find_coco_json, load_json
from dinotune.data.bands import InputSpec, input_bands, read_input
from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS, header_size, scan_images
from dinotune.data.splits import SPLIT_ALIASES, subset_indices
from dinotune.errors import DataError, ImageReadError
from dinotune.ops import box_ops
from dinotune.tasks.detect.coco import (
    Annotation,
    DetectionReport,
    DetectionSource,
    ImageRecord,
    read_coco,
)
from dinotune.tasks.detect.transforms import resize_pad, to_input
from dinotune.tasks.detect.voc import find_voc_root, read_voc
from dinotune.tasks.detect.yolo import find_yaml, read_yolo
from dinotune.utils import warn, write_json

__all__ = [
    "ImageRecord", "Annotation", "DetectionReport", "DetectionSource", "read_coco", "read_yolo", "read_voc",
    "find_detection_data", "locate_detection_data", "scan_source", "size_mismatch", "choose_subset", "restrict",
    "write_subset_file", "read_subset_file", "DetectionDataset", "detection_collate", "describe", "class_table",
]

_MAX_FACTOR = 8.0  # an annotation size at most this many times the file's (or 1/8 of it) is a rescale
ROBOFLOW_JSON = "_annotations.coco.json"  # what a Roboflow COCO export writes into each split folder


# ------------------------------------------------------------------------------------ finding data
def find_detection_data(
    data: str | Path,
    split: Literal["train", "val", "test"],
    images: str | Path = "",
    *,
    categories: list[dict[str, Any]] | None = None,
    min_box_size: float,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> DetectionSource:
    """One split of: a COCO instances JSON; a YOLO folder or its ``data.yaml``; a folder holding
    Roboflow's ``_annotations.coco.json`` (the folder is the split); a COCO folder
    (``annotations/instances_<split>*.json``, or Roboflow's ``<split>/_annotations.coco.json``;
    val also matches valid / validation); a Pascal VOC XML folder (``voc.py``; ``val_fraction`` and
    ``seed`` hold out validation images when it has no split lists). ``images``: the image folder
    of a COCO JSON (found next to it when empty). ``categories``: the training split's or a
    checkpoint's list to map onto."""
    kind, path = locate_detection_data(data, split)
    if kind == "coco":
        return read_coco(path, images or None, categories, min_box_size)
    if kind == "yolo":
        return read_yolo(path, split, categories, min_box_size)
    return read_voc(path, split, categories, min_box_size, val_fraction=val_fraction, seed=seed)


def locate_detection_data(data: str | Path, split: Literal["train", "val", "test"], what: str = "detection"
                          ) -> tuple[Literal["coco", "yolo", "voc"], Path]:
    """Which format ``data`` is in and the path its reader takes, by ``find_detection_data``'s
    rules: ``("coco", the JSON file)``, ``("yolo", the data.yaml or its folder)`` or ``("voc", the
    VOC root)``. DataError when nothing is found (``what`` names the data in the message), or when a
    Roboflow split folder is read as another split."""
    if split not in SPLIT_ALIASES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_ALIASES)}, got {split!r}")
    path = Path(data).expanduser()
    if not str(data):
        raise DataError(f"no {what} data given")
    if not path.exists():
        raise DataError(f"{what} data not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco", path
        if path.suffix.lower() in (".yaml", ".yml"):
            return "yolo", path
        raise DataError(f"{path}: expected a COCO instances .json, a YOLO data.yaml or a folder holding one "
                        "(or a Pascal VOC folder with Annotations/*.xml)")
    if find_yaml(path) is not None:
        return "yolo", path
    if (path / ROBOFLOW_JSON).is_file():
        _check_split_folder(path, split)
        return "coco", path / ROBOFLOW_JSON
    found, looked = find_coco_json(path, split)
    if found is not None:
        return "coco", found
    voc = find_voc_root(path)
    if voc is not None:
        return "voc", voc
    raise DataError(
        f"{path}: no {split} {what} data found; looked for a YOLO data.yaml, a {ROBOFLOW_JSON} in the folder, "
        f"COCO files {', '.join(looked)} and Pascal VOC Annotations/*.xml" + _parent_hint(path)
    )


def _split_of_folder(path: Path) -> str | None:
    """The split a folder's name says it is (``train``, ``valid`` -> ``val``, ``test``), or None."""
    return next((s for s, names in SPLIT_ALIASES.items() if path.name.lower() in names), None)


def _check_split_folder(path: Path, split: str) -> None:
    """A folder holding a Roboflow ``_annotations.coco.json`` is one split of an export. Read for
    another split than its name says (``export/train`` for validation), it would score a model on
    the images it was trained on, or call test images validation: refused, naming the ways out."""
    own = _split_of_folder(path)
    if own is None or own == split:
        return
    sibling = next((path.parent / a for a in SPLIT_ALIASES[split] if (path.parent / a / ROBOFLOW_JSON).is_file()),
                   None)
    ways = [f"eval --split {own} reads this folder itself" if own != "train" else
            "training reads it, eval --split train too"]
    if sibling is not None:
        ways.insert(0, f"the export's {split} split is {sibling} (pass it, or the export folder {path.parent} "
                       "as --data to read every split)")
    raise DataError(f"{path}: this folder is the {own} split of an export (it holds {ROBOFLOW_JSON}), not its "
                    f"{split} split; " + "; ".join(ways))


def _parent_hint(path: Path) -> str:
    """When ``path`` looks like one split folder of an export (``export/train``), where the export's
    own description is: its ``data.yaml``, or the split folders beside ``path``."""
    yaml = find_yaml(path.parent)
    if yaml is not None:
        return (f". {path} looks like one split of a YOLO export: its {yaml.name} is in the folder above; pass "
                f"--data {path.parent} (the yaml names every split)")
    if _split_of_folder(path) is not None and any((path.parent / d / ROBOFLOW_JSON).is_file()
                                                  for names in SPLIT_ALIASES.values() for d in names):
        return f". {path} looks like one split of a Roboflow COCO export; pass --data {path.parent}"
    return ""


def scan_source(source: DetectionSource, mode: Literal["full", "fast", "off"],
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DetectionSource:
    """``source`` without the images that do not decode (``full``), whose header is broken
    (``fast``), that have more than ``max_pixels`` pixels (never decoded), or whose file size
    disagrees with the annotation's beyond a plausible rescale (``size_mismatch``); each one is
    named with its reason in ``source.report.skipped``. Plausible rescales are kept (the dataset
    rescales the boxes) and listed in a warning."""
    if mode == "off":
        return source
    paths = [im.path for im in source.images]
    ok = scan_images(paths, source.report.skipped, mode, max_pixels=max_pixels)
    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = list(pool.map(lambda p_ok: header_size(p_ok[0]) if p_ok[1] else None, zip(paths, ok)))
    rescaled = []
    for i, (im, size) in enumerate(zip(source.images, sizes)):
        if size is None or size == (im.width, im.height):
            continue
        problem = size_mismatch(size, (im.width, im.height))
        if problem:
            ok[i] = False
            source.report.skipped.add(im.path, problem)
        else:
            rescaled.append(f"{im.path.name} ({size[0]}x{size[1]}, annotated as {im.width}x{im.height})")
    if rescaled:
        warn(f"{source.name}: {len(rescaled)} image file(s) differ in size from their annotation by a plausible "
             "factor; their boxes are rescaled to the file: " + "; ".join(rescaled[:5])
             + (" ..." if len(rescaled) > 5 else ""))
    if all(ok):
        return source
    return source.with_images([im for im, good in zip(source.images, ok) if good])


def size_mismatch(file_size: tuple[int, int], annotated: tuple[int, int]) -> str | None:
    """None when an image file of ``file_size`` can stand for one annotated at ``annotated``
    (both ``(width, height)``): the same aspect ratio within 1% (or a pixel of rounding) and a
    factor within [1/8, 8]; the boxes are then rescaled by it. Otherwise why the image is skipped:
    the annotation is for another picture, or a huge size claimed to blow up memory."""
    (fw, fh), (aw, ah) = file_size, annotated
    if aw <= 0 or ah <= 0:
        return f"the annotation gives the image the size {aw}x{ah}, which is empty"
    rx, ry = fw / aw, fh / ah
    same_aspect = abs(ah * rx - fh) <= max(1.0, 0.01 * fh) or abs(aw * ry - fw) <= max(1.0, 0.01 * fw)
    if same_aspect and 1 / _MAX_FACTOR <= rx <= _MAX_FACTOR and 1 / _MAX_FACTOR <= ry <= _MAX_FACTOR:
        return None
    why = (f"the image file is {fw}x{fh} but its annotation says {aw}x{ah}"
           + (f" (x{rx:.3g} wide, x{ry:.3g} high)" if same_aspect else " (a different aspect ratio)"))
    if (fw, fh) == (ah, aw):
        why += ("; width and height are swapped: images are read upright (EXIF orientation applied) "
                "and annotations must be in that displayed frame")
    return why + "; not a plausible rescale, so its boxes cannot be trusted"


# ------------------------------------------------------------------------------------------ subsets
def choose_subset(source: DetectionSource, n: int, seed: int) -> list[int]:
    """``n`` image ids drawn reproducibly (a seeded permutation of the sorted ids; the ``n`` images
    of a seed include those of any smaller ``n``), returned sorted. ``n`` >= the size: all ids."""
    ids = sorted(source.image_ids)
    return sorted(ids[i] for i in subset_indices(len(ids), n, seed))


def restrict(source: DetectionSource, ids: list[int], where: str = "") -> DetectionSource:
    """``source`` with only the images ``ids`` (in the source's order); ids it lacks are an error
    naming ``where`` (e.g. the subset file)."""
    present = set(source.image_ids)
    missing = [i for i in ids if i not in present]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{where or 'subset'}: {len(missing)} image id(s) are not in {source.name}: {shown}")
    wanted = set(ids)
    return source.with_images([im for im in source.images if im.id in wanted])


def write_subset_file(path: str | Path, ids: list[int], meta: dict[str, Any] | None = None) -> None:
    """``{"image_ids": [...], **meta}`` (meta: seed, n, source) as JSON, written atomically."""
    write_json(Path(path), {"image_ids": [int(i) for i in ids], **(meta or {})})


def read_subset_file(path: str | Path) -> list[int]:
    """The image ids of a subset file written by ``write_subset_file``."""
    path = Path(path).expanduser()
    data = load_json(path)
    ids = data.get("image_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{path}: expected {{\"image_ids\": [integers], ...}} (a subset file from an earlier run)")
    return ids


# ------------------------------------------------------------------------------------------ dataset
class DetectionDataset(Dataset):
    """``(image, target)`` items per the detection contract. ``transform`` takes and returns
    ``(tv_tensors.Image, {"boxes": BoundingBoxes xyxy, "labels": int64})`` (``train_transforms`` or
    ``eval_transforms``); the resize to ``image_size`` and the pad follow. ``pre_transform`` (PIL ->
    PIL of the same size, e.g. a corruption) runs on the decoded image before everything else. A file
    that fails to decode at run time (or is over ``max_image_pixels``, or whose size disagrees with
    its annotation beyond a plausible rescale, see ``size_mismatch``) is reported once and replaced
    by the next readable image.

    An image file of another size than its annotation (same aspect, factor within [1/8, 8]) is
    used as it is: its boxes are rescaled to the file, never the image to the annotation (an
    annotation may claim 20000x20000 pixels). ``orig_size`` and ``scale`` stay in the annotation's
    frame, so predictions come back in the coordinates the ground truth uses."""

    def __init__(self, source: DetectionSource, transform: Callable | None, image_size: int,
                 pre_transform: Callable | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 spec: InputSpec | None = None):
        self.image_size = int(image_size)
        self.spec = spec or InputSpec()  # pictures (RGB, ImageNet statistics) or band arrays
        self.transform = transform
        self.pre_transform = pre_transform
        self.max_image_pixels = max_image_pixels  # held here so DataLoader workers get it too
        self.source = source  # the ground truth COCO evaluation scores against
        self.categories = list(source.categories)
        self.name = source.name
        self.records = list(source.images)
        # compact per-image targets (no crowd regions), ready to become tensors
        self.boxes, self.labels = [], []
        for im in self.records:
            objs = source.targets(im.id)
            self.boxes.append(torch.tensor([a.bbox for a in objs], dtype=torch.float32).reshape(-1, 4))
            self.labels.append(torch.tensor([a.label for a in objs], dtype=torch.int64))
        self._finish = to_input(self.spec)
        self._bad: set[int] = set()
        self._resized: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        return [r.id for r in self.records]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        for offset in range(len(self.records)):
            i = (index + offset) % len(self.records)
            if i in self._bad:
                continue
            try:
                pil = self._load(i)
            except ImageReadError as exc:
                self._bad.add(i)
                warn(f"skipped {exc} (replaced by another image)")
                continue
            if self.pre_transform is not None:
                pil = self.pre_transform(pil)
            return self._item(i, pil)
        raise DataError(f"{self.name}: no image in the dataset could be decoded")

    def _load(self, i: int) -> Image.Image | torch.Tensor:
        """The decoded image of record ``i`` (a PIL picture, or a ``C x H x W`` band tensor);
        ImageReadError when its size cannot be reconciled with the annotation's (warned once when
        it can: the boxes are rescaled) or its band count is not the model's."""
        rec = self.records[i]
        pil = read_input(rec.path, self.max_image_pixels, self.spec.layout)
        if input_bands(pil) != self.spec.in_channels:
            raise ImageReadError(f"{rec.path}: has {input_bands(pil)} band(s), the model takes {self.spec.in_channels}")
        w, h = _size(pil)
        if (w, h) != (rec.width, rec.height):
            problem = size_mismatch((w, h), (rec.width, rec.height))
            if problem:
                raise ImageReadError(f"{rec.path}: {problem}")
            if i not in self._resized:
                self._resized.add(i)
                warn(f"{rec.path}: image is {w}x{h} but the annotations say "
                     f"{rec.width}x{rec.height}; boxes rescaled to the image")
        return pil

    def _target(self, i: int, pil: Image.Image | torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The image of record ``i`` as a tensor and the target the transform sees: ``boxes``
        (``BoundingBoxes`` ``N x 4`` xyxy in the file's pixels), ``labels`` (``N`` int64). A subclass
        adds its own per-object ``tv_tensors`` here (rows aligned with ``boxes``), so they go through
        the augmentation with the image."""
        rec = self.records[i]
        boxes = self.boxes[i].clone()
        w, h = _size(pil)
        if (w, h) != (rec.width, rec.height):  # annotation frame -> the file's pixels (see _load)
            boxes *= torch.tensor([w / rec.width, h / rec.height] * 2)
        image = pil if isinstance(pil, torch.Tensor) else tv_tensors.Image(F.pil_to_tensor(pil))
        return image, {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": self.labels[i].clone(),
        }

    def _on_canvas(self, target: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """Extra keys of the item's target, made from the transformed ``target`` (``_target``'s
        keys after augmentation); ``keep`` (``N`` bool) marks the boxes still valid on the canvas.
        None here; a subclass resizes / pads its per-object tensors as the image was."""
        return {}

    def _item(self, i: int, pil: Image.Image | torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        rec, size = self.records[i], self.image_size
        image, target = self._target(i, pil)
        if self.transform is not None:
            image, target = self.transform(image, target)
        canvas, boxes, _ = resize_pad(image, target["boxes"], size)
        boxes = box_ops.clip(boxes, size, size)
        keep = box_ops.valid_mask(boxes)
        boxes, labels = boxes[keep], target["labels"][keep]
        return self._finish(canvas.as_subclass(torch.Tensor)), {
            "boxes": box_ops.normalize(box_ops.xyxy_to_cxcywh(boxes), size, size).clamp(0, 1).reshape(-1, 4),
            "labels": labels.to(torch.int64),
            "image_id": int(rec.id),
            "orig_size": torch.tensor([rec.height, rec.width], dtype=torch.int64),
            # canvas pixels per annotation pixel: the same as S / max(h, w) of the annotation when
            # the file is a rescale of it (same aspect), so predictions map back to its frame
            "scale": size / max(rec.height, rec.width),
            **self._on_canvas(target, keep),
        }


def _size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """``(width, height)`` of a PIL picture or a ``C x H x W`` band tensor."""
    return image.size if isinstance(image, Image.Image) else (int(image.shape[-1]), int(image.shape[-2]))


def detection_collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """``{"images": B x 3 x S x S, "targets": [target dict, ...]}``."""
    return {"images": torch.stack([image for image, _ in batch]), "targets": [t for _, t in batch]}


def describe(source: DetectionSource) -> str:
    """For the log: a line of images, boxes and classes, then each class with its box count
    (``class_table``), so a class with no boxes or a surprise class is seen before training."""
    return (f"{source.name}: {len(source)} images, {source.num_boxes()} boxes, {len(source.categories)} classes\n"
            + class_table(source.class_names, source.boxes_per_class()))


def class_table(names: list[str], counts: list[int], width: int = 100, longest: int = 24) -> str:
    """``name  count`` cells in columns (down, then across) that fit ``width`` characters, two
    spaces in; names cut to ``longest`` characters."""
    if not names:
        return "  (no classes)"
    shown = [n if len(n) <= longest else n[: longest - 1] + "~" for n in names]
    name_w, count_w = max(map(len, shown)), max(len(str(c)) for c in counts)
    cells = [f"{n:<{name_w}} {c:>{count_w}}" for n, c in zip(shown, counts)]
    cell_w, gap = name_w + 1 + count_w, 4
    cols = max(1, min(len(cells), (width - 2 + gap) // (cell_w + gap)))
    rows = -(-len(cells) // cols)
    lines = []
    for r in range(rows):
        line = (" " * gap).join(cells[c * rows + r] for c in range(cols) if c * rows + r < len(cells))
        lines.append("  " + line.rstrip())
    return "\n".join(lines)
