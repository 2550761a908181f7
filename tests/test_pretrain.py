"""``dinotune pretrain``: the teacher is the student's EMA, a run resumes to the uninterrupted
run's weights, distillation of a copy of the student costs nothing, a collapse is warned about, and
the run is a backbone for every other command (``train --model RUN``, ``embed``, ``knn``), N-band
arrays included."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dinotune
from dinotune import api
from dinotune.cli import main
from dinotune.config import build_config
from dinotune.tasks.pretrain.teacher import TeacherWeights
from tests.conftest import make_class_folders, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model="random:tiny", image_size=28, batch_size=4, epochs=2, workers=0, progress=False, device="cpu",
            local_crops=1, prototypes=32, head_hidden=32, head_bottleneck=16, check_images="fast")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    make_class_folders(root / "labelled" / "train", ["red", "green"], 4, size=40)
    make_class_folders(root / "labelled" / "val", ["red", "green"], 2, size=40, seed=1)
    make_class_folders(root / "unlabelled", ["red", "green", "blue"], 3, size=40, seed=2)
    return root


def test_the_teacher_is_the_students_ema():
    layer = nn.Linear(3, 2)
    named = dict(layer.named_parameters())
    teacher = TeacherWeights(named)
    start = {k: v.clone() for k, v in teacher.copies().items()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    teacher.update(named, 1.0)  # momentum 1: the teacher does not move
    assert all(torch.equal(teacher.copies()[k], start[k]) for k in start)
    teacher.update(named, 0.75)
    torch.testing.assert_close(teacher.copies()["weight"], 0.75 * start["weight"] + 0.25 * layer.weight.detach())
    student = layer.weight.detach().clone()
    with teacher.swapped_in(named):
        assert torch.equal(layer.weight.detach(), teacher.copies()["weight"])
    assert torch.equal(layer.weight.detach(), student)  # the student's weights come back exactly
    assert "weight" in teacher.state_dict() and "bias" in teacher.state_dict()  # saved with the head


def test_resume_reproduces_the_uninterrupted_run(folders, tmp_path):
    opts = dict(TINY, epochs=2, data=str(folders / "unlabelled"))
    full = make_trainer(build_config("pretrain", **opts, out=str(tmp_path / "a")), tmp_path / "a")
    result = full.fit()
    # no --val-data: the last epoch is the model (a self-distillation loss ranks no epochs)
    assert result["best"]["epoch"] == result["last"]["epoch"] == 2 and result["monitor"]["key"] == "epoch"
    cfg = build_config("pretrain", **opts, out=str(tmp_path / "b"))
    interrupted = make_trainer(cfg, tmp_path / "b")
    interrupted.stop_after_epoch = 1
    interrupted.fit()
    resumed = make_trainer(cfg, tmp_path / "b")
    resumed.fit(resume=True)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    teacher = {k: v for k, v in full.model.head.state_dict().items() if k.startswith("teacher.")}
    assert teacher and any(not torch.equal(v, full.model.head.state_dict()[k.replace("teacher.dino__", "dino.")
                                                                          .replace("__", ".")])
                           for k, v in teacher.items() if k.startswith("teacher.dino__"))


def test_distilling_a_copy_of_the_student_costs_nothing(folders, tmp_path):
    cfg = build_config("pretrain", **TINY, data=str(folders / "unlabelled"), distill="random:tiny",
                       out=str(tmp_path / "d"))
    trainer = make_trainer(cfg, tmp_path / "d")
    batch = next(iter(trainer.train_loader))
    out = trainer.task.training_step(trainer.bundle, trainer.model, batch)
    assert float(out["loss"].detach()) == pytest.approx(0.0, abs=1e-6)  # same weights, identity projection
    with torch.no_grad():
        trainer.model.backbone.patch_embedding().weight.mul_(1.5)
    assert float(trainer.task.training_step(trainer.bundle, trainer.model, batch)["loss"].detach()) > 1e-3


def test_a_collapse_is_warned_about(folders, tmp_path, monkeypatch):
    said: list[str] = []
    monkeypatch.setattr("dinotune.tasks.pretrain.task.warn", said.append)
    cfg = build_config("pretrain", **TINY, data=str(folders / "unlabelled"), out=str(tmp_path / "c"))
    task = dinotune.tasks.get_task(cfg)
    task.progress = 0.05
    task._collapse_guard(0.999, 1e-5)  # too early to tell
    task.progress = 0.5
    task._collapse_guard(0.6, 0.2)  # healthy
    assert not said
    task._collapse_guard(0.6, 1e-5)  # every class token alike
    task._collapse_guard(0.999, 0.2)  # said once
    assert len(said) == 1
    task._warned = False
    task._collapse_guard(0.999, 0.2)  # uniform targets
    assert len(said) == 2 and all("collapsing" in s and "--momentum" in s for s in said)


def test_the_run_is_a_backbone_for_training_embedding_and_knn(folders, tmp_path, capsys):
    run = tmp_path / "pre"
    argv = ["pretrain", "--data", str(folders / "unlabelled"), "--val-data", str(folders / "labelled"),
            "--out", str(run)] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]
    assert main(argv + ["--no-progress"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["val/knn_top1"] <= 1 for m in metrics) and "train/teacher_entropy" in metrics[-1]
    assert "train/dino" in metrics[-1] and "train/ibot" in metrics[-1] and "train/koleo" in metrics[-1]
    backbone = dinotune.load(run, device="cpu").model.backbone  # the best checkpoint, as RUN/backbone
    from dinotune.backbone.model import DinoBackbone

    saved = DinoBackbone.from_spec(str(run)).eval()  # --model RUN: the backbone the run left
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(saved(x).cls, backbone.eval()(x).cls)
    summary = dinotune.train(task="classify", data=str(folders / "labelled"), model=str(run), image_size=28,
                             batch_size=4, epochs=1, workers=0, progress=False, device="cpu", out=str(tmp_path / "cls"))
    assert 0 <= summary["metrics"]["top1"] <= 1
    result = api.knn(run, data=folders / "labelled", k=(3,), device="cpu", progress=False, out=tmp_path / "k.json")
    assert 0 <= result["k=3"]["top1"] <= 1
    # exported as what it is: a transformers backbone with its image processor
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoImageProcessor, AutoModel

    hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state[:, 0], backbone(x).cls)
    assert AutoImageProcessor.from_pretrained(tmp_path / "hf").crop_size == {"height": 28, "width": 28}
    # and as an ONNX graph of the embedding: the torch-free runtime gives predict's records
    assert main(["export", str(run), "--out", str(tmp_path / "onnx"), "--exporter", "legacy"]) == 0
    from dinotune.runtime import load_predictor

    images = sorted((folders / "labelled" / "val" / "red").iterdir())
    from_torch = dinotune.predict(run, images, device="cpu")
    from_onnx = load_predictor(tmp_path / "onnx").predict(images)
    assert [r["image"] for r in from_onnx] == [r["image"] for r in from_torch] and len(from_torch) == 2
    np.testing.assert_allclose([r["embedding"] for r in from_onnx], [r["embedding"] for r in from_torch], atol=1e-4)
    assert len(from_torch[0]["embedding"]) == backbone.embed_dim


def test_band_arrays_pretrain_through_the_widened_patch_embedding(tmp_path):
    data = tmp_path / "bands"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (data / "train" / c).mkdir(parents=True)
        for i in range(3):
            np.save(data / "train" / c / f"{i}.npy", rng.random((5, 32, 32), np.float32) * 3000)
    run = tmp_path / "run"
    dinotune.train(task="pretrain", data=str(data), out=str(run), **dict(TINY, epochs=1))
    from dinotune.backbone.model import DinoBackbone

    assert DinoBackbone.from_spec(str(run)).patch_embedding().in_channels == 5
    # and it trains on the same bands with its own 5-band embedding (LoRA: the embedding trains and is saved)
    cls = dinotune.train(task="classify", data=str(data), model=str(run), image_size=28, batch_size=4, epochs=1,
                         workers=0, progress=False, device="cpu", out=str(tmp_path / "cls"), val_fraction=0.34)
    loaded = dinotune.load(cls["run_dir"], device="cpu")
    assert loaded.model.backbone.patch_embedding().in_channels == 5


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DINOTUNE_SHARED"), reason="needs DINOTUNE_SHARED (eurosat_ms)")
def test_pretraining_raises_the_knn_top1_of_random_tiny_on_eurosat(tmp_path):
    """The recipe of benchmarks/bench_pretrain.py, one seed: ~1 min on 2 cores (make test-slow)."""
    import sys

    source = Path(os.environ["DINOTUNE_SHARED"]) / "data" / "eurosat_ms"
    if not source.is_dir():
        pytest.skip(f"no {source}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_pretrain import eurosat_split

    labelled = eurosat_split(source, tmp_path / "labelled")
    before = api.knn("random:tiny", data=labelled, k=(20,), image_size=56, device="cpu", progress=False, save=False)
    dinotune.train(task="pretrain", data=str(source), val_data=str(labelled), model="random:tiny", image_size=56,
                   epochs=10, batch_size=32, local_crops=4, prototypes=1024, head_hidden=512, workers=0,
                   progress=False, device="cpu", out=str(tmp_path / "run"))
    after = api.knn(tmp_path / "run", data=labelled, k=(20,), device="cpu", progress=False, save=False)
    assert after["k=20"]["top1"] >= before["k=20"]["top1"] + 0.05
