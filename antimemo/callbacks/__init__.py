"""Lightning callbacks: add them to ``Trainer(callbacks=[...])``."""

from antimemo.callbacks.dedup import DedupSampling
from antimemo.callbacks.dp import DifferentialPrivacy
from antimemo.callbacks.goldfish import GOLDFISH_PRETRAINING_PRESET, GoldfishTokenDropout
from antimemo.callbacks.monitor import MemorizationMonitor
from antimemo.callbacks.regularizers import (
    ExampleTiedDropout,
    LossFloor,
    LossTruncation,
    SpectralNormPenalty,
    WithExampleIds,
    spectral_norm_weights,
)

__all__ = [
    "GOLDFISH_PRETRAINING_PRESET",
    "DedupSampling",
    "DifferentialPrivacy",
    "ExampleTiedDropout",
    "GoldfishTokenDropout",
    "LossFloor",
    "LossTruncation",
    "MemorizationMonitor",
    "SpectralNormPenalty",
    "WithExampleIds",
    "spectral_norm_weights",
]
