"""The page of ``dinotune serve`` in a real headless browser: uvicorn serves each task's tiny run on
a free loopback port, Chromium (Debian's, driven by Playwright for Python) uploads an image through
the file input, and the result must be drawn: the top-k bars with the predicted class, boxes in
their class colour on the canvas, the label map blended over the picture. A bad upload shows the
server's message and the next upload is drawn again.

Playwright's own browser download cannot run here, so the test drives an installed Chromium
(``$DINOTUNE_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on the PATH; ``.ci/run`` installs
Debian's) and skips, saying why, when there is none."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dinotune[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'dinotune[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                             "(pip install playwright; no `playwright install`)")

from dinotune.serve import RunPredictor, create_app  # noqa: E402
from tests.test_serve import TASKS, tiny_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def find_chromium() -> str | None:
    given = os.environ.get("DINOTUNE_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Server:
    """uvicorn serving ``app`` in a thread on a free loopback port, until ``stop``."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (install Debian's: apt-get install chromium, or set DINOTUNE_CHROMIUM)")
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # root cannot sandbox
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=args)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, tuple[Server, Path]]]:
    root = tmp_path_factory.mktemp("serve-browser")
    out = {}
    try:
        for task in TASKS:
            run, sample = tiny_run(task, root)
            out[task] = (Server(create_app(RunPredictor.load(run, device="cpu"))), sample)
        yield out
    finally:
        for server, _ in out.values():
            server.stop()


def _api_record(url: str, sample: Path) -> dict:
    """The server's own JSON for ``sample`` (raw body upload), to compare the page with."""
    request = urllib.request.Request(f"{url}/predict?name={sample.name}", data=sample.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def _upload(page, path: Path, state: str = "done") -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_selector(f"body[data-state={state}]", timeout=30_000)


# Pixels of the canvas that have exactly one of the given colours (boxes are stroked in them).
_COUNT_COLOURS = """(colours) => {
  const c = document.getElementById("view");
  const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const want = colours.map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
  let n = 0;
  for (let i = 0; i < data.length; i += 4)
    if (want.some(([r, g, b]) => data[i] === r && data[i + 1] === g && data[i + 2] === b)) n++;
  return n;
}"""
# Canvas pixels that differ from the picture drawn alone (the mask was blended in).
_CHANGED_PIXELS = """async () => {
  const c = document.getElementById("view");
  const img = new Image();
  img.src = window.__overlay_image;
  await img.decode();
  const plain = document.createElement("canvas");
  plain.width = c.width; plain.height = c.height;
  const draw = plain.getContext("2d");
  draw.imageSmoothingEnabled = c.getContext("2d").imageSmoothingEnabled;  // as the page drew it
  draw.drawImage(img, 0, 0, c.width, c.height);
  const a = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const b = plain.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < a.length; i += 4) if (Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2]) > 6) n++;
  return n;
}"""


def test_classification_page_shows_the_top_k_bars(browser, servers, tmp_path):
    server, sample = servers["classify"]
    record = _api_record(server.url, sample)
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('classify')")
    _upload(page, sample)
    top = record["predictions"][0]
    assert page.inner_text("#top").startswith(top["class"])
    bars = page.query_selector_all("#bars .bar")
    assert [b.get_attribute("data-class") for b in bars] == [p["class"] for p in record["predictions"]]
    assert float(bars[0].get_attribute("data-score")) == pytest.approx(top["score"])
    assert page.get_attribute("#view", "data-drawn") == "picture"
    # the upright 40 x 30 picture, drawn enlarged to a 480 px long side
    assert page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]") == [480, 360]
    # a bad upload shows the server's reason; the next good one is drawn again
    bad = tmp_path / "notes.txt"
    bad.write_text("not a picture")
    _upload(page, bad, state="error")
    assert "415" in page.inner_text("#error") and "not an image" in page.inner_text("#error")
    _upload(page, sample)
    assert page.inner_text("#top").startswith(top["class"]) and page.is_hidden("#error")
    page.close()


def test_detection_page_draws_the_boxes(browser, servers):
    server, sample = servers["detect"]
    record = _api_record(server.url, sample)
    assert record["detections"], "the detector returned no box at all"
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("document.getElementById('threshold-row').hidden === false")  # /health came
    page.fill("#threshold", "0")  # a random-weight detector scores low: draw every box
    _upload(page, sample)
    assert page.get_attribute("#view", "data-drawn") == "boxes"
    assert int(page.get_attribute("#view", "data-boxes")) == len(record["detections"])
    assert len(page.query_selector_all("#items li")) == len(record["detections"])
    colours = page.evaluate("fetch('/predict?overlay=1', {method: 'POST', body: (() => { const f = new FormData(); "
                            "f.append('file', document.getElementById('file').files[0]); return f; })()})"
                            ".then((r) => r.json()).then((r) => r.overlay.colors)")
    drawn = {d["category"] for d in record["detections"]}
    assert page.evaluate(_COUNT_COLOURS, [colours[c] for c in drawn]) > 0  # strokes in the class colours
    page.fill("#threshold", "1.01")  # above every score: nothing left to draw
    page.dispatch_event("#threshold", "input")
    assert page.get_attribute("#view", "data-boxes") == "0" and page.evaluate(_COUNT_COLOURS, list(colours.values())) == 0
    page.close()


