"""Colour-coded masks: one colour per class, the usual export of labelling tools and aerial sets.

A colour table (``--mask-colors FILE``) names the classes in label order with their colours: JSON
``{"road": [128, 64, 128], "car": "#0000ff"}`` or CSV lines ``name,r,g,b`` / ``name,#rrggbb`` (a
header line is skipped). With a table every mask is read as RGB (palette PNGs of any bit depth as
their colours, a grey value ``v`` as ``(v, v, v)``), each pixel packed into one int32
``r << 16 | g << 8 | b`` and looked up in the table's sorted codes (``ColourTable.labels``): exact
and vectorised. A colour the table lacks becomes the ignore index (no loss, no metric); the scan
counts and reports those pixels (``sources.colour_report``).

Without a table, colour (RGB) masks are refused by ``colour_masks_refusal`` with the colours found in
a sample of the masks, their pixel shares and a JSON table to rename and pass back.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS, open_image
from dinotune.errors import DataError

__all__ = ["ColourTable", "read_colour_table", "pack_rgb", "hex_colour", "colour_text", "survey_colours",
           "colour_masks_refusal", "COLOUR_MODES"]

# Mask modes read as colours when a table is given (16-bit masks hold indices, never colours).
COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "L", "LA", "1")
MAX_TABLE_BYTES = 1 << 20  # a colour table is a few lines; anything larger is not one
SURVEY_MASKS = 64  # masks sampled to list the colours of a set without a table
SURVEY_PIXELS = 1 << 20  # pixels per sampled mask (a strided grid over larger masks)
SURVEY_SHOWN = 64  # colours put in the suggested table
_HEX = re.compile(r"#?([0-9a-fA-F]{6})")


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """``H x W x 3`` (or ``... x 3``) uint8 colours -> ``H x W`` int32 codes ``r << 16 | g << 8 | b``
    (the bytes laid out as one little-endian int32: several times faster than shifts and ors)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    out = np.zeros(rgb.shape[:-1] + (4,), dtype=np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = rgb[..., 2], rgb[..., 1], rgb[..., 0]
    return out.view("<i4")[..., 0].astype(np.int32, copy=False)


# table codes -> 2**24-entry lookup table (16 MB; code -> label, 255 = not in the table), a few kept
_LUTS: dict[bytes, np.ndarray] = {}
_NOT_IN_TABLE = 255


def _unpack(code: int) -> tuple[int, int, int]:
    code = int(code)
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


def hex_colour(colour: int | Sequence[int]) -> str:
    """``#rrggbb`` of a packed code or an ``(r, g, b)`` triple."""
    r, g, b = _unpack(colour) if isinstance(colour, (int, np.integer)) else colour
    return f"#{int(r):02x}{int(g):02x}{int(b):02x}"


def colour_text(colour: int | Sequence[int]) -> str:
    """``#rrggbb (r, g, b)``: the form every message uses."""
    rgb = _unpack(colour) if isinstance(colour, (int, np.integer)) else tuple(int(v) for v in colour)
    return f"{hex_colour(rgb)} {rgb}"


@dataclass(frozen=True)
class ColourTable:
    """Class names in label order and their ``(r, g, b)`` colours; ``source`` names the file (for
    messages). Names and colours are each unique."""

    names: tuple[str, ...]
    rgb: tuple[tuple[int, int, int], ...]
    source: str = "the colour table"
    _sorted: np.ndarray = field(init=False, repr=False, compare=False)  # table codes, ascending
    _order: np.ndarray = field(init=False, repr=False, compare=False)  # label of each sorted code

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        rgb = tuple(tuple(int(v) for v in c) for c in self.rgb)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "rgb", rgb)
        if not names:
            raise DataError(f"{self.source}: the colour table is empty; give one line per class")
        if len(names) != len(rgb):
            raise ValueError("one colour per class name is expected")
        for c in rgb:
            if len(c) != 3 or not all(0 <= v <= 255 for v in c):
                raise DataError(f"{self.source}: colour {c} is not three values from 0 to 255")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DataError(f"{self.source}: class name(s) {', '.join(map(repr, twice))} appear twice")
        codes = pack_rgb(np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)).astype(np.int64)
        seen: dict[int, str] = {}
        for name, code in zip(names, codes.tolist()):
            if code in seen:
                raise DataError(f"{self.source}: {seen[code]!r} and {name!r} have the same colour "
                                f"{colour_text(code)}; a colour names one class")
            seen[code] = name
        order = np.argsort(codes, kind="stable")
        object.__setattr__(self, "_sorted", codes[order])
        object.__setattr__(self, "_order", order.astype(np.int64))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def codes(self) -> np.ndarray:
        """The packed colours in label order (int64)."""
        return pack_rgb(np.asarray(self.rgb, dtype=np.uint8).reshape(-1, 3)).astype(np.int64)

    def _lut(self) -> np.ndarray | None:
        """The 2**24-entry uint8 table code -> label (255: not in the table), for tables of up to
        254 classes (a gather per pixel); None for larger ones (they search the sorted codes)."""
        if len(self) >= _NOT_IN_TABLE:
            return None
        key = self._sorted.tobytes()
        lut = _LUTS.get(key)
        if lut is None:
            lut = np.full(1 << 24, _NOT_IN_TABLE, dtype=np.uint8)
            lut[self._sorted] = self._order
            if len(_LUTS) >= 4:
                _LUTS.pop(next(iter(_LUTS)), None)
            _LUTS[key] = lut
        return lut

    def labels(self, codes: np.ndarray, ignore_index: int, dtype: Any = np.uint8) -> np.ndarray:
        """Packed colours (``pack_rgb``, ``0 .. 2**24 - 1``) -> labels in table order; a colour not
        in the table -> ``ignore_index``."""
        codes = np.asarray(codes)
        lut = self._lut()
        if lut is not None:
            out = lut[codes]
            if ignore_index != _NOT_IN_TABLE:
                out = np.where(out == _NOT_IN_TABLE, ignore_index, out.astype(dtype))
            return out.astype(dtype, copy=False)
        pos = np.minimum(np.searchsorted(self._sorted, codes), len(self._sorted) - 1)
        return np.where(self._sorted[pos] == codes, self._order[pos], ignore_index).astype(dtype)

    def counts(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct colours of ``codes`` (ascending, int64) and their pixel counts: the table's by a
        histogram of their labels, only the pixels of other colours by ``np.unique``."""
        codes = np.asarray(codes).ravel()
        stray_label = max(len(self), _NOT_IN_TABLE)  # a label no class has
        labels = self.labels(codes, stray_label, np.int64 if stray_label > 255 else np.uint8)
        hist = np.bincount(labels, minlength=stray_label + 1)
        known = hist[: len(self)]
        stray, stray_counts = (np.unique(codes[labels == stray_label], return_counts=True) if hist[stray_label]
                               else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        present = known > 0
        values = np.concatenate([self.codes[present], stray.astype(np.int64)])
        counts = np.concatenate([known[present], stray_counts]).astype(np.int64)
        order = np.argsort(values, kind="stable")
        return values[order], counts[order]

    def to_meta(self) -> list[list[int]]:
        """The colours, ``[[r, g, b], ...]`` in label order (the run's ``meta.json`` beside ``class_names``)."""
        return [list(c) for c in self.rgb]

    @classmethod
    def from_meta(cls, names: Sequence[str], colours: Any, source: str = "the run's colour table") -> ColourTable:
        """The table a run saved (``meta["mask_colors"]`` with ``meta["class_names"]``); a saved
        value of the wrong shape is a DataError (run folders are read, not trusted)."""
        if (not isinstance(colours, list) or len(colours) != len(names)
                or not all(isinstance(c, list) and len(c) == 3 and all(_is_int(v) for v in c) for c in colours)):
            raise DataError(f"{source}: mask_colors must be one [r, g, b] per class ({len(names)}), got "
                            f"{str(colours)[:80]}")
        return cls(tuple(names), tuple(tuple(c) for c in colours), source)

    def json_text(self) -> str:
        """The table as a JSON file's text, one class a line."""
        return _json_table([(n, c) for n, c in zip(self.names, self.rgb)])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_table(rows: Sequence[tuple[str, Sequence[int]]]) -> str:
    lines = [f"  {json.dumps(name)}: [{', '.join(str(int(v)) for v in rgb)}]" for name, rgb in rows]
    return "{\n" + ",\n".join(lines) + "\n}"


def _parse_colour(value: Any, where: str) -> tuple[int, int, int]:
    """``[r, g, b]`` (ints 0..255) or ``"#rrggbb"`` -> ``(r, g, b)``, else a DataError at ``where``."""
    if isinstance(value, str):
        m = _HEX.fullmatch(value.strip())
        if m is None:
            raise DataError(f"{where}: colour {value!r} is not #rrggbb (six hex digits) or [r, g, b]")
        h = m.group(1)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in value):
        return int(value[0]), int(value[1]), int(value[2])
    raise DataError(f"{where}: colour {value!r} is not [r, g, b] (three integers 0..255) or \"#rrggbb\"")


def read_colour_table(path: str | Path) -> ColourTable:
    """The colour table of ``--mask-colors``: JSON ``{"name": [r, g, b] | "#rrggbb", ...}`` or CSV
    rows ``name,r,g,b`` / ``name,#rrggbb`` (a first row that is not a colour, a header, is
    skipped; blank rows too). The file's order is the label order. Errors name the file and the
    entry or line."""
    path = Path(path).expanduser()
    where = f"--mask-colors {path}"
    if not path.is_file():
        raise DataError(f"{where}: file not found")
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise DataError(f"{where}: {path.stat().st_size:,} bytes is too large for a colour table "
                        f"(at most {MAX_TABLE_BYTES:,}: one line per class)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: cannot read the file ({exc})") from None
    rows = _json_rows(text, where) if path.suffix.lower() == ".json" or text.lstrip().startswith("{") \
        else _csv_rows(text, where)
    return ColourTable(tuple(n for n, _ in rows), tuple(c for _, c in rows), str(path))


def _json_rows(text: str, where: str) -> list[tuple[str, tuple[int, int, int]]]:
    def pairs(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return items  # keeps the order and any repeated name (a dict would drop it silently)

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(item, tuple) for item in data):
        raise DataError(f"{where}: expected a JSON object {{\"class name\": [r, g, b] or \"#rrggbb\", ...}}")
    names = [n for n, _ in data]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{where}: class name(s) {', '.join(map(repr, twice))} appear twice")
    return [(name, _parse_colour(value, f"{where}, {name!r}")) for name, value in data]


def _csv_rows(text: str, where: str) -> list[tuple[str, tuple[int, int, int]]]:
    rows: list[tuple[str, tuple[int, int, int]]] = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        try:
            colour = _csv_colour(cells, f"{where}, line {n}")
        except DataError:
            # the first row may be a header (name,r,g,b / name,colour): no colour and no digits
            if not rows and not any(ch.isdigit() for c in cells[1:] for ch in c):
                continue
            raise
        if not cells[0]:
            raise DataError(f"{where}, line {n}: the class name is empty")
        rows.append((cells[0], colour))
    return rows


def _csv_colour(cells: list[str], where: str) -> tuple[int, int, int]:
    if len(cells) == 2:
        return _parse_colour(cells[1], where)
    if len(cells) == 4:
        if not all(re.fullmatch(r"\d{1,3}", c) for c in cells[1:]):
            raise DataError(f"{where}: {','.join(cells[1:])} is not three integers 0..255")
        return _parse_colour([int(c) for c in cells[1:]], where)
    raise DataError(f"{where}: expected name,r,g,b or name,#rrggbb, got {len(cells)} field(s)")


# -------------------------------------------------------------------- masks without a table
def _sample(paths: Sequence[Path], limit: int) -> list[Path]:
    """At most ``limit`` of ``paths``, evenly spaced (the same ones every time)."""
    if len(paths) <= limit:
        return list(paths)
    return [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, limit).round().astype(int))]


