"""Untargeted extraction against a training-set index, as a DDP-synced ``torchmetrics.Metric``."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from antimemo._checks import check_int
from antimemo.functional.untargeted import nv_recall
from antimemo.suffix_index import TokenIndex

__all__ = ["UntargetedExtraction"]

#: Output keys of :meth:`UntargetedExtraction.compute`.
KEYS = (
    "untargeted/extraction_rate",
    "untargeted/token_coverage",
    "untargeted/distinct_spans",
    "untargeted/longest_match",
    "untargeted/nv_recall_mean",
    "untargeted/nv_recall_max",
    "untargeted/generations",
)
_HASH_BITS = 52  # span hashes are kept as float64 integers, exact below 2**53


def _span_hash(tokens: np.ndarray) -> float:
    """A 52-bit content hash of a token span (BLAKE2b of its int64 little-endian bytes)."""
    digest = hashlib.blake2b(tokens.astype("<i8").tobytes(), digest_size=8).digest()
    return float(int.from_bytes(digest, "little") >> (64 - _HASH_BITS))


class UntargetedExtraction(Metric):
    """How much of what a model writes freely is training text, found with a :class:`TokenIndex`.

    The untargeted extraction attack (Carlini et al. 2021; Nasr et al. 2023, "Scalable extraction
    of training data from (production) language models"): sample generations (from BOS-only,
    held-out or repeated-token prompts, :func:`antimemo.functional.untargeted_prompts`, with
    :func:`antimemo.functional.sample_generate`), then look every generated span up in a suffix
    array of the training set. Pass the generated tokens only, without the prompt, to
    :meth:`update`.

    For each generation the metric computes the matching statistics ``ms[i]`` (the longest
    prefix of ``generated[i:]`` that occurs inside one training document,
    :meth:`TokenIndex.matching_lengths`). A **memorized span** is a maximal one: ``[i, i + ms[i])``
    with ``ms[i] >= min_span`` that no span starting earlier contains (``i == 0`` or
    ``ms[i - 1] <= ms[i]``). :meth:`compute` returns:

    - ``untargeted/extraction_rate``: fraction of generations holding at least one memorized span;
    - ``untargeted/token_coverage``: fraction of all generated tokens inside a memorized span;
    - ``untargeted/distinct_spans``: number of distinct memorized spans, distinct by content (a
      span emitted by several generations, or on several ranks, counts once);
    - ``untargeted/longest_match``: the longest generated span found verbatim in training, in
      tokens, whatever its length (so it shows progress below ``min_span`` too);
    - ``untargeted/nv_recall_mean`` and ``untargeted/nv_recall_max``: near-verbatim recall
      (:func:`antimemo.functional.nv_recall`, the block-based longest-common-substring score
      "nv-recall" of Ahmed, Cooper et al. 2026, "Extracting books from production language
      models") of the best-matching training document, per generation, averaged and maximised
      over generations. The candidate documents of a generation are those holding one of its
      ``nv_min_block``-token spans (any document that scores above 0 holds one), the
      ``nv_max_candidates`` with the most such spans are scored, and the best score counts;
    - ``untargeted/generations``: the number of generations.

    **DDP.** The counts are integer ``sum`` states, the longest match a ``max`` state, and the
    span contents (52-bit BLAKE2b hashes, kept as exact float64 integers) and the per-generation
    nv-recalls are ``cat`` states, counted unique and summed in sorted order in :meth:`compute`,
    so every key equals the single-process result on the union of the shards exactly. The index
    is not a state: every rank holds the same index.

    Args:
        index: the :class:`TokenIndex` of the training set.
        min_span: the shortest span that counts as memorized, in tokens. 32 by default (BPE
            tokens: about 25 words, far beyond chance on a training set of this package's scale;
            Nasr et al. use 50 tokens on terabyte corpora). Byte-level models need more bytes
            for the same text (about 4 bytes per BPE token) but cannot match beyond a
            document: use 48 for the 64-byte rows of the LM recipe. Must not exceed
            ``index.max_match_length`` (then no span could ever be found).
        nv_min_block: shortest block counted by nv-recall; ``None`` uses ``min_span // 2``.
        nv_max_candidates: training documents scored for nv-recall per generation.
        **kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> index = TokenIndex.build([[1, 2, 3, 4, 5, 6], [7, 8, 9, 7, 8, 9]], progress=False)
        >>> metric = UntargetedExtraction(index, min_span=4, nv_min_block=2)
        >>> metric.update(torch.tensor([[0, 2, 3, 4, 5, 0], [0, 0, 0, 0, 0, 0]]))
        >>> {k.split("/")[1]: round(float(v), 3) for k, v in metric.compute().items()}  # doctest: +NORMALIZE_WHITESPACE
        {'extraction_rate': 0.5, 'token_coverage': 0.333, 'distinct_spans': 1.0, 'longest_match': 4.0,
         'nv_recall_mean': 0.333, 'nv_recall_max': 0.667, 'generations': 2.0}
    """

    is_differentiable = False
    higher_is_better = False  # less memorization is better
    full_state_update = False

    n_generations: Tensor
    n_extracted: Tensor
    n_tokens: Tensor
    n_covered: Tensor
    longest: Tensor
    span_hashes: list[Tensor]
    nv_recalls: list[Tensor]

    def __init__(
        self,
        index: TokenIndex,
        min_span: int = 32,
        nv_min_block: int | None = None,
        nv_max_candidates: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(index, TokenIndex):
            raise TypeError(
                f"index must be an antimemo.suffix_index.TokenIndex, got {type(index).__name__}; build one with "
                "TokenIndex.build(train_dataset) or TokenIndex.load(path)"
            )
        self.index = index
        self.min_span = check_int("min_span", min_span, 1, "it is the shortest memorized span in tokens, e.g. 32")
        if self.min_span > index.max_match_length:
            raise ValueError(
                f"min_span={min_span} exceeds the longest training document in the index ({index.max_match_length} "
                f"tokens): no span could ever be found; lower min_span (e.g. min_span={max(1, 3 * index.max_match_length // 4)})"
            )
        if nv_min_block is None:
            nv_min_block = max(1, self.min_span // 2)
        self.nv_min_block = check_int("nv_min_block", nv_min_block, 1, "None uses min_span // 2")
        self.nv_max_candidates = check_int("nv_max_candidates", nv_max_candidates, 1, "e.g. nv_max_candidates=16")
        # cat states hold float64 so that an empty rank's placeholder (created in the metric's
        # dtype) gathers with the others
        self.set_dtype(torch.float64)
        for name in ("n_generations", "n_extracted", "n_tokens", "n_covered"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("longest", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="max")
        self.add_state("span_hashes", default=[], dist_reduce_fx="cat")
        self.add_state("nv_recalls", default=[], dist_reduce_fx="cat")

    def _nv_recalls(self, gen: np.ndarray, ms: np.ndarray) -> np.ndarray:
        """Best nv-recall over candidate training documents, per generation."""
        b = self.nv_min_block
        n, t = gen.shape
        out = np.zeros(n, dtype=np.float64)
        if t < b:
            return out
        rows, starts = np.nonzero(ms[:, : t - b + 1] >= b)
        if not rows.size:
            return out
        seeds = gen[rows[:, None], starts[:, None] + np.arange(b)[None, :]]
        q, docs, _ = self.index.occurrences(seeds, max_per_span=1024)
        gen_of = rows[q]
        for r in np.unique(gen_of):
            d = docs[gen_of == r]
            cand, votes = np.unique(d, return_counts=True)
            order = np.lexsort((cand, -votes))[: self.nv_max_candidates]
            out[r] = max(nv_recall(gen[r], self.index.document(int(c)), b) for c in cand[order])
        return out

    def update(self, generated: Tensor) -> None:
        """Add a batch of generations.

        Args:
            generated: integer token ids ``[N, T]``: the sampled tokens only, without the prompt.

        Raises:
            TypeError: if ``generated`` is not an integer tensor.
            ValueError: if it is not 2-D or holds a negative id.
        """
        if not isinstance(generated, Tensor):
            raise TypeError(
                f"generated must be a torch.Tensor of token ids [N, T], got {type(generated).__name__}; "
                "wrap it with torch.as_tensor(...)"
            )
        if generated.dtype == torch.bool or generated.is_floating_point() or generated.is_complex():
            raise TypeError(f"generated must hold integer token ids, got dtype {generated.dtype}; pass sampled ids, not logits")
        if generated.ndim != 2:
            raise ValueError(
                f"generated must have shape [N, T] (N generations of T tokens), got {tuple(generated.shape)}; "
                "use generated.unsqueeze(0) for one generation"
            )
        gen = generated.detach().cpu().numpy().astype(np.int64, copy=False)
        if gen.size and gen.min() < 0:
            raise ValueError(
                f"generated holds the negative token id {int(gen.min())}; pass the sampled token ids only "
                "(no -100 label padding)"
            )
        n, t = gen.shape
        ms = self.index.matching_lengths(gen)
        lengths = ms >= self.min_span
        left_max = np.ones_like(lengths)
        left_max[:, 1:] = ms[:, :-1] <= ms[:, 1:]
        starts = lengths & left_max
        # coverage: the union of [i, i + ms[i]) over memorized starts, per row
        delta = np.zeros((n, t + 1), dtype=np.int64)
        rows, cols = np.nonzero(lengths)
        np.add.at(delta, (rows, cols), 1)
        np.add.at(delta, (rows, cols + ms[rows, cols]), -1)
        covered = int((np.cumsum(delta[:, :t], axis=1) > 0).sum())
        hashes = sorted({_span_hash(gen[r, c : c + ms[r, c]]) for r, c in zip(*np.nonzero(starts))})
        nv = self._nv_recalls(gen, ms)

        device = self.n_generations.device
        self.n_generations += n
        self.n_extracted += int(starts.any(axis=1).sum())
        self.n_tokens += n * t
        self.n_covered += covered
        if ms.size:
            self.longest.copy_(torch.maximum(self.longest, torch.tensor(int(ms.max()), device=device)))
        if hashes:
            self.span_hashes.append(torch.tensor(hashes, dtype=torch.float64, device=device))
        if n:
            self.nv_recalls.append(torch.from_numpy(nv).to(device))

    def compute(self) -> dict[str, Tensor]:
        """Return the ``untargeted/*`` keys as float32 scalars (see the class docstring).

        Raises:
            RuntimeError: if no generation was added (on any rank).
        """
        n = int(self.n_generations)
        if n == 0:
            raise RuntimeError("UntargetedExtraction.compute() called before any generation was added; call update(generated) first")
        hashes = self.span_hashes if isinstance(self.span_hashes, Tensor) else (
            torch.cat(self.span_hashes) if self.span_hashes else torch.zeros(0, dtype=torch.float64))
        nv = self.nv_recalls if isinstance(self.nv_recalls, Tensor) else (
            torch.cat(self.nv_recalls) if self.nv_recalls else torch.zeros(0, dtype=torch.float64))
        nv = torch.sort(nv.double().flatten().cpu()).values  # summed in sorted order: independent of rank order
        tokens = int(self.n_tokens)
        out = {
            "untargeted/extraction_rate": torch.tensor(int(self.n_extracted) / n),
            "untargeted/token_coverage": torch.tensor(int(self.n_covered) / tokens if tokens else 0.0),
            "untargeted/distinct_spans": torch.tensor(float(torch.unique(hashes.flatten()).numel())),
            "untargeted/longest_match": torch.tensor(float(int(self.longest))),
            "untargeted/nv_recall_mean": torch.tensor(float(nv.sum()) / n),
            "untargeted/nv_recall_max": torch.tensor(float(nv.max()) if nv.numel() else 0.0),
            "untargeted/generations": torch.tensor(float(n)),
        }
        return {k: v.to(torch.float32) for k, v in out.items()}
