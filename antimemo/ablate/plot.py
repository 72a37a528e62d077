"""``pareto.png``: fidelity against memorization, one point per cell, Pareto front drawn.

x = mean memorization (default exact match), y = mean fidelity (default held-out loss); error
bars are the standard deviations over seeds. A cell is on the Pareto front when no other cell is
at least as good on both axes and better on one (lower memorization; lower loss, or higher for
``fidelity_mode="max"``). The front is drawn as a staircase through its cells.

Uses matplotlib's Agg backend (no display needed).

Example:
    >>> from antimemo.ablate.summary import CellStats
    >>> a = CellStats("a", {}, 1, 1, {"exact_match": 0.0, "val_loss": 2.0})
    >>> b = CellStats("b", {}, 1, 1, {"exact_match": 0.5, "val_loss": 1.5})
    >>> c = CellStats("c", {}, 1, 1, {"exact_match": 0.6, "val_loss": 1.8})
    >>> [s.cell for s in pareto_front([a, b, c])]
    ['a', 'b']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from antimemo.ablate.summary import CellStats

__all__ = ["PARETO_PNG", "pareto_front", "plot_pareto"]

#: File name of the plot inside ``OUT``.
PARETO_PNG = "pareto.png"


def pareto_front(
    stats: Sequence[CellStats],
    memorization: str = "exact_match",
    fidelity: str = "val_loss",
    fidelity_mode: str = "min",
) -> list[CellStats]:
    """The non-dominated cells, sorted by memorization (ties: better fidelity first).

    Example:
        >>> pareto_front([])
        []
    """
    sign = 1.0 if fidelity_mode == "min" else -1.0
    pts = [s for s in stats if memorization in s.mean and fidelity in s.mean]

    def dominated(s: CellStats) -> bool:
        x, y = s.mean[memorization], sign * s.mean[fidelity]
        for o in pts:
            ox, oy = o.mean[memorization], sign * o.mean[fidelity]
            if o is not s and ox <= x and oy <= y and (ox < x or oy < y):
                return True
        return False

    front = [s for s in pts if not dominated(s)]
    return sorted(front, key=lambda s: (s.mean[memorization], sign * s.mean[fidelity]))


def plot_pareto(
    stats: Sequence[CellStats],
    path: str | os.PathLike[str],
    memorization: str = "exact_match",
    fidelity: str = "val_loss",
    fidelity_mode: str = "min",
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Draw the cells and their Pareto front and save the figure.

    Args:
        stats: per-cell aggregates (:func:`~antimemo.ablate.summary.summarize`).
        path: the PNG to write.
        memorization / fidelity: the figures on the x / y axes.
        fidelity_mode: ``"min"`` (lower is better, a loss) or ``"max"``.
        title: figure title.
        dpi: resolution (the default gives a PNG of a few tens of kB).

    Returns:
        The path written.

    Raises:
        ValueError: no cell has both figures.

    Example:
        >>> plot_pareto(stats, "runs/ablation/pareto.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pts = [s for s in stats if memorization in s.mean and fidelity in s.mean]
    if not pts:
        raise ValueError(
            f"no cell has both {memorization!r} and {fidelity!r} (finished runs with a memorization monitor "
            "and validation); nothing to plot"
        )
    front = pareto_front(pts, memorization, fidelity, fidelity_mode)
    on_front = {id(s) for s in front}
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for s in pts:
        x, y = s.mean[memorization], s.mean[fidelity]
        xe, ye = s.std.get(memorization) or 0.0, s.std.get(fidelity) or 0.0
        color = "tab:red" if id(s) in on_front else "tab:blue"
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", color=color, ecolor=color, alpha=0.85, capsize=3, ms=5)
        ax.annotate(s.label(), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if len(front) >= 1:
        xs, ys = [], []
        for s in front:
            x, y = s.mean[memorization], s.mean[fidelity]
            if xs:
                xs.append(x)
                ys.append(ys[-1])
            xs.append(x)
            ys.append(y)
        ax.plot(xs, ys, "-", color="tab:red", lw=1.2, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(f"memorization: {memorization} (lower is better)")
    better = "lower" if fidelity_mode == "min" else "higher"
    ax.set_ylabel(f"fidelity: {fidelity} ({better} is better)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