def survey_colours(masks: Sequence[Path], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct colours of (a sample of) colour masks, their pixel counts (descending) and how many
    masks were read: at most ``SURVEY_MASKS`` masks, evenly spaced, each read on a grid of at most
    ``SURVEY_PIXELS`` pixels, so the work is bounded whatever the set's size."""
    codes, counts = [], []
    sample = _sample(list(masks), SURVEY_MASKS)
    for path in sample:
        try:
            with open_image(path, max_pixels) as im:
                rgb = np.asarray(im.convert("RGB"))
        except Exception:  # an unreadable mask is reported by the scan, not here
            continue
        step = int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / SURVEY_PIXELS))) if rgb.size else 1
        u, c = np.unique(pack_rgb(rgb[::step, ::step]), return_counts=True)
        codes.append(u.astype(np.int64))
        counts.append(c * step * step)
    if not codes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    values, inverse = np.unique(np.concatenate(codes), return_inverse=True)
    totals = np.bincount(inverse, weights=np.concatenate(counts)).astype(np.int64)
    order = np.argsort(-totals, kind="stable")
    return values[order], totals[order], len(sample)


def shares_text(codes: Sequence[int], counts: Sequence[int], total: int, limit: int = 8) -> str:
    """``#rrggbb (r, g, b) 61.2 %, ...`` for the first ``limit`` colours, then how many more."""
    shown = [f"{colour_text(c)} {100 * n / max(1, total):.1f} %" for c, n in list(zip(codes, counts))[:limit]]
    more = len(codes) - limit
    if more > 0:
        rest = sum(int(n) for n in list(counts)[limit:])
        shown.append(f"and {more} more ({100 * rest / max(1, total):.1f} %)")
    return ", ".join(shown)


