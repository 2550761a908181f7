"""Image lists: a CSV with a header row naming an image path column and, usually, a label column.

Used by classification (``--data train.csv``) and by the embedding commands. Column names are
matched case-insensitively among the usual ones (``PATH_COLUMNS``, ``LABEL_COLUMNS``) unless given.
Relative paths are read from the CSV's folder and must stay inside it; absolute paths (the user's
own list) are used as written. Repeated rows are dropped with a warning; one image listed with two
labels is refused; rows whose file is missing or not an image are reported and skipped.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from dinotune.data.images import SkipReport, is_image_file, symlink_problem
from dinotune.data.paths import join_inside
from dinotune.errors import DataError
from dinotune.utils import warn

PATH_COLUMNS = ("path", "image", "file", "filename", "filepath", "image_path")
LABEL_COLUMNS = ("label", "class", "category", "target", "class_name")
LIST_SUFFIXES = (".csv", ".tsv", ".txt")


def read_labelled_csv(path: Path, image_column: str = "", label_column: str = "", require_label: bool = True
                      ) -> tuple[list[tuple[Path, str]], SkipReport]:
    """``([(image path, label), ...], skipped)`` of the CSV ``path``, in row order. Without
    ``require_label`` a CSV with no label column gives empty labels."""
    header, rows = _read_csv_rows(path)
    img_col, lab_col = _csv_columns(path, header, image_column, label_column, require_label)
    if not rows:
        raise DataError(f"{path}: the CSV holds no rows, only its header ({', '.join(header)}); "
                        "add one row per image: path,label")
    report = SkipReport()
    pairs = []
    for line, p, label in _unique_rows(path, _csv_entries(path, rows, img_col, lab_col)):
        if not p.is_file():
            report.add(p, f"listed in {path.name} line {line} but " + (symlink_problem(p) or "missing"))
        elif not is_image_file(p):
            report.add(p, f"not an image file (extension {p.suffix or 'none'!r})")
        else:
            pairs.append((p, label))
    return pairs, report


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the CSV ({exc})") from None
    return list(header), rows


def _csv_columns(path: Path, header: list[str], image_column: str, label_column: str,
                 require_label: bool = True) -> tuple[str, str]:
    lower = {h.lower().strip(): h for h in header}
    img_col = image_column or next((lower[c] for c in PATH_COLUMNS if c in lower), "")
    lab_col = label_column or next((lower[c] for c in LABEL_COLUMNS if c in lower), "")
    needed = [(img_col, "image path")] + ([(lab_col, "label")] if require_label or label_column else [])
    for col, kind in needed:
        if not col or col not in header:
            raise DataError(
                f"{path}: no {kind} column (header: {', '.join(header) or 'empty'}); name it "
                f"{'path' if kind == 'image path' else 'label'} or pass --{'image' if kind == 'image path' else 'label'}-column"
            )
    return img_col, lab_col


def _csv_entries(path: Path, rows: list[dict[str, str]], img_col: str, lab_col: str) -> list[tuple[int, Path, str]]:
    """``(line, image path, label)`` per row. A relative path that leaves the CSV's folder is
    refused (all such rows listed at once): a CSV shipped with a dataset must not reach the rest
    of the disk. Absolute (and ``~``) paths are the user's own and used as written."""
    entries, escaping = [], []
    for line, row in enumerate(rows, start=2):
        raw, label = (row.get(img_col) or "").strip(), (row.get(lab_col) or "").strip() if lab_col else ""
        if not raw or (lab_col and not label):
            raise DataError(f"{path}, line {line}: empty {'path' if not raw else 'label'}")
        p = Path(raw).expanduser()
        if not p.is_absolute():
            p, problem = join_inside(path.parent, raw)
            if problem:
                escaping.append(f"line {line}: {problem}")
                continue
        entries.append((line, p, label))
    if escaping:
        raise DataError(f"{path}: {len(escaping)} relative image path(s) lead outside the CSV's folder "
                        "(write them relative to it, or as absolute paths): " + "; ".join(escaping[:5])
                        + (" ..." if len(escaping) > 5 else ""))
    return entries


def _unique_rows(path: Path, entries: list[tuple[int, Path, str]]) -> list[tuple[int, Path, str]]:
    """``entries`` without repeated rows (warned: count and the first few), so no image is
    trained twice per epoch. One image with two different labels is refused, naming both."""
    first: dict[str, tuple[int, str]] = {}
    out, repeats, conflicts = [], [], []
    for line, p, label in entries:
        key = os.path.normpath(p)
        if key not in first:
            first[key] = (line, label)
            out.append((line, p, label))
        elif first[key][1] == label:
            repeats.append(f"line {line} repeats line {first[key][0]} ({p.name})")
        else:
            conflicts.append(f"{p} is labelled {first[key][1]!r} on line {first[key][0]} and {label!r} on line {line}")
    if conflicts:
        raise DataError(f"{path}: {len(conflicts)} image(s) listed with two different labels: "
                        + "; ".join(conflicts[:5]) + (" ..." if len(conflicts) > 5 else ""))
    if repeats:
        warn(f"{path}: {len(repeats)} duplicate row(s) dropped (same image, same label): "
             + "; ".join(repeats[:5]) + (" ..." if len(repeats) > 5 else ""))
    return out
