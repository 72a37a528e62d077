"""``summary.md`` of an ablation: mean ± std per cell and the best cell per memorization budget.

Per cell (over its finished seeds): ``n`` (finished runs), then mean ± sample standard deviation
(``ddof=1``; just the mean when ``n == 1``) of the memorization figure, token match,
near-verbatim, MIA AUC (4 decimals, more when an AUC below 1 would print as 1:
:func:`format_auc`), held-out loss, best held-out loss, perplexity, epsilon (when any run
has it) and wall time.

**Best cell per budget.** For each budget ``b`` (default ``exact_match <= 0.01, 0.05, 0.1``),
among the cells whose *mean* memorization is ``<= b``, the one with the lowest mean fidelity
figure (default ``val_loss``, the held-out loss: lower is better; ``fidelity_mode="max"`` for
a higher-is-better figure).

Example:
    >>> rows = [{"cell": "k-2", "goldfish.k": "2", "status": "ok", "exact_match": 0.0, "val_loss": 2.0},
    ...         {"cell": "k-none", "goldfish.k": "none", "status": "ok", "exact_match": 0.5, "val_loss": 1.9}]
    >>> stats = summarize(rows, ["goldfish.k"])
    >>> [s.cell for s in stats], best_per_budget(stats, [0.01])[0.01].cell
    (['k-2', 'k-none'], 'k-2')
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antimemo._atomic import atomic_write_text

__all__ = [
    "AUC_DIGITS",
    "DEFAULT_BUDGETS",
    "SUMMARY_MD",
    "CellStats",
    "best_per_budget",
    "format_auc",
    "render_summary",
    "summarize",
    "write_summary",
]

#: File name of the summary inside ``OUT``.
SUMMARY_MD = "summary.md"
#: Default memorization budgets (exact match).
DEFAULT_BUDGETS = (0.01, 0.05, 0.1)

#: Decimals of an AUC column: 4, so that 0.9995 does not print as 1.000 beside a baseline's 1.0000;
#: an AUC that still rounds to 1 without being 1 gets up to 6 (:func:`format_auc`).
AUC_DIGITS = 4

_COLUMNS = [
    ("exact_match", "exact match", 4),
    ("token_match", "token match", 4),
    ("near_verbatim", "near-verbatim", 4),
    ("mia_auc", "MIA AUC (max)", AUC_DIGITS),
    ("val_loss", "held-out loss", 4),
    ("best_val_loss", "best held-out loss", 4),
    ("perplexity", "perplexity", 3),
    ("epsilon", "epsilon", 2),
    ("train_wall_time_s", "wall time (s)", 1),
]


def _float(value: Any) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


@dataclass
class CellStats:
    """Aggregates of one cell.

    Attributes:
        cell: cell id.
        assignment: ``{grid key: value}``.
        n: finished runs; ``total``: planned runs.
        mean, std: per figure (``std`` is ``None`` when fewer than 2 values).
    """

    cell: str
    assignment: dict[str, str]
    n: int
    total: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)

    def label(self) -> str:
        """A short label: ``k=2, lr=1e-3`` (last key component = value), or the cell id."""
        if not self.assignment:
            return self.cell
        shown = {k: v for k, v in self.assignment.items() if v not in (None, "", "None")}  # key not in this cell's grid
        return ", ".join(f"{k.rsplit('.', 1)[-1] if '.' in k else k}={v}" for k, v in shown.items()) or self.cell


def summarize(rows: Sequence[Mapping[str, Any]], grid_keys: Sequence[str]) -> list[CellStats]:
    """Aggregate rows (from :func:`~antimemo.ablate.collect.collect` or ``results.csv``) per cell.

    Only rows with ``status == "ok"`` count; cells keep their first-seen order. Every numeric
    column is aggregated (``mean`` / ``std`` keyed by column).

    Example:
        >>> s = summarize([{"cell": "a", "status": "ok", "exact_match": 0.1},
        ...                {"cell": "a", "status": "ok", "exact_match": 0.3}], [])[0]
        >>> s.n, round(s.mean["exact_match"], 3), round(s.std["exact_match"], 4)
        (2, 0.2, 0.1414)
    """
    order: list[str] = []
    groups: dict[str, list[Mapping[str, Any]]] = {}
    totals: dict[str, int] = {}
    assignments: dict[str, dict[str, str]] = {}
    for row in rows:
        cell = str(row["cell"])
        if cell not in groups:
            order.append(cell)
            groups[cell] = []
            totals[cell] = 0
            assignments[cell] = {k: str(row.get(k)) for k in grid_keys}
        totals[cell] += 1
        if row.get("status", "ok") == "ok":
            groups[cell].append(row)
    skip = {"cell", "seed", "status", "run_dir", "epochs", "global_step", *grid_keys}
    stats = []
    for cell in order:
        ok = groups[cell]
        columns: list[str] = []
        for row in ok:
            columns += [k for k in row if k not in skip and k not in columns]
        mean: dict[str, float] = {}
        std: dict[str, float | None] = {}
        for col in columns:
            values = [v for v in (_float(r.get(col)) for r in ok) if v is not None]
            if not values:
                continue
            m = sum(values) / len(values)
            mean[col] = m
            std[col] = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        stats.append(CellStats(cell, assignments[cell], len(ok), totals[cell], mean, std))
    return stats


def best_per_budget(
    stats: Sequence[CellStats],
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    memorization: str = "exact_match",
    fidelity: str = "val_loss",
    fidelity_mode: str = "min",
) -> dict[float, CellStats | None]:
    """For each budget, the cell with the best mean ``fidelity`` among those whose mean
    ``memorization`` is ``<= budget`` (``None`` when no cell meets it).

    Example:
        >>> a = CellStats("a", {}, 1, 1, {"exact_match": 0.0, "val_loss": 2.0})
        >>> b = CellStats("b", {}, 1, 1, {"exact_match": 0.04, "val_loss": 1.5})
        >>> {k: (v.cell if v else None) for k, v in best_per_budget([a, b], [0.01, 0.05]).items()}
        {0.01: 'a', 0.05: 'b'}
    """
    if fidelity_mode not in ("min", "max"):
        raise ValueError(f"fidelity_mode must be 'min' (lower is better, e.g. a loss) or 'max', got {fidelity_mode!r}")
    out: dict[float, CellStats | None] = {}
    for budget in budgets:
        eligible = [
            s for s in stats
            if s.n > 0 and memorization in s.mean and fidelity in s.mean and s.mean[memorization] <= budget
        ]  # fmt: skip
        if not eligible:
            out[budget] = None
            continue
        sign = 1.0 if fidelity_mode == "min" else -1.0
        out[budget] = min(eligible, key=lambda s: (sign * s.mean[fidelity], s.mean[memorization]))
    return out


def format_auc(value: float, digits: int = AUC_DIGITS, max_digits: int = 6) -> str:
    """An AUC with ``digits`` decimals, more (up to ``max_digits``) while a value below 1 would
    print as 1, so a cell at 0.99995 and a baseline at exactly 1 never look the same.

    Example:
        >>> format_auc(0.9995), format_auc(1.0), format_auc(0.99996), format_auc(0.5)
        ('0.9995', '1.0000', '0.99996', '0.5000')
    """
    while value < 1.0 and f"{value:.{digits}f}" == f"{1.0:.{digits}f}" and digits < max_digits:
        digits += 1
    return f"{value:.{digits}f}"


def _cell(stats: CellStats, key: str, digits: int) -> str:
    if key not in stats.mean:
        return "n/a"
    m, s = stats.mean[key], stats.std.get(key)
    mean = format_auc(m, digits) if key == "mia_auc" or key.endswith("_auc") else f"{m:.{digits}f}"
    return mean if s is None else f"{mean} ± {s:.{digits}f}"


def render_summary(
    stats: Sequence[CellStats],
    grid_keys: Sequence[str],
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    memorization: str = "exact_match",
    fidelity: str = "val_loss",
    fidelity_mode: str = "min",
    title: str | None = "Ablation summary",
    notes: Sequence[str] = (),
) -> str:
    """The summary as Markdown: the per-cell table, then the best cell per budget.

    Example:
        >>> print(render_summary([CellStats("a", {"goldfish.k": "2"}, 1, 1, {"exact_match": 0.0})],
        ...                      ["goldfish.k"], budgets=[0.01], title=None).splitlines()[0])
        | goldfish.k | runs | exact match | token match | near-verbatim | MIA AUC (max) | held-out loss | best held-out loss | perplexity | wall time (s) |
    """
    columns = [c for c in _COLUMNS if c[0] != "epsilon" or any("epsilon" in s.mean for s in stats)]
    if memorization not in [c[0] for c in columns]:
        columns.insert(0, (memorization, memorization, 4))
    if fidelity not in [c[0] for c in columns]:
        columns.append((fidelity, fidelity, 4))
    keys = list(grid_keys) or ["cell"]
    head = [*keys, "runs", *(c[1] for c in columns)]
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for s in stats:
        first = [s.assignment.get(k, "") for k in grid_keys] if grid_keys else [s.cell]
        runs = f"{s.n}/{s.total}" if s.n != s.total else str(s.n)
        lines.append("| " + " | ".join([*first, runs, *(_cell(s, k, d) for k, _, d in columns)]) + " |")
    lines.append("")
    best = best_per_budget(stats, budgets, memorization, fidelity, fidelity_mode)
    word = "lowest" if fidelity_mode == "min" else "highest"
    lines += [
        "## Best cell per memorization budget",
        "",
        f"Among the cells whose mean {memorization} is within the budget, the one with the {word} mean {fidelity}.",
        "",
        f"| budget ({memorization} <=) | best cell | {memorization} | {fidelity} |",
        "|---|---|---|---|",
    ]
    for budget, s in best.items():
        if s is None:
            lines.append(f"| {budget:g} | none meets it | | |")
        else:
            lines.append(f"| {budget:g} | {s.label()} | {_cell(s, memorization, 4)} | {_cell(s, fidelity, 4)} |")
    failed = [s for s in stats if s.n < s.total]
    if failed:
        lines += ["", "Cells with unfinished or failed runs (rerun the same command to retry): "
                  + ", ".join(f"{s.cell} ({s.total - s.n} of {s.total})" for s in failed)]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write_summary(text: str, path: str | os.PathLike[str]) -> Path:
    """Write the Markdown summary (atomically: a reader never sees half a file).

    Example:
        >>> import tempfile
        >>> write_summary("# x\\n", tempfile.mkdtemp() + "/summary.md").read_text()
        '# x\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)
