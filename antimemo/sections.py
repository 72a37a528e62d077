"""The ``antimemo fit`` config's section table, as strings only (no Lightning, no other antimemo module),
and the import policy for the class and function paths a recipe file names.

Anything that needs to know which callback a config section names (the CLI, ``antimemo ablate``,
``MemorizationBudget``'s ``control="goldfish.k"``, the dedup CLI reading a recipe) reads it here,
so none of them has to import the CLI (or Lightning) to learn it.

**Import policy.** A recipe (or a command-line value) may name a class or a function by its
dotted path (``class_path:``, ``monitor.decode``, the ``data:`` class of ``antimemo dedup``). Such
a path is refused *before it is imported* when its top-level module is part of the Python
standard library (``os``, ``subprocess``, ``builtins``, ``shutil``, ``pty``, ``importlib``,
``pickle``, ...) or ``__main__`` (:func:`check_import_path`); recipes name classes of antimemo,
Lightning, torch and your own packages, never the standard library.

Example:
    >>> CALLBACK_SECTIONS["goldfish"]
    'antimemo.callbacks.goldfish.GoldfishTokenDropout'
    >>> section_class_names()["loss_floor"]
    'LossFloor'
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = [
    "CALLBACK_SECTIONS",
    "DEFAULT_DATA_CLASS",
    "DEFAULT_MODEL_CLASS",
    "REFUSED_MODULES",
    "SECTION_DEFAULTS",
    "check_import_path",
    "import_recipe_class",
    "refused_import_path",
    "section_class_names",
]

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
SECTION_DEFAULTS: dict[str, Any] = {
    "monitor": {"class_path": CALLBACK_SECTIONS["monitor"], "init_args": {"holdout": "val"}},
}

#: The ``model:`` class when a config gives no ``class_path`` (``model: {lr: 0.001}``).
DEFAULT_MODEL_CLASS = "antimemo.lm.module.CausalLMModule"
#: The ``data:`` class when a config gives no ``class_path`` (``data: {seq_len: 64}``).
DEFAULT_DATA_CLASS = "antimemo.lm.data.TextDataModule"


def section_class_names() -> dict[str, str]:
    """Section name -> callback class name (the last part of its class path).

    Example:
        >>> section_class_names()["goldfish"]
        'GoldfishTokenDropout'
    """
    return {section: path.rsplit(".", 1)[-1] for section, path in CALLBACK_SECTIONS.items()}


#: Top-level modules a recipe may not name: the whole standard library (process launch, file
#: access, ``eval`` / ``exec``, deserialization, the import machinery...), ``__main__``, and a
#: few process-launching packages outside it.
REFUSED_MODULES: frozenset[str] = frozenset(
    set(getattr(sys, "stdlib_module_names", ()))
    | {
        "__main__", "builtins", "os", "posix", "nt", "subprocess", "_posixsubprocess", "shutil", "pty",
        "sys", "importlib", "runpy", "ctypes", "pickle", "marshal", "code", "codeop", "multiprocessing",
        "socket", "webbrowser", "antigravity", "pdb", "signal", "tempfile", "io", "pathlib",
        "functools", "operator", "inspect", "types", "pexpect", "sh", "plumbum", "invoke", "fabric",
        "dill", "cloudpickle", "joblib",
    }
)  # fmt: skip


def refused_import_path(path: Any) -> str | None:
    """Why a dotted path may not be imported for a recipe (``None`` when it may).

    Example:
        >>> refused_import_path("antimemo.lm.data.TextDataModule") is None
        True
        >>> refused_import_path("subprocess.Popen")
        "its module 'subprocess' is refused (the standard library and process launchers may not be named in a recipe)"
    """
    if not isinstance(path, str) or "." not in path or not all(p.isidentifier() for p in path.split(".")):
        return "it is not a dotted import path such as my_pkg.module.MyClass"
    top = path.split(".", 1)[0]
    if top in REFUSED_MODULES:
        return (
            f"its module {top!r} is refused (the standard library and process launchers may not be named "
            "in a recipe)"
        )
    return None


def check_import_path(path: Any, argument: str) -> str:
    """Raise unless ``path`` may be imported for the recipe argument ``argument``; returns ``path``.

    Call it before importing anything a recipe names: importing a module runs its code.

    Raises:
        ValueError: naming the argument, the value and the fix.

    Example:
        >>> check_import_path("os.system", "monitor.decode")
        Traceback (most recent call last):
        ...
        ValueError: monitor.decode: 'os.system' is refused: its module 'os' is refused (the standard library and process launchers may not be named in a recipe); name a class or function of antimemo, Lightning, torch or your own package
    """
    why = refused_import_path(path)
    if why is not None:
        raise ValueError(
            f"{argument}: {path!r} is refused: {why}; name a class or function of antimemo, Lightning, torch "
            "or your own package"
        )
    return path


def _has_base(cls: type, base: str) -> bool:
    module, _, name = base.rpartition(".")
    top = module.split(".", 1)[0]
    return any(b.__name__ == name and str(b.__module__).split(".", 1)[0] == top for b in cls.__mro__)


def import_recipe_class(path: Any, argument: str, base: str) -> type:
    """Import the class a recipe names, checking the path before the import and the class after it.

    Args:
        path: the dotted class path from the recipe.
        argument: the recipe key it came from (for the message), e.g. ``"data.class_path"``.
        base: the dotted path of the base class it must derive from, e.g.
            ``"lightning.pytorch.LightningDataModule"`` (matched by class name and top-level
            package along the MRO, so that this module never imports Lightning).

    Returns:
        The class (not instantiated: construct it only after this returns).

    Raises:
        ValueError: a refused path, something that is not a class, or a class that is not a
            subclass of ``base``; ``ImportError``: the module does not exist.

    Example:
        >>> import_recipe_class("antimemo.lm.data.TextDataModule", "data.class_path",
        ...                     "lightning.pytorch.LightningDataModule").__name__
        'TextDataModule'
    """
    import importlib

    check_import_path(path, argument)
    module_name, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except AttributeError:
        raise ImportError(f"{argument}: {path!r}: module {module_name!r} has no attribute {name!r}") from None
    except ModuleNotFoundError as err:
        raise ImportError(f"{argument}: {path!r} cannot be imported ({err}); check the spelling") from None
    if not isinstance(obj, type):
        raise ValueError(
            f"{argument}: {path!r} is a {type(obj).__name__}, not a class; name a subclass of "
            f"{base.rsplit('.', 1)[-1]}"
        )
    if obj.__module__ != module_name:
        check_import_path(f"{obj.__module__}.{obj.__name__}", argument)  # e.g. my_pkg.Popen re-exporting subprocess.Popen
    if not _has_base(obj, base):
        raise ValueError(
            f"{argument}: {path!r} is not a subclass of {base.rsplit('.', 1)[-1]} ({base}); name your "
            f"{base.rsplit('.', 1)[-1]} subclass, e.g. {DEFAULT_DATA_CLASS}"
            if base.endswith("DataModule")
            else f"{argument}: {path!r} is not a subclass of {base}"
        )
    return obj
