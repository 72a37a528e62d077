"""The ``antimemo`` console script.

Verbs:

- ``antimemo fit --config recipes/lm_goldfish.yaml [overrides]``: train with
  :class:`AntimemoCLI` (a ``LightningCLI``), then print the memorization report and write it to
  ``<log_dir>/report.json`` (or ``--report_path``).
- ``antimemo validate --config ... --ckpt_path ...``: run validation (held-out loss) only.

Besides Lightning's ``trainer`` / ``model`` / ``data`` / ``optimizer`` sections, the config has one
optional callback section per :data:`CALLBACK_SECTIONS` entry, each a callback or ``null``:
``goldfish`` (``--goldfish.k 8``; ``--goldfish null`` trains without goldfish), ``dedup``, ``dp``,
``loss_floor``, ``loss_truncation``, ``spectral_norm``, ``example_tied_dropout`` (all off by
default) and ``monitor`` (on by default; ``--monitor null`` turns measuring off). ``model`` and
``data`` take a ``class_path`` (defaults: ``CausalLMModule`` / ``TextDataModule``).

New verbs are added to :data:`VERBS` (name -> :class:`Verb`); ``main`` dispatches on the first
argument.

Example:
    >>> main(["fit", "--config", "recipes/lm_goldfish.yaml", "--goldfish", "null"])  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = ["AntimemoCLI", "CALLBACK_SECTIONS", "VERBS", "Verb", "main"]


@dataclass(frozen=True)
class Verb:
    """One ``antimemo`` sub-command.

    Attributes:
        help: one-line description shown by ``antimemo --help``.
        run: ``run(argv) -> exit code``; ``argv`` are the arguments after the verb.

    Example:
        >>> VERBS["hello"] = Verb("say hello", lambda argv: print("hello") or 0)  # doctest: +SKIP
    """

    help: str
    run: Callable[[list[str]], int]


def _lightning_verb(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        args: list[str] | None = [name, *argv]
        if sys.argv[1:] == args:
            args = None  # the console script: let LightningCLI read sys.argv itself (no double-args warning)
        _cli_class()(args=args)
        return 0

    return run


def _ablate_verb(argv: list[str]) -> int:
    from antimemo.ablate.cli import main as ablate_main

    return ablate_main(argv)


def _dedup_verb(argv: list[str]) -> int:
    import argparse

    from antimemo.dedup import cli as dedup_cli

    parser = argparse.ArgumentParser(prog="antimemo dedup", description="build a duplicate index and print its summary")
    dedup_cli.add_arguments(parser)
    return dedup_cli.run(parser.parse_args(argv))


#: Optional callback sections of the ``fit`` / ``validate`` config: section name -> class path.
#: Each section is ``null`` (off) or the callback's arguments (``--NAME.ARG VALUE``; a
#: ``class_path:`` may name a subclass). Only ``monitor`` is on by default. Add a mitigation by
#: adding an entry here; ``antimemo ablate`` sweeps any of them (``--grid NAME.ARG=V1,V2,none``).
CALLBACK_SECTIONS: dict[str, str] = {
    "goldfish": "antimemo.callbacks.goldfish.GoldfishTokenDropout",
    "dedup": "antimemo.callbacks.dedup.DedupSampling",
    "dp": "antimemo.callbacks.dp.DifferentialPrivacy",
    "loss_floor": "antimemo.callbacks.loss_floor.LossFloor",
    "loss_truncation": "antimemo.callbacks.loss_truncation.LossTruncation",
    "spectral_norm": "antimemo.callbacks.spectral_norm.SpectralNormPenalty",
    "example_tied_dropout": "antimemo.callbacks.example_tied_dropout.ExampleTiedDropout",
    "monitor": "antimemo.callbacks.monitor.MemorizationMonitor",
    "budget": "antimemo.callbacks.budget.MemorizationBudget",
    # a second monitor, e.g. on the duplicated sequences (probe_dataset: duplicated_dataset)
    "duplicates_monitor": "antimemo.callbacks.monitor.MemorizationMonitor",
    # diffusion (recipes/diffusion_ddpm.yaml; docs/diffusion.md)
    "replica_monitor": "antimemo.callbacks.replica_monitor.ReplicaMonitor",
    "conditioning_noise": "antimemo.callbacks.conditioning.ConditioningNoise",
    "label_randomization": "antimemo.callbacks.conditioning.LabelRandomization",
    "replica_penalty": "antimemo.callbacks.replica_penalty.ReplicaPenalty",
}

#: Non-null section defaults (the rest default to ``null``).
_SECTION_DEFAULTS: dict[str, Any] = {
    "monitor": {"class_path": CALLBACK_SECTIONS["monitor"], "init_args": {"holdout": "val"}},
}


def _import_class(path: str) -> type:
    """The class named by a dotted ``module.Class`` path."""
    from importlib import import_module

    module, _, name = path.rpartition(".")
    return getattr(import_module(module), name)


#: Registered verbs, in the order ``antimemo --help`` lists them.
VERBS: dict[str, Verb] = {
    "fit": Verb("train a model (LightningCLI), then print and save the memorization report", _lightning_verb("fit")),
    "validate": Verb("run the validation loop (held-out loss) on a model or checkpoint", _lightning_verb("validate")),
    "dedup": Verb("find exact and near duplicates (PATH_OR_RECIPE --out INDEX) and print a summary", _dedup_verb),
    "ablate": Verb("sweep config keys x seeds (--grid KEY=V1,V2 --seeds N --out DIR): results.csv, summary.md, pareto.png", _ablate_verb),
}


def _build_cli_class() -> type:
    """Define :class:`AntimemoCLI` lazily so that ``antimemo --help`` does not import Lightning."""
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from antimemo.lm.data import TextDataModule
    from antimemo.lm.module import CausalLMModule
    from antimemo.report import REPORT_FILENAME, build_report, format_report, write_report

    class _ValLossTracker(pl.Callback):
        """Remembers the lowest ``val_loss`` seen while fitting (read-only, logs nothing)."""

        def __init__(self) -> None:
            self.best: float | None = None

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            value = trainer.callback_metrics.get("val_loss")
            if value is not None:
                value = float(value)
                self.best = value if self.best is None else min(self.best, value)

    class AntimemoCLI(LightningCLI):
        """``LightningCLI`` for :class:`CausalLMModule` / :class:`TextDataModule` (defaults) with two
        optional callback sections, ``goldfish`` and ``monitor``, and a report after ``fit``.

        ``goldfish`` defaults to ``null`` (standard training) and ``monitor`` to
        ``MemorizationMonitor(holdout="val")``; the recipe ``recipes/lm_goldfish.yaml`` turns
        goldfish on. ``--report_path`` chooses where ``report.json`` goes (default: the run's log
        directory). Pass ``model_class`` / ``datamodule_class`` to use your own module or data.

        Args:
            args: command-line arguments (``None``: ``sys.argv[1:]``).
            run: ``False`` only parses and instantiates (no verb).
            **kwargs: passed to ``LightningCLI``.

        Example:
            >>> cli = AntimemoCLI(args=["--config", "recipes/lm_goldfish.yaml", "--goldfish", "null"],
            ...                   run=False)  # doctest: +SKIP
            >>> [type(c).__name__ for c in cli.trainer.callbacks]  # doctest: +SKIP
        """

        def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
            # model / data accept ``class_path:`` (any LightningModule / DataModule); a plain mapping
            # configures the defaults, CausalLMModule and TextDataModule.
            kwargs.setdefault("model_class", None)
            kwargs.setdefault("datamodule_class", None)
            kwargs.setdefault("seed_everything_default", 0)
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
            kwargs.setdefault("parser_kwargs", {"description": "antimemo: train with anti-memorization callbacks"})
            self.report: dict[str, Any] | None = None
            self._unavailable: dict[str, str] = {}  # section -> why its class cannot be imported
            self._argv = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, tuple, type(None))) else None
            self._fit_start: float | None = None
            self._val_tracker = _ValLossTracker()
            super().__init__(args=args, run=run, **kwargs)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            """Add one optional section per :data:`CALLBACK_SECTIONS` entry and ``--report_path``."""
            defaults: dict[str, Any] = {
                "model": {"class_path": f"{CausalLMModule.__module__}.{CausalLMModule.__qualname__}"},
                "data": {"class_path": f"{TextDataModule.__module__}.{TextDataModule.__qualname__}"},
            }
            for name, path in CALLBACK_SECTIONS.items():
                try:
                    cls = _import_class(path)
                except ImportError as err:  # an optional extra (e.g. diffusers) is not installed
                    self._unavailable[name] = f"{path} cannot be imported ({err})"
                    parser.add_argument(f"--{name}", type=Optional[Any], default=None, help=f"unavailable: {err}")
                    continue
                parser.add_lightning_class_args(cls, name, subclass_mode=True, required=False)
                defaults[name] = _SECTION_DEFAULTS.get(name)
            parser.set_defaults(defaults)
            parser.add_argument(
                "--report_path",
                type=Optional[str],
                default=None,
                help="Where to write the JSON report after fit (default: <trainer log_dir>/report.json).",
            )

        def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
            """Like ``LightningCLI.instantiate_trainer``, but a ``null`` callback section adds nothing."""
            for name, why in self._unavailable.items():
                if self._get(self.config_init, name) is not None:
                    raise ImportError(
                        f"the config turns on the {name!r} section, but {why}; install the extra it needs "
                        "(pip install 'antimemo[all]'), or set it to null"
                    )
            keys = self._parser(self.subcommand).callback_keys
            extra = [self._get(self.config_init, key) for key in keys]
            extra = [cb for cb in extra if cb is not None]
            extra.append(self._val_tracker)
            trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            return self._instantiate_trainer(trainer_config, extra)

        def before_fit(self) -> None:
            self._fit_start = time.perf_counter()

        def after_fit(self) -> None:
            wall = None if self._fit_start is None else time.perf_counter() - self._fit_start
            self._finish_report(wall)

        def _section(self, name: str) -> dict[str, Any] | None:
            """A callback section's config as plain JSON values (``None`` when off)."""
            import json

            value = self._get(self.config, name)
            if value is None:
                return None
            value = value.as_dict() if hasattr(value, "as_dict") else value
            return json.loads(json.dumps(value, default=str))

        def _finish_report(self, wall: float | None) -> None:
            trainer = self.trainer
            config_path = self._get(self.config, "config")
            extra: dict[str, Any] = {
                "config": [str(c) for c in config_path] if isinstance(config_path, (list, tuple)) else config_path,
                "command": None if self._argv is None else " ".join(["antimemo", *map(str, self._argv)]),
                "sections": {name: self._section(name) for name in CALLBACK_SECTIONS},
            }
            report = build_report(trainer, train_wall_time_s=wall, best_val_loss=self._val_tracker.best, extra=extra)
            target = self._get(self.config, "report_path")
            if target is None:
                log_dir = trainer.log_dir or trainer.default_root_dir
                target = str(Path(log_dir) / REPORT_FILENAME)
            report["report_path"] = target
            if trainer.is_global_zero:
                write_report(report, target)
                print("\n" + format_report(report), flush=True)
            self.report = report

    return AntimemoCLI


