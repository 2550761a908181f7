"""``dinotune export RUN --format hf``: the transformers folder gives dinotune predict's answers.

Runs are trained here for one epoch on tiny synthetic data (``random:tiny``, 28 px) with LoRA
(merged on export), full fine-tuning, a frozen backbone with the ``cls`` pool (zero-padded head) and
5-band ``.npy`` input; each is exported and read back with plain transformers
(``AutoModelForImageClassification``, ``AutoImageProcessor``, ``pipeline``), whose probabilities
must equal ``dinotune.predict``'s to 1e-4 with the same top-1. Real photos
(``$DINOTUNE_SHARED/data/hymenoptera``) check the image processor against dinotune's evaluation
transform, center-crop offsets included (both floor them).
Refusals (last4, mlp, DINOv3, detection) and the hub upload (offline, no token, 401, a mocked
``HfApi``) need no training.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dinotune
from dinotune.backbone.model import DinoBackbone
from dinotune.errors import ExportError
from dinotune.export.hf import export_hf
from dinotune.tasks.classify.hf import check_exportable, self_check, transformers_model
from dinotune.utils import file_mode
from tests.conftest import make_class_folders, shared_data, tiny_options

pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = {  # name -> training options beyond tiny_options
    "lora": dict(adapter="lora", rank=4),
    "full": dict(adapter="full"),
    "cls": dict(adapter="none", pool="cls", lr=1e-2),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One-epoch runs on 2 synthetic colour classes (3 RGB ones) and on 5-band ``.npy`` tiles."""
    root = tmp_path_factory.mktemp("export_hf")
    make_class_folders(root / "data" / "train", ["red", "blue"], 6, seed=1)
    make_class_folders(root / "data" / "val", ["red", "blue"], 3, seed=2)
    out = {}
    for name, extra in RUNS.items():
        out[name] = Path(dinotune.train(data=str(root / "data"),
                                        **tiny_options(root / name, epochs=1, **extra))["run_dir"])
    bands = make_band_folders(root / "bands")
    out["bands"] = Path(dinotune.train(data=str(bands), val_fraction=0.25, rgb_bands="2,1,0",
                                       **tiny_options(root / "bands_run", epochs=1, adapter="lora", rank=4))["run_dir"])
    return out


def make_band_folders(root: Path, n: int = 4, bands: int = 5) -> Path:
    """``root/<class>/*.npy``: ``40 x 34 x bands`` uint16 tiles, class ``c`` bright in band ``c + 3``."""
    for c, name in enumerate(("crop", "water")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            tile = np.random.default_rng(10 * c + i).integers(800, 1200, (40, 34, bands)).astype(np.uint16)
            tile[..., c + 3] += 2000
            np.save(root / name / f"{name}_{i}.npy", tile)
    return root


def pipeline_scores(folder: Path, inputs: list, k: int) -> list[dict[str, float]]:
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(folder), device="cpu")
    return [{p["label"]: p["score"] for p in answer} for answer in classify(inputs, top_k=k)]


def assert_same_answers(ours: list[dict], theirs: list[dict[str, float]]) -> float:
    """Same top-1 and every probability within 1e-4; returns the largest difference."""
    worst = 0.0
    for o, t in zip(ours, theirs, strict=True):
        scores = {p["class"]: p["score"] for p in o["predictions"]}
        assert scores.keys() == t.keys()
        assert o["predictions"][0]["class"] == max(t, key=t.get), o["image"]
        worst = max(worst, max(abs(scores[c] - t[c]) for c in scores))
    assert worst < 1e-4
    return worst


# ------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("name", ["lora", "full", "cls"])
def test_transformers_folder_gives_dinotune_predictions(runs, tmp_path, name):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    run = runs[name]
    folder = export_hf(run, tmp_path / "hf")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                                  "README.md"}
    assert all(p.stat().st_mode & 0o777 == file_mode() for p in folder.iterdir())  # the umask's, as run files
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert type(model).__name__ == "Dinov2ForImageClassification"
    assert model.config.id2label == {0: "blue", 1: "red"}
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "BitImageProcessor" and processor.crop_size == {"height": 28, "width": 28}

    loaded = dinotune.load(run, device="cpu")
    images = sorted(str(p) for p in (run.parent / "data" / "val").rglob("*.png"))
    ours = loaded.predict(images, top_k=2)
    assert_same_answers(ours, pipeline_scores(folder, images, 2))

    # the exported weights are the trained ones, not the random base: LoRA merged, full trained
    weights = model.state_dict()  # (written in the hub's key names, read back in the installed ones)
    base = DinoBackbone.from_spec("random:tiny", init_seed=loaded.cfg.backbone.init_seed).hf_model().state_dict()
    query = "encoder.layer.0.attention.q_proj.weight"
    assert torch.equal(weights[f"dinov2.{query}"], base[query]) == (name == "cls"), name
    if name == "cls":  # the CLS-only head, zero-padded over the mean-patch half
        width = loaded.model.backbone.embed_dim
        assert torch.count_nonzero(weights["classifier.weight"][:, width:]) == 0
        assert torch.equal(weights["classifier.weight"][:, :width], loaded.model.head.fc.weight.detach())

    card = (folder / "README.md").read_text()
    adapter = loaded.cfg.adapter.kind
    assert "pipeline_tag: image-classification" in card and "blue, red" in card and "random:tiny" in card
    assert f"**adapter**: {adapter}" in card and "| top1 |" in card


