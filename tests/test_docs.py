"""The documentation (README.md, docs/, mkdocs.yml) against the code: every command shown parses with
the real CLI parser, the flag tables the site generates hold every flag with its config default,
the navigation lists every page, the Python snippets compile, and links between the files resolve."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dinotune.cli.parser import build_parser
from dinotune.config.classify import ClassifyConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FILES = [ROOT / "README.md", *PAGES]
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


def _hooks():
    spec = importlib.util.spec_from_file_location("dinotune_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of every fenced code block of a Markdown file."""
    blocks, lang, start, body, fence = [], None, 0, [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, lang, start, body = match.group(1), match.group(2).lower(), number + 1, []
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            blocks.append((lang, start, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
    assert fence is None, f"{path}: a code block opened at line {start - 1} is never closed"
    return blocks


def shell_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``("FILE:LINE", dinotune's arguments)`` of every dinotune command line in the bash blocks:
    ``dinotune ...``, ``python -m dinotune ...`` and ``torchrun ... -m dinotune ...``; lines ending
    in a backslash are joined, comments dropped, lines with ``<placeholders>`` or ``...`` skipped."""
    out = []
    for lang, start, text in code_blocks(path):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            first, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            line = line.strip()
            line = line.removeprefix("$ ")
            if "<" in line.split("#")[0] or "..." in line.split("#")[0]:
                continue
            tokens = shlex.split(line, comments=True)
            while tokens and tokens[-1] in ("&", ";"):
                tokens.pop()
            if not tokens:
                continue
            if tokens[0] == "dinotune":
                args = tokens[1:]
            elif tokens[0] in ("python", "python3", "torchrun") or tokens[0].endswith(("/python", "/python3")):
                if "-m" not in tokens or tokens[tokens.index("-m") + 1:tokens.index("-m") + 2] != ["dinotune"]:
                    continue
                args = tokens[tokens.index("-m") + 2:]
            else:
                continue
            out.append((f"{path.relative_to(ROOT)}:{start + first}", args))
    return out


COMMANDS = [item for path in FILES for item in shell_commands(path)]


@functools.cache
def _parser() -> argparse.ArgumentParser:
    return build_parser()  # one parser for every shown command: parse_args keeps no state between calls


def test_commands_are_found():
    # the README's quick start alone shows a dozen; an extractor that finds none would pass everything
    assert sum(1 for where, _ in COMMANDS if where.startswith("README.md")) >= 12
    assert len(COMMANDS) >= 60
    assert any(args[:1] == ["train"] and where.startswith("docs/training.md") for where, args in COMMANDS)  # torchrun


@pytest.mark.parametrize("where,args", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_shown_command_parses(where, args, capsys):
    """Each command parses with the real parser: its command exists and each flag belongs to it
    (argparse refuses an unknown flag, a bad choice, a missing value)."""
    try:
        ns = _parser().parse_args(args)
    except SystemExit as exc:
        err = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"{where}: `dinotune {shlex.join(args)}` does not parse (exit {exc.code}): {err[-1] if err else ''}")
    assert getattr(ns, "func", None) is not None, f"{where}: `dinotune {shlex.join(args)}` names no command"


def _subparser(*words: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        parser = parser._subparsers._group_actions[0].choices[word]
    return parser


def _documented(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_flag_table_holds_every_train_classify_flag():
    hooks = _hooks()
    table = hooks.flag_table("train classify")
    parser = _subparser("train", "classify")
    actions = _documented(parser)
    assert len(actions) > 60
    for action in actions:
        for option in action.option_strings:
            assert f"`{option}`" in table, f"{option} is missing from the generated table"
    # grouped by the parser's argument groups
    assert "**adapter options**" in table and "**optim options**" in table
    # the default column is the config's default, split off the help text
    row = next(line for line in table.splitlines() if line.startswith("| `--epochs` |"))
    cells = [cell.strip() for cell in row.strip().strip("|").split(" | ")]
    assert cells[2] == f"`{ClassifyConfig().train.epochs}`", row
    assert "(default:" not in cells[3]


def test_flag_table_splits_defaults_and_escapes_cells():
    hooks = _hooks()
    assert hooks.split_default("learning rate of the head (default: 0.001)") == ("learning rate of the head", "0.001")
    assert hooks.split_default("feature cache folder (default: RUN/cache) (default: '')") == (
        "feature cache folder (default: RUN/cache)", "''")
    assert hooks.split_default("no default here") == ("no default here", "")
    assert hooks.escape("a|b <c> d_e *f*") == "a\\|b &lt;c&gt; d\\_e \\*f\\*"
    table = hooks.flag_table("eval")
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", re.sub(r"`[^`]*`", "CODE", line))
            assert len(cells) == 6, line  # 4 cells between the outer pipes
    assert "SUPPRESS" not in hooks.flag_table("train")
    assert "`--resume`" in hooks.flag_table("train")


def test_unknown_flags_marker_fails():
    hooks = _hooks()
    with pytest.raises(ValueError, match="no command"):
        hooks.render("<!-- flags: train nothing -->")
    with pytest.raises(ValueError, match="no group"):
        hooks.render("<!-- flags: sweep classify :: no such group -->")


def test_every_flags_marker_renders():
    hooks = _hooks()
    markers = 0
    for page in PAGES:
        text = page.read_text()
        markers += len(hooks.MARKER.findall(text))
        rendered = hooks.render(text)
        assert "<!-- flags:" not in rendered, page
    # every command page shows its flags
    for page in sorted((DOCS / "commands").glob("*.md")):
        if page.name != "index.md":
            assert hooks.MARKER.search(page.read_text()), f"{page.name} has no flags table"
    assert markers >= 14


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def test_nav_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
    for page in nav:
        assert (DOCS / page).is_file(), f"mkdocs.yml lists {page}, which does not exist"
    on_disk = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert on_disk == set(nav), f"not in the nav: {sorted(on_disk - set(nav))}"
    assert config["hooks"] == ["docs/hooks.py"]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_python_blocks_compile(path):
    for lang, start, text in code_blocks(path):
        if lang in ("python", "py"):
            compile(text, f"{path.relative_to(ROOT)}:{start}", "exec")


def test_readme_links_resolve():
    """The README's relative links (to docs/ pages and repository files) point at files that exist."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        assert (ROOT / link).exists(), f"README.md links to {link}, which does not exist"


def test_readme_keeps_the_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert "## Set-up: two commands" in text
    assert "make test   # creates .venv, installs dinotune[dev], runs the test suite" in text
    assert len(text.splitlines()) <= 220


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "commands" / "train" / "index.html").is_file()
