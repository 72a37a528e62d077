"""``antimemo recursive`` with a diffusion recipe (issue 16, digits): the data mix per generation,
the outputs (FID, Vendi, replica rate), resume, and the refusals."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from antimemo.cli import main
from antimemo.collapse.image_files import ImageFileDataModule, labels_path

REAL_TRAIN, REAL_VAL, SAMPLES = 16, 16, 12
TINY = {
    "seed_everything": 0,
    "trainer": {"max_epochs": 1, "check_val_every_n_epoch": 1, "log_every_n_steps": 1, "enable_checkpointing": True,
                "enable_model_summary": False},
    "model": {"class_path": "antimemo.diffusion.DiffusionModule", "init_args": {
        "image_size": 8, "num_classes": 10, "block_out_channels": [8], "layers_per_block": 1, "norm_num_groups": 4,
        "num_train_timesteps": 20, "num_inference_steps": 4, "lr": 0.002, "seed": 0}},
    "data": {"class_path": "antimemo.diffusion.DigitsDataModule", "init_args": {
        "image_size": 8, "num_train": REAL_TRAIN, "num_val": REAL_VAL, "num_duplicated": 0, "copies": 1,
        "batch_size": 8, "seed": 0}},
    "monitor": None,
    "replica_monitor": {"num_samples": 8, "every_n_epochs": 1, "batch_size": 8, "seed": 0, "threshold": 0.95,
                        "extra_similarities": ["carlini"], "fid_real": "val", "num_pictures": 0,
                        "fid_feature": {"class_path": "antimemo.diffusion.DigitsFeatures",
                                        "init_args": {"image_size": 8, "num_features": 8, "epochs": 1, "seed": 0}}},
    "recursive": {"samples": SAMPLES},
}


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("recursive_diffusion")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = root / "out"
    argv = ["recursive", "--config", str(config), "--generations", "3", "--mix", "replace,accumulate", "--out",
            str(out), "--no_progress", "--threads", "1"]
    assert main(argv) == 0
    return config, out, argv


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "generations.csv", newline="") as f:
        return list(csv.DictReader(f))


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(path, allow_pickle=False), np.load(labels_path(path), allow_pickle=False)


def test_rows_metrics_and_outputs(loop):
    _, out, _ = loop
    rows = _rows(out)
    assert [(r["generation"], r["mix"]) for r in rows] == [
        ("0", "replace"), ("0", "accumulate"), ("1", "replace"), ("1", "accumulate"), ("2", "replace"),
        ("2", "accumulate")]
    assert "synthetic_flagged" not in rows[0] and "diversity/distinct_2" not in rows[0]
    for r in rows:
        fid, vendi, rate = float(r["replication/fid"]), float(r["replication/vendi"]), float(r["replication/rate"])
        assert math.isfinite(fid) and fid > 0
        assert 1 <= vendi <= 8  # 8 samples: between one mode and all distinct
        assert 0 <= rate <= 1 and float(r["val_loss"]) > 0
    summary = (out / "summary.md").read_text()
    assert "| replace | 2 |" in summary and "| accumulate | 2 |" in summary and "replication/fid" in summary
    assert "FID against the REAL held-out images" in summary
    assert (out / "collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_generation_trains_on_the_right_mix(loop):
    _, out, _ = loop
    real_x, real_y = _load(out / "data" / "real_train.npy")
    val_x, _ = _load(out / "data" / "real_val.npy")
    assert real_x.shape == (REAL_TRAIN, 1, 8, 8) and val_x.shape[0] == REAL_VAL and real_x.dtype == np.float32
    runs = out / "runs"
    syn = {(mix, g): _load(runs / mix / "seed0" / "synthetic" / f"gen{g}.npy")
           for mix in ("replace", "accumulate") for g in (1, 2)}
    for (mix, g), (x, y) in syn.items():
        assert x.shape == (SAMPLES, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
        assert y.tolist() == [i % 10 for i in range(SAMPLES)]  # class-conditional draws, labels i % 10
    # generation 1 of both mixes samples the shared generation-0 checkpoint with the same seeds
    assert np.array_equal(syn[("replace", 1)][0], syn[("accumulate", 1)][0])
    # ... and generation 2 samples each mix's own generation-1 model
    assert not np.array_equal(syn[("replace", 2)][0], syn[("accumulate", 2)][0])

    def train(mix, g):
        return _load(runs / mix / "seed0" / f"gen{g}" / "train.npy")

    assert all(np.array_equal(a, b) for a, b in zip(_load(runs / "gen0" / "seed0" / "train.npy"), (real_x, real_y)))
    for g in (1, 2):  # replace: the previous model's samples only, no real image
        x, y = train("replace", g)
        assert np.array_equal(x, syn[("replace", g)][0]) and np.array_equal(y, syn[("replace", g)][1])
        assert not any((x == r).all(axis=(1, 2, 3)).any() for r in real_x)
    for g in (1, 2):  # accumulate: all real, then every synthetic set so far, in order
        x, y = train("accumulate", g)
        parts = [(real_x, real_y), *(syn[("accumulate", k)] for k in range(1, g + 1))]
        assert np.array_equal(x, np.concatenate([p[0] for p in parts]))
        assert np.array_equal(y, np.concatenate([p[1] for p in parts]))
    rows = {(r["generation"], r["mix"]): r for r in _rows(out)}
    assert [rows[("2", "replace")][k] for k in ("train_items", "real_items", "synthetic_items")] == ["12", "0", "12"]
    assert [rows[("2", "accumulate")][k] for k in ("train_items", "real_items", "synthetic_items")] == ["40", "16", "24"]
    # each fit read that file and validated on the REAL held-out images
    fit = yaml.safe_load((runs / "accumulate" / "seed0" / "gen2" / "fit.yaml").read_text())
    assert fit["data"] == {"class_path": "antimemo.collapse.image_files.ImageFileDataModule", "init_args": {
        "train": str(runs / "accumulate" / "seed0" / "gen2" / "train.npy"), "val": str(out / "data" / "real_val.npy"),
        "batch_size": 8}}
    # so generation 2 of accumulate ran 40 / 8 = 5 steps, replace 12 / 8 -> 2
    import json

    assert json.loads((runs / "accumulate" / "seed0" / "gen2" / "report.json").read_text())["global_step"] == 5
    assert json.loads((runs / "replace" / "seed0" / "gen2" / "report.json").read_text())["global_step"] == 2


def test_rerun_does_not_retrain_or_resample(loop):
    _, out, argv = loop
    files = [*out.glob("runs/**/report.json"), *out.glob("runs/**/*.ckpt"), *out.glob("runs/**/synthetic/*.npy"),
             *out.glob("runs/**/train.npy")]
    assert len(list(out.glob("runs/**/report.json"))) == 5  # gen0 shared, 2 x 2 recursive generations
    before = {p: p.stat().st_mtime_ns for p in files}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(_rows(out)) == 6


def _refused(tmp_path, capsys, config: dict, *extra: str) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["recursive", "--config", str(path), "--generations", "2", "--out", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not (tmp_path / "out").exists()
    return err[0]


def test_filter_is_refused_for_a_diffusion_recipe(tmp_path, capsys):
    line = _refused(tmp_path, capsys, TINY, "--mix", "replace,filter")
    assert "--mix filter" in line and str(tmp_path / "tiny.yaml") in line and "DiffusionModule" in line
    assert "--mix replace,accumulate" in line


def test_lm_settings_and_a_missing_replica_monitor_are_refused(tmp_path, capsys):
    line = _refused(tmp_path, capsys, TINY, "--mix", "replace", "--delta", "2")
    assert "--delta" in line and "LM recipes only" in line
    no_monitor = copy.deepcopy(TINY)
    no_monitor["replica_monitor"] = None
    line = _refused(tmp_path, capsys, no_monitor, "--mix", "replace")
    assert line.startswith("antimemo recursive: error: replica_monitor:") and "fid_feature" in line


def test_image_files_are_checked(tmp_path):
    np.save(tmp_path / "x.npy", np.full((2, 1, 4, 4), 2.0, np.float32))
    np.save(tmp_path / "x_labels.npy", np.zeros(2, np.int64))
    np.save(tmp_path / "v.npy", np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"train: .*x\.npy' has values outside \[0, 1\]"):
        ImageFileDataModule(str(tmp_path / "x.npy"), str(tmp_path / "v.npy"))
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(FileNotFoundError, match=r"val \(labels\): .*v_labels\.npy' does not exist"):
        ImageFileDataModule(str(tmp_path / "x.npy"), str(tmp_path / "v.npy"))
    np.save(tmp_path / "v_labels.npy", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"expected 2 integer class labels"):
        ImageFileDataModule(str(tmp_path / "x.npy"), str(tmp_path / "v.npy"))
    np.save(tmp_path / "v_labels.npy", np.array([object()] * 2, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cannot be read without pickle"):
        ImageFileDataModule(str(tmp_path / "x.npy"), str(tmp_path / "v.npy"))


def test_shipped_recipe_plans_an_image_loop_that_measures_the_final_model(tmp_path):
    from antimemo.collapse.cli import _parser, build_plan
    from antimemo.collapse.loop import generation_config

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "diffusion_collapse.yaml")
    plan = build_plan(_parser().parse_args(["--config", recipe, "--generations", "3", "--mix", "replace,accumulate",
                                            "--out", str(tmp_path / "out")]))
    assert plan.modality == "images" and plan.settings["samples"] is None
    # without --mix an image recipe runs replace and accumulate (an LM recipe: all three)
    default = build_plan(_parser().parse_args(["--config", recipe, "--generations", "2", "--out", str(tmp_path / "o")]))
    assert default.mixes == ["replace", "accumulate"]
    lm = str(Path(recipe).with_name("lm_collapse.yaml"))
    assert build_plan(_parser().parse_args(["--config", lm, "--generations", "2", "--out", str(tmp_path / "o")])).mixes == [
        "replace", "accumulate", "filter"]
    cfg = generation_config(plan, "replace", 1, 2, tmp_path / "train.npy")
    assert cfg["data"]["class_path"] == "antimemo.collapse.image_files.ImageFileDataModule"
    assert cfg["seed_everything"] == cfg["model"]["init_args"]["seed"] == cfg["replica_monitor"]["seed"] == 1
    assert cfg["replica_monitor"]["every_n_epochs"] == cfg["trainer"]["max_epochs"]  # the final model is measured
    assert cfg["replica_monitor"]["fid_real"] == "val" and "recursive" not in cfg
    assert cfg["trainer"]["default_root_dir"] == str(tmp_path / "out" / "runs" / "replace" / "seed1" / "gen2")
