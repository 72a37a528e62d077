"""Grid parsing for ``antimemo ablate``: ``--grid KEY=V1,V2,...`` axes, their product, and the
``antimemo fit`` overrides of each cell.

A key is a dotted config key of the recipe (``model.lr``, ``trainer.max_epochs``,
``goldfish.k``) or the bare name of a callback section (``goldfish``). For a key inside a
callback section (a name in :data:`antimemo.sections.CALLBACK_SECTIONS`):

- ``none`` turns the section off: ``--goldfish=null``;
- a value sets that argument: ``--goldfish.k=VALUE``. When the recipe has the section off
  (``null``), the run first turns it on with ``--goldfish=<class path>``, so the callback's other
  arguments take their defaults (a section already on keeps the recipe's arguments);
- for a bare section key, ``on`` keeps or turns on the section and ``none`` turns it off.

Any other key is a plain override (``--model.lr=0.001``). This module never imports Lightning:
:func:`validate_grid` (which checks keys and values against the real parser) imports it lazily.

Example:
    >>> axes = [parse_axis("goldfish.k=2,4,none"), parse_axis("model.lr=1e-3,2e-3")]
    >>> cells = expand_grid(axes)
    >>> len(cells), cells[0].id
    (6, 'goldfish.k-2_model.lr-1e-3')
    >>> cell_overrides(cells[0], sections={"goldfish": "pkg.Goldfish"}, null_sections={"goldfish"})
    ['--goldfish=pkg.Goldfish', '--goldfish.k=2', '--model.lr=1e-3']
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Cell",
    "GridAxis",
    "NONE",
    "ON",
    "callback_sections",
    "cell_overrides",
    "expand_grid",
    "parse_axis",
    "parse_fit_args",
    "parse_grid",
    "seed_keys",
    "validate_grid",
]

#: Grid value that turns a callback section off.
NONE = "none"
#: Grid value (bare section keys only) that turns a callback section on.
ON = "on"

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def callback_sections() -> dict[str, str]:
    """The callback sections of the ``antimemo fit`` config (:data:`antimemo.sections.CALLBACK_SECTIONS`).

    Example:
        >>> callback_sections()["goldfish"]
        'antimemo.callbacks.goldfish.GoldfishTokenDropout'
    """
    from antimemo.sections import CALLBACK_SECTIONS

    return dict(CALLBACK_SECTIONS)


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid KEY=V1,V2,...`` axis: a config key and its values (strings, as given).

    Example:
        >>> parse_axis("goldfish.k=2,4")
        GridAxis(key='goldfish.k', values=('2', '4'))
    """

    key: str
    values: tuple[str, ...]

    @property
    def section(self) -> str:
        """The first component of the key (``goldfish`` for ``goldfish.k``)."""
        return self.key.split(".", 1)[0]


@dataclass(frozen=True)
class Cell:
    """One grid cell: a value for every axis.

    Attributes:
        assignment: ``((key, value), ...)`` in axis order.
        id: a filesystem-safe name, ``key-value`` pairs joined by ``_`` (e.g.
            ``goldfish.k-4_model.lr-1e-3``); ``base`` for an empty grid.
    """

    assignment: tuple[tuple[str, str], ...]
    id: str = field(default="")

    def as_dict(self) -> dict[str, str]:
        """``{key: value}`` of the cell.

        Example:
            >>> expand_grid([parse_axis("goldfish.k=2,4")])[1].as_dict()
            {'goldfish.k': '4'}
        """
        return dict(self.assignment)


def _cell_id(assignment: Sequence[tuple[str, str]]) -> str:
    if not assignment:
        return "base"
    return "_".join(f"{key}-{_UNSAFE.sub('_', value)}" for key, value in assignment)


