"""``dinotune embed`` and ``dinotune knn``: the k-NN protocol against a brute-force reference, the
embeddings of a run against its backbone, a completed file against a single pass, and the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dinotune
from dinotune import api
from dinotune.cli import main
from dinotune.ops.knn import knn_classify
from dinotune.embed.store import read_embeddings
from dinotune.errors import ConfigError
from tests.conftest import make_class_folders, tiny_options

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(train, train_labels, queries, query_labels, k, t):
    """The protocol written out per query with plain Python: cosine similarity, the k most similar
    (ties: earlier training row), votes exp(sim / t) per label, labels ranked by votes (ties: sorted name)."""
    classes = sorted(set(train_labels))
    hits1 = hits5 = 0
    for q, truth in zip(queries, query_labels):
        qn = [v / math.sqrt(sum(x * x for x in q)) for v in q]
        sims = []
        for i, row in enumerate(train):
            rn = [v / math.sqrt(sum(x * x for x in row)) for v in row]
            sims.append((sum(a * b for a, b in zip(qn, rn)), i))
        nearest = sorted(sims, key=lambda s: (-s[0], s[1]))[:k]
        votes = {c: 0.0 for c in classes}
        for sim, i in nearest:
            votes[train_labels[i]] += math.exp(sim / t)
        ranked = sorted(classes, key=lambda c: (-votes[c], classes.index(c)))
        hits1 += ranked[0] == truth
        hits5 += truth in ranked[:5]
    return hits1 / len(queries), hits5 / len(queries)


def test_knn_equals_a_brute_force_reference():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 6)).astype(np.float32)
    labels = [f"c{i % 7}" for i in range(40)]
    queries = rng.normal(size=(15, 6)).astype(np.float32)
    qlabels = [f"c{i % 7}" for i in range(15)]
    out = knn_classify(train, labels, queries, qlabels, ks=(1, 5, 20, 40), temperature=0.07)
    for k in (1, 5, 20, 40):
        top1, top5 = _reference(train.tolist(), labels, queries.tolist(), qlabels, k, 0.07)
        assert out[f"k={k}"]["top1"] == pytest.approx(top1)
        assert out[f"k={k}"]["top5"] == pytest.approx(top5)


def test_knn_ties_go_to_the_earlier_training_row_and_the_first_class():
    # two training rows equally similar to the query (the same vector), labelled b then a: k=1 takes b
    train = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    out = knn_classify(train, ["b", "a", "c"], np.array([[1.0, 0.0]], np.float32), ["b"], ks=(1,))
    assert out["k=1"]["top1"] == 1.0
    # k=2: a and b tie on votes; the class first in sorted order (a) ranks first
    out = knn_classify(train, ["b", "a", "c"], np.array([[1.0, 0.0]], np.float32), ["a"], ks=(2,))
    assert out["k=2"]["top1"] == 1.0
    assert _reference(train.tolist(), ["b", "a", "c"], [[1.0, 0.0]], ["a"], 2, 0.07)[0] == 1.0
    # scale does not matter (L2-normalised)
    out = knn_classify(train * 5, ["b", "a", "c"], np.array([[3.0, 0.0]], np.float32), ["b"], ks=(1,))
    assert out["k=1"]["top1"] == 1.0


def test_k_larger_than_the_training_set_is_refused():
    train = np.eye(3, dtype=np.float32)
    with pytest.raises(ConfigError, match="more than the 3 training embeddings"):
        knn_classify(train, ["a", "b", "c"], train, ["a", "b", "c"], ks=(2, 4))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_data")
    make_class_folders(root / "train", ["red", "green"], 4, size=40)
    make_class_folders(root / "val", ["red", "green"], 2, size=40, seed=1)
    return root


def test_embed_writes_the_columns_and_settings(folders, tmp_path):
    out = api.embed("random:tiny", folders, tmp_path / "e.parquet", image_size=28, device="cpu", progress=False)
    rows = read_embeddings(out)
    assert len(rows) == 12 and rows.vectors.dtype == np.float32 and rows.vectors.shape[1] > 0
    assert sorted(set(rows.splits)) == ["train", "val"] and sorted(set(rows.labels)) == ["green", "red"]
    assert rows.meta["model"] == "random:tiny" and rows.meta["pool"] == "cls" and rows.meta["image_size"] == 28
    assert rows.meta["version"] == dinotune.__version__
    import pyarrow.parquet as pq
    schema = pq.read_schema(out)
    assert schema.names == ["path", "split", "label", "embedding"]
    import pyarrow as pa
    assert pa.types.is_list(schema.field("embedding").type)
    assert schema.field("embedding").type.value_type == pa.float32()
    both = read_embeddings(api.embed("random:tiny", folders, tmp_path / "b.parquet", image_size=28, pool="both",
                                     device="cpu", progress=False))
    mean = read_embeddings(api.embed("random:tiny", folders, tmp_path / "m.parquet", image_size=28, pool="mean",
                                     device="cpu", progress=False))
    np.testing.assert_allclose(both.vectors, np.concatenate([rows.vectors, mean.vectors], axis=1), atol=1e-5)


def test_a_plain_folder_has_no_labels(folders, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(folders / "train" / "red", plain)
    rows = read_embeddings(api.embed("random:tiny", plain, tmp_path / "p.parquet", image_size=28, device="cpu",
                                     progress=False))
    assert rows.labels == [""] * 4 and rows.splits == [""] * 4


def test_resumed_embedding_equals_a_single_pass(folders, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folders, data)
    moved = tmp_path / "later"
    shutil.copytree(data / "train" / "green", moved)
    shutil.rmtree(data / "train" / "green")
    out = tmp_path / "r.parquet"
    api.embed("random:tiny", data, out, image_size=28, device="cpu", progress=False, save_every=3)
    assert len(read_embeddings(out)) == 8
    shutil.copytree(moved, data / "train" / "green")
    api.embed("random:tiny", data, out, image_size=28, device="cpu", progress=False, batch_size=3)
    single = api.embed("random:tiny", data, tmp_path / "s.parquet", image_size=28, device="cpu", progress=False)
    a, b = read_embeddings(out), read_embeddings(single)
    assert sorted(a.paths) == sorted(b.paths) and len(set(a.paths)) == 12
    by_path = {p: (s, lab, v) for p, s, lab, v in zip(b.paths, b.splits, b.labels, b.vectors)}
    for p, s, lab, v in zip(a.paths, a.splits, a.labels, a.vectors):
        assert (s, lab) == by_path[p][:2]
        np.testing.assert_allclose(v, by_path[p][2], atol=1e-5)
    with pytest.raises(ConfigError, match="other settings"):
        api.embed("random:tiny", data, out, image_size=42, device="cpu", progress=False)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_knn_from_the_model_equals_knn_from_the_file(folders, tmp_path):
    out = api.embed("random:tiny", folders, tmp_path / "e.parquet", image_size=28, device="cpu", progress=False)
    from_file = api.knn(out, k=(1, 3, 8))
    from_model = api.knn("random:tiny", data=folders, k=(1, 3, 8), image_size=28, device="cpu", progress=False,
                         out=tmp_path / "m.json")
    for k in ("k=1", "k=3", "k=8"):
        assert from_file[k] == from_model[k]
    # saved by default beside the embeddings file
    assert from_file["file"] == str(tmp_path / "e.knn.json")
    assert json.loads((tmp_path / "e.knn.json").read_text()) == from_file
    assert json.loads((tmp_path / "m.json").read_text())["k=8"] == from_model["k=8"]
    assert from_file["train"] == 8 and from_file["val"] == 4 and from_file["classes"] == 2
    with pytest.raises(ConfigError, match="more than the 8 training"):
        api.knn(out, k=(9,))


def test_embed_of_a_run_equals_its_backbones_features(folders, tmp_path):
    from dinotune.data.bands import InputSpec, read_input
    from dinotune.data.transforms import classify_eval_transform

    summary = dinotune.train(task="classify", data=str(folders), **tiny_options(tmp_path / "run", epochs=1))
    run = Path(summary.path)
    rows = read_embeddings(api.embed(run, folders / "val", tmp_path / "run.parquet", device="cpu", progress=False))
    assert rows.meta["image_size"] == 28
    backbone = dinotune.load(run, device="cpu").model.backbone.eval()
    transform = classify_eval_transform(28, InputSpec())
    with torch.no_grad():
        for path, vector in zip(rows.paths, rows.vectors):
            x = transform(read_input(Path(path))).as_subclass(torch.Tensor)[None]
            np.testing.assert_allclose(vector, backbone(x).cls[0].numpy(), atol=1e-5)


def test_the_cli_prints_and_saves_the_json(folders, tmp_path, capsys):
    out = tmp_path / "e.parquet"
    assert main(["embed", "random:tiny", str(folders), "--out", str(out), "--image-size", "28",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["knn", str(out), "--k", "2", "5", "--out", str(tmp_path / "k.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) >= {"k=2", "k=5", "train", "val"}
    assert json.loads((tmp_path / "k.json").read_text()) == printed
    assert main(["knn", "random:tiny"]) == 2  # a model needs --data


@pytest.mark.skipif(not os.environ.get("DINOTUNE_SHARED"), reason="needs DINOTUNE_SHARED (hymenoptera)")
def test_hymenoptera_knn_equals_the_protocol_on_the_embed_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a model's result is saved as ./knn.json
    data = Path(os.environ["DINOTUNE_SHARED"]) / "data" / "hymenoptera"
    if not data.is_dir():
        pytest.skip(f"no {data}")
    out = tmp_path / "h.parquet"
    assert main(["embed", "random:tiny", str(data), "--out", str(out), "--image-size", "56", "--device", "cpu",
                 "--batch-size", "64"]) == 0
    capsys.readouterr()
    assert main(["knn", "random:tiny", "--data", str(data), "--k", "20", "--temperature", "0.07",
                 "--image-size", "56", "--device", "cpu", "--batch-size", "64"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = read_embeddings(out)
    train, val = rows.where("train"), rows.where("val")
    top1, top5 = _reference(train.vectors.tolist(), train.labels, val.vectors.tolist(), val.labels, 20, 0.07)
    assert printed["k=20"]["top1"] == pytest.approx(top1) and printed["k=20"]["top5"] == pytest.approx(top5)
    assert (printed["train"], printed["val"]) == (len(train), len(val))
    assert json.loads((tmp_path / "knn.json").read_text()) == printed


@pytest.fixture(scope="module")
def indexed(folders, tmp_path_factory):
    """``folders`` embedded and indexed through the CLI: (embeddings file, index folder)."""
    root = tmp_path_factory.mktemp("indexed")
    emb = api.embed("random:tiny", folders, root / "e.parquet", image_size=28, device="cpu", progress=False)
    assert main(["index", str(emb), "--out", str(root / "index")]) == 0
    return emb, root / "index"


def test_search_answers_the_query_first_and_exact_searchs_neighbours(folders, indexed, tmp_path, capsys):
    from dinotune.embed.index import exact_neighbours

    emb, index = indexed
    query = sorted((folders / "train" / "red").iterdir())[1]
    capsys.readouterr()
    assert main(["search", str(index), str(query), "--k", "5", "--picture", str(tmp_path / "s.png"),
                 "--device", "cpu"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    hits = result["hits"]
    assert result["query"] == str(query.absolute()) and hits[0]["path"] == str(query.absolute())
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    rows = read_embeddings(emb)
    _, ids = exact_neighbours(rows.vectors, rows.vectors[rows.paths.index(str(query.absolute()))][None], 5)
    assert [h["path"] for h in hits] == [rows.paths[i] for i in ids[0]]
    assert [h["label"] for h in hits] == [rows.labels[i] for i in ids[0]]
    from PIL import Image

    with Image.open(tmp_path / "s.png") as picture:  # the query beside its five hits
        assert picture.width > 4 * picture.height


def _mosaics(root: Path, counts: dict[str, int]) -> Path:
    """``root/SPLIT/{a,b}/I.png``: 48 px pictures of 4 x 4 random colour cells, all unlike each other
    (a random-weight backbone tells them apart, which it cannot for one colour with noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for i in range(n):
            folder = root / split / ("ab"[i % 2])
            folder.mkdir(parents=True, exist_ok=True)
            cells = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(cells).resize((48, 48), Image.Resampling.NEAREST).save(folder / f"{i}.png")
    return root


def test_duplicates_lists_a_planted_resized_copy_across_splits_first(tmp_path, capsys):
    from PIL import Image

    data = _mosaics(tmp_path / "data", {"train": 8, "val": 4})
    original = data / "train" / "b" / "3.png"
    leaked = data / "val" / "b" / "copy.png"
    with Image.open(original) as image:
        image.resize((53, 53), Image.Resampling.BILINEAR).save(leaked)  # resized: not the same file
    twin = data / "train" / "a" / "twin.png"
    shutil.copy(data / "train" / "a" / "0.png", twin)  # an exact copy inside one split: more similar
    capsys.readouterr()
    assert main(["duplicates", str(data), "--model", "random:tiny", "--image-size", "28", "--device", "cpu",
                 "--out", str(tmp_path / "d.json")]) == 0
    said = capsys.readouterr().out.splitlines()
    report = json.loads((tmp_path / "d.json").read_text())
    assert (report["images"], report["pairs"], report["leaks"]) == (14, 2, 1)
    leak, same = report["results"]
    assert leak["leak"] and {leak["a"], leak["b"]} == {str(original.absolute()), str(leaked.absolute())}
    assert sorted(leak["splits"]) == ["train", "val"] and leak["similarity"] >= 0.95
    assert not same["leak"] and same["similarity"] > leak["similarity"]  # leaks first, whatever the similarity
    assert {same["a"], same["b"]} == {str((data / "train" / "a" / "0.png").absolute()), str(twin.absolute())}
    assert said[0].startswith("2 pair(s) of 14 images") and "LEAK" in said[1] and "LEAK" not in said[2]


def test_map_draws_the_embeddings_and_lists_outliers(indexed, tmp_path, capsys):
    emb, _ = indexed
    capsys.readouterr()
    assert main(["map", str(emb), "--out", str(tmp_path / "m.png"), "--method", "pca", "--outliers", "3"]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["method"] == "pca" and result["images"] == 12 and result["classes"] == 2
    assert len(result["outliers"]) == 3 and {o["label"] for o in result["outliers"]} <= {"red", "green"}
    from PIL import Image

    with Image.open(tmp_path / "m.png") as picture:
        assert min(picture.size) > 200


def test_items_of_coco_yolo_csv_and_band_array_layouts(folders, tmp_path):
    from dinotune.embed.features import find_items

    coco = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        shutil.copytree(folders / "train" / "red", coco / split)
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_train2017.json").write_text("{}")
    items = find_items(coco)
    assert [(i.split, i.label) for i in items] == [("train", "")] * 4 + [("val", "")] * 4
    yolo = tmp_path / "yolo"
    shutil.copytree(folders / "val" / "green", yolo / "images" / "valid")
    (yolo / "labels" / "valid").mkdir(parents=True)
    assert {(i.split, i.label) for i in find_items(yolo)} == {("val", "")} and len(find_items(yolo)) == 2
    listed = sorted((folders / "train" / "green").iterdir())[:2]
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("Image,Class\n" + "".join(f"{p},g{i}\n" for i, p in enumerate(listed)) + "missing.png,g\n")
    items = find_items(csv_file)
    assert [(Path(i.path), i.split, i.label) for i in items] == [(listed[0], "train", "g0"), (listed[1], "train", "g1")]
    (tmp_path / "plain.csv").write_text("path\n" + str(listed[0]) + "\n")
    assert [(i.split, i.label) for i in find_items(tmp_path / "plain.csv")] == [("", "")]
    bands = tmp_path / "bands"
    for c, name in enumerate(("a", "b")):
        (bands / name).mkdir(parents=True)
        for i in range(2):
            np.save(bands / name / f"{i}.npy", np.random.default_rng(c * 10 + i).random((5, 32, 32), np.float32))
    rows = read_embeddings(api.embed("random:tiny", bands, tmp_path / "b.parquet", image_size=28, device="cpu",
                                     progress=False))
    assert rows.meta["in_channels"] == 5 and rows.labels == ["a", "a", "b", "b"] and np.isfinite(rows.vectors).all()
