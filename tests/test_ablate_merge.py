"""antimemo ablate --merge: several ablation directories as one table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from antimemo.ablate.cli import build_parser, run
from antimemo.ablate.collect import read_csv
from antimemo.ablate.merge import merge_ablations
from antimemo.ablate.runner import REPORT, Run, load_manifest, write_manifest


def _ablation(out: Path, key: str, values: list[str], seeds: int, overrides: list[str], exact: dict[str, float]) -> None:
    """An ablation directory as `antimemo ablate` leaves it: manifest plus one report per run."""
    runs = []
    for value in values:
        for seed in range(seeds):
            cell = f"{key}-{value}"
            run_dir = out / "runs" / cell / f"seed{seed}"
            run_dir.mkdir(parents=True)
            report = {"exact_match": exact[value] + 0.01 * seed, "val_loss": 2.0 + exact[value], "train_wall_time_s": 1.0}
            (run_dir / REPORT).write_text(json.dumps(report))
            runs.append(Run(cell, {key: value}, seed, run_dir, ["--config", "r.yaml"]))
    write_manifest(out, runs, config=["r.yaml"], grid=[[key, values]], seeds=seeds, seed_start=0, base_overrides=overrides)


@pytest.fixture()
def two(tmp_path):
    a, b = tmp_path / "goldfish", tmp_path / "floor"
    _ablation(a, "goldfish.k", ["4", "none"], 2, [], {"4": 0.2, "none": 0.9})
    _ablation(b, "loss_floor.floor", ["0.5", "1.0"], 1, ["--monitor.every_n_epochs=60"], {"0.5": 0.3, "1.0": 0.1})
    return a, b


def test_merged_manifest_lists_every_run_in_place_with_the_union_of_grid_keys(tmp_path, two):
    a, b = two
    path = merge_ablations(tmp_path / "all", [a, b])
    info, runs = load_manifest(tmp_path / "all")
    assert path == tmp_path / "all" / "ablation.json"
    assert [(r.cell, r.seed) for r in runs] == [
        ("goldfish.k-4", 0), ("goldfish.k-4", 1), ("goldfish.k-none", 0), ("goldfish.k-none", 1),
        ("loss_floor.floor-0.5", 0), ("loss_floor.floor-1.0", 0),
    ]  # fmt: skip
    assert all(r.dir.is_relative_to(a) or r.dir.is_relative_to(b) for r in runs)  # nothing copied
    assert not (tmp_path / "all" / "runs").exists()
    assert info["grid"] == [["goldfish.k", ["4", "none"]], ["loss_floor.floor", ["0.5", "1.0"]]]
    assert [m["base_overrides"] for m in info["merged_from"]] == [[], ["--monitor.every_n_epochs=60"]]
    assert [m["runs"] for m in info["merged_from"]] == [4, 2]


def test_cli_merge_writes_the_combined_table_and_plot(tmp_path, two, capsys):
    a, b = two
    out = tmp_path / "all"
    args = build_parser().parse_args(["--merge", str(a), str(b), "--out", str(out)])
    assert run(args) == 0
    rows = read_csv(out / "results.csv")
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    by = {(r["cell"], r["seed"]): r for r in rows}
    assert float(by[("goldfish.k-none", "1")]["exact_match"]) == pytest.approx(0.91)
    assert by[("loss_floor.floor-1.0", "0")]["goldfish.k"] == ""  # key not part of that cell
    summary = (out / "summary.md").read_text()
    assert f"Merged from: {a} (4 runs, 2 seeds, overrides: none); {b} (2 runs, 1 seed, overrides" in summary
    assert "| 0.1 | floor=1.0 |" in summary  # the best cell under 0.1 comes from the second source
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert summary in capsys.readouterr().out


def test_same_cell_and_seed_in_two_sources_is_refused(tmp_path, two):
    a, _ = two
    c = tmp_path / "goldfish_again"
    _ablation(c, "goldfish.k", ["none"], 1, [], {"none": 0.5})
    with pytest.raises(ValueError, match=r"cell 'goldfish.k-none' seed 0 is in both .*goldfish.* and .*goldfish_again"):
        merge_ablations(tmp_path / "all", [a, c])


def test_bad_merge_arguments(tmp_path, two, capsys):
    a, b = two
    with pytest.raises(ValueError, match="at least two ablation directories"):
        merge_ablations(tmp_path / "all", [a])
    with pytest.raises(ValueError, match="the output directory --out .* is one of the merged ablations"):
        merge_ablations(a, [a, b])
    with pytest.raises(ValueError, match="lists .* twice"):
        merge_ablations(tmp_path / "all", [a, b, a])
    with pytest.raises(FileNotFoundError, match="no ablation.json in"):
        merge_ablations(tmp_path / "all", [a, tmp_path / "nothing"])
    args = build_parser().parse_args(["--merge", str(a), str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert run(args) == 2 and "no ablation.json" in capsys.readouterr().err
    args = build_parser().parse_args(["--merge", str(a), str(b), "--config", "r.yaml", "--out", str(tmp_path / "x")])
    assert run(args) == 2 and "--merge runs nothing" in capsys.readouterr().err
