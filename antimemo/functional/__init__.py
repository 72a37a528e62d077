"""Pure tensor functions: no Lightning, no state.

Each metric in :mod:`antimemo.metrics` and each callback in :mod:`antimemo.callbacks` does its
math here, so that users with their own training loop can call it directly.
"""

from antimemo.functional.discoverable import (
    discoverable_probability,
    suffix_sampling_log_probability,
    suffix_sampling_probability,
    teacher_forced_greedy_match,
)
from antimemo.functional.exposure import exposure_rank, exposure_skewnorm
from antimemo.functional.extraction import edit_similarity, exact_match, levenshtein_distance, token_match
from antimemo.functional.generation import greedy_generate, sample_generate
from antimemo.functional.goldfish import goldfish_mask
from antimemo.functional.membership import (
    mia_loss,
    mia_min_k,
    mia_min_k_plus_plus,
    mia_zlib,
    roc_auc,
    token_logprob_stats,
    tpr_at_fpr,
)

from antimemo.functional.regularizers import (
    example_tied_dropout,
    example_tied_dropout_mask,
    flood,
    init_power_iteration_vectors,
    loss_truncation_loss,
    per_sequence_lm_loss,
    power_iteration,
    sequence_flooding_loss,
    spectral_norm_penalty,
    truncation_threshold,
)
from antimemo.functional.untargeted import nv_recall, untargeted_prompts
from antimemo.functional.text_diversity import (
    distinct_n,
    ngram_entropy,
    rare_ngrams,
    tail_coverage,
    tail_probability_coverage,
)

__all__ = [
    "distinct_n",
    "ngram_entropy",
    "rare_ngrams",
    "tail_coverage",
    "tail_probability_coverage",
    "nv_recall",
    "untargeted_prompts",
    "example_tied_dropout",
    "example_tied_dropout_mask",
    "flood",
    "init_power_iteration_vectors",
    "loss_truncation_loss",
    "per_sequence_lm_loss",
    "power_iteration",
    "sequence_flooding_loss",
    "spectral_norm_penalty",
    "truncation_threshold",
    "discoverable_probability",
    "edit_similarity",
    "exact_match",
    "exposure_rank",
    "exposure_skewnorm",
    "goldfish_mask",
    "levenshtein_distance",
    "greedy_generate",
    "sample_generate",
    "mia_loss",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "mia_zlib",
    "roc_auc",
    "token_logprob_stats",
    "suffix_sampling_log_probability",
    "suffix_sampling_probability",
    "teacher_forced_greedy_match",
    "token_match",
    "tpr_at_fpr",
]