def test_band_run_exports_with_its_bands_and_statistics(runs, tmp_path):
    from dinotune.data.bands import read_input

    run = runs["bands"]
    folder = export_hf(run, tmp_path / "hf")
    loaded = dinotune.load(run, device="cpu")
    spec = loaded.meta["input"]
    config = json.loads((folder / "config.json").read_text())
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert config["num_channels"] == 5
    assert processor["image_mean"] == pytest.approx(spec["mean"]) and processor["image_std"] == pytest.approx(spec["std"])
    assert processor["do_rescale"] is False and processor["input_data_format"] == "channels_first"
    files = sorted((run.parent / "bands").rglob("*.npy"))
    ours = loaded.predict([str(f) for f in files], top_k=2)
    arrays = [read_input(f).numpy() for f in files]  # float32 C x H x W in the files' units
    assert_same_answers(ours, pipeline_scores(folder, arrays, 2))


def test_registers_backbone_maps_onto_its_transformers_class(tmp_path):
    from transformers import AutoModelForImageClassification

    from dinotune.tasks.classify.heads import LinearHead
    from dinotune.tasks.classify.model import Classifier

    backbone = DinoBackbone.from_spec("random:tiny-reg4")
    head = LinearHead(2 * backbone.embed_dim, 3)
    torch.nn.init.normal_(head.fc.weight)  # the zero-ish init would hide a swapped half
    ours = Classifier(backbone, head, "cls_mean").eval()
    hf = transformers_model(ours, ["a", "b", "c"], "cls_mean")
    hf.save_pretrained(tmp_path)
    theirs = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "Dinov2WithRegistersForImageClassification"
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        assert torch.allclose(ours(images=x), theirs(pixel_values=x).logits, atol=1e-5)

    # the export checks itself: halves of the classifier swapped (CLS <-> mean patch) are caught
    assert self_check(ours, hf, 28) < 1e-5
    hf.classifier.weight = torch.nn.Parameter(hf.classifier.weight.detach().roll(backbone.embed_dim, dims=1))
    with pytest.raises(ExportError, match="logits differ"):
        self_check(ours, hf, 28)


# ----------------------------------------------------------------------- real photos (JPEG)
def test_processor_reproduces_the_eval_transform_on_real_photos(runs, tmp_path):
    """Every sampled photo is processed as dinotune's evaluation transform does, to float rounding,
    including those whose center-crop margin is 3 mod 4 pixels, where torchvision's rounded offset
    and transformers' floored one would differ by a pixel (dinotune floors, as transformers does);
    the pipeline then gives dinotune predict's probabilities on all of them."""
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image as hf_load_image

    from dinotune.data.images import load_image

    photos = sorted(shared_data("hymenoptera").rglob("*.jpg"))[::10]
    folder = export_hf(runs["lora"], tmp_path / "hf")
    processor = AutoImageProcessor.from_pretrained(folder)
    loaded = dinotune.load(runs["lora"], device="cpu")
    ours_transform = loaded.task.eval_transform()
    short, crop = processor.size["shortest_edge"], processor.crop_size["height"]
    margin_3_mod_4 = 0
    for photo in photos:
        picture = load_image(photo)
        theirs = processor(images=hf_load_image(str(photo)), return_tensors="pt")["pixel_values"][0]
        assert (ours_transform(picture) - theirs).abs().max() < 1e-5, photo
        w, h = picture.size
        margin_3_mod_4 += any((side - crop) % 4 == 3 for side in (short, int(short * max(w, h) / min(w, h))))
    assert margin_3_mod_4  # the case where the two roundings part occurs among real photos
    ours = loaded.predict([str(p) for p in photos], top_k=2)
    assert_same_answers(ours, pipeline_scores(folder, [str(p) for p in photos], 2))


