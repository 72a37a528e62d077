"""Sharded inputs of the Ray dedup engine: expand paths and globs, cut files into pieces, read a piece.

A corpus is a list of files, in the order given (each glob or directory sorted by path). Documents
are numbered across files in that order, so document ``i`` of a corpus is the ``i``-th document of
the files read one after the other, exactly as ``antimemo dedup`` reads one file:

- ``.txt`` / ``.text``: one document per line (without its line break); empty lines are documents;
- ``.jsonl`` / ``.ndjson``: one JSON object per line, the document in ``field`` (``"text"`` by
  default, else ``"input_ids"``; a string is a text, a list of integers token ids);
- ``.parquet`` / ``.pq``: one document per row, in column ``field``.

A *piece* is a contiguous run of documents of one file (``chunk_size`` lines of a text file, one
row group of a Parquet file), described by a small JSON-able dict, so that workers read only their
piece: :func:`scan_file` cuts a file into pieces, :func:`read_piece` reads one. Only numpy,
pyarrow (Parquet) and the standard library are imported.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "expand_inputs", "file_format", "read_piece", "scan_file"]

#: File suffix -> format name.
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def file_format(path: str | os.PathLike) -> str:
    """The format of a file from its suffix: ``"text"``, ``"jsonl"`` or ``"parquet"``.

    Args:
        path: a file path.

    Raises:
        ValueError: an unsupported suffix (naming the file and the supported suffixes).

    Example:
        >>> file_format("shard-0001.jsonl"), file_format("a.parquet")
        ('jsonl', 'parquet')
    """
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(
            f"unsupported input file {str(path)!r}: the Ray engine reads {sorted(FORMATS)} "
            "(one text per line, one JSON object per line, or one row per document)"
        )
    return fmt


def expand_inputs(inputs: str | os.PathLike | list) -> list[Path]:
    """The input files of a corpus, in document order.

    Args:
        inputs: a path, directory or glob pattern (``"data/*.jsonl"``, ``"data/**/*.parquet"``), or
            a list of them. A directory stands for its supported files (not recursive); each glob
            and directory is sorted by path; the list keeps its order.

    Returns:
        Absolute file paths.

    Raises:
        FileNotFoundError: a path or pattern that matches no file.
        ValueError: a file named twice, or an unsupported suffix.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "b.txt").write_text("x\\n"); _ = (d / "a.txt").write_text("y\\n")
        >>> [p.name for p in expand_inputs(str(d / "*.txt"))]
        ['a.txt', 'b.txt']
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError(f"inputs must be a path, glob pattern or a non-empty list of them, got {inputs!r}")
    files: list[Path] = []
    seen: dict[Path, str] = {}
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"each input must be a path or glob pattern (str), got {type(item).__name__}: {item!r}")
        text = os.fspath(item)
        p = Path(text)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in FORMATS)
            if not found:
                raise FileNotFoundError(f"input directory {text!r} holds no {sorted(FORMATS)} file")
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not found:
                raise FileNotFoundError(f"input {text!r} matches no file; give a file, a directory or a glob pattern")
        for q in found:
            q = q.resolve()
            file_format(q)
            if q in seen:
                raise ValueError(
                    f"input file {str(q)!r} is named twice (by {seen[q]!r} and {text!r}); each file may appear once, "
                    "or its documents would be counted twice"
                )
            seen[q] = text
            files.append(q)
    return files


def _decode_line(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"line {line_no} of {str(path)!r} is not valid UTF-8: {err}") from None


