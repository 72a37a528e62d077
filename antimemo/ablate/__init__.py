"""``antimemo ablate``: sweep regularization strengths over seeds and compare them.

- :mod:`~antimemo.ablate.grid`: ``--grid KEY=V1,V2,...`` parsing, validation, cell overrides;
- :mod:`~antimemo.ablate.runner`: one ``antimemo fit`` process per cell x seed, resumable;
- :mod:`~antimemo.ablate.collect`: ``results.csv``;
- :mod:`~antimemo.ablate.summary`: ``summary.md`` (mean ± std, best cell per budget);
- :mod:`~antimemo.ablate.plot`: ``pareto.png``;
- :mod:`~antimemo.ablate.merge`: ``--merge``, several ablation directories as one.

Nothing here imports Lightning at import time. See ``docs/ablation.md``.

Example:
    >>> from antimemo.ablate import parse_grid, expand_grid
    >>> [c.id for c in expand_grid(parse_grid(["goldfish.k=4,none"]))]
    ['goldfish.k-4', 'goldfish.k-none']
"""

from antimemo.ablate.cli import main, report
from antimemo.ablate.collect import collect, row_from_report, write_csv
from antimemo.ablate.merge import merge_ablations
from antimemo.ablate.grid import Cell, GridAxis, cell_overrides, expand_grid, parse_axis, parse_grid, validate_grid
from antimemo.ablate.plot import pareto_front, plot_pareto
from antimemo.ablate.runner import Run, execute, plan_runs
from antimemo.ablate.summary import CellStats, best_per_budget, render_summary, summarize

__all__ = [
    "Cell",
    "CellStats",
    "GridAxis",
    "Run",
    "best_per_budget",
    "cell_overrides",
    "collect",
    "execute",
    "expand_grid",
    "main",
    "merge_ablations",
    "pareto_front",
    "parse_axis",
    "parse_grid",
    "plan_runs",
    "plot_pareto",
    "render_summary",
    "report",
    "row_from_report",
    "summarize",
    "validate_grid",
    "write_csv",
]
