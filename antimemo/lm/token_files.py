"""``TokenFileDataModule``: token ids from ``.jsonl`` or ``.npy`` files, for auditing any causal LM.

``antimemo audit`` measures a model on its training data (the members: probes and MIA members)
and on held-out data (the validation loss and the MIA non-members). When the model was not
trained with antimemo, the two splits come as files of token ids, already tokenized with the
model's tokenizer:

- ``.jsonl``: one JSON object per line, ``{"input_ids": [int, ...]}`` (other keys are ignored;
  blank lines are skipped). Sequences may differ in length.
- ``.npy``: a 2-D integer array, one row per sequence (``np.save(path, ids)``). Read with
  ``allow_pickle=False``: object arrays are refused.

Nothing else is read (no pickle, no ``torch.load``). Files are read and checked when the data
module is built, so a bad file is a configuration error that names the argument.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from antimemo._checks import check_int, is_int

__all__ = ["TokenFileDataModule", "TokenListDataset", "read_token_file"]

#: File suffixes :func:`read_token_file` reads.
SUFFIXES = (".jsonl", ".npy")


def _fail(argument: str, path: Path, what: str) -> ValueError:
    return ValueError(f"{argument}: {str(path)!r} {what}")


def _read_jsonl(path: Path, argument: str, key: str) -> list[torch.Tensor]:
    fix = f'each line must be a JSON object {{"{key}": [int, ...]}}'
    rows: list[torch.Tensor] = []
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise _fail(argument, path, f"line {number} is not valid JSON ({err.msg}); {fix}") from None
            if not isinstance(item, dict) or key not in item:
                found = f"keys {sorted(map(str, item))}" if isinstance(item, dict) else f"a JSON {type(item).__name__}"
                raise _fail(argument, path, f"line {number} has no {key!r} ({found}); {fix}")
            ids = item[key]
            if not isinstance(ids, list) or not ids or not all(is_int(t) for t in ids):
                raise _fail(
                    argument, path, f"line {number}: {key!r} must be a non-empty list of integers, got "
                    f"{json.dumps(ids)[:60]}; {fix}"
                )
            rows.append(torch.tensor(ids, dtype=torch.long))
    return rows


def _read_npy(path: Path, argument: str) -> list[torch.Tensor]:
    fix = "save a 2-D integer array, one row per sequence: np.save(path, np.asarray(ids, dtype=np.int64))"
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays need pickle, which is refused
        raise _fail(argument, path, f"cannot be read without pickle ({err}); {fix}") from None
    if not isinstance(array, np.ndarray):
        raise _fail(argument, path, f"holds a {type(array).__name__}, not one array; {fix}")
    if array.ndim != 2 or array.shape[1] == 0:
        raise _fail(argument, path, f"holds an array of shape {tuple(array.shape)}, expected 2-D (sequences, tokens); {fix}")
    if not np.issubdtype(array.dtype, np.integer):
        raise _fail(argument, path, f"holds {array.dtype} values, expected integer token ids; {fix}")
    return list(torch.from_numpy(array.astype(np.int64, copy=False)))


def read_token_file(path: str | os.PathLike[str], argument: str = "path", key: str = "input_ids") -> list[torch.Tensor]:
    """Read the sequences of token ids in a ``.jsonl`` or ``.npy`` file, checked.

    Args:
        path: the file.
        argument: the argument name used in error messages (e.g. ``"train"``).
        key: the JSON key of the token ids in ``.jsonl`` lines.

    Returns:
        One 1-D ``LongTensor`` per sequence.

    Raises:
        FileNotFoundError: no such file. ValueError: another suffix, a malformed line, a missing
        key, an array that is not 2-D integer, a negative id or an empty file; each names
        ``argument``, the file and the fix.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.jsonl"
        >>> _ = p.write_text('{"input_ids": [5, 6, 7]}\\n{"input_ids": [8, 9]}\\n')
        >>> [t.tolist() for t in read_token_file(p, "train")]
        [[5, 6, 7], [8, 9]]
        >>> _ = p.write_text('{"ids": [5]}\\n')
        >>> read_token_file(p, "train")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: train: '...train.jsonl' line 1 has no 'input_ids' (keys ['ids']); each line must be ...
    """
    p = Path(path)
    if p.suffix not in SUFFIXES:
        raise _fail(
            argument, p, f"is neither a .jsonl nor a .npy file; write the token ids as JSON lines "
            f'{{"{key}": [...]}} or as a 2-D integer array with np.save (pickle-based formats are not read)'
        )
    if not p.is_file():
        raise FileNotFoundError(f"{argument}: {str(p)!r} does not exist (or is not a file); pass the path of a .jsonl or .npy file")
    rows = _read_jsonl(p, argument, key) if p.suffix == ".jsonl" else _read_npy(p, argument)
    if not rows:
        raise _fail(argument, p, "holds no sequence; it needs at least one")
    low = min(int(r.min()) for r in rows)
    if low < 0:
        raise _fail(argument, p, f"holds the negative token id {low}; token ids are >= 0")
    return rows


class TokenListDataset(Dataset):
    """Item ``i`` is ``{"input_ids": rows[i]}`` (1-D ``LongTensor``, rows may differ in length).

    Example:
        >>> ds = TokenListDataset([torch.tensor([1, 2, 3]), torch.tensor([4])])
        >>> len(ds), ds[1]["input_ids"].tolist()
        (2, [4])
    """

    def __init__(self, rows: list[torch.Tensor]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.rows[index]}


class _PadCollate:
    """Right-pad a batch to its longest row; ``attention_mask`` is 0 on the padding."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [item["input_ids"] for item in items]
        width = max(r.numel() for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : row.numel()] = row
            mask[i, : row.numel()] = 1
        return {"input_ids": ids, "attention_mask": mask}


