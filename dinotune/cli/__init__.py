"""The ``dinotune`` command (``entry.py``: ``main``; the parser in ``parser.py``, flags from typed configs in
``flags.py``, the commands in ``commands.py``): parses flags into a config or API options and calls the Python API.

Its own logic is limited to the command line: flag parsing, refusing flags that do not apply to a
run's task (asked of the task, not decided by its name), and printing results.

Every command's flags and operands are made from a typed config (``add_config_flags``): the task
configs for ``train`` / ``sweep``, ``config/commands.py`` and ``config/tools.py`` for the others, and
for ``predict`` also the task configs' ``inference`` sections and ``predict_options``. Written by hand
are only the options that are no config field: ``-q`` / ``-v``, ``train --resume`` (with the three
settings a resumed run may change, passed to the API as they are), ``--config`` and ``--set``."""

from dinotune.cli.flags import add_config_flags, command_config, predict_task_options
from dinotune.cli.entry import main
from dinotune.cli.parser import build_parser

__all__ = ["add_config_flags", "build_parser", "command_config", "main", "predict_task_options"]
