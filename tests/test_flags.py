"""One flag convention: underscores everywhere (as LightningCLI), dashed spellings accepted as aliases."""

from __future__ import annotations

import argparse

import pytest

from antimemo._flags import canonical_flags
from antimemo.ablate.cli import build_parser as ablate_parser
from antimemo.cli import main
from antimemo.dedup.cli import add_arguments as dedup_arguments


def _options(parser):
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


@pytest.mark.parametrize("parser", [ablate_parser(), dedup_arguments(argparse.ArgumentParser())], ids=["ablate", "dedup"])
def test_every_option_is_spelled_with_underscores(parser):
    assert not [o for o in _options(parser) if "-" in o[2:]]


def test_dashed_spellings_are_aliases():
    p = ablate_parser()
    argv = ["--config", "r.yaml", "--grid", "goldfish.k=2", "--out", "o", "--dry-run", "--no-progress", "--seed-start=3"]
    args = p.parse_args(canonical_flags(p, argv))
    assert args.dry_run and args.no_progress and args.seed_start == 3
    d = dedup_arguments(argparse.ArgumentParser())
    args = d.parse_args(canonical_flags(d, ["x.txt", "--out", "i.npz", "--num-perm", "64", "--no-progress"]))
    assert args.num_perm == 64 and args.no_progress


def test_dedup_verb_accepts_both_spellings(tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text("a b c d e f\na b c d e f\nz y x w v u\n")
    for flag in ("--no-progress", "--no_progress"):
        assert main(["dedup", str(src), "--out", str(tmp_path / f"i{flag}.npz"), flag, "--num_perm", "32"]) == 0
    assert "clusters" in capsys.readouterr().out.lower()