class TokenFileDataModule(pl.LightningDataModule):
    """Training and held-out sequences of token ids read from ``.jsonl`` / ``.npy`` files.

    The training file holds the sequences the model was trained on (the monitor's probes and MIA
    members are drawn from them); the validation file holds sequences it never saw (the held-out
    loss and the MIA non-members, ``holdout="val"``). Both must be tokenized with the model's
    tokenizer. See the module docstring for the two formats.

    Batches are ``{"input_ids", "attention_mask"}``, right-padded with ``pad_id`` to the longest
    row of the batch (``attention_mask`` 0 on the padding). The monitor reads the dataset items
    themselves (unpadded), so a sequence shorter than its ``prefix_length + suffix_length`` is
    never a probe.

    Args:
        train: the ``.jsonl`` / ``.npy`` file of training (member) sequences.
        val: the file of held-out (non-member) sequences.
        seq_len: keep only the first ``seq_len`` tokens of each sequence (``None``: whole
            sequences). Memorization probes use the first ``prefix_length + suffix_length``.
        batch_size: batch size of both loaders (held-out loss; the monitor has its own).
        pad_id: the id padding batches (masked out of the loss: any id works).
        num_workers: ``DataLoader`` workers.
        key: the JSON key of the token ids in ``.jsonl`` lines.

    Raises:
        FileNotFoundError / ValueError: when built, naming ``train`` or ``val`` and the fix.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> np.save(d / "train.npy", np.arange(40).reshape(4, 10))
        >>> _ = (d / "val.jsonl").write_text('{"input_ids": [1, 2, 3]}\\n')
        >>> dm = TokenFileDataModule(train=str(d / "train.npy"), val=str(d / "val.jsonl"), seq_len=8, batch_size=2)
        >>> len(dm.train_dataset), dm.train_dataset[1]["input_ids"].tolist()
        (4, [10, 11, 12, 13, 14, 15, 16, 17])
        >>> next(iter(dm.val_dataloader()))["attention_mask"].tolist()
        [[1, 1, 1]]
    """

    def __init__(
        self,
        train: str,
        val: str,
        seq_len: int | None = None,
        batch_size: int = 8,
        pad_id: int = 0,
        num_workers: int = 0,
        key: str = "input_ids",
    ) -> None:
        super().__init__()
        if seq_len is not None:
            check_int("seq_len", seq_len, 1, "or None to keep whole sequences; e.g. seq_len=64")
        check_int("batch_size", batch_size, 1, "e.g. batch_size=8")
        check_int("pad_id", pad_id, 0, "any id works: padding is masked out of the loss")
        check_int("num_workers", num_workers, 0, "0 loads in the main process")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}; e.g. key='input_ids'")
        self.save_hyperparameters()
        self.train_path, self.val_path = str(train), str(val)
        self.seq_len, self.batch_size, self.pad_id, self.num_workers = seq_len, batch_size, pad_id, num_workers
        self.train_dataset = TokenListDataset(self._read(train, "train", key))
        self.val_dataset = TokenListDataset(self._read(val, "val", key))

    def _read(self, path: Any, argument: str, key: str) -> list[torch.Tensor]:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"{argument} must be the path of a .jsonl or .npy file, got {path!r}")
        rows = read_token_file(path, argument, key)
        return rows if self.seq_len is None else [r[: self.seq_len] for r in rows]

    def setup(self, stage: str | None = None) -> None:
        """Nothing to do: the files were read when the data module was built."""

    def train_dataloader(self) -> DataLoader:
        """Training sequences, shuffled with a fixed seed (0)."""
        return DataLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=True, collate_fn=_PadCollate(self.pad_id),
            generator=torch.Generator().manual_seed(0), num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """Held-out sequences in file order."""
        return DataLoader(
            self.val_dataset, batch_size=self.batch_size, shuffle=False, collate_fn=_PadCollate(self.pad_id),
            num_workers=self.num_workers,
        )
