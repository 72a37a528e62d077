"""``antimemo recursive``: train generation after generation on the previous generation's samples.

    antimemo recursive --config recipes/lm_collapse.yaml --generations 5 --mix replace,accumulate,filter \\
        --seeds 2 --out runs/collapse
    antimemo recursive --config recipes/diffusion_collapse.yaml --generations 4 --mix replace,accumulate \\
        --seeds 1 --out runs/collapse_diffusion

See :mod:`antimemo.collapse.loop` for the output layout and ``docs/collapse.md``, "The recursive
loop". A bad argument prints one line naming it and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from antimemo.collapse.loop import DEFAULTS, MIXES, CollapsePlan, load_recipe, parse_mixes, run_recursive

__all__ = ["build_plan", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"antimemo recursive: error: {message}; 'antimemo recursive --help' lists the options\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="antimemo recursive", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the recipe (e.g. recipes/lm_collapse.yaml)")
    p.add_argument("--generations", type=int, required=True, help="generations including generation 0 (real data), >= 1")
    p.add_argument("--mix", default=None,
                   help=f"comma-separated policies from {', '.join(MIXES)} (default: all three; replace,accumulate "
                        "for a diffusion recipe, which has no watermark to filter)")
    p.add_argument("--out", required=True, help="output directory (rerunning resumes it)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per mix (default 1)")
    p.add_argument("--samples", type=int, default=None,
                   help="synthetic sequences per generation (default: recursive.samples, else the real training count)")
    for name in ("prompt_length", "context_width", "key"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"default: recursive.{name}, else {DEFAULTS[name]}")
    for name in ("gamma", "delta", "temperature", "z_threshold"):
        p.add_argument(f"--{name}", type=float, default=None, help=f"default: recursive.{name}, else {DEFAULTS[name]}")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each fit (default: all cores)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def build_plan(args: argparse.Namespace) -> CollapsePlan:
    """Check the arguments and the recipe's ``recursive:`` section; raise ``ValueError`` naming the bad one."""
    from pathlib import Path

    if args.generations < 1:
        raise ValueError(f"--generations must be an integer >= 1, got {args.generations}; e.g. --generations 5 "
                         "(generation 0 on real data, then 4 recursive generations)")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {args.seeds}; e.g. --seeds 2")
    mixes = parse_mixes(args.mix) if args.mix is not None else list(MIXES)
    recipe = load_recipe(args.config)
    section = recipe.get("recursive") or {}
    if not isinstance(section, dict):
        raise ValueError(f"recursive: must be a mapping of settings, got {section!r}")
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"recursive.{unknown[0]}: unknown setting in {args.config!r}; known: {', '.join(DEFAULTS)}")
    settings = {**DEFAULTS, **section}
    given = set(section)
    for name in DEFAULTS:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
            given.add(name)
    from antimemo.collapse.images import check_image_recipe, is_image_recipe

    modality = "images" if is_image_recipe(recipe) else "tokens"
    if modality == "images":
        if args.mix is None:
            mixes = ["replace", "accumulate"]
        check_image_recipe(recipe, str(args.config), mixes, sorted(given))
    checks = (
        ("samples", settings["samples"] is None or (isinstance(settings["samples"], int) and settings["samples"] >= 1), "an integer >= 1, e.g. 128"),
        ("prompt_length", isinstance(settings["prompt_length"], int) and settings["prompt_length"] >= 1, "an integer >= 1, e.g. 8"),
        ("gamma", isinstance(settings["gamma"], (int, float)) and 0 < settings["gamma"] < 1, "a number in (0, 1), e.g. 0.25"),
        ("delta", isinstance(settings["delta"], (int, float)) and settings["delta"] >= 0, "a number >= 0, e.g. 4.0"),
        ("temperature", isinstance(settings["temperature"], (int, float)) and settings["temperature"] > 0, "a number > 0, e.g. 1.0"),
        ("context_width", isinstance(settings["context_width"], int) and settings["context_width"] >= 1, "an integer >= 1, e.g. 1"),
        ("key", isinstance(settings["key"], int), "an integer"),
        ("z_threshold", isinstance(settings["z_threshold"], (int, float)), "a number, e.g. 4.0"),
        ("diversity", isinstance(settings["diversity"], dict), "a mapping of DiversityMonitor arguments"),
    )
    for name, ok, fix in checks:
        if not ok:
            raise ValueError(f"--{name} (recursive.{name}) must be {fix}, got {settings[name]!r}")
    if (recipe.get("trainer") or {}).get("enable_checkpointing") is False:
        raise ValueError(f"trainer.enable_checkpointing is false in {args.config!r}; the recursive loop samples from "
                         "each generation's final checkpoint: set it to true")
    return CollapsePlan(str(args.config), recipe, Path(args.out), args.generations, mixes, list(range(args.seeds)), settings,
                        modality)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``antimemo recursive``; returns the exit code (0, 1 when a generation failed, 2 for a bad argument)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        plan = build_plan(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"antimemo recursive: error: {err}", file=sys.stderr)
        return 2
    try:
        rows, failures = run_recursive(plan, threads=args.threads, progress=not args.no_progress)
    except Exception as err:
        from antimemo._fit_cli import RUN_PHASE_ATTR

        setattr(err, RUN_PHASE_ATTR, True)  # a failure while running keeps its traceback (not a config error)
        raise
    for line in failures:
        print(f"antimemo recursive: {line}", file=sys.stderr)
    print(f"antimemo recursive: {len(rows)} rows in {plan.out / 'generations.csv'}; table {plan.out / 'summary.md'}; "
          f"plot {plan.out / 'collapse.png'}")
    return 1 if failures else 0
