"""``dinotune sweep``: which adapter, rank and learning rate, at what memory and speed, for this data.

- ``grid``: ``--grid KEY=V1,V2 ...`` parsed against the task's config and expanded into trials
  (settings that do not apply collapsed);
- ``folder``: the sweep folder, its lock and its settings (a changed sweep is refused);
- ``runner``: one trial as ``dinotune train`` in its own process, its state and its attempts;
- ``search``: every trial of the grid, or optuna's TPE over the same choices;
- ``linear_grid``: heads trained together on one pass of cached features (``--linear-grid``);
- ``table`` and ``plot``: the results table (Markdown, CSV) and the Pareto chart;
- ``run``: ``run_sweep``, from the settings to the table.
"""

from dinotune.sweep.run import SweepResult, run_sweep

__all__ = ["SweepResult", "run_sweep"]
