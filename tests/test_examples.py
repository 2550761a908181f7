"""The tutorials in examples/: each parses, converts to a valid notebook with jupytext, follows the
conventions (the one-line model switch, data from $DINOTUNE_SHARED, runs under
$DINOTUNE_EXAMPLES_OUT, no stored outputs), and the runner CI uses fails on a cell error. The
tutorials themselves are executed by ``make examples`` (CI, after the tests), not here."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("[0-9][0-9]_*.py"))
MODEL_LINE = re.compile(r'^MODEL = "random:(tiny|small)"  # facebook/dinov2-[a-z]+ with a network$', re.M)


def _runner():
    spec = importlib.util.spec_from_file_location("examples_run_all", EXAMPLES / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _calls(tree: ast.AST) -> set[str]:
    """Dotted names of every function called in ``tree`` (``dinotune.api.compare``, ``evaluate_corruptions``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            names.add(ast.unparse(node.func))
    return names


def test_four_tutorials_cover_the_tasks():
    assert [p.stem for p in SCRIPTS] == ["01_classify_folders", "02_detect_coco", "03_segment_robustness_pca",
                                         "04_multispectral_eurosat"]
    text = {p.stem[:2]: p.read_text() for p in SCRIPTS}
    trees = {k: ast.parse(v) for k, v in text.items()}
    assert 'task="classify"' in text["01"] and "dinotune.api.sweep" in _calls(trees["01"])
    assert 'task="detect"' in text["02"] and "dinotune.api.compare" in _calls(trees["02"])
    assert 'task="segment"' in text["03"]
    assert {"evaluate_corruptions", "dinotune.api.pca"} <= _calls(trees["03"])
    assert 'task="classify"' in text["04"] and "rgb_bands=RGB_BANDS" in text["04"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_tutorial_converts_and_follows_the_conventions(script, tmp_path):
    source = script.read_text()
    compile(source, str(script), "exec")  # plain Python as well as a notebook
    notebook = jupytext.read(script)
    kinds = [c.cell_type for c in notebook.cells]
    assert kinds[0] == "markdown" and notebook.cells[0].source.startswith("# ")
    assert kinds.count("markdown") >= 4 and kinds.count("code") >= 4  # explained step by step
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    # the .ipynb users open is valid and carries no outputs (none are ever committed)
    path = tmp_path / f"{script.stem}.ipynb"
    jupytext.write(notebook, path, fmt="ipynb")
    saved = nbformat.read(path, as_version=4)
    nbformat.validate(saved)
    assert all(not c.get("outputs") for c in saved.cells if c.cell_type == "code")
    # the pretrained model is one line away, and that line is the one every model option reads
    assert len(MODEL_LINE.findall(source)) == 1, "expected one `MODEL = \"random:tiny\"  # facebook/dinov2-small with a network` line"
    assert re.search(r"\bmodel=MODEL\b|\bpca\(MODEL\b", source)
    assert not re.search(r'model="(random:|facebook/)', source), "models are named only on the MODEL line"
    # data from $DINOTUNE_SHARED with a clear message when unset; runs under $DINOTUNE_EXAMPLES_OUT
    assert 'os.environ.get("DINOTUNE_SHARED")' in source and "raise RuntimeError" in source
    assert 'os.environ.get("DINOTUNE_EXAMPLES_OUT", "runs/examples")' in source
    assert "../shared" not in source.replace("DINOTUNE_SHARED=../shared", "")


def test_no_executed_notebooks_are_tracked():
    tracked = subprocess.run(["git", "ls-files", "examples"], cwd=EXAMPLES.parent, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert not [f for f in tracked.stdout.split() if f.endswith(".ipynb")]


def test_runner_lists_tutorials_and_refuses_unknown_names():
    runner = _runner()
    assert runner.tutorials([]) == SCRIPTS
    assert runner.tutorials(["02_detect_coco"]) == [EXAMPLES / "02_detect_coco.py"]
    with pytest.raises(SystemExit, match="unknown tutorial.*nope.*01_classify_folders"):
        runner.tutorials(["nope"])


def test_runner_executes_in_a_kernel_and_fails_on_a_cell_error(tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient.exceptions import CellExecutionError

    script = tmp_path / "99_broken.py"
    script.write_text('# %% [markdown]\n# # A broken tutorial\n\n# %%\nimport os\nprint("out:", os.environ["MARK"])\n\n'
                      '# %%\nraise ValueError("cell two fails")\n')
    monkeypatch.setenv("MARK", "seen-by-the-kernel")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CellExecutionError, match="cell two fails"):
        _runner().execute(script, work, timeout=60)
    executed = nbformat.read(work / "99_broken.ipynb", as_version=4)  # written even when a cell fails
    first, second = [c for c in executed.cells if c.cell_type == "code"]
    assert "out: seen-by-the-kernel" in first.outputs[0]["text"]  # ran in a kernel with the caller's environment
    assert second.outputs[0]["output_type"] == "error" and second.outputs[0]["ename"] == "ValueError"
