"""``TextDataModule``: fixed-length byte sequences with one seeded train / held-out split.

The held-out split is the validation set: its loss is the recipe's ``val_loss`` and its sequences
are the non-members for membership inference (``MemorizationMonitor(holdout="val")``). Members and
non-members come from ONE random split of the same chunked text, as the MIA literature asks
(Duan et al. 2024: splits by source or date measure distribution shift, not membership).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from antimemo._checks import check_int
from antimemo.lm.corpus import DEFAULT_CORPUS, ByteTokenizer, chunk_ids, load_text

__all__ = ["SequenceDataset", "TextDataModule"]


class SequenceDataset(Dataset):
    """A dataset of equal-length token rows; item ``i`` is ``{"input_ids": LongTensor[seq_len]}``
    (plus ``"example_id": i`` with ``example_ids=True``, what
    :class:`~antimemo.callbacks.ExampleTiedDropout` reads).

    Args:
        input_ids: ``LongTensor[N, seq_len]``.
        example_ids: add each item's index as ``"example_id"``.

    Example:
        >>> ds = SequenceDataset(torch.arange(6).reshape(2, 3))
        >>> ds[1]["input_ids"].tolist()
        [3, 4, 5]
        >>> SequenceDataset(torch.arange(6).reshape(2, 3), example_ids=True)[1]["example_id"]
        1
    """

    def __init__(self, input_ids: torch.Tensor, example_ids: bool = False) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a 2-D LongTensor [N, seq_len], got {type(input_ids).__name__}"
                f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else ''}"
            )
        self.input_ids = input_ids.long()
        self.example_ids = bool(example_ids)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.example_ids:
            return {"input_ids": self.input_ids[index], "example_id": int(index)}
        return {"input_ids": self.input_ids[index]}


class TextDataModule(pl.LightningDataModule):
    """Chunk a corpus into byte sequences and split them once, with a seed, into train and held-out.

    The text (:func:`antimemo.lm.corpus.load_text`) is UTF-8 encoded, cut into non-overlapping
    rows of ``seq_len`` bytes, exact duplicate rows are dropped (so no held-out row also occurs in
    train), the rows are shuffled with ``torch.Generator().manual_seed(seed)``, and the first
    ``num_holdout`` rows become the held-out (validation) set, the next ``num_train`` the training
    set. The split depends only on the text, ``seq_len`` and ``seed``; growing ``num_train`` keeps
    the held-out set fixed.

    Args:
        corpus: ``"pydoc_topics"`` (embedded CPython help texts) or the path of a UTF-8 text file.
        seq_len: bytes per sequence. For ``MemorizationMonitor`` probes it must be at least
            ``prefix_length + suffix_length`` (64 for the defaults).
        num_train: number of training sequences; ``None`` takes every row not held out.
        num_holdout: number of held-out (validation, non-member) sequences.
        batch_size: batch size of both loaders.
        seed: seed of the split and of the training loader's shuffling.
        num_workers: ``DataLoader`` workers.
        duplicates: number of training sequences (the first ``duplicates`` of the training split)
            that occur ``duplicate_copies`` times in the training set: the extra copies are
            appended, so ``len(train_dataset) = num_train + duplicates * (duplicate_copies - 1)``.
            Duplicated data is what memorization feeds on (Kandpal et al. 2022); this is the
            setting in which :class:`~antimemo.DedupSampling` is measured. The distinct duplicated
            sequences are :attr:`duplicated_dataset` (e.g. as probes of a second monitor).
        duplicate_copies: total occurrences of each duplicated sequence (>= 2).
        example_ids: training items also hold ``"example_id"`` (their index), which
            :class:`~antimemo.callbacks.ExampleTiedDropout` needs; validation items never do.

    Example:
        >>> dm = TextDataModule(seq_len=64, num_train=256, num_holdout=64, batch_size=32)
        >>> dm.setup("fit")
        >>> len(dm.train_dataset), len(dm.val_dataset)
        (256, 64)
        >>> dm.train_dataset[0]["input_ids"].shape
        torch.Size([64])
    """

    def __init__(
        self,
        corpus: str = DEFAULT_CORPUS,
        seq_len: int = 64,
        num_train: int | None = 256,
        num_holdout: int = 128,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        duplicates: int = 0,
        duplicate_copies: int = 16,
        example_ids: bool = False,
    ) -> None:
        super().__init__()
        check_int("seq_len", seq_len, 2, "e.g. seq_len=64 (= 32-token prefix + 32-token suffix)")
        if num_train is not None:
            check_int("num_train", num_train, 1, "or None to train on every sequence not held out")
        check_int("num_holdout", num_holdout, 1, "the held-out set is the validation set; e.g. num_holdout=128")
        check_int("batch_size", batch_size, 1, "e.g. batch_size=32")
        check_int("seed", seed, 0, "e.g. seed=0")
        check_int("num_workers", num_workers, 0, "0 loads in the main process")
        check_int("duplicates", duplicates, 0, "0 duplicates nothing; e.g. duplicates=8 repeats 8 training sequences")
        check_int("duplicate_copies", duplicate_copies, 2, "it is the total number of copies, e.g. duplicate_copies=16")
        if num_train is not None and duplicates > num_train:
            raise ValueError(
                f"duplicates={duplicates} exceeds num_train={num_train}: only training sequences can be duplicated; "
                "lower duplicates or raise num_train"
            )
        if str(corpus) != DEFAULT_CORPUS and not Path(corpus).is_file():
            raise ValueError(
                f"corpus must be {DEFAULT_CORPUS!r} or the path of an existing UTF-8 text file, got {str(corpus)!r} "
                "(no such file); pass an absolute path or one relative to the working directory"
            )
        self.save_hyperparameters()
        self.corpus = str(corpus)
        self.seq_len = seq_len
        self.num_train = num_train
        self.num_holdout = num_holdout
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.duplicates = duplicates
        self.duplicate_copies = duplicate_copies
        self.example_ids = bool(example_ids)
        self.duplicated_dataset: SequenceDataset | None = None
        self.tokenizer = ByteTokenizer()
        self.train_dataset: SequenceDataset | None = None
        self.val_dataset: SequenceDataset | None = None

    def build_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(train_ids, holdout_ids)``, two disjoint ``LongTensor[N, seq_len]``.

        Deterministic: the same arguments always give the same tensors.

        Example:
            >>> tr, ho = TextDataModule(num_train=8, num_holdout=4).build_split()
            >>> tr.shape, ho.shape
            (torch.Size([8, 64]), torch.Size([4, 64]))
        """
        rows = chunk_ids(self.tokenizer.encode(load_text(self.corpus)), self.seq_len)
        # Drop exact duplicate rows (keep the first occurrence) so that no held-out row is a member.
        seen: set[tuple[int, ...]] = set()
        keep = []
        for i, row in enumerate(rows.tolist()):
            key = tuple(row)
            if key not in seen:
                seen.add(key)
                keep.append(i)
        rows = rows[torch.tensor(keep, dtype=torch.long)] if keep else rows
        need = self.num_holdout + (self.num_train or 1)
        if rows.shape[0] < need:
            raise ValueError(
                f"num_train={self.num_train} + num_holdout={self.num_holdout} needs {need} sequences but corpus "
                f"{self.corpus!r} gives only {rows.shape[0]} distinct sequences of seq_len={self.seq_len}; "
                "lower num_train / num_holdout / seq_len or use a longer text"
            )
        perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(self.seed))
        holdout = rows[perm[: self.num_holdout]]
        end = None if self.num_train is None else self.num_holdout + self.num_train
        train = rows[perm[self.num_holdout : end]]
        return train, holdout

    def setup(self, stage: str | None = None) -> None:
        """Build the split once (idempotent; every stage shares it).

        Args:
            stage: Lightning stage name (unused: the split is the same for every stage).
        """
        if self.train_dataset is None:
            train, holdout = self.build_split()
            if self.duplicates:
                dup = train[: self.duplicates]
                self.duplicated_dataset = SequenceDataset(dup)
                train = torch.cat([train, dup.repeat(self.duplicate_copies - 1, 1)])
            self.train_dataset = SequenceDataset(train, example_ids=self.example_ids)
            self.val_dataset = SequenceDataset(holdout)

    def _need_setup(self) -> None:
        if self.train_dataset is None:
            self.setup()

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (its order is seeded by ``seed``)."""
        self._need_setup()
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """Held-out loader in fixed order (the validation set, never goldfish-masked)."""
        self._need_setup()
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
