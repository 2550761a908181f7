"""Edge cases the rest of the suite left open: a raw / EMA tie, balanced sampling of an uneven
dataset over several processes, a band named twice when the patch embedding is widened, a
constant band's statistics, sliding windows that fit the border exactly, the dynamic batch the
ONNX graphs declare on their outputs, the reason a linked archive member is refused, and the
linear grid with gradient accumulation."""

from __future__ import annotations

import io
import itertools
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from dinotune import api
from dinotune.backbone.channels import widened_kernels
from dinotune.data.bands import InputSpec, band_statistics, read_input
from dinotune.data.download.extract import safe_extract
from dinotune.data.loader import make_loader
from dinotune.data.sampler import BalancedSampler, class_balanced_weights
from dinotune.data.transforms import normalize
from dinotune.engine import distributed
from dinotune.engine.monitor import Monitor
from dinotune.errors import DataError
from dinotune.runtime import windows
from dinotune.tasks.segment import inference as seg_inference
from tests.conftest import tiny_options

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- 1. raw vs EMA tie
@pytest.mark.parametrize("key, mode, worse, better", [("val/top1", "max", 0.25, 0.75), ("val/loss", "min", 0.9, 0.1)])
def test_a_tie_between_raw_and_ema_weights_keeps_the_raw_ones(key, mode, worse, better):
    """The monitor's docstring: an epoch's score is the better of raw and EMA, and raw wins a tie
    (score and improved); a strictly better EMA score still picks the EMA weights."""
    monitor = Monitor(key, mode)
    ema_key = monitor.ema_key
    assert ema_key == "val_ema/" + key.split("/", 1)[1]
    tie = {"epoch": 1, key: 0.5, ema_key: 0.5}
    assert monitor.score(tie) == (0.5, "raw")
    assert monitor.improved(tie, None) == "raw"
    assert monitor.improved(tie, {"epoch": 0, key: worse}) == "raw"
    # the EMA strictly better: its weights are the ones kept, in either mode
    ema_wins = {"epoch": 1, key: worse, ema_key: better}
    assert monitor.score(ema_wins) == (better, "ema")
    assert monitor.improved(ema_wins, None) == "ema"
    # and the raw strictly better: raw
    raw_wins = {"epoch": 1, key: better, ema_key: worse}
    assert monitor.score(raw_wins) == (better, "raw")
    # a tie with the best so far is no improvement (whichever weights gave it)
    assert monitor.improved(tie, {"epoch": 0, key: 0.5, ema_key: 0.5}) is None


# ------------------------------------------------------------- 2. balanced sampler, processes
@pytest.mark.parametrize("world", [2, 3])
def test_balanced_shards_of_an_uneven_dataset_share_one_draw_rounded_up(world, monkeypatch):
    """11 items on 2 or 3 processes: each process takes every ``world``-th index of ONE draw of
    len(dataset) items rounded UP to a multiple of the process count (the sampler's docstring:
    every process makes as many steps), so together they see the whole draw, nothing cut off."""
    n, seed = 11, 5
    weights = class_balanced_weights([0] * 8 + [1] * 3)
    total = -(-n // world) * world  # 12 on 2 or 3 processes
    reference = torch.multinomial(weights, total, replacement=True,
                                  generator=torch.Generator().manual_seed(seed)).tolist()
    one = BalancedSampler(weights, torch.Generator())
    one.generator.manual_seed(seed)
    assert len(one) == n and len(list(one)) == n  # one process: exactly len(dataset) draws

    shares = []
    for rank in range(world):
        share = one.shard(rank, world)
        share.generator.manual_seed(seed)  # every process seeds its generator alike
        shares.append(list(share))
        assert len(share) == len(shares[-1]) == total // world
    assert sum(len(s) for s in shares) == total >= n
    together = [None] * total
    for rank, share in enumerate(shares):
        together[rank::world] = share
    assert together == reference  # the shares interleave back into the one draw

    # the same through the engine: shard_loader under a simulated torchrun asks for each share
    loader = make_loader(TensorDataset(torch.arange(n)), 2, shuffle=True, workers=0, weights=weights)
    for rank in range(world):
        monkeypatch.setattr(distributed, "current", lambda rank=rank: distributed.DistContext(rank, world, 0, True))
        sharded = distributed.shard_loader(loader, seed=0)
        assert sharded.generator is loader.generator
        assert len(sharded.sampler) == total // world and len(sharded) == -(-(total // world) // 2)
        sharded.generator.manual_seed(seed)
        assert list(sharded.sampler) == shares[rank]
        assert sum(len(batch) for (batch,) in sharded) == total // world


# ---------------------------------------------------------------- 3. band named twice: sum
def _brute_force_kernels(weight: torch.Tensor, n: int, rgb_bands: list[int]) -> torch.Tensor:
    """Band by band: the sum of the RGB kernels mapped to it, else the RGB mean times 3 / n."""
    w = weight.double()
    columns = []
    for band in range(n):
        mapped = [rgb for rgb, b in enumerate(rgb_bands) if b == band]
        if mapped:
            columns.append(sum(w[:, rgb] for rgb in mapped))
        else:
            columns.append(w.mean(dim=1) * 3.0 / n)
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("n, rgb_bands", [(4, [0, 0, 1]), (5, [3, 1, 3]), (1, [0, 0, 0]), (3, [2, 2, 2]),
                                          (3, [1, 0, 1]), (7, [4, 2, 0]), (3, [0, 1, 2])])
def test_widened_kernels_sum_the_kernels_of_a_band_named_twice(n, rgb_bands):
    """``widened_kernels``: a band named several times in rgb_bands gets the SUM of the kernels
    mapped to it (one band for all three = a gray image), the others the mean times 3 / N."""
    weight = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    got = widened_kernels(weight, n, rgb_bands)
    assert got.shape == (6, n, 2, 2) and got.dtype == weight.dtype
    torch.testing.assert_close(got.double(), _brute_force_kernels(weight, n, rgb_bands), rtol=1e-6, atol=1e-6)
    if n == 1:  # the gray case: one band as R, G and B gives the RGB conv of the band repeated thrice
        x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(torch.nn.functional.conv2d(x, got, stride=2),
                                   torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), weight, stride=2))


