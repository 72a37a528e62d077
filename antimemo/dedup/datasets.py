"""Read examples for a duplicate index: from a map-style dataset's items, or from text files.

:func:`dataset_view` detects what a dataset holds (text, token ids, images) from its first item
and returns a lazy view of the values; :class:`LineFile` reads a ``.txt`` (one example per line)
or ``.jsonl`` (one JSON object per line) file lazily, keeping only 8 bytes of line offset per
example in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LineFile", "dataset_view"]


class _ItemView(Sequence):
    """A lazy view ``view[i] = extract(dataset[i])`` with ``len`` (what the index builders read)."""

    def __init__(self, dataset: Any, extract: Any) -> None:
        self.dataset = dataset
        self.extract = extract

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.extract(self.dataset[i])


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dim")


def _describe(item: Any) -> str:
    if isinstance(item, Mapping):
        return f"dict with keys {sorted(map(str, item.keys()))}"
    if _is_tensor(item):
        return f"Tensor of shape {tuple(item.shape)} and dtype {item.dtype}"
    if isinstance(item, (tuple, list)):
        return f"{type(item).__name__} of {[type(x).__name__ for x in list(item)[:3]]}"
    return type(item).__name__


def _kind_of(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if _is_tensor(value):
        if value.is_floating_point() and value.dim() == 3:
            return "images"
        if not value.is_floating_point() and not value.is_complex() and value.dim() == 1:
            return "tokens"
        return None
    if isinstance(value, np.ndarray):
        return "tokens" if value.ndim == 1 and value.dtype.kind in "iu" else None
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value[:8]
    ):
        return "tokens"
    return None


_KEYS = {"tokens": ("input_ids",), "text": ("text",), "images": ("image", "pixel_values", "img")}


def _get_key(key: str) -> Any:
    return lambda x: x[key]


def _identity(x: Any) -> Any:
    return x


def _first(x: Any) -> Any:
    return x[0]


def _extractor(item: Any, kind: str | None) -> tuple[str, Any] | None:
    if isinstance(item, Mapping):
        for k in [kind] if kind else ["tokens", "text", "images"]:
            for key in _KEYS.get(k, ()):
                if key in item and _kind_of(item[key]) == k:
                    return k, _get_key(key)
        return None
    found = _kind_of(item)
    if found is not None:
        return (found, _identity) if kind is None or found == kind else None
    if isinstance(item, (tuple, list)) and item:  # (input, label) pairs
        found = _kind_of(item[0])
        if found is not None and (kind is None or found == kind):
            return found, _first
    return None


def dataset_view(dataset: Any, kind: str | None = None) -> tuple[str, Sequence]:
    """Detect what a map-style dataset holds and return ``(kind, lazy view of the values)``.

    Items may be ``str`` (text), dicts with ``"input_ids"`` (tokens), ``"text"`` (text) or
    ``"image"``/``"pixel_values"`` (images), 1-D integer tensors/arrays/lists (tokens),
    ``[C, H, W]`` float tensors (images), or tuples whose first element is one of these
    (``(image, label)``).

    Args:
        dataset: a map-style dataset (``len`` and integer indexing).
        kind: expect ``"text"``, ``"tokens"`` or ``"images"`` (e.g. the kind of a given index).

    Returns:
        ``(kind, view)`` with ``view[i]`` the value of item ``i``.

    Raises:
        TypeError: if the items hold none of these, with the fix (build the index yourself).

    Example:
        >>> kind, view = dataset_view([{"input_ids": [1, 2]}, {"input_ids": [3]}])
        >>> kind, view[1]
        ('tokens', [3])
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: a duplicate index needs at least one example")
    first = dataset[0]
    found = _extractor(first, kind)
    if found is None:
        want = f"{kind} " if kind else ""
        raise TypeError(
            f"cannot read {want}examples from the dataset: item 0 is a {_describe(first)}. Readable items: str, "
            "dicts with 'input_ids' / 'text' / 'image', 1-D integer sequences, [C, H, W] float tensors, or tuples "
            "starting with one of these. Otherwise build the index yourself, e.g. DedupSampling("
            "index=DuplicateIndex.from_texts(...) / from_token_ids(...) / from_images(...))"
        )
    return found[0], _ItemView(dataset, found[1])


class LineFile(Sequence):
    """A text file read lazily as a sequence of examples, one per line.

    ``.txt``: each line (without its line break) is a text; empty lines are examples too, so
    example ``i`` is line ``i + 1``. ``.jsonl``: each line is a JSON object and ``field`` holds
    the example (a string -> text, a list of integers -> token ids).

    Args:
        path: the file.
        field: the JSON field of a ``.jsonl`` file (``None``: ``"text"``, else ``"input_ids"``).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.txt"; _ = p.write_text("x y\\n\\nz\\n")
        >>> f = LineFile(p); len(f), f[2], f.kind
        (3, 'z', 'text')
    """

    def __init__(self, path: str | os.PathLike, field: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: {str(self.path)!r}")
        self.jsonl = self.path.suffix.lower() in (".jsonl", ".ndjson")
        offsets = [0]
        with open(self.path, "rb") as f:
            for line in f:
                offsets.append(offsets[-1] + len(line))
        self._handle: Any = None
        self._offsets = np.asarray(offsets, dtype=np.int64)
        if len(self) == 0:
            raise ValueError(f"{str(self.path)!r} is empty: a duplicate index needs at least one example")
        self.field = field
        if self.jsonl:
            obj = self._json(0)
            if field is None:
                self.field = "text" if "text" in obj else "input_ids" if "input_ids" in obj else None
            if self.field is None or self.field not in obj:
                raise ValueError(
                    f"line 1 of {str(self.path)!r} has no field {field or 'text'!r} (keys {sorted(obj)}); "
                    "choose one with --field"
                )
            value = obj[self.field]
            self.kind = "text" if isinstance(value, str) else "tokens"
        else:
            self.kind = "text"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = None  # file handles do not pickle; reopened on first read
        return state

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.close()

    def __len__(self) -> int:
        return int(self._offsets.shape[0] - 1)

    def _line(self, i: int) -> str:
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open for fast random reads
        self._handle.seek(int(self._offsets[i]))
        raw = self._handle.read(int(self._offsets[i + 1] - self._offsets[i]))
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:
            raise ValueError(f"line {i + 1} of {str(self.path)!r} is not valid UTF-8: {err}") from None

    def _json(self, i: int) -> Any:
        try:
            return json.loads(self._line(i))
        except json.JSONDecodeError as err:
            raise ValueError(f"line {i + 1} of {str(self.path)!r} is not valid JSON: {err}") from None

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if not self.jsonl:
            return self._line(i)
        obj = self._json(i)
        if not isinstance(obj, Mapping) or self.field not in obj:
            raise ValueError(f"line {i + 1} of {str(self.path)!r} has no field {self.field!r}")
        return obj[self.field]
