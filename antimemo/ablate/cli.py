"""The ``antimemo ablate`` verb: sweep config keys over seeds, then tabulate and plot.

::

    antimemo ablate --config recipes/lm_goldfish.yaml --grid goldfish.k=2,4,8,none --seeds 3 \\
        --out runs/ablation [--jobs 2] [-- --trainer.max_epochs=30]

Arguments after ``--`` are passed to every ``antimemo fit`` run. See ``docs/ablation.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from antimemo._flags import canonical_flags

__all__ = ["add_arguments", "build_parser", "main", "report", "run"]


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets must be comma-separated numbers, e.g. 0.01,0.05,0.1; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"--budgets needs at least one number, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``antimemo ablate`` options to ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--config", "r.yaml", "--grid", "goldfish.k=2,4", "--out", "o"]).seeds
        1
    """
    parser.add_argument("--config", action="append", default=None,
                        help="recipe YAML (repeatable, as for antimemo fit); required unless --report_only")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a config key and its values (repeatable: several keys form a product); "
                             "'none' turns a callback section off, e.g. goldfish.k=2,4,8,none")
    parser.add_argument("--out", required=True, help="output directory (runs/, results.csv, summary.md, pareto.png)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per cell (default 1)")
    parser.add_argument("--seed_start", type=int, default=0, help="first seed value (default 0)")
    parser.add_argument("--seed_keys", default=None,
                        help="comma-separated keys set to the seed (default: every seed key of the config: "
                             "seed_everything, model.seed, data.seed, <callback>.seed)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, each its own process (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default cpu_count // jobs)")
    parser.add_argument("--budgets", type=_floats, default=None,
                        help="memorization budgets for the best-cell table (default 0.01,0.05,0.1)")
    parser.add_argument("--memorization", default="exact_match", help="memorization column (default exact_match)")
    parser.add_argument("--fidelity", default="val_loss", help="fidelity column (default val_loss, the held-out loss)")
    parser.add_argument("--fidelity_mode", choices=("min", "max"), default="min",
                        help="min: lower fidelity figure is better (a loss; default); max: higher is better")
    parser.add_argument("--dry_run", action="store_true", help="validate and print the runs' commands, run nothing")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: rebuild results.csv, summary.md and pareto.png from OUT")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="run nothing: list the runs of these ablation directories in OUT/ablation.json "
                             "(runs stay where they are), then write OUT's results.csv, summary.md and pareto.png")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


class _Parser(argparse.ArgumentParser):
    """``argparse`` with a one-line error (plus a hint) instead of the full usage block; exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\nhint: '{self.prog} --help' lists the options\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``antimemo ablate`` argument parser (errors: one line on stderr, exit status 2)."""
    parser = _Parser(
        prog="antimemo ablate",
        description="Train every grid cell x seed as its own 'antimemo fit' run (resumable), then write "
                    "results.csv, summary.md and pareto.png. Arguments after '--' go to every run.",
    )
    add_arguments(parser)
    return parser


def report(
    out: str | Path,
    memorization: str = "exact_match",
    fidelity: str = "val_loss",
    fidelity_mode: str = "min",
    budgets: Sequence[float] | None = None,
    quiet: bool = False,
) -> str:
    """Write ``results.csv``, ``summary.md`` and ``pareto.png`` for the ablation in ``out`` and
    return the summary (printed unless ``quiet``).

    Example:
        >>> print(report("runs/ablation"))  # doctest: +SKIP
    """
    from antimemo.ablate.collect import RESULTS_CSV, collect, write_csv
    from antimemo.ablate.plot import PARETO_PNG, plot_pareto
    from antimemo.ablate.runner import load_manifest
    from antimemo.ablate.summary import DEFAULT_BUDGETS, SUMMARY_MD, render_summary, summarize, write_summary

    out = Path(out)
    info, runs = load_manifest(out)
    grid_keys = [key for key, _ in info.get("grid", [])]
    rows = collect(out, runs)
    write_csv(rows, out / RESULTS_CSV)
    stats = summarize(rows, grid_keys)
    notes = [
        f"Recipe: {', '.join(map(str, info.get('config', [])))}; seeds: {info.get('seeds')}; "
        f"overrides for every run: {' '.join(info.get('base_overrides', [])) or 'none'}.",
        f"Mean ± sample std over seeds. Per-run figures: {RESULTS_CSV}; plot: {PARETO_PNG}.",
    ]
    if info.get("merged_from"):
        notes[0] = "Merged from: " + "; ".join(
            f"{m['out']} ({plural(m['runs'], 'run')}, {plural(m['seeds'], 'seed')}, overrides: "
            f"{' '.join(m['base_overrides']) or 'none'})"
            for m in info["merged_from"]
        ) + "."
    text = render_summary(stats, grid_keys, budgets or DEFAULT_BUDGETS, memorization, fidelity, fidelity_mode, notes=notes)
    write_summary(text, out / SUMMARY_MD)
    try:
        plot_pareto(stats, out / PARETO_PNG, memorization, fidelity, fidelity_mode,
                    title=f"{fidelity} vs {memorization}" if len(grid_keys) > 2 else f"{', '.join(grid_keys) or 'ablation'}: {fidelity} vs {memorization}")
    except ValueError as err:
        print(f"antimemo ablate: no plot: {err}", file=sys.stderr)
    if not quiet:
        print("\n" + text, flush=True)
    return text