# ---------------------------------------------------------------------- 4. constant band
# the last case: over its 7 x 181 pixels sum(x^2) / n - mean^2 is 1.2e-7, not 0 (float64 rounding),
# which a variance test would take for a band that varies (std 3e-4)
@pytest.mark.parametrize("constant, shape, files", [(0.0, (10, 12), 3), (7.0, (10, 12), 3), (1234.0, (10, 12), 3),
                                                    (24308.23046875, (7, 181), 1)])
def test_a_constant_band_gets_std_1_and_normalises_finitely(tmp_path, constant, shape, files):
    """``band_statistics``: a band that never varies gets std 1 (never 0), so normalising with the
    statistics gives finite values; the varying bands keep their real mean / std."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(files):
        tile = rng.integers(800, 1200, (*shape, 3)).astype(np.float32)
        tile[..., 1] = constant
        paths.append(tmp_path / f"tile_{i}.npy")
        np.save(paths[-1], tile)
    mean, std = band_statistics(paths)
    stacked = np.concatenate([np.load(p).reshape(-1, 3) for p in paths]).astype(np.float64)
    assert std[1] == 1.0  # documented: never 0
    assert mean[1] == pytest.approx(constant)
    np.testing.assert_allclose([mean[0], mean[2]], stacked.mean(0)[[0, 2]], rtol=1e-9)
    np.testing.assert_allclose([std[0], std[2]], stacked.std(0)[[0, 2]], rtol=1e-6)
    spec = InputSpec(in_channels=3, rgb_bands=[0, 1, 2], mean=mean, std=std, arrays=True)
    out = normalize(spec)(read_input(paths[0]))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # (constant - mean) / 1


# ---------------------------------------------------------------------- 5. sliding windows
# one copy (runtime/windows.py) for both paths; each checked by the name its path imports it under
WINDOW_STARTS = [windows.window_starts, seg_inference.window_starts]
WINDOW_IDS = ["runtime", "segment"]


@pytest.mark.parametrize("window_starts", WINDOW_STARTS, ids=WINDOW_IDS)
def test_windows_that_fit_the_border_exactly_have_no_duplicate_last_window(window_starts):
    """size = window + k * stride: the regular starts already end at the border; the last start
    (size - window) must come once, not be appended again."""
    for k in range(6):
        size = 28 + 14 * k
        starts = window_starts(size, 28, 14)
        assert starts == list(range(0, size - 28 + 1, 14)), (size, starts)
        assert starts.count(size - 28) == 1
    assert window_starts(70, 28, 14) == [0, 14, 28, 42]
    assert window_starts(71, 28, 14) == [0, 14, 28, 42, 43]  # one pixel over: one more window at the border


@pytest.mark.parametrize("window_starts", WINDOW_STARTS, ids=WINDOW_IDS)
def test_window_starts_brute_force_properties(window_starts):
    """Over many (size, window, stride) with stride <= window (the strides inference uses):
    starts strictly increasing, first 0, last max(0, size - window), no duplicates, every pixel
    of 0..size covered, and every window inside the image (when it fits)."""
    for window in (1, 2, 5, 14, 28):
        for stride in range(1, window + 1):
            for size in range(1, 3 * window + 2 * stride + 3):
                starts = window_starts(size, window, stride)
                where = (size, window, stride, starts)
                assert starts[0] == 0 and starts[-1] == max(0, size - window), where
                assert all(a < b for a, b in itertools.pairwise(starts)), where
                assert len(set(starts)) == len(starts), where
                assert all(b - a <= stride for a, b in itertools.pairwise(starts)), where
                covered = np.zeros(size, dtype=bool)
                for s in starts:
                    assert s >= 0 and (s + window <= size or size <= window), where
                    covered[s:s + window] = True
                assert covered.all(), where


# ------------------------------------------------------------------- 6. ONNX dynamic batch
@pytest.mark.parametrize("kind, exporter", [
    ("classify", "legacy"), ("detect", "legacy"),
    pytest.param("classify", "dynamo", marks=pytest.mark.slow),  # ~16 s on 2 cores: make test-slow
])
def test_onnx_graphs_declare_a_symbolic_batch_on_every_output(kind, exporter, tmp_path_factory):
    """The exported graph's declared inputs AND outputs have a symbolic first dimension
    (``dim_param``), not a fixed number, and it is the inputs' batch symbol: a consumer reading
    the declared shapes (TensorRT, onnxruntime's shape checks, a server sizing buffers) sees one
    dynamic batch through the graph."""
    onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript, onnxruntime) is not installed")
    from tests.export_runs import exported

    folder = exported(kind, tmp_path_factory, exporter)
    graph = onnx.load(str(folder / "model.onnx")).graph
    outputs = {o.name: o for o in graph.output}
    expected = {"classify": {"logits"}, "detect": {"scores", "labels", "boxes"}}[kind]
    assert set(outputs) == expected
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the images' batch symbol
    assert batch
    for value in [*graph.input, *graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert first.WhichOneof("value") == "dim_param" and first.dim_param, (value.name, str(first))
        assert not first.HasField("dim_value"), (value.name, first.dim_value)
        # one symbol for every batch axis: the outputs hold as many rows as the images, declared so
        # (not a fresh unknown such as the legacy exporter's 'Gemmlogits_dim_0' when outputs are not
        # declared dynamic)
        assert first.dim_param == batch, (value.name, first.dim_param, batch)


# ------------------------------------------------------------ 7. linked archive members
def _zip_with_symlink(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/ok.txt", "fine")
        link = zipfile.ZipInfo("data/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")


def _tar_with_link(path: Path, kind: bytes) -> None:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("data/ok.txt")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = kind, ("/etc/passwd" if kind == tarfile.SYMTYPE else "data/ok.txt")
        tf.addfile(link)


@pytest.mark.parametrize("archive, reason", [
    ("zip-symlink", r"member 'data/link' is a symbolic link; links are refused"),
    ("tar-symlink", r"member 'data/link' is a link \(to '/etc/passwd'\); links are refused"),
    ("tar-hardlink", r"member 'data/link' is a link \(to 'data/ok\.txt'\); links are refused"),
])
def test_an_archive_with_a_link_member_is_refused_saying_it_is_a_link(tmp_path, archive, reason):
    """``safe_extract``: a symbolic (or hard) link member refuses the whole archive with the REASON
    (it is a link, links are refused), not only the member's name; nothing is extracted."""
    path = tmp_path / ("a.zip" if archive.startswith("zip") else "a.tar")
    if archive == "zip-symlink":
        _zip_with_symlink(path)
    else:
        _tar_with_link(path, tarfile.SYMTYPE if archive == "tar-symlink" else tarfile.LNKTYPE)
    target = tmp_path / "out"
    with pytest.raises(DataError, match=reason) as err:
        safe_extract(path, target)
    message = str(err.value)
    assert "nothing was extracted" in message and "device or FIFO" not in message
    assert not target.exists() or not any(target.iterdir())  # not even the good member before it


# ------------------------------------------------------------ 8. linear grid, accumulation
def test_linear_grid_with_accumulation_equals_the_head_trained_alone(tiny_folder, tmp_path):
    """``--accumulate 2`` on 3 batches per epoch (a group of 2, then a last group of 1): the linear
    grid's head divides each micro-batch loss by its group's size, as the trainer does, so it equals
    the head trained alone with ``--cache-features`` bit for bit (records and weights)."""
    opts = tiny_options(tmp_path / "unused", data=str(tiny_folder), epochs=2, accumulate=2)
    opts.pop("out")
    result = api.sweep("classify", linear_grid={"lr": [3e-2]}, out=tmp_path / "sweep", **opts)
    (name,) = [r["name"] for r in result["rows"]]
    together = json.loads((tmp_path / "sweep" / "heads.json").read_text())["heads"][name]["history"]
    weights = load_file(str(tmp_path / "sweep" / "heads" / f"{name}.safetensors"))
    alone = api.train(task="classify", adapter="none", cache_features=True, lr=3e-2, out=str(tmp_path / "alone"),
                      **opts)
    run = Path(alone["run_dir"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "accumulate: 2" in (run / "config.yaml").read_text()
    assert len(together) == len(records) == 2
    for mine, theirs in zip(together, records):
        for key in ("train/loss", "lr/head", "val/loss", "val/top1"):
            assert mine[key] == theirs[key], key
    final = load_file(str(run / "checkpoints" / "last" / "head.safetensors"))
    assert set(final) == set(weights) and all(torch.equal(weights[k], final[k]) for k in final)
