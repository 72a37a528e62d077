"""Stateful, DDP-synced memorization metrics (``torchmetrics.Metric`` subclasses).

- :class:`ExtractableMemorization`: exact / token / near-verbatim match of greedy suffixes.
- :class:`DiscoverableExtraction`: greedy exact match and (n, p)-discoverable rate (sampling
  probability of the true suffix) from one teacher-forced pass.
- :class:`CanaryExposure`: Secret Sharer exposure of inserted canaries (rank and skew-normal).
- :class:`UntargetedExtraction`: training spans found verbatim (suffix array) and nv-recall in
  free generations.
- :class:`MembershipInference`: ROC AUC and TPR@FPR of loss, zlib, Min-K% and Min-K%++ attacks.
- :class:`ReplicaRate`, :class:`GenerationDiversity`, :class:`FeatureFrechetDistance`: image
  replication, diversity and fidelity of generated images (diffusion).
- :class:`TextDiversity`, :class:`TailCoverage`: distinct-n, n-gram entropy and rare-n-gram
  (tail) coverage of generated text (model collapse).

The math lives in :mod:`antimemo.functional`; this package never imports Lightning.
"""

from antimemo.metrics.discoverable import DiscoverableExtraction
from antimemo.metrics.exposure import CanaryExposure
from antimemo.metrics.extraction import ExtractableMemorization
from antimemo.metrics.membership import MembershipInference
from antimemo.metrics.replica import FeatureFrechetDistance, GenerationDiversity, ReplicaRate
from antimemo.metrics.text_diversity import TailCoverage, TextDiversity
from antimemo.metrics.untargeted import UntargetedExtraction

__all__ = [
    "CanaryExposure",
    "DiscoverableExtraction",
    "ExtractableMemorization",
    "FeatureFrechetDistance",
    "GenerationDiversity",
    "MembershipInference",
    "ReplicaRate",
    "TailCoverage",
    "TextDiversity",
    "UntargetedExtraction",
]
