"""The ``antimemo`` CLI: verbs, recipe parsing, goldfish on/off, a tiny fit with its report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from antimemo.cli import VERBS, main
from antimemo.report import format_report

# In-process calls pass args= while sys.argv holds pytest's own arguments; Lightning warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "lm_goldfish.yaml")

# Overrides that make the recipe tiny (a few seconds on 2 CPU cores).
TINY = [
    "--model.hidden_size", "32",
    "--model.num_layers", "1",
    "--model.intermediate_size", "64",
    "--data.num_train", "16",
    "--data.num_holdout", "8",
    "--data.batch_size", "8",
    "--trainer.max_epochs", "2",
    "--trainer.check_val_every_n_epoch", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_checkpointing", "false",
    "--trainer.log_every_n_steps", "1",
    "--monitor.every_n_epochs", "2",
    "--monitor.num_probes", "8",
]  # fmt: skip


def _callbacks(cli):
    return {type(cb).__name__: cb for cb in cli.trainer.callbacks}


def _parse(tmp_path, *extra):
    from antimemo.cli import AntimemoCLI

    return AntimemoCLI(args=["--config", RECIPE, "--trainer.default_root_dir", str(tmp_path), *extra], run=False)


# ----------------------------------------------------------------------------- verbs


def test_help_lists_the_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: antimemo <verb>" in out
    for verb in ("fit", "validate"):
        assert f"  {verb}" in out
    assert set(VERBS) >= {"fit", "validate"}


def test_no_args_and_unknown_verb_exit_2(capsys):
    assert main([]) == 2
    assert "usage: antimemo" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'frobnicate'" in err and "fit" in err


def test_help_does_not_import_lightning():
    code = (
        "import sys\nfrom antimemo.cli import main\nmain(['--help'])\n"
        "print('LOADED' if any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules) else 'CLEAN')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "CLEAN"


# ----------------------------------------------------------------------------- parsing the recipe


def test_recipe_yaml_parses_with_goldfish_and_monitor(tmp_path):
    cli = _parse(tmp_path)
    cbs = _callbacks(cli)
    gf, mon = cbs["GoldfishTokenDropout"], cbs["MemorizationMonitor"]
    assert (gf.k, gf.h, gf.seed) == (4, 13, 0)
    assert mon.holdout == "val" and mon.num_probes == 64
    assert (mon.prefix_length, mon.suffix_length) == (32, 32)
    assert cli.model.model.config.hidden_size == 128
    assert cli.datamodule.seq_len == 64 and cli.datamodule.corpus == "pydoc_topics"


def test_goldfish_null_disables_the_callback(tmp_path):
    cbs = _callbacks(_parse(tmp_path, "--goldfish", "null"))
    assert "GoldfishTokenDropout" not in cbs
    assert "MemorizationMonitor" in cbs


def test_goldfish_and_monitor_flags(tmp_path):
    cbs = _callbacks(_parse(tmp_path, "--goldfish.k", "8", "--goldfish.h", "7"))
    assert (cbs["GoldfishTokenDropout"].k, cbs["GoldfishTokenDropout"].h) == (8, 7)
    cbs = _callbacks(_parse(tmp_path, "--monitor", "null"))
    assert "MemorizationMonitor" not in cbs and "GoldfishTokenDropout" in cbs


@pytest.mark.parametrize(
    "flag, value, cls, attr, expected",
    [
        ("--dedup.policy", "drop", "DedupSampling", "policy", "drop"),
        ("--dp.noise_multiplier", "0.5", "DifferentialPrivacy", "noise_multiplier", 0.5),
        ("--loss_floor.floor", "1.5", "LossFloor", "floor", 1.5),
        ("--loss_truncation.c", "0.2", "LossTruncation", "c", 0.2),
        ("--spectral_norm.lam", "0.05", "SpectralNormPenalty", "lam", 0.05),
        ("--example_tied_dropout.p_mem", "0.3", "ExampleTiedDropout", "p_mem", 0.3),
    ],
)
def test_every_mitigation_section_is_off_by_default_and_one_flag_turns_it_on(tmp_path, flag, value, cls, attr, expected):
    from antimemo.cli import CALLBACK_SECTIONS

    section = flag[2:].split(".")[0]
    assert CALLBACK_SECTIONS[section].endswith("." + cls)
    assert cls not in _callbacks(_parse(tmp_path))
    cb = _callbacks(_parse(tmp_path, flag, value))[cls]
    assert getattr(cb, attr) == expected
    assert cls not in _callbacks(_parse(tmp_path, flag, value, f"--{section}", "null"))


def test_model_and_data_sections_take_a_class_path(tmp_path):
    from antimemo.lm.data import TextDataModule

    class_path = f"{TextDataModule.__module__}.{TextDataModule.__qualname__}"
    cli = _parse(tmp_path, "--data", class_path, "--data.num_train", "24", "--model.lr", "0.01")
    assert isinstance(cli.datamodule, TextDataModule) and cli.datamodule.num_train == 24
    assert cli.model.hparams.lr == 0.01
    with pytest.raises(SystemExit):
        _parse(tmp_path, "--model", "antimemo.no_such.Module")


def test_bad_override_is_rejected_with_the_callbacks_message(tmp_path):
    with pytest.raises(ValueError, match="k must be an integer >= 2, got 1"):
        _parse(tmp_path, "--goldfish.k", "1")


def test_recipe_is_self_consistent():
    cfg = yaml.safe_load(Path(RECIPE).read_text())
    mon, data, trainer = cfg["monitor"], cfg["data"], cfg["trainer"]
    # probes are whole training sequences: seq_len must hold prefix + suffix
    assert data["seq_len"] >= mon["prefix_length"] + mon["suffix_length"]
    # the final epoch must be validated and measured, so the report describes the final model
    assert trainer["max_epochs"] % trainer["check_val_every_n_epoch"] == 0
    assert trainer["max_epochs"] % mon["every_n_epochs"] == 0
    assert cfg["goldfish"] == {"k": 4, "h": 13, "seed": 0}


# ----------------------------------------------------------------------------- tiny fits


def _single_report(root: Path) -> dict:
    reports = list(root.rglob("report.json"))
    assert len(reports) == 1, reports
    return json.loads(reports[0].read_text())


def test_tiny_fit_prints_the_table_and_writes_report_json(tmp_path, capsys):
    assert main(["fit", "--config", RECIPE, *TINY, "--trainer.default_root_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("goldfish", "k=4, h=13", "exact match", "token match", "near-verbatim", "held-out loss (val_loss)"):
        assert row in out
    report = _single_report(tmp_path)
    assert report["goldfish"] == {"k": 4, "h": 13, "seed": 0}
    for key in ("exact_match", "token_match", "near_verbatim"):
        assert 0.0 <= report[key] <= 1.0
    assert math.isfinite(report["val_loss"]) and report["best_val_loss"] <= report["val_loss"] + 1e-9
    assert report["global_step"] == 4 and report["epochs"] == 2  # 16 sequences / batch 8, 2 epochs
    assert report["memorization_after_epochs"] == 2 and report["num_probes"] == 8
    assert report["train_wall_time_s"] > 0
    assert "memorization/mia/loss/auc" in report["metrics"]
    assert report["report_path"].endswith("report.json") and str(tmp_path) in report["report_path"]
    assert report["environment"]["torch"]


def test_tiny_fit_without_goldfish_and_custom_report_path(tmp_path, capsys):
    target = tmp_path / "out" / "baseline.json"
    args = ["fit", "--config", RECIPE, *TINY, "--goldfish", "null"]
    args += ["--trainer.default_root_dir", str(tmp_path / "run"), "--report_path", str(target)]
    assert main(args) == 0
    assert "| goldfish" in capsys.readouterr().out
    report = json.loads(target.read_text())
    assert report["goldfish"] is None
    assert report["sections"]["goldfish"] is None and report["sections"]["dp"] is None
    assert report["sections"]["monitor"]["init_args"]["num_probes"] == 8
    assert report["command"].startswith("antimemo fit --config")


def test_format_report_rows():
    table = format_report(
        {
            "goldfish": {"k": 4, "h": 13, "seed": 0},
            "exact_match": 0.015625,
            "token_match": 0.25,
            "near_verbatim": None,
            "val_loss": 2.5,
            "num_probes": 64,
            "prefix_length": 32,
            "suffix_length": 32,
        }
    )
    lines = table.splitlines()
    assert lines[0] == lines[2] == lines[-1] and set(lines[0]) <= {"+", "-"}
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[3:-1]}
    assert rows["goldfish"] == "k=4, h=13, seed=0"
    assert rows["exact match"] == "0.0156"  # 1/64 rounded to 4 places
    assert rows["near-verbatim (edit >= 0.9)"] == "n/a"
    assert rows["held-out loss (val_loss)"] == "2.5000"
    assert rows["probes"] == "64 training sequences, 32-token prefix -> 32-token suffix"


def test_format_report_warns_when_memorization_is_not_from_the_final_epoch():
    table = format_report({"goldfish": None, "exact_match": 0.5, "memorization_after_epochs": 50, "epochs": 60})
    assert "WARNING" in table and "epoch 50 of 60" in table
    assert "WARNING" not in format_report({"goldfish": None, "memorization_after_epochs": 60, "epochs": 60})


def test_format_report_shows_enabled_mitigations_and_epsilon():
    report = {
        "goldfish": None,
        "sections": {
            "goldfish": None,
            "dp": {"class_path": "antimemo.DifferentialPrivacy", "init_args": {"noise_multiplier": 0.5, "target_epsilon": None}},
            "loss_floor": None,
            "monitor": {"class_path": "antimemo.MemorizationMonitor", "init_args": {"num_probes": 8}},
        },
        "metrics": {"dp/epsilon": 41.234},
    }
    out = format_report(report)
    assert "| dp " in out and "noise_multiplier=0.5" in out and "target_epsilon" not in out
    assert "41.234" in out and "loss_floor" not in out and "num_probes=8" not in out


def test_format_report_shows_a_second_monitor():
    report = {
        "goldfish": None,
        "sections": {"duplicates_monitor": {"class_path": "antimemo.MemorizationMonitor", "init_args": {}}},
        "metrics": {"memorization_duplicates/exact_match": 0.75, "memorization_duplicates/near_verbatim": 0.8125},
    }
    out = format_report(report)
    assert "memorization_duplicates/exact_match" in out and "0.7500" in out and "0.8125" in out
    assert "| duplicates_monitor" not in out


def test_a_section_whose_extra_is_missing_fails_only_when_used(tmp_path, monkeypatch):
    from antimemo import cli

    monkeypatch.setitem(cli.CALLBACK_SECTIONS, "fancy", "antimemo_no_such_extra.Fancy")
    assert "GoldfishTokenDropout" in _callbacks(_parse(tmp_path))  # unused: the recipe still runs
    with pytest.raises(ImportError, match="turns on the 'fancy' section, but antimemo_no_such_extra.Fancy cannot be imported"):
        _parse(tmp_path, "--fancy", '{"x": 1}')
