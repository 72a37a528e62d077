"""Untargeted extraction: prompts to sample from, and near-verbatim recall (nv-recall).

Untargeted extraction samples the model freely and then looks for training text in what it
wrote (Carlini et al. 2021, "Extracting training data from large language models"; Nasr et al.
2023, "Scalable extraction of training data from (production) language models"). This module
holds the two pure pieces of it; :class:`antimemo.metrics.UntargetedExtraction` does the
counting against a :class:`antimemo.suffix_index.TokenIndex`.

- :func:`untargeted_prompts`: the three kinds of prompts of that literature, as token-id tensors
  for :func:`antimemo.functional.sample_generate`:

  - ``"empty"``: a BOS-only prompt (Carlini et al. 2021 sample from the start-of-text token);
  - ``"holdout"``: random prefixes of held-out (non-training) text (Carlini et al. 2021 prompt
    with short snippets of web text);
  - ``"repeat"``: one token (or a short unit of tokens) repeated ``repeats`` times, the
    "divergence" attack of Nasr et al. 2023 ("Repeat the word 'poem' forever"), after which the
    model may drift into emitting training data.

- :func:`nv_recall`: near-verbatim recall of a reference text by a generation, the block-based
  approximation of the longest common substring behind "nv-recall" in the book-extraction work
  (Cooper et al. 2026 / Ahmed et al. 2026, "Extracting books from production language models").

Neither function imports Lightning.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from antimemo._checks import check_int

__all__ = ["PROMPT_KINDS", "nv_recall", "nv_recall_blocks", "untargeted_prompts"]

#: The prompt kinds :func:`untargeted_prompts` produces.
PROMPT_KINDS = ("empty", "holdout", "repeat")


def _holdout_rows(holdout: Any, key: str) -> Tensor:
    """Held-out token rows as a LongTensor ``[M, S]`` (a 2-D tensor, or a dataset of rows / dicts)."""
    if isinstance(holdout, Tensor):
        rows = holdout
    else:
        if not hasattr(holdout, "__len__") or not hasattr(holdout, "__getitem__"):
            raise TypeError(
                "holdout must be a 2-D LongTensor [M, S] or a dataset of token rows / dicts with "
                f"{key!r}, got {type(holdout).__name__}"
            )
        items = []
        for i in range(len(holdout)):
            item = holdout[i]
            if isinstance(item, Mapping):
                if key not in item:
                    raise KeyError(f"holdout[{i}] is a dict without {key!r}; pass key=<the key of its token ids>")
                item = item[key]
            items.append(torch.as_tensor(item))
        if not items:
            raise ValueError("holdout is empty: pass at least one held-out sequence")
        lengths = {int(t.shape[-1]) for t in items}
        if len(lengths) != 1 or any(t.dim() != 1 for t in items):
            raise ValueError(
                f"holdout rows must be 1-D and of one length, got lengths {sorted(lengths)[:5]}; "
                "pass a 2-D tensor of equal-length rows"
            )
        rows = torch.stack(items)
    if rows.dim() != 2 or rows.shape[0] == 0:
        raise ValueError(f"holdout must be 2-D [M, S] with M >= 1, got shape {tuple(rows.shape)}")
    if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
        raise TypeError(f"holdout must hold integer token ids, got dtype {rows.dtype}")
    return rows.long()


def untargeted_prompts(
    kind: str,
    n: int,
    *,
    length: int = 1,
    bos_id: int | None = None,
    holdout: Any = None,
    key: str = "input_ids",
    unit: Sequence[int] | Tensor | None = None,
    vocab_size: int | None = None,
    repeats: int = 32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` prompts of one kind for untargeted extraction, as a LongTensor ``[n, P]``.

    Args:
        kind: ``"empty"``: every prompt is ``[bos_id]`` (``P = 1``; ``sample_generate`` needs at
            least one token; a model without BOS can use a separator it saw at document starts,
            e.g. the newline byte 10 for the byte-level recipe). ``"holdout"``: ``length``
            consecutive tokens of a held-out row, the row and the start offset drawn uniformly
            with ``generator`` (``P = length``). ``"repeat"``: ``unit`` repeated ``repeats`` times
            (``P = repeats * len(unit)``), the same for every prompt; without ``unit``, each prompt
            repeats its own single token drawn uniformly from ``[0, vocab_size)``.
        n: number of prompts, ``>= 1``.
        length: prompt length for ``"holdout"``.
        bos_id: the BOS token id for ``"empty"``.
        holdout: held-out (never trained on) token rows for ``"holdout"``: a 2-D LongTensor
            ``[M, S]`` with ``S >= length``, or a dataset of rows or of dicts with ``key``.
        key: the dict key of the token ids in ``holdout`` items.
        unit: the repeated token(s) for ``"repeat"``, e.g. ``tokenizer.encode(" poem")``.
        vocab_size: draw each prompt's repeated token from ``[0, vocab_size)`` for ``"repeat"``
            without ``unit``.
        repeats: how many times ``"repeat"`` repeats its unit (Nasr et al. use hundreds of
            tokens; the prompt plus the generation must fit the model's context).
        generator: a seeded ``torch.Generator`` (CPU) for the random draws; ``None`` uses the
            global RNG. The same seed gives the same prompts.

    Returns:
        LongTensor ``[n, P]`` on the CPU.

    Raises:
        ValueError: for an unknown ``kind``, a missing or bad argument of that kind (the message
            names it), or held-out rows shorter than ``length``.

    Example:
        >>> untargeted_prompts("empty", 2, bos_id=1).tolist()
        [[1], [1]]
        >>> untargeted_prompts("repeat", 1, unit=[7, 8], repeats=3).tolist()
        [[7, 8, 7, 8, 7, 8]]
        >>> rows = torch.arange(20).reshape(2, 10)
        >>> p = untargeted_prompts("holdout", 3, holdout=rows, length=4, generator=torch.Generator().manual_seed(0))
        >>> p.shape, bool(((p[:, 1:] - p[:, :-1]) == 1).all())
        (torch.Size([3, 4]), True)
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")
    n = check_int("n", n, 1, "it is the number of prompts, e.g. n=64")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if kind == "empty":
        if bos_id is None:
            raise ValueError(
                "kind='empty' needs bos_id (the token every prompt consists of), got None; e.g. "
                "bos_id=tokenizer.bos_token_id, or bos_id=10 (newline) for the byte-level recipe"
            )
        check_int("bos_id", bos_id, 0, "it is a token id, e.g. bos_id=tokenizer.bos_token_id")
        return torch.full((n, 1), int(bos_id), dtype=torch.long)
    if kind == "holdout":
        if holdout is None:
            raise ValueError(
                "kind='holdout' needs holdout= (held-out token rows, never trained on), got None; e.g. "
                "holdout=datamodule.val_dataset"
            )
        length = check_int("length", length, 1, "it is the prompt length in tokens, e.g. length=16")
        rows = _holdout_rows(holdout, key)
        if rows.shape[1] < length:
            raise ValueError(
                f"length={length} exceeds the held-out rows' length {rows.shape[1]}; lower length"
            )
        which = torch.randint(0, rows.shape[0], (n,), generator=generator)
        start = torch.randint(0, rows.shape[1] - length + 1, (n,), generator=generator)
        idx = start[:, None] + torch.arange(length)[None, :]
        return rows[which[:, None], idx]
    repeats = check_int("repeats", repeats, 1, "it is how often the unit is repeated, e.g. repeats=32")
    if unit is not None:
        u = torch.as_tensor(unit).long().flatten()
        if u.numel() == 0 or (u < 0).any():
            raise ValueError(f"unit must hold at least one token id >= 0, got {u.tolist()}")
        return u.repeat(repeats).unsqueeze(0).repeat(n, 1)
    if vocab_size is None:
        raise ValueError(
            "kind='repeat' needs unit= (the repeated token ids, e.g. tokenizer.encode(' poem')) or vocab_size= "
            "(each prompt repeats one random token), got neither"
        )
    vocab_size = check_int("vocab_size", vocab_size, 1, "e.g. vocab_size=tokenizer.vocab_size")
    tokens = torch.randint(0, vocab_size, (n, 1), generator=generator)
    return tokens.repeat(1, repeats)


def _as_list(x: Any, name: str) -> list[int]:
    if isinstance(x, Tensor):
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a 1-D sequence of token ids, got {type(x).__name__}")
    return [int(v) for v in x]


def nv_recall_blocks(generated: Any, reference: Any, min_block: int) -> list[tuple[int, int, int]]:
    """The near-verbatim blocks of :func:`nv_recall`: ``(reference_start, generated_start, size)``.

    Example:
        >>> nv_recall_blocks([9, 1, 2, 3, 9, 4, 5, 6], [1, 2, 3, 0, 4, 5, 6], min_block=3)
        [(0, 1, 3), (4, 5, 3)]
    """
    min_block = check_int("min_block", min_block, 1, "it is the shortest block counted, in tokens, e.g. 16")
    gen = _as_list(generated, "generated")
    ref = _as_list(reference, "reference")
    matcher = difflib.SequenceMatcher(None, ref, gen, autojunk=False)
    return [(b.a, b.b, b.size) for b in matcher.get_matching_blocks() if b.size >= min_block]


def nv_recall(generated: Any, reference: Any, min_block: int) -> float:
    """Near-verbatim recall of ``reference`` by ``generated``: the share of the reference covered
    by long common blocks, in order.

    "nv-recall" is how the book-extraction literature scores extraction: a score computed from a
    block-based approximation of the longest common substring (Ahmed, Cooper et al. 2026,
    "Extracting books from production language models", arXiv 2601.02671; the antimemo field
    notes record only that one-line definition, not the paper's block parameters). What is
    implemented here, exactly:

    1. Matching blocks: the greedy longest-common-substring decomposition of Ratcliff and
       Obershelp, as :class:`difflib.SequenceMatcher` (``autojunk=False``) computes it on token
       ids: take the longest common substring of ``reference`` and ``generated``, then recurse
       on the parts to its left and to its right. The blocks are disjoint and in the same order
       in both sequences, so nothing is counted twice and a reordered copy does not score.
    2. Keep the blocks of at least ``min_block`` tokens (shorter common runs are chance).
    3. ``nv_recall = sum(kept block sizes) / len(reference)``.

    A verbatim copy of the reference scores 1.0; a copy with a few substituted or inserted
    tokens keeps most of its score as long as the runs between the edits are ``>= min_block``
    (near-verbatim); an unrelated text scores 0.0.

    Args:
        generated: 1-D token ids of the generation.
        reference: 1-D token ids of the reference (a training document).
        min_block: the shortest block counted, in tokens, ``>= 1``.

    Returns:
        A float in ``[0, 1]``; 0.0 for an empty reference.

    Example:
        >>> ref = list(range(10))
        >>> nv_recall(ref, ref, min_block=3)
        1.0
        >>> nv_recall([0, 1, 2, 3, 99, 5, 6, 7, 8, 9], ref, min_block=3)  # one token changed
        0.9
        >>> nv_recall([0, 1, 99, 3, 4, 99, 6, 7, 99, 9], ref, min_block=3)  # every block too short
        0.0
    """
    blocks = nv_recall_blocks(generated, reference, min_block)
    n = len(_as_list(reference, "reference"))
    return sum(size for _, _, size in blocks) / n if n else 0.0
