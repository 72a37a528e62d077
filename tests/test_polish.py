"""Issue 18, items 5-9: the diffusion report and its labelled replica picture, the dedup report,
the budget trajectory, and ``antimemo ablate``'s AUC digits, plurals and per-run progress."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from antimemo.ablate.cli import _plan_text, plural
from antimemo.ablate.runner import PARTIAL_REPORT, REPORT, Run, execute, progress_postfix, run_progress
from antimemo.ablate.summary import CellStats, format_auc, render_summary
from antimemo.report import format_budget, format_report

ROOT = Path(__file__).resolve().parents[1]

LM_ROWS = ("goldfish", "exact match", "token match", "near-verbatim", "probes", "memorization measured", "trained targets")


def _rows(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2:
                out[cells[0]] = cells[1]
    return out


# ---------------------------------------------------------------------------------- item 5


def test_diffusion_report_dict_has_no_lm_rows_and_shows_the_picture():
    report = {
        "kind": "diffusion", "goldfish": None, "exact_match": None, "token_match": None, "near_verbatim": None,
        "val_loss": 0.5, "train_loss": 0.6, "num_probes": None, "memorization_after_epochs": None,
        "metrics": {"replication/rate": 0.25, "replication/fid": 3.0},
        "replica_pictures": ["runs/diffusion_ddpm/replicas/replicas_epoch029.png"],
        "sections": {"goldfish": None, "conditioning_noise": {"init_args": {"std": 1.0}}, "replica_monitor": {}},
    }  # fmt: skip
    rows = _rows(format_report(report))
    assert not [r for r in rows if r.startswith(LM_ROWS)], rows
    assert rows["replica picture (PNG)"] == "runs/diffusion_ddpm/replicas/replicas_epoch029.png"
    assert rows["replication/rate"] == "0.2500" and rows["conditioning_noise"] == "std=1.0"
    assert rows["train loss (last epoch)"] == "0.6000"
    # an old report without "kind": classified from its figures
    old = {k: v for k, v in report.items() if k != "kind"}
    assert "exact match" not in _rows(format_report(old))
    # an LM report keeps its rows
    lm = _rows(format_report({"goldfish": None, "exact_match": 0.5, "val_loss": 2.0}))
    assert lm["goldfish"] == "off" and lm["exact match"] == "0.5000"


def test_tiny_diffusion_fit_report_and_labelled_picture(tmp_path, capsys):
    """A tiny diffusion fit through the CLI: no LM rows, the PNG path printed, the PNG labelled."""
    import json

    import numpy as np
    from PIL import Image

    from antimemo.callbacks.replica_monitor import LABEL_HEIGHT
    from antimemo.cli import main

    pics = tmp_path / "pics"
    args = [
        "fit", "--config", str(ROOT / "recipes" / "diffusion_ddpm.yaml"),
        "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--model.init_args.image_size", "8", "--model.init_args.num_inference_steps", "2",
        "--data.init_args.image_size", "8", "--data.init_args.num_train", "16", "--data.init_args.num_val", "8",
        "--data.init_args.num_duplicated", "2", "--data.init_args.copies", "2",
        "--replica_monitor.every_n_epochs", "1", "--replica_monitor.num_samples", "4", "--replica_monitor.num_pictures", "3",
        "--replica_monitor.save_dir", str(pics), "--replica_monitor.extra_similarities", "[]",
        "--replica_monitor.fid_feature", "null",
        "--report_path", str(tmp_path / "report.json"),
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    table = out[out.rindex("| metric"):]
    rows = _rows(table)
    png = pics / "replicas_epoch000.png"
    assert rows["replica picture (PNG)"] == str(png)
    assert not [r for r in rows if r.startswith(LM_ROWS)], rows
    assert "replication/rate" in rows
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kind"] == "diffusion" and report["replica_pictures"] == [str(png)]
    # the picture: 3 pairs of 8x8 images scaled 4x, plus three label strips; the strips hold text
    pic = np.asarray(Image.open(png), dtype=np.float32) / 255
    unlabelled_height = 2 * (8 * 4 + 2) + 2
    assert pic.shape[0] == unlabelled_height + 3 * LABEL_HEIGHT
    assert pic.shape[1] >= 3 * (8 * 4 + 2) + 2
    strips = (pic[:LABEL_HEIGHT], pic[LABEL_HEIGHT + 34 : 2 * LABEL_HEIGHT + 34], pic[-LABEL_HEIGHT:])
    for strip in strips:
        assert (strip < 0.5).sum() > 20  # dark text on white


def test_similarity_labels_are_drawn_under_each_pair():
    import torch

    from antimemo.callbacks.replica_monitor import LABEL_HEIGHT, labelled_replica_grid, replica_grid

    gen = torch.ones(2, 3, 8, 8)  # white images: only labels are dark
    plain = replica_grid(gen, gen)
    pic = labelled_replica_grid(gen, gen, torch.tensor([0.987, 0.5]))
    assert pic.shape[0] == 3 and pic.shape[1] == plain.shape[1] + 3 * LABEL_HEIGHT
    bottom = pic[0, -LABEL_HEIGHT:]
    first, second = bottom[:, 2 : 2 + 32], bottom[:, 36 : 36 + 32]
    assert (first < 0.5).sum() > 10 and (second < 0.5).sum() > 10  # one score under each column
    assert not torch.equal(first, second)  # different numbers
    assert torch.equal(pic[:, LABEL_HEIGHT + 2 : LABEL_HEIGHT + 34, 2:34], torch.ones(3, 32, 32))  # images untouched


# ---------------------------------------------------------------------------------- item 7


def test_budget_trajectory_table_is_one_based_after_epoch():
    report = {
        "goldfish": {"k": 4, "h": 13, "seed": 0}, "exact_match": 0.0, "val_loss": 2.0,
        "budget": {"control": "goldfish.k", "metric": "memorization/exact_match", "max_value": 0.05, "stronger": "decrease",
                   "history": [[4, 0.0, 2.0, 2.0], [9, 0.0, 2.0, 4.0], [14, 0.1, 4.0, 2.0]]},
        "sections": {"budget": {"class_path": "antimemo.MemorizationBudget",
                                "init_args": {"control": "goldfish.k", "metric": "memorization/exact_match",
                                              "max_value": 0.05, "bounds": [2, 4], "factor": 2.0}}},
    }  # fmt: skip
    text = format_report(report)
    assert _rows(text)["budget"] == "control=goldfish.k, metric=memorization/exact_match, max_value=0.05, bounds=[2, 4]"
    budget = text[text.index("MemorizationBudget:"):].splitlines()
    body = [[c.strip() for c in line.strip("|").split("|")] for line in budget[4:-1]]
    assert body == [["start", "2", ""], ["5", "2", "0.0000"], ["10", "4 (weaker)", "0.0000"], ["15", "2 (stronger)", "0.1000"]]
    assert format_budget({"budget": None}) == "" and "MemorizationBudget" not in format_report({"exact_match": 0.0})


def test_docs_use_the_same_epoch_convention():
    docs = (ROOT / "docs" / "ablation.md").read_text()
    assert "after epoch N" in docs and "trainer.current_epoch" in docs


# ---------------------------------------------------------------------------------- item 8


def test_dedup_report_rows():
    report = {
        "goldfish": None, "exact_match": 0.45, "token_match": 0.6, "near_verbatim": 0.5, "val_loss": 2.5,
        "num_probes": 64, "prefix_length": 32, "suffix_length": 32,
        "monitors": [
            {"log_prefix": "memorization", "probe_dataset": None, "num_probes": 64, "prefix_length": 32, "suffix_length": 32},
            {"log_prefix": "memorization_duplicates", "probe_dataset": "duplicated_dataset", "num_probes": 16,
             "prefix_length": 32, "suffix_length": 32},
        ],
        "metrics": {"memorization/exact_match": 0.45, "memorization_duplicates/exact_match": 0.75,
                    "memorization_duplicates/token_match": 0.893, "memorization_duplicates/near_verbatim": 0.75},
        "sections": {"dedup": {"class_path": "antimemo.DedupSampling",
                               "init_args": {"policy": "downweight", "max_copies": 1, "num_samples": 300}}},
    }  # fmt: skip
    rows = _rows(format_report(report))
    assert rows["memorization_duplicates/token_match"] == "0.8930"
    assert rows["memorization_duplicates/exact_match"] == "0.7500"
    assert rows["memorization probes"] == "64 training sequences, 32-token prefix -> 32-token suffix"
    assert rows["memorization_duplicates probes"] == "16 sequences of duplicated_dataset, 32-token prefix -> 32-token suffix"
    assert rows["dedup"] == "policy=downweight, num_samples=300"  # max_copies is the cap policy's knob
    report["sections"]["dedup"]["init_args"].update(policy="cap", max_copies=2, num_samples=None)
    assert _rows(format_report(report))["dedup"] == "policy=cap, max_copies=2"
    report["sections"]["dedup"]["init_args"].update(policy="drop")
    assert _rows(format_report(report))["dedup"] == "policy=drop"


# ---------------------------------------------------------------------------------- item 9


def test_auc_digits_tell_a_near_one_auc_from_one():
    assert format_auc(0.9995) != format_auc(1.0)
    assert format_auc(0.99995) != format_auc(1.0) and float(format_auc(0.99995)) < 1
    cells = [CellStats("k-4", {"goldfish.k": "4"}, 1, 1, {"exact_match": 0.0, "mia_auc": 0.9995, "val_loss": 2.0}),
             CellStats("k-none", {"goldfish.k": "none"}, 1, 1, {"exact_match": 0.5, "mia_auc": 1.0, "val_loss": 1.9})]
    text = render_summary(cells, ["goldfish.k"], budgets=[0.01], title=None)
    assert "| 0.9995 |" in text and "| 1.0000 |" in text


def test_plurals():
    assert _plan_text(2, 2, 1) == "2 runs (2 cells x 1 seed)"
    assert _plan_text(1, 1, 1) == "1 run (1 cell x 1 seed)"
    assert _plan_text(6, 3, 2) == "6 runs (3 cells x 2 seeds)"
    assert plural(1, "seed") == "1 seed" and plural(0, "seed") == "0 seeds"


def test_run_progress_from_metrics_csv_checkpoints_and_config(tmp_path):
    run = Run("k-2", {}, 0, tmp_path / "r", ["--trainer.max_epochs=60", "--trainer.max_epochs=8"])
    assert run_progress(run) is None and progress_postfix([(run, 0.0)]) == "k-2/seed0: starting"
    logs = run.dir / "lightning_logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch,step,train_loss,val_loss\n0,15,2.5,\n1,31,2.3,\n1,31,,2.2\n2,47,2.1,\n")
    assert run_progress(run) == "epoch 3/8"  # 0-based epoch 2 in the CSV = the third epoch; the last max_epochs wins
    (logs / "config.yaml").write_text("trainer:\n  max_epochs: 60\n")
    assert run_progress(run) == "epoch 3/60"  # the child's saved config
    ckpt = logs / "checkpoints"
    ckpt.mkdir()
    (ckpt / "epoch=4-step=79.ckpt").write_text("")
    assert run_progress(run) == "epoch 5/60"
    assert progress_postfix([(run, 0.0)], failed=2) == "failed=2, k-2/seed0: epoch 5/60"
    # files from before the child started (a failed earlier attempt) do not count
    later = time.time() + 100
    assert run_progress(run, since=later) is None


FAKE_EPOCHS = textwrap.dedent(
    """
    import json, os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    logs = os.path.join(args["trainer.default_root_dir"], "lightning_logs", "version_0")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, "metrics.csv"), "w") as f:
        f.write("epoch,step,train_loss\\n0,3,2.0\\n")
        f.flush()
        time.sleep(2.5)
        f.write("1,7,1.5\\n")
        f.flush()
        time.sleep(2.5)
    with open(args["report_path"], "w") as f:
        json.dump({"exact_match": 0.0, "val_loss": 1.0}, f)
    """
)


def test_progress_bar_shows_the_running_child_epoch(tmp_path, capsys):
    script = tmp_path / "fake_fit.py"
    script.write_text(FAKE_EPOCHS)
    run_dir = tmp_path / "abl" / "runs" / "k-2" / "seed0"
    run = Run("k-2", {"goldfish.k": "2"}, 0, run_dir, [
        "--trainer.max_epochs=3", f"--trainer.default_root_dir={run_dir}", f"--report_path={run_dir / PARTIAL_REPORT}"])
    outcome = execute([run], jobs=1, command=[sys.executable, str(script)], threads=1, progress=True)
    assert outcome.finished == 1 and (run_dir / REPORT).is_file()
    err = capsys.readouterr().err
    assert "k-2/seed0: epoch 1/3" in err and "k-2/seed0: epoch 2/3" in err, err
