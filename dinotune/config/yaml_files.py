"""Every YAML file dinotune reads, read one safe way: ``--config`` files, run folders' and
checkpoints' ``config.yaml``, a sweep's ``sweep.yaml``, a YOLO ``data.yaml``.

Any of them may come from someone else, so reading one costs bounded memory and time:

- at most ``MAX_BYTES`` are read (a config is a few KB; a data.yaml naming thousands of classes
  some hundred KB);
- aliases (``*name``) are allowed, since a hand-written config may share a value with an anchor
  (``lr: &lr 1e-4 ... backbone_lr: *lr``), but the document they expand to is budgeted: at most
  ``MAX_EXPANDED`` values and scalar characters counted as if every alias were written out. The
  parser itself shares aliased values, but everything after it (building a config, ``repr`` in a
  message, comparing two settings) walks the expansion, which a 459-byte "billion laughs" file
  makes 10^9 values. A recursive alias (``&a [*a]``) is refused too;
- nesting deeper than ``MAX_DEPTH`` (through aliases too) is refused before it can exhaust the
  recursion of the parser or of the code reading the result (dinotune's own files are 3 deep);
- a key given twice in one mapping is refused, naming the key and both lines (YAML says keys are
  unique; PyYAML would silently keep the last). Keys merged in with ``<<: *base`` may be
  overridden, as YAML means them to be.

Errors are one line: ``FILE, line N: what is wrong``, as the given error class (``ConfigError``
by default; a data reader passes ``DataError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from dinotune.errors import ConfigError

try:  # libyaml's parser when installed (about 5x faster); the checks below are ours either way
    from yaml.cyaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: Any):
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_EXPANDED", "read_yaml", "parse_yaml", "describe", "yaml_text"]

MAX_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 16  # nested mappings / lists; dinotune's files use 3
MAX_EXPANDED = 4 * MAX_BYTES  # values + scalar characters with aliases written out; an alias-free file stays under ~1.5x its size

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.YAMLError):
    """A document refused by the checks of this module, at ``line`` (1-based)."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


def _line(node_or_event: Any) -> int:
    mark = getattr(node_or_event, "start_mark", None)
    return mark.line + 1 if mark is not None else 0


class _BudgetComposer(Composer):
    """PyYAML's composer, counting as it builds the node graph (which shares aliased nodes, so it
    is linear in the file): each node's expanded size and height, refusing those over budget."""

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._measure: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)  # the anchored node (or PyYAML's undefined-alias error)
            if id(node) not in self._measure:
                raise _Refused(_line(event), f"the alias *{event.anchor} is inside the value it names (a recursive "
                                             "alias); write the value out")
            return node
        opens = self.check_event(SequenceStartEvent, MappingStartEvent)
        if opens:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _Refused(_line(self.peek_event()), f"nested more than {MAX_DEPTH} levels deep; a dinotune "
                                                         "file needs 3")
        node = super().compose_node(parent, index)
        if opens:
            self._depth -= 1
        self._measure[id(node)] = size, height = self._size(node)
        if height > MAX_DEPTH:
            raise _Refused(_line(node), f"its aliases nest it more than {MAX_DEPTH} levels deep; write the values out")
        if size > MAX_EXPANDED:
            raise _Refused(_line(node), f"its aliases expand it beyond {MAX_EXPANDED:,} values and characters "
                                        "(nested aliases, a 'billion laughs'?); write the values out")
        return node

    def _size(self, node: Any) -> tuple[int, int]:
        if isinstance(node, ScalarNode):
            return 1 + len(node.value), 0
        if isinstance(node, SequenceNode):
            children = [self._measure[id(c)] for c in node.value]
        elif isinstance(node, MappingNode):
            children = [self._measure[id(c)] for pair in node.value for c in pair]
        else:  # pragma: no cover - PyYAML composes only these three
            return 1, 0
        return 1 + sum(s for s, _ in children), 1 + max((h for _, h in children), default=0)


class _UniqueKeyConstructor(SafeConstructor):
    """PyYAML's safe constructor, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node)
                try:
                    seen = first.get(key)
                except TypeError:  # a list or mapping as a key: PyYAML refuses it itself below
                    continue
                if seen is not None:
                    raise _Refused(_line(key_node), f"the key {key!r} is given twice (first on line {seen}); keep one")
                first[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)


class _Loader(_BudgetComposer, _Parser, _UniqueKeyConstructor, Resolver):
    def __init__(self, stream: Any):
        _Parser.__init__(self, stream)
        _BudgetComposer.__init__(self)
        _UniqueKeyConstructor.__init__(self)
        Resolver.__init__(self)


def describe(exc: Exception) -> str:
    """What is wrong, in one line to follow a file name: ``, line N: ...`` or ``: ...`` (PyYAML's
    own messages span several lines)."""
    if isinstance(exc, _Refused):
        return f", line {exc.line}: {exc.message}"
    if isinstance(exc, yaml.MarkedYAMLError) and (exc.problem_mark or exc.context_mark):
        mark = exc.problem_mark or exc.context_mark
        if "nesting depth" in (exc.problem or ""):  # libyaml's own limit (1000 flow levels), met before ours
            return f", line {mark.line + 1}: nested more than {MAX_DEPTH} levels deep; a dinotune file needs 3"
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        return f", line {mark.line + 1}, column {mark.column + 1}: not valid YAML ({what})"
    return f": not valid YAML ({' '.join(str(exc).split())})"


def parse_yaml(data: bytes | str) -> Any:
    """The data of one YAML document, under this module's limits (except the size: the caller
    bounds what it reads); ``yaml.YAMLError`` when refused (``describe`` says it in one line)."""
    loader = _Loader(data)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path, error: type[Exception] = ConfigError) -> Any:
    """The data of the YAML file ``path`` (None when empty), read under this module's limits;
    ``error(f"{path}, line N: ...")`` when it cannot be read or is refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_BYTES:
        raise error(f"{path}: larger than the {MAX_BYTES // (1 << 20)} MiB a YAML file dinotune reads may be "
                    "(a config is a few KB); is it the right file?")
    try:
        return parse_yaml(data)
    except yaml.YAMLError as exc:
        raise error(f"{path}{describe(exc)}") from None
    except (ValueError, OverflowError) as exc:  # a value PyYAML cannot build (an int of 10^5 digits, 2024-02-30)
        raise error(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None


def yaml_text(data: Any) -> str:
    """``data`` as YAML text, keys in their order (what every YAML file dinotune writes holds)."""
    return yaml.safe_dump(data, sort_keys=False)