_CLI_CLASS: type | None = None


def _cli_class() -> type:
    global _CLI_CLASS
    if _CLI_CLASS is None:
        _CLI_CLASS = _build_cli_class()
    return _CLI_CLASS


def __getattr__(name: str) -> Any:
    # ``from antimemo.cli import AntimemoCLI`` builds the class on first use (imports Lightning).
    if name == "AntimemoCLI":
        return _cli_class()
    raise AttributeError(f"module 'antimemo.cli' has no attribute {name!r}")


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = [
        "usage: antimemo <verb> [options]",
        "",
        "Training-time anti-memorization for PyTorch Lightning.",
        "",
        "verbs:",
        *(f"  {name.ljust(width)}  {verb.help}" for name, verb in VERBS.items()),
        "",
        "Run 'antimemo <verb> --help' for a verb's options, e.g.",
        "  antimemo fit --config recipes/lm_goldfish.yaml                 # goldfish k=4, h=13",
        "  antimemo fit --config recipes/lm_goldfish.yaml --goldfish null # standard training",
        "  antimemo fit --config recipes/lm_goldfish.yaml --goldfish.k 8",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``antimemo`` console script.

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        The exit code (0 on success; 2 for an unknown verb).

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: antimemo <verb> [options]
        ...
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from antimemo import __version__

        print(f"antimemo {__version__}")
        return 0
    verb = VERBS.get(args[0])
    if verb is None:
        print(f"antimemo: unknown verb {args[0]!r}; choose one of: {', '.join(VERBS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    return verb.run(args[1:])


if __name__ == "__main__":
    sys.exit(main())
