"""Bad and hostile inputs to the ``antimemo`` verbs and recipe files (issue 14, "Fail closed").

Every case asserts the exit status (2: a configuration error, printed as one line on stderr) and
that the message names the argument. Hostile recipes name a callable that would create a sentinel
file in ``tmp_path``; the tests assert that the file was never created.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

from antimemo.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "lm_goldfish.yaml")
SENTINEL = "PWNED"


def _popen(tmp_path: Path) -> dict:
    """A hostile ``class_path`` mapping: building it would create ``tmp_path/PWNED``."""
    return {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(tmp_path / SENTINEL)]}}


def _yaml(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def _error_lines(err: str, verb: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"antimemo {verb}: error:") or line.startswith("antimemo ablate:")]


# ----------------------------------------------------------------------------- the table

# (id, verb, argv builder (tmp_path -> argv after the verb), regex the error line must match)
CASES = [
    # fit: flags and values
    ("fit-goldfish-k-1", "fit", lambda t: ["--config", RECIPE, "--goldfish.k", "1"],
     r"--goldfish: k must be an integer >= 2, got 1"),
    ("fit-unknown-goldfish-arg", "fit", lambda t: ["--config", RECIPE, "--goldfish.kk", "1"],
     r"--goldfish: Option 'kk' is not accepted"),
    ("fit-bad-int", "fit", lambda t: ["--config", RECIPE, "--trainer.max_epochs", "abc"],
     r"--trainer\.max_epochs: .*int.*abc"),
    ("fit-bad-float", "fit", lambda t: ["--config", RECIPE, "--model.lr", "x"], r"--model\.lr: .*float.*x"),
    ("fit-unknown-flag", "fit", lambda t: ["--config", RECIPE, "--frobnicate", "1"],
     r"unrecognized arguments: --frobnicate"),
    ("fit-missing-config", "fit", lambda t: ["--config", str(t / "nope.yaml")], r"--config: File does not exist: .*nope\.yaml"),
    ("fit-unknown-section", "fit", lambda t: ["--config", RECIPE, "--config", _yaml(t, "s.yaml", {"frobnicate": {"k": 1}})],
     r"frobnicate"),
    # fit: hostile class paths and callables, on the command line and in recipe files
    ("fit-data-popen-flag", "fit", lambda t: ["--config", RECIPE, "--data", "subprocess.Popen"],
     r"--data: subprocess\.Popen is refused"),
    ("fit-data-popen-recipe", "fit", lambda t: ["--config", RECIPE, "--config", _yaml(t, "d.yaml", {"data": _popen(t)})],
     r"--data: subprocess\.Popen is refused"),
    ("fit-goldfish-popen-recipe", "fit",
     lambda t: ["--config", RECIPE, "--config", _yaml(t, "g.yaml", {"goldfish": _popen(t)})],
     r"--goldfish: subprocess\.Popen is refused"),
    ("fit-trainer-callback-popen", "fit",
     lambda t: ["--config", RECIPE, "--config", _yaml(t, "c.yaml", {"trainer": {"callbacks": [_popen(t)]}})],
     r"--trainer\.callbacks: subprocess\.Popen is refused"),
    ("fit-monitor-decode-os-system", "fit",
     lambda t: ["--config", RECIPE, "--config", _yaml(t, "m.yaml", {"monitor": {"decode": "os.system"}})],
     r"--monitor\.decode: os\.system is refused"),
    ("fit-monitor-decode-flag", "fit", lambda t: ["--config", RECIPE, "--monitor.decode", "subprocess.getoutput"],
     r"--monitor\.decode: subprocess\.getoutput is refused"),
    ("fit-monitor-holdout-popen", "fit",
     lambda t: ["--config", RECIPE, "--monitor.holdout", json.dumps(_popen(t))], r"--monitor: subprocess\.Popen is refused"),
    ("validate-data-popen", "validate", lambda t: ["--config", RECIPE, "--data", "subprocess.Popen"],
     r"--data: subprocess\.Popen is refused"),
    # dedup
    ("dedup-popen-recipe", "dedup", lambda t: [_yaml(t, "r.yaml", {"data": _popen(t)}), "--out", str(t / "i.npz")],
     r"data\.class_path: 'subprocess\.Popen' is refused"),
    ("dedup-not-a-datamodule", "dedup",
     lambda t: [_yaml(t, "r.yaml", {"data": {"class_path": "antimemo.lm.module.CausalLMModule"}}), "--out", str(t / "i.npz")],
     r"data\.class_path: 'antimemo\.lm\.module\.CausalLMModule' is not a subclass of LightningDataModule"),
    ("dedup-a-function", "dedup",
     lambda t: [_yaml(t, "r.yaml", {"data": {"class_path": "antimemo.lm.corpus.byte_decode"}}), "--out", str(t / "i.npz")],
     r"data\.class_path: 'antimemo\.lm\.corpus\.byte_decode' is a function, not a class"),
    ("dedup-reexported-stdlib", "dedup",
     lambda t: [_yaml(t, "r.yaml", {"data": {"class_path": "antimemo.cli.sys.exit"}}), "--out", str(t / "i.npz")],
     r"data\.class_path: 'antimemo\.cli\.sys\.exit'"),
    ("dedup-no-data-section", "dedup", lambda t: [_yaml(t, "r.yaml", {"model": {}}), "--out", str(t / "i.npz")],
     r"has no 'data:' section"),
    ("dedup-out-is-a-directory", "dedup", lambda t: [_txt(t), "--out", str(t)], r"--out '.*' is a directory; .*--out '.*index\.npz'"),
    ("dedup-missing-source", "dedup", lambda t: [str(t / "nope.txt"), "--out", str(t / "i.npz")],
     r"no such file or recipe: '.*nope\.txt'"),
    ("dedup-bad-threshold", "dedup", lambda t: [_txt(t), "--out", str(t / "i.npz"), "--threshold", "abc"],
     r"argument --threshold: invalid float value: 'abc'"),
    # ablate
    ("ablate-grid-no-equals", "ablate", lambda t: ["--config", RECIPE, "--grid", "goldfish.k", "--out", str(t / "a")],
     r"--grid 'goldfish\.k': expected KEY=V1,V2"),
    ("ablate-grid-empty-value", "ablate", lambda t: ["--config", RECIPE, "--grid", "goldfish.k=2,,4", "--out", str(t / "a")],
     r"--grid 'goldfish\.k=2,,4': key 'goldfish\.k' has an empty value"),
    ("ablate-grid-bad-key", "ablate", lambda t: ["--config", RECIPE, "--grid", "goldfish.k;rm=2", "--out", str(t / "a")],
     r"--grid 'goldfish\.k;rm=2': key 'goldfish\.k;rm' is not a dotted config key"),
    ("ablate-grid-class-path-value", "ablate",
     lambda t: ["--config", RECIPE, "--grid", "goldfish=subprocess.Popen", "--out", str(t / "a"), "--dry_run"],
     r"--grid goldfish=subprocess\.Popen: a bare callback section takes 'on' or 'none'"),
    ("ablate-grid-rejected-value", "ablate",
     lambda t: ["--config", RECIPE, "--grid", "goldfish.k=1", "--out", str(t / "a"), "--dry_run"],
     r"--grid goldfish\.k=1: .*k must be an integer >= 2, got 1"),
    ("ablate-seeds-0", "ablate", lambda t: ["--config", RECIPE, "--seeds", "0", "--out", str(t / "a"), "--dry_run"],
     r"--seeds must be an integer >= 1, got 0"),
    ("ablate-bad-jobs", "ablate", lambda t: ["--config", RECIPE, "--jobs", "x", "--out", str(t / "a")],
     r"argument --jobs: invalid int value: 'x'"),
    ("ablate-missing-out", "ablate", lambda t: ["--config", RECIPE], r"the following arguments are required: --out"),
    ("ablate-merge-one-dir", "ablate", lambda t: ["--merge", str(t / "a"), "--out", str(t / "all")],
     r"--merge needs at least two ablation directories"),
    ("ablate-report-only-nothing", "ablate", lambda t: ["--report_only", "--out", str(t / "empty")],
     r"--report_only --out '.*empty': no ablation\.json"),
    ("ablate-report-only-bad-manifest", "ablate", lambda t: ["--report_only", "--out", _manifest(t, {"runs": [{"cell": "c"}]})],
     r"ablation\.json': runs\[0\]: 'dir' must be a str"),
]  # fmt: skip


def _txt(tmp_path: Path) -> str:
    path = tmp_path / "t.txt"
    path.write_text("a b c\na b c\nd e f\n")
    return str(path)


def _manifest(tmp_path: Path, data: dict) -> str:
    out = tmp_path / "abl"
    out.mkdir(exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(data))
    return str(out)


@pytest.mark.parametrize("verb, build, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_argument_and_exit_2(tmp_path, capsys, verb, build, pattern):
    argv = [verb, *build(tmp_path)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside the verb
        code = exc.code
    # (a Lightning log handler left on an earlier test's closed stream reports a "Logging error")
    err = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", capsys.readouterr().err, flags=re.S)
    assert code == 2, err
    lines = _error_lines(err, verb)
    assert len(lines) == 1, err  # one line, not a traceback
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / SENTINEL).exists()


def test_the_table_has_at_least_15_cases():
    assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- the traceback switch


def test_debug_env_var_keeps_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTIMEMO_DEBUG", "1")
    with pytest.raises(ValueError, match="k must be an integer >= 2, got 1"):
        main(["fit", "--config", RECIPE, "--goldfish.k", "1"])


def test_debug_flag_anywhere_before_double_dash(tmp_path):
    with pytest.raises(ValueError, match=r"data\.class_path: 'subprocess\.Popen' is refused"):
        main(["dedup", "--debug", _yaml(tmp_path, "r.yaml", {"data": _popen(tmp_path)}), "--out", str(tmp_path / "i.npz")])
    assert not (tmp_path / SENTINEL).exists()
    with pytest.raises(ValueError, match=r"--grid 'goldfish\.k': expected KEY=V1,V2"):
        main(["--debug", "ablate", "--config", RECIPE, "--grid", "goldfish.k", "--out", str(tmp_path / "a")])
    assert "ANTIMEMO_DEBUG" not in os.environ  # --debug does not leak into the rest of the process


def test_console_script_prints_one_line_and_debug_prints_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "antimemo.cli", "fit", "--config", RECIPE, "--goldfish.k", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ANTIMEMO_DEBUG", None)
    plain = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert plain.returncode == 2, plain.stderr
    lines = [line for line in plain.stderr.splitlines() if line.strip()]
    assert len(lines) < 5, plain.stderr
    assert any(line.startswith("antimemo fit: error: --goldfish: k must be an integer >= 2, got 1") for line in lines)
    assert "Traceback" not in plain.stderr and "--debug" in plain.stderr
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert debug.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in debug.stderr and "k must be an integer >= 2" in debug.stderr


# ----------------------------------------------------------------------------- other string -> callable places


def test_audit_config_refuses_callables_and_class_paths_of_the_standard_library():
    """The check applied to the parsed config before anything is built (whatever jsonargparse's version)."""
    from antimemo._fit_cli import audit_config

    audit_config(Namespace(model=Namespace(class_path="antimemo.lm.CausalLMModule"), monitor=None))
    with pytest.raises(ValueError, match=r"monitor\.init_args\.decode: '(posix|os)\.system' is refused"):
        audit_config(Namespace(monitor=Namespace(class_path="antimemo.MemorizationMonitor",
                                                 init_args=Namespace(decode=os.system))))
    with pytest.raises(ValueError, match=r"trainer\.callbacks\.0\.class_path: 'subprocess\.Popen' is refused"):
        audit_config({"trainer": {"callbacks": [{"class_path": "subprocess.Popen"}]}})
    with pytest.raises(ValueError, match=r"data\.init_args\.factory: 'builtins\.eval' is refused"):
        audit_config({"data": {"init_args": {"factory": eval}}})


def _grid_parse(tmp_path: Path, class_path: str):
    """An injected ``antimemo fit`` parser whose goldfish section names ``class_path``."""

    def parse(args):
        goldfish = Namespace(class_path=class_path, init_args=Namespace(k=2, args=["touch", str(tmp_path / SENTINEL)]))
        return Namespace(seed_everything=0, goldfish=goldfish, trainer=Namespace(max_epochs=1))

    return parse


@pytest.mark.parametrize(
    "class_path, pattern",
    [
        ("subprocess.Popen", r"--grid goldfish\.k=2: goldfish\.class_path: 'subprocess\.Popen' is refused"),
        ("antimemo.lm.data.TextDataModule",
         r"--grid goldfish\.k=2: goldfish\.class_path 'antimemo\.lm\.data\.TextDataModule' is not a subclass of "
         r"antimemo\.callbacks\.goldfish\.GoldfishTokenDropout"),
    ],
)
def test_grid_values_never_build_a_class_outside_the_section(tmp_path, class_path, pattern):
    from antimemo.ablate.grid import parse_grid, validate_grid

    sections = {"goldfish": "antimemo.callbacks.goldfish.GoldfishTokenDropout"}
    with pytest.raises(ValueError, match=pattern):
        validate_grid(RECIPE, parse_grid(["goldfish.k=2"]), sections=sections, parse=_grid_parse(tmp_path, class_path))
    assert not (tmp_path / SENTINEL).exists()


def test_a_manifest_is_data_only(tmp_path, capsys):
    """Fields naming commands or class paths in ablation.json are never executed or imported."""
    from antimemo.ablate.collect import read_csv

    out = tmp_path / "abl"
    run_dir = out / "runs" / "c" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps({"exact_match": 0.5, "val_loss": 1.0}))
    touch = ["touch", str(tmp_path / SENTINEL)]
    manifest = {
        "config": ["r.yaml"], "grid": [["goldfish.k", ["4"]]], "seeds": 1, "command": touch,
        "class_path": "subprocess.Popen", "base_overrides": ["--data=subprocess.Popen"],
        "runs": [{"cell": "c", "assignment": {"goldfish.k": "4"}, "seed": 0, "dir": str(run_dir),
                  "args": ["--data", json.dumps(_popen(tmp_path))], "command": touch}],
    }  # fmt: skip
    (out / "ablation.json").write_text(json.dumps(manifest))
    assert main(["ablate", "--report_only", "--out", str(out)]) == 0
    assert read_csv(out / "results.csv")[0]["exact_match"] == "0.5"
    assert not (tmp_path / SENTINEL).exists()
    # --merge reads the sources' manifests the same way: a malformed one is refused, naming it
    other = tmp_path / "other"
    other.mkdir()
    (other / "ablation.json").write_text(json.dumps({"runs": [{"cell": "d", "assignment": {}, "seed": "0; touch x",
                                                                 "dir": str(run_dir), "args": []}]}))
    assert main(["ablate", "--merge", str(out), str(other), "--out", str(tmp_path / "all")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"other/ablation\.json': runs\[0\]: 'seed' must be an integer, got '0; touch x'", err), err
    assert not (tmp_path / "all" / "ablation.json").exists()


def test_import_policy_allows_the_packages_recipes_name():
    from antimemo.sections import CALLBACK_SECTIONS, DEFAULT_DATA_CLASS, DEFAULT_MODEL_CLASS, refused_import_path

    for path in [*CALLBACK_SECTIONS.values(), DEFAULT_DATA_CLASS, DEFAULT_MODEL_CLASS,
                 "antimemo.lm.corpus.byte_decode", "torch.optim.AdamW", "lightning.pytorch.loggers.CSVLogger",
                 "my_pkg.data.MyData"]:  # fmt: skip
        assert refused_import_path(path) is None, path
    for path in ("os.system", "subprocess.Popen", "builtins.eval", "shutil.rmtree", "pty.spawn", "importlib.import_module",
                 "pickle.loads", "__main__.x", "sys.exit", "not a path", "x"):  # fmt: skip
        assert refused_import_path(path) is not None, path
