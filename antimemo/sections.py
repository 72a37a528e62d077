"""The ``antimemo fit`` config's section table, as strings only (no Lightning, no other antimemo module).

Anything that needs to know which callback a config section names (the CLI, ``antimemo ablate``,
``MemorizationBudget``'s ``control="goldfish.k"``, the dedup CLI reading a recipe) reads it here,
so none of them has to import the CLI (or Lightning) to learn it.

Example:
    >>> CALLBACK_SECTIONS["goldfish"]
    'antimemo.callbacks.goldfish.GoldfishTokenDropout'
    >>> section_class_names()["loss_floor"]
    'LossFloor'
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CALLBACK_SECTIONS",
    "DEFAULT_DATA_CLASS",
    "DEFAULT_MODEL_CLASS",
    "SECTION_DEFAULTS",
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