def parse_axis(spec: str) -> GridAxis:
    """Parse one ``KEY=V1,V2,...`` grid specification.

    Args:
        spec: e.g. ``"goldfish.k=2,4,8,none"`` or ``"model.lr=1e-3,2e-3"``. Values are split on
            commas and stripped; they are passed to the parser as given (``none`` is special for
            callback sections, see the module docstring).

    Returns:
        The :class:`GridAxis`.

    Raises:
        ValueError: no ``=``, a malformed key, no value, an empty value or a repeated value.

    Example:
        >>> parse_axis("trainer.max_epochs=30,60").values
        ('30', '60')
    """
    if not isinstance(spec, str) or "=" not in spec:
        raise ValueError(
            f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. --grid goldfish.k=2,4,8,none or "
            "--grid model.lr=1e-3,2e-3)"
        )
    key, _, raw = spec.partition("=")
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if not _KEY_RE.match(key):
        raise ValueError(
            f"--grid {spec!r}: key {key!r} is not a dotted config key; write it as in the recipe, "
            "e.g. goldfish.k, model.lr, trainer.max_epochs"
        )
    values = tuple(v.strip() for v in raw.split(","))
    if not raw.strip() or any(v == "" for v in values):
        raise ValueError(
            f"--grid {spec!r}: key {key!r} has an empty value; give comma-separated values, e.g. "
            f"{key}=2,4,8"
        )
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"--grid {spec!r}: key {key!r} repeats the value(s) {dupes}; list each value once")
    return GridAxis(key, values)


def parse_grid(specs: Iterable[str]) -> list[GridAxis]:
    """Parse several ``--grid`` specifications (their product forms the grid).

    Raises:
        ValueError: a bad specification (see :func:`parse_axis`) or a key given twice.

    Example:
        >>> [a.key for a in parse_grid(["goldfish.k=2,4", "model.lr=1e-3"])]
        ['goldfish.k', 'model.lr']
    """
    axes = [parse_axis(s) for s in specs]
    seen: dict[str, int] = {}
    for axis in axes:
        seen[axis.key] = seen.get(axis.key, 0) + 1
    repeated = [k for k, n in seen.items() if n > 1]
    if repeated:
        raise ValueError(
            f"--grid: the key(s) {repeated} are given more than once; put all values of a key in one "
            "--grid KEY=V1,V2,... argument"
        )
    keys = [a.key for a in axes]
    for a in axes:
        for b in keys:
            if b != a.key and b.startswith(a.key + "."):
                raise ValueError(
                    f"--grid: key {a.key!r} and its sub-key {b!r} cannot both be swept; sweep "
                    f"{a.key!r}={NONE} as a value of a sub-key instead (e.g. {b}=2,4,{NONE})"
                )
    return axes


def expand_grid(axes: Sequence[GridAxis]) -> list[Cell]:
    """The cells of the grid: the product of the axes, first axis slowest.

    An empty grid has one cell, ``base`` (the recipe as it is).

    Raises:
        ValueError: two cells get the same id after making values filesystem-safe.

    Example:
        >>> [c.id for c in expand_grid([parse_axis("goldfish.k=2,none")])]
        ['goldfish.k-2', 'goldfish.k-none']
    """
    cells = []
    for combo in itertools.product(*(a.values for a in axes)):
        assignment = tuple(zip((a.key for a in axes), combo))
        cells.append(Cell(assignment, _cell_id(assignment)))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(
            f"--grid: values differ only in characters that are unsafe in file names, giving the same "
            f"run directory {dup}; use values made of letters, digits and . _ + -"
        )
    return cells


def cell_overrides(
    cell: Cell, sections: Mapping[str, str], null_sections: Iterable[str]
) -> list[str]:
    """The ``antimemo fit`` arguments that set one cell.

    Args:
        cell: the cell.
        sections: callback section name -> class path (:func:`callback_sections`).
        null_sections: sections that are ``null`` (off) in the recipe with its base overrides.

    Returns:
        ``--KEY=VALUE`` arguments: ``--SECTION=null`` for ``none``, ``--SECTION=<class path>``
        before the first argument of a section that is off in the recipe, and the plain
        overrides.

    Example:
        >>> cell = expand_grid([parse_axis("goldfish=on,none")])[0]
        >>> cell_overrides(cell, {"goldfish": "pkg.G"}, null_sections=["goldfish"])
        ['--goldfish=pkg.G']
    """
    null = set(null_sections)
    out: list[str] = []
    enabled: set[str] = set()
    off = {key.split(".", 1)[0] for key, value in cell.assignment if value == NONE and key.split(".", 1)[0] in sections}
    for key, value in cell.assignment:
        section, _, rest = key.partition(".")
        if section in sections:
            if value == NONE:
                if f"--{section}=null" not in out:
                    out.append(f"--{section}=null")
                continue
            if section in off:
                continue  # another key of this cell turns the section off
            if section in null and section not in enabled:
                out.append(f"--{section}={sections[section]}")
                enabled.add(section)
            if rest:
                out.append(f"--{key}={value}")
        else:
            out.append(f"--{key}={value}")
    return out


