"""``main``: parse, run the command, and turn a known error into one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from dinotune.cli.parser import build_parser
from dinotune.config import (
    ConfigError,
)


def _known_errors() -> tuple[type[BaseException], ...]:
    from dinotune.errors import DinotuneError

    return (DinotuneError, FileNotFoundError)


# ------------------------------------------------------------------------------- config flags


_RESUME_FLAGS = ("--resume", "--device", "--workers", "--threads", "--progress", "--no-progress")


def _refuse_resume_extras(argv: list[str]) -> None:
    """``train --resume RUN`` continues a run with its saved settings: anything but the few flags
    that change where it runs is refused by name (argparse would report a puzzling 'invalid
    choice' for the task)."""
    if not argv or argv[0] != "train" or not any(a == "--resume" or a.startswith("--resume=") for a in argv):
        return
    extras, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _RESUME_FLAGS:
            skip = "=" not in a and name in ("--resume", "--device", "--workers", "--threads")
        elif a in ("-h", "--help"):
            return
        else:
            extras.append(a)
    if extras:
        raise ConfigError(f"--resume continues a run with its own saved settings and takes only --device, "
                          f"--workers, --threads and --progress / --no-progress; got {' '.join(extras)}")


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; for an error raised in a DataLoader worker (torch re-raises it with
    "Caught X in DataLoader worker process N. Original Traceback ...") the original message, so the
    user reads the same line as with ``--workers 0``."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    prefix = f"{type(exc).__name__}: "
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if prefix in line and not line.startswith(" ")]
    if not starts:
        return text
    return "\n".join([lines[starts[-1]].split(prefix, 1)[1], *lines[starts[-1] + 1:]]).strip()


def _command_parser(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost parser of the command ``ns`` holds (``dinotune train classify``'s, ...)."""
    current = parser
    while True:
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(ns, sub.dest, None) if sub is not None else None
        if name not in getattr(sub, "choices", {}):
            return current
        current = sub.choices[name]


def _threads(ns: argparse.Namespace) -> None:
    """Apply ``--threads`` (every command's, ``train``'s config key, or ``train --resume``'s) before
    the command loads PyTorch or onnxruntime: 0 = a count that does not oversubscribe the machine.
    A ``train --config FILE`` run applies its file's value when the config is built."""
    from dinotune.threads import apply_threads

    for dest in ("threads", "train.threads", "resume_threads"):
        value = getattr(ns, dest, None)
        if value is not None:
            apply_threads(int(value))
            return
    apply_threads(0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _refuse_resume_extras(argv)
    except ConfigError as exc:
        print(f"dinotune: error: {exc}", file=sys.stderr)
        return 2
    ns, extras = parser.parse_known_args(argv)
    if extras:  # said by the command's own parser: its usage is the one that helps
        _command_parser(parser, ns).error(f"unrecognized arguments: {' '.join(extras)}")
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    from dinotune.utils import set_quiet, set_verbose

    set_quiet(ns.quiet)
    set_verbose(ns.verbose)
    try:
        _threads(ns)
        return ns.func(ns)
    except _known_errors() as exc:
        print(f"dinotune: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinotune: interrupted; resume with `dinotune train --resume RUN`", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:  # nothing distributed without torch (`predict --backend onnx` needs none)
            from dinotune.engine.distributed import cleanup

            cleanup()


if __name__ == "__main__":
    sys.exit(main())