def plural(n: Any, word: str) -> str:
    """``"1 seed"``, ``"3 seeds"`` (``n`` as given when it is not an integer).

    Example:
        >>> plural(1, "seed"), plural(3, "seed"), plural(0, "run")
        ('1 seed', '3 seeds', '0 runs')
    """
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _plan_text(runs: int, cells: int, seeds: int) -> str:
    """``"2 runs (2 cells x 1 seed)"``.

    Example:
        >>> _plan_text(2, 2, 1), _plan_text(1, 1, 1)
        ('2 runs (2 cells x 1 seed)', '1 run (1 cell x 1 seed)')
    """
    return f"{plural(runs, 'run')} ({plural(cells, 'cell')} x {plural(seeds, 'seed')})"


def run(
    args: argparse.Namespace,
    overrides: Sequence[str] = (),
    command: Sequence[str] | None = None,
    parse: Callable[[Sequence[str]], Any] | None = None,
    sections: Mapping[str, str] | None = None,
) -> int:
    """Run an ablation from parsed arguments.

    Args:
        args: from :func:`build_parser`.
        overrides: ``antimemo fit`` arguments for every run (those after ``--``).
        command: the training command (default ``python -m antimemo.cli fit``).
        parse: the config parser (default: ``antimemo fit``'s).
        sections: callback sections (default ``antimemo.sections.CALLBACK_SECTIONS``).

    Returns:
        0 when every run finished; 1 when some failed or are still being trained by another
        process (their ``run.lock``); 2 for a bad grid or other bad argument; 130 when
        interrupted.
    """
    from antimemo.ablate.grid import parse_grid
    from antimemo.ablate.runner import execute, plan_runs, write_manifest

    out = Path(args.out)
    if args.merge:
        from antimemo.ablate.merge import merge_ablations

        if args.config or args.grid or args.dry_run:
            print("antimemo ablate: --merge runs nothing; drop --config, --grid and --dry_run", file=sys.stderr)
            return 2
        try:
            merge_ablations(out, args.merge)
        except (ValueError, FileNotFoundError, IsADirectoryError) as err:
            if _debug():
                raise
            print(f"antimemo ablate: {err}", file=sys.stderr)
            return 2
        report(out, args.memorization, args.fidelity, args.fidelity_mode, args.budgets)
        return 0
    if out.exists() and not out.is_dir():
        print(f"antimemo ablate: --out {str(out)!r} is a file; give a directory for the ablation (it is created)",
              file=sys.stderr)
        return 2
    if args.report_only:
        try:
            report(out, args.memorization, args.fidelity, args.fidelity_mode, args.budgets)
        except (ValueError, FileNotFoundError) as err:
            if _debug():
                raise
            print(f"antimemo ablate: --report_only --out {str(out)!r}: {err}", file=sys.stderr)
            return 2
        return 0
    if not args.config:
        print("antimemo ablate: --config is required (the recipe to sweep), e.g. --config recipes/lm_goldfish.yaml",
              file=sys.stderr)
        return 2
    try:
        axes = parse_grid(args.grid)
        seed_keys = None if args.seed_keys is None else [k.strip() for k in args.seed_keys.split(",") if k.strip()]
        runs = plan_runs(args.config, axes, out, seeds=args.seeds, seed_start=args.seed_start, seed_keys_=seed_keys,
                         base_overrides=list(overrides), sections=sections, parse=parse)
    except ValueError as err:
        if _debug():
            raise
        print(f"antimemo ablate: {err}", file=sys.stderr)
        return 2
    write_manifest(out, runs, config=args.config, grid=[[a.key, list(a.values)] for a in axes], seeds=args.seeds,
                   seed_start=args.seed_start, base_overrides=list(overrides))
    cells = len({r.cell for r in runs})
    if args.dry_run:
        from antimemo.ablate.runner import default_command

        prefix = " ".join(command or default_command())
        for r in runs:
            print(f"{prefix} {' '.join(r.args)}")
        print(f"# {_plan_text(len(runs), cells, args.seeds)} in {out}")
        return 0
    print(f"antimemo ablate: {_plan_text(len(runs), cells, args.seeds)} in {out}", flush=True)
    import signal

    def _terminate(signum: int, frame: Any) -> None:  # SIGTERM: stop the children like Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        outcome = execute(runs, jobs=args.jobs, command=command, threads=args.threads, progress=not args.no_progress)
    except ValueError as err:
        print(f"antimemo ablate: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nantimemo ablate: interrupted; finished runs are kept, rerun the same command to resume", file=sys.stderr)
        report(out, args.memorization, args.fidelity, args.fidelity_mode, args.budgets, quiet=True)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    busy = f", {len(outcome.busy)} still being trained by another process" if outcome.busy else ""
    print(f"antimemo ablate: {outcome.finished} finished, {outcome.skipped} already done, {len(outcome.failed)} failed"
          f"{busy}", flush=True)
    report(out, args.memorization, args.fidelity, args.fidelity_mode, args.budgets)
    return 1 if outcome.failed or outcome.busy else 0


def _debug() -> bool:
    """``antimemo --debug`` / ``ANTIMEMO_DEBUG=1``: raise configuration errors with their traceback."""
    import os

    return os.environ.get("ANTIMEMO_DEBUG", "").strip().lower() in ("1", "true", "yes")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: Sequence[str] | None = None) -> int:
    """``antimemo ablate`` entry point: ``argv`` without the verb; after ``--``, fit overrides.

    Example:
        >>> main(["--config", "recipes/lm_goldfish.yaml", "--grid", "goldfish.k=2,none",
        ...       "--out", "runs/ablation", "--dry_run"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(canonical_flags(parser, sys.argv[1:] if argv is None else list(argv)))
    return run(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
