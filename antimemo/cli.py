"""The ``antimemo`` console script.

Verbs:

- ``antimemo fit --config recipes/lm_goldfish.yaml [overrides]``: train with
  :class:`AntimemoCLI` (a ``LightningCLI``), then print the memorization report and write it to
  ``<log_dir>/report.json`` (or ``--report_path``).
- ``antimemo validate --config ... --ckpt_path ...``: run validation (held-out loss) only.
- ``antimemo audit --config ... --ckpt_path ...``: every memorization measure (full greedy decode,
  discoverable extraction, MIA, untargeted extraction) on a saved checkpoint, or on any
  ``save_pretrained`` causal LM (:class:`antimemo.lm.PretrainedCausalLM`) with token files
  (:class:`antimemo.lm.TokenFileDataModule`); the same report as ``fit`` (:mod:`antimemo.audit`).

Besides Lightning's ``trainer`` / ``model`` / ``data`` / ``optimizer`` sections, the config has one
optional callback section per :data:`CALLBACK_SECTIONS` entry, each a callback or ``null``:
``goldfish`` (``--goldfish.k 8``; ``--goldfish null`` trains without goldfish), ``dedup``, ``dp``,
``loss_floor``, ``loss_truncation``, ``spectral_norm``, ``example_tied_dropout`` (all off by
default) and ``monitor`` (on by default; ``--monitor null`` turns measuring off). ``model`` and
``data`` take a ``class_path`` (defaults: ``CausalLMModule`` / ``TextDataModule``).

New verbs are added to :data:`VERBS` (name -> :class:`Verb`); ``main`` dispatches on the first
argument.

Errors: a configuration error (a bad flag or value, an unknown key, a missing config file, a
refused class path: ``ValueError`` / ``TypeError`` / ``KeyError`` / ``ImportError`` /
``FileNotFoundError`` or a parse error raised while the verb reads its arguments and builds its
objects) prints one line and a hint on stderr and exits with status 2. An exception raised while
the verb runs (training itself) keeps its traceback. ``--debug`` (before or after the verb) or
``ANTIMEMO_DEBUG=1`` shows the full traceback of configuration errors too.

Example:
    >>> main(["fit", "--config", "recipes/lm_goldfish.yaml", "--goldfish", "null"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from antimemo._fit_cli import RUN_PHASE_ATTR, describe_error
from antimemo._flags import canonical_flags
from antimemo._fit_cli import cli_class as _cli_class
from antimemo.sections import CALLBACK_SECTIONS

__all__ = ["AntimemoCLI", "CALLBACK_SECTIONS", "CONFIG_ERRORS", "DEBUG_ENV", "VERBS", "Verb", "main"]

#: Environment variable that, set to 1, shows the full traceback of configuration errors.
DEBUG_ENV = "ANTIMEMO_DEBUG"
#: Exceptions that, raised before a verb runs, are configuration errors (one line, exit 2).
CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, KeyError, ImportError, FileNotFoundError, IsADirectoryError, argparse.ArgumentError,
)


class _Parser(argparse.ArgumentParser):
    """``argparse`` with a one-line error (plus a hint) instead of the full usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\nhint: '{self.prog} --help' lists the options\n")


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
        # parse errors raise (one line in main) instead of printing jsonargparse's usage block
        no_exit = {"exit_on_error": False}
        _cli_class()(args=args, parser_kwargs={
            "description": "antimemo: train with anti-memorization callbacks", **no_exit,
            **{verb: dict(no_exit) for verb in ("fit", "validate", "test", "predict")},
        })
        return 0

    return run


def _ablate_verb(argv: list[str]) -> int:
    from antimemo.ablate.cli import main as ablate_main

    return ablate_main(argv)


def _audit_verb(argv: list[str]) -> int:
    from antimemo.audit import run

    return run(argv)


def _recursive_verb(argv: list[str]) -> int:
    from antimemo.collapse.cli import main as recursive_main

    return recursive_main(argv)


def _dedup_verb(argv: list[str]) -> int:
    from antimemo.dedup import cli as dedup_cli

    parser = _Parser(prog="antimemo dedup", description="build a duplicate index and print its summary")
    dedup_cli.add_arguments(parser)
    return dedup_cli.run(parser.parse_args(canonical_flags(parser, argv)))


#: Registered verbs, in the order ``antimemo --help`` lists them.
VERBS: dict[str, Verb] = {
    "fit": Verb("train a model (LightningCLI), then print and save the memorization report", _lightning_verb("fit")),
    "validate": Verb("run the validation loop (held-out loss) on a model or checkpoint", _lightning_verb("validate")),
    "audit": Verb("measure memorization of a finished model (--ckpt_path, or a save_pretrained model): report.json",
                  _audit_verb),
    "dedup": Verb("find exact and near duplicates (PATH_OR_RECIPE --out INDEX) and print a summary", _dedup_verb),
    "ablate": Verb("sweep config keys x seeds (--grid KEY=V1,V2 --seeds N --out DIR): results.csv, summary.md, pareto.png", _ablate_verb),
    "recursive": Verb("train on generated data generation after generation (--mix replace,accumulate,filter): "
                      "generations.csv, summary.md, collapse.png", _recursive_verb),
}


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
        "  antimemo audit --config recipes/lm_goldfish.yaml --ckpt_path runs/.../checkpoints/epoch=59-step=960.ckpt",
        "",
        f"--debug (anywhere before a '--') or {DEBUG_ENV}=1 shows the full traceback of an error.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``antimemo`` console script.

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        The exit code (0 on success; 2 for an unknown verb or a configuration error, printed as
        one line on stderr unless ``--debug`` / ``ANTIMEMO_DEBUG=1``).

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: antimemo <verb> [options]
        ...
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)  # after '--': arguments for another program
    debug = "--debug" in args[:cut] or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    if "--debug" in args[:cut]:
        args = [a for a in args[:cut] if a != "--debug"] + args[cut:]
        if argv is None:
            sys.argv = [sys.argv[0], *args]  # what LightningCLI reads
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
    previous = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # verbs that print their own errors (dedup, ablate) and ablate's runs read it
    try:
        return verb.run(args[1:])
    except CONFIG_ERRORS as err:
        if debug or getattr(err, RUN_PHASE_ATTR, False):
            raise  # a failure while running (or --debug): the full traceback
        print(f"antimemo {args[0]}: error: {describe_error(err)}", file=sys.stderr)
        print(f"hint: 'antimemo {args[0]} --help' lists the options; --debug or {DEBUG_ENV}=1 shows the "
              "full traceback", file=sys.stderr)
        return 2
    finally:
        if debug and previous is None:
            os.environ.pop(DEBUG_ENV, None)
        elif previous is not None:
            os.environ[DEBUG_ENV] = previous


if __name__ == "__main__":
    sys.exit(main())
