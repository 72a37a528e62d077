"""Shared fixtures. The builders themselves live in ``tests/_builders.py`` (plain functions, also
importable at module level: ``from _builders import tiny_llama, quiet_trainer_kwargs``).

``_builders`` is imported inside the fixtures, so collecting a test file that needs neither
Lightning nor transformers does not import them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def _builders() -> ModuleType:
    return importlib.import_module("_builders")  # tests/ is on sys.path (pytest's rootdir-relative import)


@pytest.fixture
def builders() -> ModuleType:
    """The ``_builders`` module, for tests that need a builder with other arguments."""
    return _builders()


@pytest.fixture
def tiny_llama():
    """A fresh default tiny ``LlamaForCausalLM`` (vocab 48, hidden 32, 2 layers, seed 0)."""
    return _builders().tiny_llama()


@pytest.fixture
def tiny_causal_lm():
    """A fresh ``_builders.TinyCausalLM`` (SGD, lr 0.5) around the default tiny Llama."""
    return _builders().TinyCausalLM()


@pytest.fixture
def quiet_trainer_kwargs() -> dict:
    """``pl.Trainer`` arguments with logging, checkpoints, progress bar and model summary off."""
    return _builders().quiet_trainer_kwargs()
