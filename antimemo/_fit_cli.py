"""``AntimemoCLI``, the ``LightningCLI`` behind ``antimemo fit`` / ``antimemo validate`` (and, as
``antimemo.audit``'s subclass, ``antimemo audit``).

Public as ``antimemo.cli.AntimemoCLI``. It lives here, below :mod:`antimemo.cli`, so that
``antimemo.ablate`` can parse ``fit`` arguments with it without importing the console script
(which imports ``antimemo.ablate`` for its ``ablate`` verb). Nothing here imports Lightning until
:func:`cli_class` is called.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from antimemo._extras import extra_for
from antimemo.sections import (
    CALLBACK_SECTIONS,
    DEFAULT_DATA_CLASS,
    DEFAULT_MODEL_CLASS,
    REFUSED_MODULES,
    SECTION_DEFAULTS,
    check_import_path,
)

__all__ = ["audit_config", "build_cli_class", "cli_class", "describe_error", "import_class", "mark_run_phase"]

#: Attribute set on an exception raised while the verb ran (after parsing and instantiation): the
#: ``antimemo`` console script prints those with their traceback (a bug or a runtime failure),
#: and errors raised before it as one line (a configuration error).
RUN_PHASE_ATTR = "_antimemo_run_phase"


def mark_run_phase(err: BaseException) -> BaseException:
    """Tag ``err`` as raised while the verb ran (not while the config was parsed / built)."""
    try:
        setattr(err, RUN_PHASE_ATTR, True)
    except (AttributeError, TypeError):  # pragma: no cover - exceptions without a __dict__
        pass
    return err


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)


def _value_text(raw: str) -> str | None:
    import re

    nested = re.fullmatch(r"NestedArg\(key='[^']*', val=(.*)\)", raw)
    if nested:
        raw = nested.group(1).strip("'\"")
    if raw.startswith("Namespace(") or len(raw) > 120:
        return None
    return raw


def describe_error(err: BaseException) -> str:
    r"""One line for a configuration error: the argument, what is wrong with it, and the value.

    jsonargparse reports a bad value as a nested block (union subtypes, the class path tried, the
    given value); a callback's own check (``k must be an integer >= 2``) arrives wrapped in one.
    This keeps the innermost specific reason, prefixes it with the dotted argument (``--goldfish``,
    ``--model.lr``) and appends the given value.

    Example:
        >>> describe_error(ValueError('Parser key "trainer.max_epochs":\n  Errors:\n'
        ...                           "    - Expected a <class 'int'>\n  Given value: abc"))
        "--trainer.max_epochs: Expected a <class 'int'> (given: abc)"
    """
    import re

    from antimemo._extras import extra_for, missing_extra_message

    text = str(err).strip() or type(err).__name__
    missing = re.search(r"No module named '([\w.]+)'", text)
    if missing and extra_for(missing.group(1)):
        return missing_extra_message(missing.group(1), "this config")
    lines = [line for line in text.splitlines() if line.strip()]
    best: tuple[int, int, str] | None = None  # (indent, index, reason)
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("- "):
            stripped = stripped[2:].strip()
            indent += 2
        key = re.match(r'Parser key "([^"]+)":\s*(.*)$', stripped)
        if key:
            stripped = key.group(2).strip()
        if not stripped or stripped.startswith(_NOISE) or re.match(r"Expected a path but .* either not accessible", stripped):
            continue
        if best is None or indent > best[0]:
            best = (indent, i, stripped)
    if best is None:
        return " ".join(line.strip() for line in lines)
    indent, index, reason = best
    # the argument: every 'Parser key' line enclosing the reason (less indented, above it)
    keys: list[str] = []
    limit = indent + 1
    for line in reversed(lines[: index + 1]):
        stripped = line.strip().removeprefix("- ").strip()
        depth = len(line) - len(line.lstrip())
        key = re.match(r'Parser key "([^"]+)":', stripped)
        if key and depth < limit:
            keys.insert(0, key.group(1))
            limit = depth
    if not keys:
        # a callback's own check, wrapped by jsonargparse: name the section by its class
        from antimemo.sections import CALLBACK_SECTIONS

        found = re.search(r"class_path='([\w.]+)'", text)
        if found:
            name = found.group(1).rsplit(".", 1)[-1]
            keys = [s for s, path in CALLBACK_SECTIONS.items() if path.rsplit(".", 1)[-1] == name][:1] or [name]
    if "import path denylist" in reason:
        found = re.search(r"Importing '([^']+)'", reason)
        reason = (
            f"{found.group(1) if found else 'the import path'} is refused: the standard library and process "
            "launchers may not be named in a recipe; name a class or function of antimemo, Lightning, torch or "
            "your own package"
        )
    given = None
    for line in lines[index + 1 :]:
        found = re.match(r"\s*Given value: (.*)$", line)
        if found:
            given = _value_text(found.group(1).strip())
            break
    head = f"--{'.'.join(keys)}: " if keys else ""
    tail = f" (given: {given})" if given is not None and given not in reason else ""
    return f"{head}{reason}{tail}"


def _enforce_import_policy() -> None:
    """Make jsonargparse refuse, before importing it, any import path a config value names whose
    top-level module is in :data:`antimemo.sections.REFUSED_MODULES` (``class_path: subprocess.Popen``,
    ``decode: os.system``). pyproject requires a jsonargparse that has this setting (>= 4.53); an
    older one fails here loudly instead of running without the policy. :func:`audit_config` checks
    the parsed config a second time before anything is built."""
    from jsonargparse import set_parsing_settings

    try:
        set_parsing_settings(import_path_denylist=sorted(REFUSED_MODULES))
    except (TypeError, ValueError) as err:
        import jsonargparse

        raise RuntimeError(
            f"jsonargparse {getattr(jsonargparse, '__version__', '?')} cannot refuse import paths in recipes "
            f"({err}); antimemo needs jsonargparse >= 4.53: pip install -U 'jsonargparse[signatures]>=4.53'"
        ) from err


def audit_config(config: Any, prefix: str = "") -> None:
    """Check every import path a parsed config holds before anything is instantiated.

    Every ``class_path`` string and every class or function value (a ``Callable`` argument such
    as ``monitor.decode``, resolved from a dotted string) must come from a module that
    :func:`antimemo.sections.check_import_path` accepts.

    Raises:
        ValueError: naming the config key, the value and the fix.

    Example:
        >>> import os
        >>> audit_config({"monitor": {"init_args": {"decode": os.system}}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: monitor.init_args.decode: '...system' is refused: its module '...' is refused ...
    """
    import inspect

    if hasattr(config, "__dict__") and type(config).__name__ == "Namespace":
        items = list(vars(config).items())
    elif isinstance(config, dict):
        items = list(config.items())
    elif isinstance(config, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(config)]
    else:
        items = []
    for key, value in items:
        key = str(key)
        if key.startswith("__"):
            continue
        where = f"{prefix}.{key}" if prefix else key
        if key == "class_path" and isinstance(value, str):
            check_import_path(value, where)
        elif inspect.isclass(value) or inspect.isroutine(value):
            module = getattr(value, "__module__", None) or "builtins"
            check_import_path(f"{module}.{getattr(value, '__name__', 'object')}", where)
        else:
            audit_config(value, where)


def import_class(path: str) -> type:
    """The class named by a dotted ``module.Class`` path."""
    from importlib import import_module

    module, _, name = path.rpartition(".")
    return getattr(import_module(module), name)



#: Lightning console lines that are noise for an ``antimemo`` user (dropped by :func:`quiet_console`).
NOISE_PREFIXES = (
    "\N{ELECTRIC LIGHT BULB} Tip:",  # litlogger / litmodels advertisements
    "Seed set to",  # printed again by every parse of a config (ablate --dry_run printed it 5 times)
    "GPU available: False",
    "TPU available: False",
    "HPU available: False",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
#: Warnings from libraries that the user can do nothing about.
NOISE_WARNINGS = (
    r".*`tensorboardX` has been removed as a dependency.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE_PREFIXES)


def quiet_console() -> None:
    """Drop Lightning's tips, CPU-only accelerator lines, repeated seed lines and library warnings
    the user cannot act on, from the console of the ``antimemo`` verbs (idempotent).

    Lightning's own progress bar, warnings about the user's setup and errors are kept. It acts on
    the handlers Lightning attaches to its ``lightning.pytorch`` / ``lightning.fabric`` loggers and
    on Python warnings, so it is only called by the CLI, never on import.

    Example:
        >>> quiet_console()
        >>> import logging
        >>> logging.getLogger("lightning.fabric.utilities.seed").info("Seed set to 0")  # dropped
    """
    import lightning.pytorch  # noqa: F401  (attaches Lightning's console handlers)

    # the loggers that emit these lines (a logger's filter sees its own records, wherever they are
    # handled), and the console handlers Lightning attaches when the root logger has none
    emitters = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed")
    targets: list[Any] = [logging.getLogger(name) for name in emitters]
    for name in ("lightning.pytorch", "lightning.fabric"):
        targets.extend(logging.getLogger(name).handlers)
    for target in targets:
        if not any(isinstance(f, _NoiseFilter) for f in target.filters):
            target.addFilter(_NoiseFilter())
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def build_cli_class() -> type:
    """Define :class:`AntimemoCLI` lazily so that ``antimemo --help`` does not import Lightning."""
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from antimemo.report import REPORT_FILENAME, build_report, format_report, write_report

    _enforce_import_policy()
    quiet_console()

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
                "model": {"class_path": DEFAULT_MODEL_CLASS},
                "data": {"class_path": DEFAULT_DATA_CLASS},
            }
            for name, path in CALLBACK_SECTIONS.items():
                try:
                    cls = import_class(path)
                except ImportError as err:  # an optional extra (e.g. diffusers) is not installed
                    module = getattr(err, "name", None) or ""
                    extra = extra_for(module) if module else None
                    fix = f"pip install 'antimemo[{extra}]'" if extra else "pip install 'antimemo[all]'"
                    self._unavailable[name] = f"{path} cannot be imported ({err}); install it with {fix}"
                    parser.add_argument(f"--{name}", type=Optional[Any], default=None, help=f"unavailable: {err}")
                    continue
                parser.add_lightning_class_args(cls, name, subclass_mode=True, required=False)
                defaults[name] = SECTION_DEFAULTS.get(name)
            parser.set_defaults(defaults)
            parser.add_argument(
                "--report_path",
                type=Optional[str],
                default=None,
                help="Where to write the JSON report after fit (default: <trainer log_dir>/report.json).",
            )

        def before_instantiate_classes(self) -> None:
            """Refuse any import path of the standard library before a class is built."""
            audit_config(self.config)

        def _run_subcommand(self, subcommand: str) -> None:
            try:
                super()._run_subcommand(subcommand)
            except BaseException as err:
                raise mark_run_phase(err)

        def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
            """Like ``LightningCLI.instantiate_trainer``, but a ``null`` callback section adds nothing."""
            for name, why in self._unavailable.items():
                if self._get(self.config_init, name) is not None:
                    raise ImportError(f"the config turns on the {name!r} section, but {why}, or set it to null")
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

        def _finish_report(self, wall: float | None, overrides: dict[str, Any] | None = None) -> None:
            """Build, write and print the report; ``overrides`` (``antimemo audit``) replace or add keys."""
            trainer = self.trainer
            config_path = self._get(self.config, "config")
            extra: dict[str, Any] = {
                "config": [str(c) for c in config_path] if isinstance(config_path, (list, tuple)) else config_path,
                "command": None if self._argv is None else " ".join(["antimemo", *map(str, self._argv)]),
                "sections": {name: self._section(name) for name in CALLBACK_SECTIONS},
            }
            report = build_report(trainer, train_wall_time_s=wall, best_val_loss=self._val_tracker.best, extra=extra)
            report.update(overrides or {})
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


def cli_class() -> type:
    """:class:`AntimemoCLI`, built on first use (this imports Lightning)."""
    global _CLI_CLASS
    if _CLI_CLASS is None:
        _CLI_CLASS = build_cli_class()
    return _CLI_CLASS
