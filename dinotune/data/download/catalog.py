"""The official archives of the datasets ``dinotune data download`` fetches, and where they go.

Sizes are exact byte counts as served; checksums are the ones published with the dataset or
replicated by the common dataset loaders (torchvision's VOC md5, the md5 list COCO users check
their zips against, GluonCV's ADE20K sha1). Where none is published the entry says so
(``checksum=None``) and only the size is verified; a size that is not known is ``None`` and the
checksum alone decides. No checksum here was computed by dinotune.

Every archive is bounded twice, so that a wrong or hostile file costs a known amount of disk: a
download stops the moment it passes the published size (``max_size`` where none is published), and
extraction refuses an archive whose members declare, or turn out to hold, more than
``max_extracted`` bytes (the known extracted size plus a margin of about a fifth or more).

Each archive is fetched from ``base_url + path``; ``--mirror URL`` / ``$DINOTUNE_DOWNLOAD_MIRROR``
replaces ``base_url`` (the same ``path`` is appended), for tests and local mirrors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CATALOG", "MIRROR_ENV", "Archive", "DatasetEntry", "archives_for", "human_size"]

MIRROR_ENV = "DINOTUNE_DOWNLOAD_MIRROR"


@dataclass(frozen=True)
class Archive:
    """One file of a dataset.

    ``path``: below the dataset's base URL (also the path below a mirror). ``size``: bytes, or None
    when not published. ``checksum``: ``(algorithm, hex digest)`` with an algorithm ``hashlib``
    knows, or None when none is published. ``strip``: a leading folder of every member dropped on
    extraction, so that the dataset folder itself holds the layout dinotune reads. ``max_size``: the
    most bytes a download may bring when ``size`` is None (required then). ``max_extracted``: the
    most bytes the members may extract to (None: ``extract.RATIO`` x the archive's size)."""

    path: str
    size: int | None
    checksum: tuple[str, str] | None
    strip: str = ""
    max_size: int | None = None
    max_extracted: int | None = None

    def __post_init__(self) -> None:
        if self.size is None and self.max_size is None:
            raise ValueError(f"{self.path}: an archive whose size is not published needs max_size, a bound on "
                             "its download")

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def size_bound(self) -> int:
        """The most bytes a download of this archive may bring: its published size, else ``max_size``."""
        return self.size if self.size is not None else self.max_size  # type: ignore[return-value]


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset: its official base URL, the archives of each split, and how to use the result.

    ``splits``: split name -> the archives it needs (an archive shared by several splits is fetched
    once). ``layout``: what the dataset folder holds after extraction (shown in messages and
    ``--help``); ``use``: the dinotune command that reads it (``{dir}`` = the dataset folder)."""

    name: str
    title: str
    base_url: str
    splits: dict[str, tuple[Archive, ...]]
    layout: str
    use: str
    note: str = ""
    aliases: tuple[str, ...] = field(default=())


# max_extracted: what the archive is known to extract to, plus a margin (JSON text compresses ~3.3:1;
# JPEG / PNG and a plain tar hardly at all), so that a file that is not the published one cannot fill
# the disk.
_COCO_ANN = Archive("annotations/annotations_trainval2017.zip", 252_907_541,
                    ("md5", "f4bbac642086de4f52a3fdda2de5fa2c"), max_extracted=1_200_000_000)  # ~0.83 GB of JSON
_COCO_TRAIN = Archive("zips/train2017.zip", 19_336_861_798, ("md5", "cced6f7f71b7629ddf16f17bbcfab6b2"),
                      max_extracted=23_000_000_000)  # ~19.3 GB of JPEGs
_COCO_VAL = Archive("zips/val2017.zip", 815_585_330, ("md5", "442b8da7639aecaf257c1dceb8ba8c80"),
                    max_extracted=1_000_000_000)  # ~0.82 GB of JPEGs
_VOC = Archive("VOCtrainval_11-May-2012.tar", 1_999_639_040, ("md5", "6cd6e144f989b92b3379bac3b3de84fd"),
               max_extracted=2_400_000_000)  # a plain tar: its members hold less than its 2.0 GB
# The exact byte count of the ADE20K zip is not published (~923 MB); its sha1 is. Its download is
# bounded at 1.1 GB (a fifth over the known size).
_ADE = Archive("ADEChallengeData2016.zip", None, ("sha1", "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"),
               max_size=1_100_000_000, max_extracted=1_200_000_000)  # ~0.95 GB of JPEGs and PNGs
# No checksum is published for the PyTorch tutorial's zip: its size is verified, nothing more.
_HYMENOPTERA = Archive("hymenoptera_data.zip", 47_286_322, None, strip="hymenoptera_data",
                       max_extracted=60_000_000)  # ~47 MB of JPEGs

CATALOG: dict[str, DatasetEntry] = {
    "coco": DatasetEntry(
        name="coco", title="COCO 2017 detection (instances)", base_url="http://images.cocodataset.org/",
        splits={"train": (_COCO_ANN, _COCO_TRAIN), "val": (_COCO_ANN, _COCO_VAL)},
        layout="annotations/instances_{train,val}2017.json + train2017/ + val2017/",
        use="dinotune train detect --data {dir}",
    ),
    "voc": DatasetEntry(
        name="voc", title="PASCAL VOC 2012 trainval (segmentation, detection)",
        base_url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        splits={"train": (_VOC,), "val": (_VOC,)},
        layout="VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}/",
        use="dinotune train segment --data {dir}",
        note="train and val come in one archive",
    ),
    "ade20k": DatasetEntry(
        name="ade20k", title="ADE20K SceneParsing (ADEChallengeData2016)",
        base_url="http://data.csail.mit.edu/places/ADEchallenge/",
        splits={"train": (_ADE,), "val": (_ADE,)},
        layout="ADEChallengeData2016/{images,annotations}/{training,validation}/",
        use="dinotune train segment --data {dir}",
        note="train and val come in one archive; its size is not published: a download stops past 1.1 GB",
        aliases=("ade",),
    ),
    "hymenoptera": DatasetEntry(
        name="hymenoptera", title="ants vs bees (PyTorch transfer-learning tutorial)",
        base_url="https://download.pytorch.org/tutorial/",
        splits={"train": (_HYMENOPTERA,), "val": (_HYMENOPTERA,)},
        layout="train/{ants,bees}/ + val/{ants,bees}/",
        use="dinotune train classify --data {dir}",
        note="train and val come in one archive; no checksum is published, the size is verified",
    ),
}


def archives_for(entry: DatasetEntry, splits: list[str]) -> list[Archive]:
    """The archives ``splits`` need, each once, in catalog order."""
    out: list[Archive] = []
    for split in splits:
        for archive in entry.splits[split]:
            if archive not in out:
                out.append(archive)
    return out


def human_size(size: int | None) -> str:
    if size is None:
        return "size not published"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
