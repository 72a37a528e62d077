"""antimemo._atomic: a failed write keeps the old file and leaves no temporary file."""

from __future__ import annotations

import pytest

from antimemo._atomic import atomic_open, atomic_write_bytes, atomic_write_text


def test_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "index.json", "old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_open(path) as handle:
            handle.write("new, half written")
            raise OSError(28, "disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_writes_replace_and_refuse_directories(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match=r"a directory of that name exists; pass a file path"):
        atomic_write_text(tmp_path / "out", "x")
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        atomic_write_text(tmp_path / "missing" / "x.txt", "x")
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_open(tmp_path / "x", "a"):
            pass
