"""Every ``Example:`` in the package's docstrings runs and prints what it shows.

Examples marked ``# doctest: +SKIP`` (they need a training run or a user's data) are documentation
only and are not counted here; every other example must pass.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import antimemo


def _modules() -> list[str]:
    names = [antimemo.__name__]
    for info in pkgutil.walk_packages(antimemo.__path__, prefix="antimemo."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    return [t for t in tests if t.examples and t.name.startswith(name)]


MODULES = [name for name in _modules() if _examples(name)]


def test_the_package_has_examples_to_run():
    assert len(MODULES) >= 30  # not vacuous: most modules document their public API with an example


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny examples: intra-op threads only add overhead on a busy CI box
    try:
        for test in _examples(name):
            runner.run(test, out=report.append, clear_globs=True)
    finally:
        torch.set_num_threads(threads)
    failed, attempted = runner.failures, runner.tries
    assert failed == 0, f"{failed} of {attempted} docstring examples of {name} failed:\n" + "".join(report)