# ------------------------------------------------------------------------------- validation


def _short(message: str, limit: int = 600) -> str:
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if node is None:
            return None
        try:
            node = node[part]
        except (KeyError, TypeError):
            return None
    return node


def _section_args(config: Any, section: str) -> list[str]:
    init = _get(config, f"{section}.init_args")
    if init is None:
        return []
    return sorted(dict(vars(init)) if hasattr(init, "__dict__") else dict(init))


def validate_grid(
    config: str | Sequence[str],
    axes: Sequence[GridAxis],
    base_overrides: Sequence[str] = (),
    sections: Mapping[str, str] | None = None,
    parse: Any = None,
) -> Any:
    """Check every grid key and value against the recipe's real parser.

    Each ``(key, value)`` is parsed once with ``antimemo fit``'s parser (the recipe, the base
    overrides, then that value's :func:`cell_overrides`); a value of a callback section is also
    passed to the callback's constructor, so a value the callback rejects (``goldfish.k=1``)
    fails here, before any training.

    Args:
        config: the recipe path(s) (``--config``).
        axes: the parsed grid.
        base_overrides: overrides applied to every run.
        sections: callback sections (default :func:`callback_sections`).
        parse: ``parse(args) -> config`` (default: :func:`parse_fit_args`); tests inject one.

    Returns:
        The parsed base config (recipe + base overrides), a ``jsonargparse.Namespace``.

    Raises:
        ValueError: naming the key, the value and the fix.

    Example:
        >>> validate_grid("recipes/lm_goldfish.yaml", [parse_axis("goldfish.k=1")])  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: --grid goldfish.k=1: ... k must be an integer >= 2, got 1; ...
    """
    sections = callback_sections() if sections is None else dict(sections)
    parse = parse_fit_args if parse is None else parse
    configs = [config] if isinstance(config, str) else list(config)
    head = [arg for c in configs for arg in ("--config", str(c))]
    try:
        base = parse([*head, *base_overrides])
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"the recipe {configs} with overrides {list(base_overrides)} does not parse: {_short(err)}") from err
    top = sorted(k for k in vars(base) if not k.startswith("__")) if hasattr(base, "__dict__") else sorted(base)
    null_sections = {s for s in sections if _get(base, s) is None}
    for axis in axes:
        section, _, rest = axis.key.partition(".")
        if section not in top:
            raise ValueError(
                f"--grid {axis.key}: unknown config key {section!r}; the recipe's top-level keys are "
                f"{top} (callback sections: {sorted(sections)})"
            )
        is_section = section in sections
        if not rest and not is_section:
            raise ValueError(
                f"--grid {axis.key}: {section!r} is a whole config section, not a value; sweep one of "
                f"its keys, e.g. {section}.<arg>=V1,V2"
            )
        if rest:
            known = _known_args(base, section, sections)
            arg = rest.split(".", 1)[0]
            if known and arg not in known:
                what = f"the callback section {section!r} ({sections[section].rsplit('.', 1)[-1]})" if is_section else f"{section!r}"
                raise ValueError(
                    f"--grid {axis.key}: {what} has no argument {arg!r}; it takes {known}"
                )
        for value in axis.values:
            if value == NONE and not is_section:
                raise ValueError(
                    f"--grid {axis.key}={value}: {NONE!r} turns a callback section off, but {section!r} "
                    f"is not one (callback sections: {sorted(sections)}); give values of {axis.key}"
                )
            if value == ON and not rest:
                pass
            elif not rest and value != NONE:
                raise ValueError(
                    f"--grid {axis.key}={value}: a bare callback section takes {ON!r} or {NONE!r}; "
                    f"to sweep an argument use {section}.<arg>=V1,V2 (arguments: "
                    f"{_section_args(base, section) or 'see the callback docs'})"
                )
            cell = Cell(((axis.key, value),), "")
            args = [*head, *base_overrides, *cell_overrides(cell, sections, null_sections)]
            try:
                parsed = parse(args)
            except Exception as err:  # noqa: BLE001 - re-raised with context
                raise ValueError(f"--grid {axis.key}={value}: rejected by the config parser: {_short(err)}") from err
            if is_section and value != NONE:
                _check_constructs(axis.key, value, section, parsed, sections)
    return base