def _json_value(raw: bytes, path: Path, line_no: int, field: str) -> Any:
    try:
        obj = json.loads(_decode_line(raw, path, line_no))
    except json.JSONDecodeError as err:
        raise ValueError(f"line {line_no} of {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(obj, Mapping) or field not in obj:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"line {line_no} of {str(path)!r} has no field {field!r} (it has {keys}); choose one with --field")
    return obj[field]


def _kind_of(value: Any, where: str) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "tokens"
    raise TypeError(f"{where} is a {type(value).__name__}; a document must be a string (text) or a list of integers (token ids)")


def scan_file(path: str | os.PathLike, field: str | None, chunk_size: int) -> dict:
    """Cut one file into pieces of at most ``chunk_size`` lines (one row group for Parquet).

    Args:
        path: the file.
        field: the JSON field / Parquet column (``None``: ``"text"``, else ``"input_ids"``; ignored
            for ``.txt``).
        chunk_size: lines per piece of a text or JSONL file.

    Returns:
        ``{"rows": int, "kind": "text" | "tokens" | None, "field": str | None, "pieces": [dict]}``;
        each piece holds ``path``, ``format``, ``field``, ``rows`` and its location (byte range or
        row group). ``kind`` is ``None`` for an empty file.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.txt"; _ = p.write_text("x\\ny\\nz")
        >>> s = scan_file(p, None, chunk_size=2)
        >>> s["rows"], [q["rows"] for q in s["pieces"]], s["kind"]
        (3, [2, 1], 'text')
    """
    path = Path(path)
    fmt = file_format(path)
    if fmt == "parquet":
        return _scan_parquet(path, field)
    pieces: list[dict] = []
    rows = 0
    first: bytes | None = None
    with open(path, "rb") as f:
        start = pos = 0
        count = 0
        for line in f:
            if first is None:
                first = line
            pos += len(line)
            count += 1
            if count == chunk_size:
                pieces.append({"start": start, "end": pos, "rows": count, "line": rows})
                rows += count
                start, count = pos, 0
        if count:
            pieces.append({"start": start, "end": pos, "rows": count, "line": rows})
            rows += count
    kind = None
    if fmt == "jsonl" and first is not None:
        if field is None:
            try:
                obj = json.loads(_decode_line(first, path, 1))
            except json.JSONDecodeError as err:
                raise ValueError(f"line 1 of {str(path)!r} is not valid JSON: {err}") from None
            if not isinstance(obj, Mapping) or not {"text", "input_ids"} & set(obj):
                keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
                raise ValueError(
                    f"line 1 of {str(path)!r} has no field 'text' or 'input_ids' (it has {keys}); choose one with --field"
                )
            field = "text" if "text" in obj else "input_ids"
        kind = _kind_of(_json_value(first, path, 1, field), f"line 1 of {str(path)!r} (field {field!r})")
    elif first is not None:
        kind, field = "text", None
    for p in pieces:
        p.update(path=str(path), format=fmt, field=field)
    return {"rows": rows, "kind": kind, "field": field, "pieces": pieces}


def _parquet():
    from antimemo._extras import require

    return require("pyarrow.parquet", "reading Parquet inputs")


def _scan_parquet(path: Path, field: str | None) -> dict:
    pq = _parquet()
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # ArrowInvalid: not a Parquet file
        raise ValueError(f"{str(path)!r} is not a readable Parquet file: {type(err).__name__}: {err}") from None
    names = pf.schema_arrow.names
    if field is None and not {"text", "input_ids"} & set(names):
        raise ValueError(
            f"Parquet file {str(path)!r} has no column 'text' or 'input_ids' (columns {names}); choose one with --field"
        )
    if field is None:
        field = "text" if "text" in names else "input_ids"
    if field not in names:
        raise ValueError(f"Parquet file {str(path)!r} has no column {field!r} (columns {names}); choose one with --field")
    pieces = []
    kind = None
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if n == 0:
            continue
        pieces.append({"path": str(path), "format": "parquet", "field": field, "row_group": g, "rows": n})
        if kind is None:
            first = pf.read_row_group(g, columns=[field]).column(field)[0].as_py()
            kind = _kind_of(first, f"row 1 of {str(path)!r} (column {field!r})")
    return {"rows": sum(p["rows"] for p in pieces), "kind": kind, "field": field, "pieces": pieces}


def read_piece(piece: dict, rows: list[int] | None = None) -> list:
    """The documents of one piece (texts, or token id lists), in order.

    Args:
        piece: a piece from :func:`scan_file` (it may carry a ``doc`` key: the corpus index of its
            first document, used in error messages).
        rows: only these rows of the piece (ascending positions; only their lines are parsed).

    Returns:
        A list of ``piece["rows"]`` documents, or of ``len(rows)``.

    Raises:
        ValueError: a line that is not UTF-8 or JSON, lacks the field, or a file changed since it
            was scanned.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.jsonl"; _ = p.write_text('{"text": "a"}\\n{"text": "b"}\\n')
        >>> [read_piece(q) for q in scan_file(p, None, chunk_size=1)["pieces"]]
        [['a'], ['b']]
    """
    path = Path(piece["path"])
    fmt = piece["format"]
    if fmt == "parquet":
        pq = _parquet()
        col = pq.ParquetFile(path).read_row_group(piece["row_group"], columns=[piece["field"]]).column(piece["field"])
        n_read = len(col)
        values = col.to_pylist() if rows is None else col.take(rows).to_pylist()
    else:
        with open(path, "rb") as f:
            f.seek(piece["start"])
            raw = f.read(piece["end"] - piece["start"])
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        n_read = len(lines)
        first_line = int(piece.get("line", 0)) + 1
        picked = enumerate(lines) if rows is None else ((i, lines[i]) for i in rows if i < n_read)
        if fmt == "jsonl":
            values = [_json_value(b, path, first_line + i, piece["field"]) for i, b in picked]
        else:
            values = [_decode_line(b, path, first_line + i) for i, b in picked]
    if n_read != piece["rows"]:
        raise ValueError(
            f"{str(path)!r} changed while it was being indexed: expected {piece['rows']} documents in a piece, "
            f"read {n_read}; rerun on a corpus that is not being written"
        )
    return values
