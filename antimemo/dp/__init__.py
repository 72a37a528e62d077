"""DP-SGD building blocks used by :class:`antimemo.callbacks.dp.DifferentialPrivacy` (no Lightning).

- :mod:`antimemo.dp.sampler`: :class:`PoissonBatchSampler` (Poisson sampling, also sharded over
  DDP ranks) and :class:`EmptySafeCollate` (zero-length batches).
- :mod:`antimemo.dp.accounting`: epsilon from an accountant history, noise for a target
  epsilon, steps left within a budget (Opacus' accountants).
- :mod:`antimemo.dp.hf`: Hugging Face causal LMs: per-sequence loss, GPT-2 batched position
  ids, grad samplers for HF ``Conv1D`` and ``LlamaRMSNorm``.

Opacus (``pip install 'antimemo[dp]'``) is imported inside the functions that need it.
"""

from antimemo.dp.accounting import (
    ACCOUNTANTS,
    compute_epsilon,
    extend_history,
    noise_multiplier_for,
    steps_within_budget,
)
from antimemo.dp.hf import (
    PerSequenceLoss,
    find_causal_lms,
    install_batched_position_ids,
    per_sequence_causal_lm_loss,
    register_grad_samplers,
)
from antimemo.dp.sampler import EmptySafeCollate, PoissonBatchSampler, mix_seed

__all__ = [
    "ACCOUNTANTS",
    "EmptySafeCollate",
    "PerSequenceLoss",
    "PoissonBatchSampler",
    "compute_epsilon",
    "extend_history",
    "find_causal_lms",
    "install_batched_position_ids",
    "mix_seed",
    "noise_multiplier_for",
    "per_sequence_causal_lm_loss",
    "register_grad_samplers",
    "steps_within_budget",
]
