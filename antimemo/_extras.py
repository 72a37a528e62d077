"""Optional dependencies: which ``pip install 'antimemo[...]'`` extra brings which module (stdlib only).

Every optional import goes through :func:`require`, so a missing package gives one line that
names the extra to install instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "extra_for", "missing_extra_message", "require"]

#: Top-level module -> the antimemo extra that installs it.
EXTRAS: dict[str, str] = {
    "diffusers": "diffusion",
    "sklearn": "diffusion",
    "PIL": "diffusion",
    "faiss": "dedup",
    "numba": "dedup",
    "opacus": "dp",
    "datasketch": "bench",
    "pydivsufsort": "extraction",
    "ray": "ray",
    "pyarrow": "ray",
    "peft": "lora",
}


def extra_for(module: str) -> str | None:
    """The extra that installs ``module`` (its top-level package), or ``None``.

    Example:
        >>> extra_for("diffusers.utils"), extra_for("json")
        ('diffusion', None)
    """
    return EXTRAS.get(module.split(".")[0])


def missing_extra_message(module: str, needed_by: str) -> str:
    """``"<needed_by> needs <module>, which is not installed: pip install 'antimemo[<extra>]'"``.

    Example:
        >>> missing_extra_message("diffusers", "DiffusionModule")
        "DiffusionModule needs diffusers, which is not installed: pip install 'antimemo[diffusion]'"
    """
    extra = extra_for(module)
    fix = f"pip install 'antimemo[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
    return f"{needed_by} needs {module.split('.')[0]}, which is not installed: {fix}"


def require(module: str, needed_by: str) -> ModuleType:
    """Import ``module``, or raise one ``ImportError`` naming the extra that installs it.

    Example:
        >>> require("json", "the report").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] != module.split(".")[0]:
            raise  # a dependency of that module is missing: show the real name
        raise ImportError(missing_extra_message(module, needed_by)) from err
