"""``antimemo recursive`` (issue 16): the recursive-training loop, end to end on a tiny config."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from antimemo.cli import main

TINY = {
    "seed_everything": 0,
    "trainer": {"max_epochs": 1, "check_val_every_n_epoch": 1, "log_every_n_steps": 1, "enable_checkpointing": True,
                "enable_model_summary": False},
    "model": {"vocab_size": 257, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 32, "lr": 0.003, "seed": 0},
    "data": {"corpus": "pydoc_topics", "seq_len": 24, "num_train": 16, "num_holdout": 8, "batch_size": 8, "seed": 0},
    "goldfish": None,
    "monitor": {"num_probes": 4, "prefix_length": 12, "suffix_length": 12, "every_n_epochs": 1, "batch_size": 8,
                "holdout": "val", "seed": 0},
    "recursive": {"prompt_length": 4, "delta": 8.0,
                  "diversity": {"num_samples": 4, "num_tokens": 8, "prompt_length": 4, "max_heldout": 8}},
}


def run_tiny(root: Path, generations: int, mix: str) -> tuple[Path, Path, list[str]]:
    """Run the TINY recipe under ``root`` (asserting exit 0); returns ``(config, out, argv)``."""
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = root / "out"
    argv = ["recursive", "--config", str(config), "--generations", str(generations), "--mix", mix, "--out", str(out),
            "--no_progress", "--threads", "1"]
    assert main(argv) == 0
    return config, out, argv


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    return run_tiny(tmp_path_factory.mktemp("recursive"), 2, "replace,filter")


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "generations.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_rows_and_columns(loop):
    _, out, _ = loop
    rows = _rows(out)
    assert [(r["generation"], r["mix"], r["seed"]) for r in rows] == [
        ("0", "replace", "0"), ("0", "filter", "0"), ("1", "replace", "0"), ("1", "filter", "0")]
    for key in ("val_loss", "diversity/distinct_1", "diversity/distinct_4", "diversity/tail_coverage", "exact_match",
                "watermark/filtered_fraction", "synthetic_items", "train_items"):
        assert key in rows[0]
    for r in rows:
        assert float(r["val_loss"]) > 0 and 0 <= float(r["diversity/distinct_2"]) <= 1
    # generation 0 (real data) is one run shared by both mixes
    assert rows[0]["run_dir"] == rows[1]["run_dir"] and rows[0]["val_loss"] == rows[1]["val_loss"]
    summary = (out / "summary.md").read_text()
    assert "| replace | 1 |" in summary and "| filter | 1 |" in summary
    assert (out / "collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_filter_drops_every_synthetic_item_and_replace_trains_on_synthetic_only(loop):
    _, out, _ = loop
    rows = {(r["generation"], r["mix"]): r for r in _rows(out)}
    replace, filt = rows[("1", "replace")], rows[("1", "filter")]
    # replace: only generation 0's 16 samples (the default sample count = the real training count)
    assert (replace["real_items"], replace["synthetic_items"], replace["train_items"]) == ("0", "16", "16")
    synthetic = np.load(out / "runs" / "replace" / "seed0" / "synthetic" / "gen1.npy")
    assert np.array_equal(np.load(out / "runs" / "replace" / "seed0" / "gen1" / "train.npy"), synthetic)
    real = np.load(out / "data" / "real_train.npy")
    assert synthetic.shape == real.shape and np.array_equal(synthetic[:, :4], real[:, :4])  # real prompts
    assert not np.array_equal(synthetic, real)
    # filter: real + synthetic; the WatermarkFilter the child ran flagged exactly the synthetic half
    assert (filt["real_items"], filt["synthetic_items"], filt["synthetic_flagged"]) == ("16", "16", "16")
    report = json.loads((out / "runs" / "filter" / "seed0" / "gen1" / "report.json").read_text())
    assert report["metrics"]["watermark/filtered_fraction"] == pytest.approx(16 / 32)
    assert float(filt["watermark/filtered_fraction"]) == pytest.approx(0.5)
    # so it trained on 32 - 16 = 16 items, all real: 16 / batch 8 = 2 steps in its one epoch
    assert report["global_step"] == 2
    replace_report = json.loads((out / "runs" / "replace" / "seed0" / "gen1" / "report.json").read_text())
    assert "watermark/filtered_fraction" not in replace_report["metrics"] and replace_report["global_step"] == 2
    # validation is the real held-out split in every generation
    fit = yaml.safe_load((out / "runs" / "replace" / "seed0" / "gen1" / "fit.yaml").read_text())
    assert fit["data"]["init_args"]["val"] == str(out / "data" / "real_val.npy")


def test_rerun_does_not_retrain(loop, capsys):
    _, out, argv = loop
    reports = sorted(out.glob("runs/**/report.json"))
    assert len(reports) == 3
    before = {p: p.stat().st_mtime_ns for p in [*reports, *out.glob("runs/**/*.ckpt"), *out.glob("runs/**/synthetic/*.npy")]}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(_rows(out)) == 4


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--generations", "0", "--generations"), ("--mix", "replace,keep", "--mix"), ("--seeds", "0", "--seeds"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, flag, value, named):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = {"--generations": "2", "--mix": "replace", "--seeds": "1", flag: value}
    argv = ["recursive", "--config", str(config), "--out", str(tmp_path / "out"),
            *(x for k, v in args.items() for x in (k, v))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and value.split(",")[-1] in err[0]
    assert not (tmp_path / "out").exists()


def test_accumulate_trains_on_real_plus_every_earlier_synthetic_set(tmp_path):
    _, out, _ = run_tiny(tmp_path, 3, "accumulate")
    real = np.load(out / "data" / "real_train.npy", allow_pickle=False)
    seed_dir = out / "runs" / "accumulate" / "seed0"
    synthetic = [np.load(seed_dir / "synthetic" / f"gen{g}.npy", allow_pickle=False) for g in (1, 2)]
    # each generation samples its own predecessor: generation 2's samples are not generation 1's
    assert synthetic[0].shape == synthetic[1].shape == real.shape and not np.array_equal(*synthetic)
    for g in (1, 2):
        train = np.load(seed_dir / f"gen{g}" / "train.npy", allow_pickle=False)
        assert np.array_equal(train, np.concatenate([real, *synthetic[:g]]))  # real first, then gen 1..g in order
    rows = {r["generation"]: r for r in _rows(out)}
    assert [(rows[g]["real_items"], rows[g]["synthetic_items"], rows[g]["train_items"]) for g in "012"] == [
        ("16", "0", "16"), ("16", "16", "32"), ("16", "32", "48")]
    # every watermarked sample is detected; real rows are never counted
    assert rows["2"]["synthetic_flagged"] == "32"
    report = json.loads((seed_dir / "gen2" / "report.json").read_text())
    assert report["global_step"] == 48 // 8 and "watermark/filtered_fraction" not in report["metrics"]