def _known_args(config: Any, section: str, sections: Mapping[str, str]) -> list[str]:
    """Argument names of a config section (``[]`` when unknown)."""
    known = _section_args(config, section)
    if known:
        return known
    if section in sections:
        import inspect
        from importlib import import_module

        module, _, name = sections[section].rpartition(".")
        try:
            return sorted(p for p in inspect.signature(getattr(import_module(module), name)).parameters if p != "self")
        except Exception:  # noqa: BLE001 - no hint then
            return []
    node = _get(config, section)
    if node is not None and hasattr(node, "__dict__") and "class_path" not in vars(node):
        return sorted(k for k in vars(node) if not k.startswith("__"))
    return []


def _check_constructs(key: str, value: str, section: str, parsed: Any, sections: Mapping[str, str] | None = None) -> None:
    """Build the section's callback from the parsed arguments, so that its own checks run.

    The class is checked before it is built: its path must pass
    :func:`antimemo.sections.check_import_path` (checked before the import) and, when the
    section's own class is known, it must be a subclass of it.
    """
    from importlib import import_module

    from antimemo.sections import check_import_path

    class_path = _get(parsed, f"{section}.class_path")
    init = _get(parsed, f"{section}.init_args")
    if class_path is None:
        return
    check_import_path(str(class_path), f"--grid {key}={value}: {section}.class_path")
    module, _, name = str(class_path).rpartition(".")
    cls = getattr(import_module(module), name)
    expected = (sections or {}).get(section)
    if expected is not None:
        base_module, _, base_name = expected.rpartition(".")
        base = getattr(import_module(base_module), base_name)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ValueError(
                f"--grid {key}={value}: {section}.class_path {class_path!r} is not a subclass of {expected}; "
                f"name {expected} or a subclass of it"
            )
    kwargs = dict(vars(init)) if init is not None and hasattr(init, "__dict__") else dict(init or {})
    try:
        cls(**kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"--grid {key}={value}: {name} rejects it: {_short(err)}") from err


_PARSE_CLASS: Any = None


def parse_fit_args(args: Sequence[str]) -> Any:
    """Parse ``antimemo fit`` arguments without building the model, data or trainer.

    Returns:
        The parsed config (a ``jsonargparse.Namespace``).

    Raises:
        argparse.ArgumentError (or another exception): the arguments do not parse.

    Example:
        >>> cfg = parse_fit_args(["--config", "recipes/lm_goldfish.yaml"])  # doctest: +SKIP
        >>> cfg.goldfish.init_args.k  # doctest: +SKIP
        4
    """
    global _PARSE_CLASS
    if _PARSE_CLASS is None:
        from antimemo._fit_cli import cli_class

        AntimemoCLI = cli_class()

        class _Parsed(Exception):
            pass

        class _ParseOnly(AntimemoCLI):  # type: ignore[misc, valid-type]
            def before_instantiate_classes(self) -> None:
                raise _Parsed(self.config)

        _PARSE_CLASS = (_ParseOnly, _Parsed)
    cls, signal = _PARSE_CLASS
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cls(args=list(args), run=False, parser_kwargs={"exit_on_error": False})
        except signal as parsed:
            return parsed.args[0]
    raise RuntimeError("antimemo fit's parser returned without a config")  # pragma: no cover


def seed_keys(config: Any, sections: Mapping[str, str]) -> list[str]:
    """The seed keys of a parsed config: ``seed_everything`` and every ``<section>.seed`` of an
    enabled section (``model``, ``data`` and the callback sections whose arguments include
    ``seed``).

    Example:
        >>> seed_keys(parse_fit_args(["--config", "recipes/lm_goldfish.yaml"]), callback_sections())  # doctest: +SKIP
        ['seed_everything', 'model.seed', 'data.seed', 'goldfish.seed', 'monitor.seed']
    """
    keys = []
    if _get(config, "seed_everything") is not None:
        keys.append("seed_everything")
    for section in ("model", "data", *sections):
        init = _get(config, f"{section}.init_args")
        if init is not None and "seed" in (vars(init) if hasattr(init, "__dict__") else init):
            keys.append(f"{section}.seed")
    return keys