# --------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("task, pool, head, expect", [
    ("classify", "last4", "linear", "last 4 layers"),
    ("classify", "cls_mean", "mlp", "not one linear map"),
    ("classify", "last4", "mlp", "'mlp' (pool 'last4')"),
    ("detect", "", "", "detect runs have no transformers counterpart"),
])
def test_heads_that_do_not_match_are_refused_with_the_reason(task, pool, head, expect):
    from dinotune.config import build_config
    from dinotune.tasks import get_task

    with pytest.raises(ExportError, match="--format hf") as e:
        if task == "classify":
            check_exportable(pool, head)
        else:  # a task without a transformers counterpart says so from its config
            get_task(build_config(task)).check_transformers_export()
    assert expect in str(e.value)


def test_refused_before_any_weights_are_loaded(runs, tmp_path):
    run = tmp_path / "mlp_run"
    shutil.copytree(runs["lora"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["head"]["head"] = "mlp"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.rmtree(run / "checkpoints")  # loading would fail differently: the refusal comes first
    with pytest.raises(ExportError, match="head is 'mlp'"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_dinov3_is_refused_naming_the_missing_transformers_class():
    from dinotune.tasks.classify.heads import LinearHead
    from dinotune.tasks.classify.model import Classifier

    backbone = DinoBackbone.from_spec("random:dinov3-tiny")
    model = Classifier(backbone, LinearHead(2 * backbone.embed_dim, 2), "cls_mean")
    with pytest.raises(ExportError, match="'dinov3_vit' model and transformers .* has no image-classification class"):
        transformers_model(model, ["a", "b"], "cls_mean")


def test_an_existing_folder_is_not_overwritten(runs, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(runs["lora"], tmp_path / "hf")
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep"


# ---------------------------------------------------------------------------------- the hub
class FakeHfApi:
    calls: list = []
    fail_with: int | None = None

    def create_repo(self, repo_id, **kwargs):
        if self.fail_with:
            from huggingface_hub.errors import HfHubHTTPError
            from huggingface_hub.utils import httpx

            url = "https://huggingface.co/api/repos/create"
            raise HfHubHTTPError(f"{self.fail_with} Client Error", response=httpx.Response(
                self.fail_with, request=httpx.Request("POST", url)))
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()), kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    from dinotune.backbone import loading

    FakeHfApi.calls, FakeHfApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)
    return FakeHfApi


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(runs, tmp_path, fake_hub):
    folder = export_hf(runs["lora"], tmp_path / "hf", push_to_hub="someone/ants", private=True)
    (create, repo, options), (upload, files, kwargs) = fake_hub.calls
    assert (create, repo, options["private"], options["exist_ok"]) == ("create_repo", "someone/ants", True, True)
    assert upload == "upload_folder" and kwargs["repo_id"] == "someone/ants"
    assert Path(kwargs["folder_path"]) == folder and "model.safetensors" in files and "README.md" in files


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_upload_names_the_token(runs, tmp_path, fake_hub, status):
    fake_hub.fail_with = status
    with pytest.raises(ExportError, match=f"HTTP {status}.*token"):
        export_hf(runs["lora"], tmp_path / "hf", push_to_hub="someone/ants")


def test_push_to_hub_fails_fast_offline_or_without_a_token(runs, tmp_path, monkeypatch, fake_hub):
    monkeypatch.setattr(__import__("huggingface_hub"), "get_token", lambda: None)
    with pytest.raises(ExportError, match="no Hugging Face token.*HF_TOKEN"):
        export_hf(runs["lora"], tmp_path / "hf", push_to_hub="someone/ants")
    with pytest.raises(ExportError, match="not a hub repo id"):
        export_hf(runs["lora"], tmp_path / "hf", push_to_hub="no//good")

    from dinotune.backbone import loading

    monkeypatch.undo()  # the real hub_reachable, told it is offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not loading.hub_reachable()
    start = time.perf_counter()
    with pytest.raises(ExportError, match="cannot be reached.*huggingface-cli upload"):
        export_hf(runs["lora"], tmp_path / "hf", push_to_hub="someone/ants")
    assert time.perf_counter() - start < 2.0
    assert not (tmp_path / "hf").exists() and not fake_hub.calls  # nothing written, nothing sent


# ------------------------------------------------------------------------------------ the CLI
def test_cli_exports_and_refuses_in_one_line(runs, tmp_path, monkeypatch, capsys):
    from dinotune.cli import main

    assert main(["export", str(runs["cls"]), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    assert main(["export", str(runs["cls"]), "--format", "hf", "--out", str(tmp_path / "hf2"),
                 "--push-to-hub", "someone/ants"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinotune: error: --push-to-hub someone/ants: the Hugging Face hub cannot be reached")
    assert "\n" not in err and not (tmp_path / "hf2").exists()
    assert main(["export", str(runs["cls"]), "--format", "onnx", "--out", str(tmp_path / "x"), "--private"]) == 2
