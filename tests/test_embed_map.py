"""The dataset map: PCA / UMAP projection, the outliers "farthest from their class", and the two
pictures (the map, the neighbours of a search). No backbone: embeddings are made up here."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
from PIL import Image

from dinotune.embed.projection import MIN_UMAP_ROWS, dataset_map, outliers, project
from dinotune.embed.store import Embeddings
from dinotune.errors import ConfigError, DataError
from dinotune.viz.embedding_map import map_figure
from dinotune.viz.neighbours import MAX_HITS, neighbours_figure


def _rows(paths, labels, vectors) -> Embeddings:
    return Embeddings(list(paths), ["train"] * len(paths), list(labels), np.asarray(vectors, np.float32), {})


def _clusters(n_per: int = 10, k: int = 3, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    return np.concatenate([c + rng.normal(size=(n_per, d)) for c in centres]).astype(np.float32)


@pytest.fixture
def no_umap(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` raises ImportError


@pytest.fixture
def fake_umap(monkeypatch):
    calls = []

    class UMAP:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def fit_transform(self, x):
            calls.append(np.asarray(x))
            return np.stack([np.arange(len(x)), -np.arange(len(x))], axis=1).astype(np.float64)

    module = types.ModuleType("umap")
    module.UMAP = UMAP
    monkeypatch.setitem(sys.modules, "umap", module)
    return calls


def test_pca_equals_an_svd_of_the_normalised_vectors_up_to_sign(no_umap):
    x = _clusters()
    coords, used = project(x, "pca")
    assert used == "pca" and coords.shape == (len(x), 2) and coords.dtype == np.float32
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    u, s, _ = np.linalg.svd(unit - unit.mean(axis=0), full_matrices=False)
    reference = u[:, :2] * s[:2]
    signs = np.sign((coords * reference).sum(axis=0))
    np.testing.assert_allclose(coords * signs, reference, atol=1e-5)
    assert project(x, "auto")[1] == "pca"  # umap not importable: auto falls back


def test_pca_sizes_and_refusals(no_umap):
    coords, _ = project(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "pca")
    assert coords.shape == (2, 2) and np.isfinite(coords).all()
    assert coords[0, 0] == pytest.approx(-coords[1, 0]) and abs(coords[0, 0]) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(DataError, match="at least 2"):
        project(np.ones((1, 4)), "pca")
    with pytest.raises(DataError, match="NaN"):
        project(np.array([[1.0, np.nan], [0.0, 1.0]]), "pca")
    with pytest.raises(ConfigError, match="pca"):
        project(np.ones((3, 4)), "tsne")
    with pytest.raises(ConfigError, match="pip install umap-learn"):
        project(_clusters(), "umap")


def test_umap_is_used_when_importable(fake_umap):
    x = _clusters(n_per=10)  # 30 rows >= MIN_UMAP_ROWS
    coords, used = project(x, "auto", seed=7)
    assert used == "umap" and coords.dtype == np.float32
    np.testing.assert_array_equal(coords[:, 0], np.arange(len(x)))
    kwargs, seen = fake_umap
    assert kwargs == {"n_components": 2, "metric": "cosine", "random_state": 7}
    np.testing.assert_allclose(np.linalg.norm(seen, axis=1), 1.0, rtol=1e-5)  # given normalised vectors
    assert project(x, "umap")[1] == "umap"
    fake_umap.clear()
    small = x[: MIN_UMAP_ROWS - 1]
    assert project(small, "auto")[1] == "pca" and not fake_umap  # too few for a neighbour graph
    with pytest.raises(ConfigError, match="at least"):
        project(small, "umap")


def test_outliers_farthest_from_their_class_first():
    e1, e2, e3 = np.eye(3)
    paths = [f"a/{i}.jpg" for i in range(5)] + ["a/planted.jpg", "b/0.jpg", "b/1.jpg", "u/0.jpg", "u/1.jpg"]
    labels = ["a"] * 6 + ["b", "b", "", ""]
    vectors = [e1] * 5 + [e2] + [e1, e3] + [e3, -e1]
    found = outliers(_rows(paths, labels, vectors), top=3)
    # centroid of a: (5 e1 + e2) / 6, direction (5, 1, 0) / sqrt(26); the planted row's cosine is 1 / sqrt(26)
    assert found[0]["path"] == "a/planted.jpg" and found[0]["label"] == "a" and found[0]["split"] == "train"
    assert found[0]["distance"] == pytest.approx(1 - 1 / math.sqrt(26), abs=1e-6)
    # five equal distances: MAD 0, so the mean absolute deviation (d1 - d0) / 6 * 1.2533 is the scale
    assert found[0]["z"] == pytest.approx(6 / 1.2533, abs=1e-5)
    # the rest of class a (z 0) by path; class b (2 rows) and the unlabelled rows are not considered
    assert [f["path"] for f in found[1:]] == ["a/0.jpg", "a/1.jpg"] and found[1]["z"] == 0
    assert len(outliers(_rows(paths, labels, vectors), top=20)) == 6
    assert outliers(_rows(paths, labels, vectors), top=0) == []
    assert outliers(_rows(paths[6:], labels[6:], vectors[6:])) == []  # no class of 3


def test_dataset_map_writes_the_picture(tmp_path, no_umap):
    x = _clusters(n_per=8)
    x[0] = x[-1]  # a row of class 0 placed in class 2
    labels = [f"class {i // 8}" for i in range(len(x))]
    labels[3] = ""
    paths = [f"images/{i:02d}.png" for i in range(len(x))]
    result = dataset_map(_rows(paths, labels, x), tmp_path / "maps" / "map.png", top=4)
    assert result["method"] == "pca" and result["images"] == 24 and result["classes"] == 3
    assert result["picture"] == str(tmp_path / "maps" / "map.png") and len(result["outliers"]) == 4
    assert result["outliers"][0]["path"] == "images/00.png"
    with Image.open(result["picture"]) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 600 and im.height >= 400


def test_map_of_many_classes_has_no_legend_but_draws(tmp_path):
    n = 50
    coords = np.random.default_rng(1).normal(size=(n, 2))
    path = map_figure(coords, [f"c{i % 25}" for i in range(n)], tmp_path / "many.png", title="25 classes",
                      highlight=list(range(12)), names=[f"x/{i}.jpg" for i in range(n)])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 600
    with pytest.raises(ValueError, match="N x 2"):
        map_figure(coords[:3], ["a", "b"], tmp_path / "bad.png", title="")


def test_neighbours_picture_grows_with_hits_and_survives_unreadable_images(tmp_path):
    queries = [("q/cat.jpg", Image.new("RGB", (300, 200), (200, 60, 40))),
               ("q/dog.png", Image.new("L", (40, 90), 128))]

    def hits(k):
        image = [Image.new("RGB", (64 + 20 * j, 64), (0, 90, 200)) for j in range(k)]
        image[1] = None  # could not be read
        return [[(f"db/{q}_{j}.jpg", 0.9 - 0.1 * j, image[j]) for j in range(k)] for q in range(len(queries))]

    sizes = {}
    for k in (2, 5, MAX_HITS + 3):
        path = neighbours_figure(queries, hits(k), tmp_path / f"nb{k}.png", thumb=64)
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG"
            sizes[k] = im.size
    assert sizes[2][0] < sizes[5][0] < sizes[MAX_HITS + 3][0]
    assert sizes[2][1] == sizes[5][1] and sizes[2][1] > 2 * 64  # two rows of 64 px thumbnails and captions
    assert sizes[MAX_HITS + 3][0] < 2 * 16 + 24 + (MAX_HITS + 1) * (64 + 8)  # capped at MAX_HITS hits
    one = neighbours_figure(queries[:1], hits(2)[:1], tmp_path / "one.png", thumb=64)
    with Image.open(one) as im:
        assert im.height < sizes[2][1]
    with pytest.raises(ValueError, match="hit lists"):
        neighbours_figure(queries, hits(2)[:1], tmp_path / "bad.png")
