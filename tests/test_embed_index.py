"""The similarity index and near-duplicates: exact search equals brute force, the graph's recall on
clustered data, the padding never leaks, save -> load round-trips, hostile folders are refused, and
a planted train/val copy is the first duplicate pair."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinotune.embed import index as vi
from dinotune.embed.duplicates import duplicates_report, near_duplicates
from dinotune.embed.index import build_index, exact_neighbours, is_index, load_index, save_index
from dinotune.embed.store import Embeddings
from dinotune.errors import ConfigError, DataError

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Small searches: one OpenMP thread is as fast, and does not spin when other tests keep the cores busy."""
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def _rows(vectors: np.ndarray, splits: list[str] | None = None) -> Embeddings:
    n = len(vectors)
    return Embeddings([f"img/{i}.jpg" for i in range(n)], splits or ["train"] * n, [f"c{i % 3}" for i in range(n)],
                      np.asarray(vectors, np.float32), {"model": "random:small", "pool": "cls", "image_size": 112,
                                                        "in_channels": 3, "dim": vectors.shape[1]})


def _clustered(n: int, dim: int, seed: int, clusters: int = 30, spread: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def test_flat_equals_brute_force_and_scores_descend():
    rng = np.random.default_rng(0)
    vectors, queries = rng.standard_normal((400, 24)), rng.standard_normal((25, 24))
    index = build_index(_rows(vectors))
    assert index.meta["kind"] == "flat" and len(index) == 400
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = exact_neighbours(vectors, queries, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (25, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_hnsw_recall_on_clustered_data(monkeypatch):
    # overlapping clusters: FAISS's own default efSearch (16) finds only ~0.89 of the 10 nearest here
    data = _clustered(3100, 64, 1, clusters=50, spread=2.0)
    vectors, queries = data[:3000], data[3000:]  # held-out queries from the same clusters
    monkeypatch.setattr(vi, "EXACT_LIMIT", 1000)  # auto picks the graph above the limit
    index = build_index(_rows(vectors))
    assert index.meta["kind"] == "hnsw" and index.meta["efSearch"] == vi.HNSW_EF_SEARCH
    scores, ids = index.search(queries, 10)
    truth = exact_neighbours(vectors, queries, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
    assert recall >= 0.9, recall
    assert (np.diff(scores, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_k_beyond_count_and_bad_queries(kind):
    vectors = np.random.default_rng(2).standard_normal((5, 8))
    index = build_index(_rows(vectors), kind)
    scores, ids = index.search(vectors[0], 10)  # one 1-D query
    assert ids.shape == scores.shape == (1, 5) and (ids >= 0).all() and sorted(ids[0]) == [0, 1, 2, 3, 4]
    assert ids[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="at least 1"):
        index.search(vectors, 0)
    with pytest.raises(ConfigError, match="8-dimensional"):
        index.search(np.ones((2, 9)), 3)
    with pytest.raises(ConfigError, match="kind"):
        build_index(_rows(vectors), "ivf")
    with pytest.raises(ConfigError, match="no rows"):
        build_index(_rows(np.zeros((0, 8))))


def test_padding_never_leaks():
    """Where the graph finds fewer than k rows FAISS pads with -1; those queries are answered exactly."""

    class Padded:  # the real index, but the first query comes back one row short
        def __init__(self, inner):
            self.inner, self.ntotal, self.d = inner, inner.ntotal, inner.d

        def search(self, x, k, params=None):
            scores, ids = self.inner.search(x, k)
            scores[0, -1], ids[0, -1] = -3.4e38, -1
            return scores, ids

        def reconstruct_n(self, start, n):
            return self.inner.reconstruct_n(start, n)

    vectors = np.random.default_rng(5).standard_normal((40, 8))
    index = build_index(_rows(vectors))
    index.index = Padded(index.index)
    scores, ids = index.search(vectors[:3], 6)
    np.testing.assert_array_equal(ids, exact_neighbours(vectors, vectors[:3], 6)[1])
    assert (scores > -1.01).all()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    vectors = _clustered(300, 16, 3)
    index = build_index(_rows(vectors, ["train", "val", ""] * 100), kind)
    folder = save_index(index, tmp_path / "idx")
    assert is_index(folder) and sorted(p.name for p in folder.iterdir()) == ["index.faiss", "index.json",
                                                                             "items.parquet"]
    loaded = load_index(folder)
    assert (loaded.paths, loaded.splits, loaded.labels) == (index.paths, index.splits, index.labels)
    assert loaded.meta == dict(index.meta, format=1)
    for a, b in zip(loaded.search(vectors[:20], 7), index.search(vectors[:20], 7)):
        np.testing.assert_array_equal(a, b)
    save_index(index, folder)  # an earlier index folder may be overwritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="other files"):
        save_index(index, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def _count_plus_one(folder):
    meta = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps(dict(meta, count=meta["count"] + 1)))


@pytest.mark.parametrize("damage, file, match", [
    (lambda f: (f / "index.json").write_text('{"format": 1, "count": '), "index.json", "not valid JSON"),
    (lambda f: (f / "index.json").write_text('{"format": 1, "kind": "flat"}'), "index.json", "'count'"),
    (_count_plus_one, "items.parquet", "51 rows|50 rows"),
    (lambda f: (f / "index.faiss").write_bytes((f / "index.faiss").read_bytes() + bytes(2**21)), "index.faiss",
     "more than"),
    (lambda f: (f / "index.faiss").write_bytes(b"garbage" * 10), "index.faiss", "not a readable FAISS"),
    (lambda f: (f / "items.parquet").unlink(), "items.parquet", "missing"),
])
def test_load_refuses_damaged_folders(tmp_path, damage, file, match):
    folder = save_index(build_index(_rows(_clustered(50, 8, 4))), tmp_path / "idx")
    damage(folder)
    with pytest.raises(DataError, match=match) as error:
        load_index(folder)
    assert file in str(error.value)


def test_near_duplicates_leaks_first():
    e = np.eye(16, dtype=np.float32)
    vectors = np.stack([e[0], e[1], e[2], e[2], e[4], e[0] + 0.1 * e[15], e[1] + 0.5 * e[14], e[4], e[8], e[9]])
    splits = ["train", "train", "train", "train", "train", "val", "val", "", "val", "val"]
    rows = _rows(vectors, splits)
    pairs = near_duplicates(rows, threshold=0.95, neighbours=3)
    # 0~5 across train/val (0.995) first; then the exact copies 2=3 (train) and 4=7 (no split: no leak);
    # 1~6 (0.894) is below the threshold
    assert [(p.a, p.b, p.leak) for p in pairs] == [(0, 5, True), (2, 3, False), (4, 7, False)]
    assert pairs[0].similarity == pytest.approx(1 / np.sqrt(1.01), abs=1e-5)
    assert pairs[1].similarity == pytest.approx(1.0, abs=1e-5) and pairs[1].similarity <= 1.0
    report = duplicates_report(rows, pairs, 0.95)
    assert {k: report[k] for k in ("images", "threshold", "pairs", "leaks")} == {"images": 10, "threshold": 0.95,
                                                                                 "pairs": 3, "leaks": 1}
    assert report["results"][0] == {"a": "img/0.jpg", "b": "img/5.jpg", "similarity": round(pairs[0].similarity, 6),
                                    "splits": ["train", "val"], "labels": ["c0", "c2"], "leak": True}
    json.dumps(report)
    lower = near_duplicates(rows, threshold=0.85, neighbours=3)
    assert (1, 6) in {(p.a, p.b) for p in lower} and len(lower) == 4


@pytest.mark.parametrize("threshold, neighbours", [(0.0, 10), (1.5, 10), (-0.2, 10), (0.9, 0)])
def test_near_duplicates_refuses_bad_settings(threshold, neighbours):
    with pytest.raises(ConfigError):
        near_duplicates(_rows(np.eye(4)), threshold=threshold, neighbours=neighbours)