def test_segmentation_page_blends_the_mask(browser, servers):
    server, sample = servers["segment"]
    record = _api_record(server.url, sample)
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('segment')")
    _upload(page, sample)
    assert page.get_attribute("#view", "data-drawn") == "mask"
    legend = [b.get_attribute("data-class") for b in page.query_selector_all("#bars .bar")]
    assert sorted(legend) == sorted(record["classes"])
    page.evaluate("fetch('/predict?overlay=1', {method: 'POST', body: (() => { const f = new FormData(); "
                  "f.append('file', document.getElementById('file').files[0]); return f; })()})"
                  ".then((r) => r.json()).then((r) => { window.__overlay_image = r.overlay.image; })")
    assert page.evaluate(_CHANGED_PIXELS) > 0.5 * 480 * 480  # the label map covers the (enlarged) picture
    page.close()


def test_instance_page_draws_each_mask_with_its_box(browser, tmp_path_factory):
    run, sample = tiny_run("instance", tmp_path_factory.mktemp("serve-instance"))
    server = Server(create_app(RunPredictor.load(run, device="cpu")))
    try:
        record = _api_record(server.url, sample)
        assert record["detections"] and all("segmentation" in d for d in record["detections"])
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_function("document.getElementById('threshold-row').hidden === false")
        page.fill("#threshold", "0")  # a random-weight model scores low: draw every instance
        _upload(page, sample)
        assert page.get_attribute("#view", "data-drawn") == "boxes"
        with_mask = sum(1 for d in record["detections"] if d["area"] > 0)
        assert int(page.get_attribute("#view", "data-masks")) == with_mask > 0
        page.evaluate("fetch('/predict?overlay=1', {method: 'POST', body: (() => { const f = new FormData(); "
                      "f.append('file', document.getElementById('file').files[0]); return f; })()})"
                      ".then((r) => r.json()).then((r) => { window.__overlay_image = r.overlay.image; })")
        tinted = page.evaluate(_CHANGED_PIXELS)
        page.fill("#threshold", "1.01")  # above every score: no box, no mask
        page.dispatch_event("#threshold", "input")
        assert page.get_attribute("#view", "data-masks") == "0"
        assert page.evaluate(_CHANGED_PIXELS) < tinted  # the masks' tint went with them
        page.close()
    finally:
        server.stop()


def test_the_page_shows_the_most_similar_indexed_images(browser, tmp_path_factory):
    """``serve RUN --index DIR``: after the prediction the page shows the index's most similar
    images, the upload's own copy first, each picture fetched and decoded."""
    import dinotune
    from dinotune.embed.index import load_index
    from dinotune.serve.similar import DEFAULT_K, SimilarImages

    root = tmp_path_factory.mktemp("serve-similar")
    run, _ = tiny_run("classify", root)
    data = run.parent / "data"
    emb = dinotune.api.embed(run, data, root / "e.parquet", device="cpu", progress=False)
    dinotune.api.build_index(emb, root / "idx")
    server = Server(create_app(RunPredictor.load(run, device="cpu"), similar=SimilarImages(root / "idx", "cpu")))
    try:
        query = sorted((data / "train" / "blue").iterdir())[0]
        [searched] = dinotune.api.search(root / "idx", query, k=DEFAULT_K, picture=None, device="cpu")
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_function("document.getElementById('model').textContent.includes('indexed images')")
        _upload(page, query)
        figures = page.query_selector_all("#hits figure")
        assert len(figures) == DEFAULT_K and page.is_visible("#similar")
        indexed = load_index(root / "idx").paths
        assert [indexed[int(f.get_attribute("data-row"))] for f in figures] == [h["path"] for h in searched["hits"]]
        assert indexed[int(figures[0].get_attribute("data-row"))] == str(query.absolute())
        assert page.inner_text("#hits figure figcaption").startswith("1.000")
        page.wait_for_function("[...document.querySelectorAll('#hits img')].every((i) => i.complete && "
                               "i.naturalWidth > 0)")
        labels = [f.inner_text().split()[-1] for f in figures]
        assert labels == [h["label"] for h in searched["hits"]]
        page.close()
    finally:
        server.stop()
