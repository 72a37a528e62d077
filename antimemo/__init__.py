"""antimemo: training-time anti-memorization for PyTorch Lightning.

Layers (lower layers never import Lightning):

- ``antimemo.functional``: pure tensor functions (goldfish mask, metric math).
- ``antimemo.metrics``: stateful ``torchmetrics.Metric`` classes, DDP-synced.
- ``antimemo.callbacks``: Lightning callbacks (``GoldfishTokenDropout``, ``MemorizationMonitor``).
- ``antimemo.lm``: the LM recipe's data and LightningModule.
- ``antimemo.cli``: the ``antimemo`` console script.

Top-level names are imported lazily so that ``import antimemo.functional`` stays Lightning-free.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GoldfishTokenDropout": "antimemo.callbacks.goldfish",
    "GOLDFISH_PRETRAINING_PRESET": "antimemo.callbacks.goldfish",
    "MemorizationMonitor": "antimemo.callbacks.monitor",
    "ExtractableMemorization": "antimemo.metrics.extraction",
    "CanaryExposure": "antimemo.metrics.exposure",
    "MembershipInference": "antimemo.metrics.membership",
    "DedupSampling": "antimemo.callbacks.dedup",
    "DedupSampler": "antimemo.sampling",
    "DuplicateIndex": "antimemo.dedup.index",
    "LossFloor": "antimemo.callbacks.loss_floor",
    "LossTruncation": "antimemo.callbacks.loss_truncation",
    "SpectralNormPenalty": "antimemo.callbacks.spectral_norm",
    "ExampleTiedDropout": "antimemo.callbacks.example_tied_dropout",
    "WithExampleIds": "antimemo.callbacks.example_tied_dropout",
    "MemorizationBudget": "antimemo.callbacks.budget",
    "DifferentialPrivacy": "antimemo.callbacks.dp",
    "ReplicaRate": "antimemo.metrics.replica",
    "ReplicaMonitor": "antimemo.callbacks.replica_monitor",
    "ConditioningNoise": "antimemo.callbacks.conditioning",
    "LabelRandomization": "antimemo.callbacks.conditioning",
    "ReplicaPenalty": "antimemo.callbacks.replica_penalty",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'antimemo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
