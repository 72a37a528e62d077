"""Collect the reports of an ablation into rows and ``results.csv`` (one row per run).

Columns (a column appears when some run has it):

- ``cell``, one column per grid key (its value in the cell), ``seed``, ``status``
  (``ok`` / ``failed`` / ``missing``);
- memorization: ``exact_match``, ``token_match``, ``near_verbatim`` (the report's last
  monitor evaluation), every ``*exposure*`` metric (key with ``/`` as ``_``), ``mia_<score>_auc`` for each
  membership-inference score the monitor logged (``.../mia/<score>/auc``) and ``mia_auc``, the
  largest of them (the strongest attack);
- fidelity: ``val_loss`` (held-out loss of the last validation), ``best_val_loss``,
  ``perplexity = exp(val_loss)``, ``best_perplexity``, ``train_loss``;
- ``epsilon`` (``dp/epsilon``), ``replication_*`` (every ``replication/*`` metric: replica
  rate, fidelity), every ``*diversity*`` metric, ``budget_*`` (the
  :class:`~antimemo.callbacks.MemorizationBudget` knob);
- ``train_wall_time_s``, ``epochs``, ``global_step``, ``run_dir``.

Example:
    >>> rows = collect("runs/ablation")  # doctest: +SKIP
    >>> write_csv(rows, "runs/ablation/results.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from antimemo._atomic import atomic_open
from antimemo.ablate.runner import FAILED, Run, load_manifest

__all__ = ["RESULTS_CSV", "collect", "read_csv", "row_from_report", "write_csv"]

#: File name of the per-run table inside ``OUT``.
RESULTS_CSV = "results.csv"

_FIXED = [
    "exact_match", "token_match", "near_verbatim", "mia_auc", "val_loss", "best_val_loss",
    "perplexity", "best_perplexity", "train_loss", "epsilon",
]  # fmt: skip
_TAIL = ["train_wall_time_s", "epochs", "global_step", "run_dir"]


def _name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value


def _exp(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return math.exp(value) if value < 700 else math.inf


def row_from_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one run's ``report.json`` (see the module docstring for the columns).

    Example:
        >>> row = row_from_report({"exact_match": 0.5, "val_loss": 0.0,
        ...                        "metrics": {"memorization/mia/loss/auc": 0.7, "dp/epsilon": 8.0}})
        >>> row["exact_match"], row["perplexity"], row["mia_loss_auc"], row["mia_auc"], row["epsilon"]
        (0.5, 1.0, 0.7, 0.7, 8.0)
    """
    metrics = {str(k): _num(v) for k, v in (report.get("metrics") or {}).items()}
    row: dict[str, Any] = {}
    for key in ("exact_match", "token_match", "near_verbatim", "val_loss", "best_val_loss", "train_loss"):
        row[key] = _num(report.get(key))
    row["perplexity"] = _exp(row["val_loss"])
    row["best_perplexity"] = _exp(row["best_val_loss"])
    aucs = {}
    for key, value in metrics.items():
        if "/mia/" in key and key.endswith("/auc") and value is not None:
            score = key.split("/mia/", 1)[1][: -len("/auc")]
            aucs[f"mia_{_name(score)}_auc"] = value
    row["mia_auc"] = max(aucs.values()) if aucs else None
    row.update(sorted(aucs.items()))
    row["epsilon"] = metrics.get("dp/epsilon")
    for key, value in sorted(metrics.items()):
        low = key.lower()
        if key.startswith("replication/"):
            row["replication_" + _name(key[len("replication/"):])] = value
        elif "exposure" in low or "diversity" in low:
            row[_name(key)] = value
        elif key.startswith("budget/"):
            row["budget_" + _name(key[len("budget/"):])] = value
    row["train_wall_time_s"] = _num(report.get("train_wall_time_s"))
    row["epochs"] = report.get("epochs")
    row["global_step"] = report.get("global_step")
    return row


def _status(run: Run) -> tuple[str, dict[str, Any] | None]:
    try:
        return "ok", json.loads(run.report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ("failed" if (run.dir / FAILED).is_file() else "missing"), None


def collect(out: str | os.PathLike[str], runs: Sequence[Run] | None = None) -> list[dict[str, Any]]:
    """One row per planned run of the ablation in ``out`` (finished or not).

    Args:
        out: the ablation directory (holding ``ablation.json``).
        runs: the runs (default: those of ``ablation.json``).

    Returns:
        Rows: ``cell``, the grid keys, ``seed``, ``status``, then the figures (``None`` when a
        run has not finished or lacks a figure).

    Example:
        >>> rows = collect("runs/ablation")  # doctest: +SKIP
        >>> rows[0]["cell"], rows[0]["status"], rows[0]["exact_match"]  # doctest: +SKIP
        ('goldfish.k-2', 'ok', 0.0)
    """
    if runs is None:
        _, runs = load_manifest(out)
    rows = []
    for run in runs:
        status, report = _status(run)
        row: dict[str, Any] = {"cell": run.cell, **run.assignment, "seed": run.seed, "status": status}
        if report is not None:
            row.update(row_from_report(report))
        row["run_dir"] = str(run.dir)
        rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        for key in row:
            if key not in seen:
                seen.append(key)
    head = [k for k in seen if k not in _FIXED and k not in _TAIL]
    # head: cell, grid keys, seed, status, then the optional figures after the fixed ones
    lead = head[: head.index("status") + 1] if "status" in head else []
    extra = [k for k in head if k not in lead]
    return lead + [k for k in _FIXED if k in seen] + extra + [k for k in _TAIL if k in seen]


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows as CSV (columns in a stable order; missing values empty), atomically.

    Example:
        >>> import tempfile
        >>> p = write_csv([{"cell": "a", "seed": 0, "status": "ok", "exact_match": 0.5}], tempfile.mkdtemp() + "/r.csv")
        >>> p.read_text().splitlines()[0]
        'cell,seed,status,exact_match'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read ``results.csv`` back (values as strings, empty for missing).

    Example:
        >>> read_csv("runs/ablation/results.csv")[0]["status"]  # doctest: +SKIP
        'ok'
    """
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))