def colour_masks_refusal(masks: Sequence[Path], where: str,
                         max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DataError | None:
    """None when (a sample of) ``masks`` are label images; when some are colour (RGB / RGBA) images,
    the DataError that asks for a colour table: the colours of the sampled colour masks with their
    pixel shares and a JSON table (``class_0``, ... most pixels first) ready to rename."""
    colour = []
    for path in _sample(list(masks), SURVEY_MASKS):
        try:
            with open_image(path, max_pixels) as im:
                if im.mode in ("RGB", "RGBA"):
                    colour.append(path)
        except Exception:  # unreadable: the scan names it
            continue
    if not colour:
        return None
    codes, counts, read = survey_colours(colour, max_pixels)
    seen = f"the {len(masks)} masks" if read == len(masks) else f"{read} masks sampled of {len(masks)}"
    total = int(counts.sum())
    table = _json_table([(f"class_{i}", _unpack(c)) for i, c in enumerate(codes[:SURVEY_SHOWN])])
    extra = ""
    if len(codes) > SURVEY_SHOWN:
        rest = 100 * int(counts[SURVEY_SHOWN:].sum()) / max(1, total)
        extra = (f" (the {SURVEY_SHOWN} commonest of {len(codes)} colours; the other {rest:.1f} % of the pixels "
                 "look like smoothed or JPEG-compressed masks: colour masks must be saved losslessly)")
    return DataError(
        f"{where}: the masks are colour images ({colour[0].name}{' and others' if len(colour) > 1 else ''}: RGB, a "
        "colour per class), so the classes "
        f"need a colour table: --mask-colors FILE. {len(codes)} colour(s) in {seen}, by pixel share: "
        f"{shares_text(codes, counts, total)}. Save this table as a .json file{extra}, rename the classes "
        "(the file's order is the label order; a colour left out is ignored in loss and metrics) and pass it with "
        f"--mask-colors:\n{table}")
