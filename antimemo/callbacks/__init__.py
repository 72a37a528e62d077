"""Lightning callbacks: add them to ``Trainer(callbacks=[...])``."""

from antimemo.callbacks.budget import MemorizationBudget
from antimemo.callbacks.conditioning import ConditioningNoise, LabelRandomization
from antimemo.callbacks.dedup import DedupSampling
from antimemo.callbacks.dp import DifferentialPrivacy
from antimemo.callbacks.diversity_monitor import DiversityMonitor
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
from antimemo.callbacks.replica_monitor import ReplicaMonitor
from antimemo.callbacks.replica_penalty import ReplicaPenalty
from antimemo.callbacks.watermark_filter import WatermarkFilter

__all__ = [
    "GOLDFISH_PRETRAINING_PRESET",
    "DedupSampling",
    "DifferentialPrivacy",
    "DiversityMonitor",
    "ExampleTiedDropout",
    "GoldfishTokenDropout",
    "LossFloor",
    "LossTruncation",
    "MemorizationBudget",
    "MemorizationMonitor",
    "SpectralNormPenalty",
    "WithExampleIds",
    "ConditioningNoise",
    "LabelRandomization",
    "ReplicaMonitor",
    "ReplicaPenalty",
    "WatermarkFilter",
    "spectral_norm_weights",
]
