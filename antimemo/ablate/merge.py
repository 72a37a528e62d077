"""Merge several ablation directories into one, for a combined table and plot.

Families of an ablation are often run as separate product grids (goldfish ``k`` over seeds, DP
noise, each regularizer), each in its own ``--out``. :func:`merge_ablations` writes an
``ablation.json`` in a new directory that lists every run of those directories (their run
directories are not copied or moved) with the union of their grid keys, so that
``antimemo ablate --merge A B C --out ALL`` tabulates and plots them together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from antimemo.ablate.runner import Run, load_manifest, write_manifest

__all__ = ["merge_ablations"]


def _same_dir(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def merge_ablations(out: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]]) -> Path:
    """Write ``OUT/ablation.json`` listing every run of the ablations in ``sources``.

    Grid keys are the union of the sources' keys in order of first appearance (a key's values
    are merged the same way); each source's settings (config, seeds, overrides for every run)
    are kept under ``merged_from``. Nothing is trained, copied or moved: the runs stay in their
    directories, and the report of ``OUT`` reads them there.

    Args:
        out: The merged ablation's directory (created; must not be one of ``sources``).
        sources: At least two ablation directories (each with an ``ablation.json``).

    Returns:
        The path of the written manifest.

    Raises:
        ValueError: fewer than two sources, ``out`` among them, a source listed twice, or the
            same cell and seed in two sources (their figures would be counted twice).
        FileNotFoundError: a source has no ``ablation.json``.

    Example:
        >>> merge_ablations("runs/ablation/all", ["runs/ablation/goldfish", "runs/ablation/dp"])  # doctest: +SKIP
        PosixPath('runs/ablation/all/ablation.json')
    """
    out = Path(out)
    paths = [Path(s) for s in sources]
    if len(paths) < 2:
        raise ValueError(f"--merge needs at least two ablation directories, got {[str(p) for p in paths]}")
    for i, path in enumerate(paths):
        if _same_dir(path, out):
            raise ValueError(
                f"--merge {path}: the output directory --out {out} is one of the merged ablations; "
                "write the merged ablation to a new directory, e.g. --out runs/ablation/all"
            )
        if any(_same_dir(path, other) for other in paths[:i]):
            raise ValueError(f"--merge lists {str(path)!r} twice")
    grid: dict[str, list[str]] = {}
    runs: list[Run] = []
    owner: dict[tuple[str, int], Path] = {}
    merged_from: list[dict[str, Any]] = []
    configs: list[str] = []
    for path in paths:
        info, source_runs = load_manifest(path)
        for key, values in info.get("grid", []):
            known = grid.setdefault(key, [])
            known.extend(str(v) for v in values if str(v) not in known)
        for run in source_runs:
            # a cell's id is its full assignment, so equal ids mean the same settings
            identity = (run.cell, run.seed)
            if identity in owner:
                raise ValueError(
                    f"--merge: cell {run.cell!r} seed {run.seed} is in both {str(owner[identity])!r} and "
                    f"{str(path)!r}; its figures would be counted twice. Merge ablations of different "
                    "cells (or different seeds)"
                )
            owner[identity] = path
            runs.append(run)
        for config in info.get("config", []) or []:
            if str(config) not in configs:
                configs.append(str(config))
        merged_from.append(
            {
                "out": str(path),
                "config": info.get("config"),
                "seeds": info.get("seeds"),
                "seed_start": info.get("seed_start"),
                "base_overrides": info.get("base_overrides", []),
                "runs": len(source_runs),
            }
        )
    seeds = max(int(m["seeds"] or 1) for m in merged_from)
    return write_manifest(
        out,
        runs,
        config=configs,
        grid=[[key, values] for key, values in grid.items()],
        seeds=seeds,
        seed_start=min(int(m["seed_start"] or 0) for m in merged_from),
        base_overrides=[],
        merged_from=merged_from,
    )

