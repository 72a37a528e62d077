"""Tiny end-to-end run of recipes/diffusion_ddpm.yaml through the antimemo CLI on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from antimemo.cli import CALLBACK_SECTIONS, main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "diffusion_ddpm.yaml"


def test_recipe_sections_are_registered_and_point_at_diffusion_classes():
    cfg = yaml.safe_load(RECIPE.read_text())
    for name in ("replica_monitor", "conditioning_noise", "label_randomization", "replica_penalty"):
        assert name in CALLBACK_SECTIONS
    assert cfg["model"]["class_path"] == "antimemo.diffusion.DiffusionModule"
    assert cfg["data"]["class_path"] == "antimemo.diffusion.DigitsDataModule"
    assert cfg["monitor"] is None and cfg["replica_monitor"]["every_n_epochs"] == cfg["trainer"]["check_val_every_n_epoch"]


def test_tiny_recipe_run_reports_replication(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    args = [
        "fit", "--config", str(RECIPE),
        "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "false",
        "--model.init_args.image_size", "8", "--model.init_args.num_inference_steps", "3",
        "--data.init_args.image_size", "8", "--data.init_args.num_train", "24", "--data.init_args.num_val", "16",
        "--data.init_args.copies", "3",
        "--replica_monitor.every_n_epochs", "1", "--replica_monitor.num_samples", "8",
        "--replica_monitor.save_dir", str(tmp_path / "pics"),
        "--replica_monitor.fid_feature.init_args.image_size", "8", "--replica_monitor.fid_feature.init_args.epochs", "1",
        "--conditioning_noise.std", "0.5", "--label_randomization.p", "0.1", "--replica_penalty.strength", "0.1",
        "--report_path", str(report_path),
    ]
    assert main(args) == 0
    report = json.loads(report_path.read_text())
    metrics = report["metrics"]
    for key in ("rate", "p95", "carlini/rate", "fid", "vendi", "dup_match_fraction"):
        assert f"replication/{key}" in metrics, key
    assert 0.0 <= metrics["replication/rate"] <= 1.0
    assert "train/replica_penalty" in metrics
    assert report["sections"]["conditioning_noise"]["init_args"]["std"] == 0.5
    assert (tmp_path / "pics" / "replicas_epoch000.png").exists()
    out = capsys.readouterr().out
    assert "replication/rate" in out and "replication/fid" in out
