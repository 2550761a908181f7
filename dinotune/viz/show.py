"""Show a picture dinotune wrote: inline in a notebook, its path elsewhere (the tutorials in
examples/ run both as notebooks and as plain scripts)."""

from __future__ import annotations

from pathlib import Path


def show(path: str | Path) -> None:
    """Display the picture at ``path`` inline when running in IPython / Jupyter, else print its path."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:  # IPython is not a dependency: a plain script prints the path
        print("picture:", path)
        return
    if get_ipython() is not None:
        display(Image(filename=str(path)))
    else:
        print("picture:", path)
