"""``antimemo ablate`` runner: plan, resume, failures, Ctrl-C, results.csv / summary.md / pareto.png,
with a fake training command (fast), and one real ablation of two tiny ``antimemo fit`` runs."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from jsonargparse import Namespace

from antimemo.ablate.cli import build_parser, run
from antimemo.ablate.collect import read_csv
from antimemo.ablate.runner import Run, execute, load_manifest, plan_runs
from antimemo.ablate.grid import parse_grid

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "lm_goldfish.yaml")
SECTIONS = {  # an injected mapping (the CLI's is antimemo.cli.CALLBACK_SECTIONS)
    "goldfish": "antimemo.callbacks.goldfish.GoldfishTokenDropout",
    "loss_floor": "antimemo.callbacks.loss_floor.LossFloor",
}
BASE = {
    "seed_everything": 0,
    "model": {"class_path": "M", "init_args": {"lr": 0.1, "seed": 0}},
    "trainer": {"max_epochs": 3},
    "goldfish": {"class_path": SECTIONS["goldfish"], "init_args": {"k": 4, "h": 13, "seed": 0}},
    "loss_floor": None,
}


def fake_parse(args):
    """A stand-in for antimemo fit's parser: --config, --SECTION=null|CLASS, --a.b=v (known keys only)."""
    cfg = copy.deepcopy(BASE)
    for arg in args:
        if not arg.startswith("--") or arg == "--config" or arg.endswith(".yaml"):
            continue
        key, _, value = arg[2:].partition("=")
        if key in ("report_path", "trainer.default_root_dir", "trainer.enable_progress_bar"):
            continue
        parts = key.split(".")
        if parts[0] not in cfg:
            raise ValueError(f"unrecognized arguments: {arg}")
        if len(parts) == 1:
            cfg[key] = None if value == "null" else ({"class_path": value, "init_args": {"k": 4, "h": 13, "seed": 0}}
                                                     if key == "goldfish" else {"class_path": value, "init_args": {"floor": 0.5}})
            continue
        node = cfg[parts[0]]
        if node is None:
            raise ValueError(f"section {parts[0]} is null")
        node = node.get("init_args", node)
        if parts[1] not in node and key != "seed_everything":
            raise ValueError(f"Option {parts[1]!r} is not accepted")
        node[parts[1]] = type(node[parts[1]])(float(value)) if parts[1] in node else value
    return Namespace(cfg) if False else _ns(cfg)


def _ns(obj):
    if isinstance(obj, dict):
        return Namespace(**{k: _ns(v) for k, v in obj.items()})
    return obj


# The fake training: exact match falls with goldfish strength (1/k), held-out loss rises; seed adds
# noise; one value fails. It appends its argv to CALLS so tests can count runs.
FAKE = textwrap.dedent(
    """
    import json, os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    if os.environ.get("FAKE_SLEEP"):
        with open(os.environ["FAKE_PIDS"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        if args.get("goldfish.k") != "2":
            time.sleep(float(os.environ["FAKE_SLEEP"]))
    k = args.get("goldfish.k", "4")
    if args.get("goldfish") == "null":
        k = "none"
    if k == "3":
        print("boom", file=sys.stderr); sys.exit(3)
    seed = int(args["seed_everything"])
    em = 0.5 if k == "none" else 1.0 / int(k) ** 2
    em += 0.01 * seed
    vl = 1.0 if k == "none" else 1.0 + 1.0 / int(k)
    report = {"exact_match": em, "token_match": 2 * em, "near_verbatim": em, "val_loss": vl, "best_val_loss": vl - 0.1,
              "train_wall_time_s": 1.5, "epochs": 3, "global_step": 30,
              "metrics": {"memorization/mia/loss/auc": 0.5 + em, "memorization/mia/zlib/auc": 0.55 + em,
                          "dp/epsilon": 8.0, "replication/replica_rate": 0.25}}
    with open(args["report_path"], "w") as f:
        json.dump(report, f)
    print("trained", k, seed)
    """
)


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_fit.py"
    script.write_text(FAKE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    return [sys.executable, str(script)], calls


def _n_calls(calls: Path) -> int:
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def _args(out, *grid, seeds=2, jobs=1):
    argv = ["--config", RECIPE, "--out", str(out), "--seeds", str(seeds), "--jobs", str(jobs), "--no_progress"]
    for g in grid:
        argv += ["--grid", g]
    return build_parser().parse_args(argv)


def test_plan_runs_seeds_dirs_and_arguments(tmp_path):
    runs = plan_runs(RECIPE, parse_grid(["goldfish.k=2,none", "loss_floor.floor=0.5"]), tmp_path, seeds=2,
                     seed_start=5, base_overrides=["--trainer.max_epochs=2"], sections=SECTIONS, parse=fake_parse)
    assert [(r.cell, r.seed) for r in runs] == [
        ("goldfish.k-2_loss_floor.floor-0.5", 5), ("goldfish.k-2_loss_floor.floor-0.5", 6),
        ("goldfish.k-none_loss_floor.floor-0.5", 5), ("goldfish.k-none_loss_floor.floor-0.5", 6),
    ]  # fmt: skip
    first = runs[1]
    assert first.dir == tmp_path / "runs" / "goldfish.k-2_loss_floor.floor-0.5" / "seed6"
    i_floor = first.args.index(f"--loss_floor={SECTIONS['loss_floor']}")
    assert first.args[i_floor + 1] == "--loss_floor.floor=0.5"  # enabled before its value
    assert "--trainer.max_epochs=2" in first.args
    for key in ("seed_everything", "model.seed", "goldfish.seed"):
        assert f"--{key}=6" in first.args
    assert f"--report_path={first.dir / 'report.partial.json'}" in first.args
    assert f"--trainer.default_root_dir={first.dir}" in first.args
    # goldfish off: no goldfish.seed; explicit seed keys are honoured
    assert not any(a.startswith("--goldfish.seed") for a in runs[2].args) and "--goldfish=null" in runs[2].args
    only = plan_runs(RECIPE, parse_grid(["goldfish.k=2"]), tmp_path, seeds=1, seed_keys_=["seed_everything"],
                     sections=SECTIONS, parse=fake_parse)
    assert [a for a in only[0].args if a.split("=", 1)[0].endswith(("seed", "seed_everything"))] == [
        "--seed_everything=0"
    ]
    with pytest.raises(ValueError, match="--seeds must be an integer >= 1, got 0"):
        plan_runs(RECIPE, [], tmp_path, seeds=0, sections=SECTIONS, parse=fake_parse)
    with pytest.raises(ValueError, match="--grid model.lrr: 'model' has no argument 'lrr'"):
        plan_runs(RECIPE, parse_grid(["model.lrr=1"]), tmp_path, sections=SECTIONS, parse=fake_parse)


def test_ablation_outputs_resume_and_failures(tmp_path, fake, capsys):
    command, calls = fake
    out = tmp_path / "abl"
    args = _args(out, "goldfish.k=2,3,4,none", seeds=2, jobs=2)
    rc = run(args, ["--trainer.max_epochs=3"], command=command, parse=fake_parse, sections=SECTIONS)
    printed = capsys.readouterr().out
    assert rc == 1  # k=3 fails
    assert _n_calls(calls) == 8
    assert all(json.loads(line)["trainer.max_epochs"] == "3" for line in calls.read_text().splitlines())

    # results.csv: one row per run, grid key and seed columns, figures from the reports
    rows = read_csv(out / "results.csv")
    assert len(rows) == 8
    assert list(rows[0])[:4] == ["cell", "goldfish.k", "seed", "status"]
    by = {(r["goldfish.k"], r["seed"]): r for r in rows}
    assert by[("3", "0")]["status"] == "failed" and by[("3", "0")]["exact_match"] == ""
    r = by[("2", "1")]
    assert r["status"] == "ok"
    assert float(r["exact_match"]) == pytest.approx(0.25 + 0.01)
    assert float(r["val_loss"]) == pytest.approx(1.5) and float(r["perplexity"]) == pytest.approx(math.exp(1.5))
    assert float(r["mia_loss_auc"]) == pytest.approx(0.76) and float(r["mia_auc"]) == pytest.approx(0.81)
    assert float(r["epsilon"]) == 8.0 and float(r["replication_replica_rate"]) == 0.25
    assert float(r["train_wall_time_s"]) == 1.5
    failed = json.loads((out / "runs" / "goldfish.k-3" / "seed0" / "failed.json").read_text())
    assert failed["returncode"] == 3 and "boom" in failed["log_tail"]
    assert "trained 2 1" in (out / "runs" / "goldfish.k-2" / "seed1" / "run.log").read_text()

    # summary.md: mean ± std per cell, best cell per budget; the table is printed too
    summary = (out / "summary.md").read_text()
    assert summary in printed
    k4 = next(line for line in summary.splitlines() if line.startswith("| 4 |"))
    assert "| 2 |" in k4 and f"{0.0675:.4f} ± {0.01 / math.sqrt(2):.4f}" in k4  # mean/std of 1/16 + {0, .01}
    k3 = next(line for line in summary.splitlines() if line.startswith("| 3 |"))
    assert "| 0/2 |" in k3 and "n/a" in k3
    best = summary.split("## Best cell per memorization budget", 1)[1]
    assert "| 0.01 | none meets it |" in best
    assert "| 0.1 | k=4 |" in best  # 0.0675 <= 0.1, and lower loss (1.25) than k=2's (1.5)
    assert "| 0.3 | k=4 |" not in best
    assert "goldfish.k-3 (2 of 2)" in summary
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # resume: finished runs are skipped, failed ones retried (still failing here)
    rc = run(args, ["--trainer.max_epochs=3"], command=command, parse=fake_parse, sections=SECTIONS)
    assert rc == 1 and _n_calls(calls) == 10
    # a lost report is re-run, and nothing else
    (out / "runs" / "goldfish.k-none" / "seed1" / "report.json").unlink()
    info, runs = load_manifest(out)
    ok = [x for x in runs if x.cell != "goldfish.k-3"]
    outcome = execute(ok, command=command, progress=False)
    assert (outcome.finished, outcome.skipped, outcome.failed) == (1, 5, [])
    assert _n_calls(calls) == 11
    assert info["grid"] == [["goldfish.k", ["2", "3", "4", "none"]]]


def test_partial_report_is_not_a_finished_run(tmp_path, fake):
    """A child that exits 0 without a valid report is a failure, and a half-written report.json is rerun."""
    command, calls = fake
    runs = plan_runs(RECIPE, parse_grid(["goldfish.k=2"]), tmp_path, seeds=1, sections=SECTIONS, parse=fake_parse)
    runs[0].dir.mkdir(parents=True)
    (runs[0].dir / "report.json").write_text('{"exact_ma')  # torn write
    outcome = execute(runs, command=command, progress=False)
    assert outcome.finished == 1 and _n_calls(calls) == 1
    assert json.loads((runs[0].dir / "report.json").read_text())["exact_match"] == 0.25
    silent = execute([Run("x", {}, 0, tmp_path / "x", [])], command=[sys.executable, "-c", "pass"], progress=False)
    assert len(silent.failed) == 1
    assert "no valid report.partial.json" in (tmp_path / "x" / "failed.json").read_text()
    with pytest.raises(ValueError, match="--jobs must be an integer >= 1, got 0"):
        execute(runs, jobs=0)


def test_ctrl_c_kills_children_and_keeps_finished_runs(tmp_path, fake, monkeypatch):
    command, calls = fake
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    monkeypatch.setenv("FAKE_SLEEP", "60")
    runs = plan_runs(RECIPE, parse_grid(["goldfish.k=2,4,8"]), tmp_path / "abl", seeds=1, sections=SECTIONS,
                     parse=fake_parse)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([r.to_json() for r in runs]))
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import json, sys
        from antimemo.ablate.runner import Run, execute
        runs = [Run.from_json(r) for r in json.load(open({str(plan)!r}))]
        try:
            execute(runs, jobs=2, command={command!r}, progress=False)
        except KeyboardInterrupt:
            print("interrupted"); sys.exit(130)
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(driver)], env=env, stdout=subprocess.PIPE, text=True)
    done = runs[0].dir / "report.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (done.exists() and pids.exists() and len(pids.read_text().split()) >= 2):
        time.sleep(0.1)
    assert done.exists(), "the quick run should have finished"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in out
    children = [int(p) for p in pids.read_text().split()]
    time.sleep(0.2)
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert json.loads(done.read_text())["exact_match"] == 0.25  # finished run intact
    assert not (runs[1].dir / "report.json").exists()
    # resume (without sleeping): only the unfinished runs run
    monkeypatch.delenv("FAKE_SLEEP")
    before = _n_calls(calls)
    outcome = execute(runs, command=command, progress=False)
    assert (outcome.finished, outcome.skipped) == (2, 1) and _n_calls(calls) == before + 2


@pytest.mark.filterwarnings("ignore")
def test_real_ablation_of_two_tiny_runs(tmp_path, capsys):
    """Two real `antimemo fit` processes (loss_floor enabled from null vs off) on a tiny config."""
    tiny = [
        "--model.hidden_size=32", "--model.num_layers=1", "--model.intermediate_size=64",
        "--data.num_train=16", "--data.num_holdout=8", "--data.batch_size=8",
        "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_checkpointing=false",
        "--trainer.log_every_n_steps=1", "--monitor.every_n_epochs=2", "--monitor.num_probes=8",
    ]  # fmt: skip
    out = tmp_path / "abl"
    args = build_parser().parse_args(
        ["--config", RECIPE, "--out", str(out), "--grid", "loss_floor.floor=0.5,none", "--seeds", "1",
         "--jobs", "2", "--no_progress"]
    )
    assert run(args, tiny) == 0
    rows = {r["loss_floor.floor"]: r for r in read_csv(out / "results.csv")}
    assert set(rows) == {"0.5", "none"}
    for row in rows.values():
        assert row["status"] == "ok"
        assert 0.0 <= float(row["exact_match"]) <= 1.0 and float(row["val_loss"]) > 0
        assert float(row["perplexity"]) == pytest.approx(math.exp(float(row["val_loss"])), rel=1e-6)
        assert 0.0 <= float(row["mia_auc"]) <= 1.0
    on = json.loads((out / "runs" / "loss_floor.floor-0.5" / "seed0" / "report.json").read_text())
    off = json.loads((out / "runs" / "loss_floor.floor-none" / "seed0" / "report.json").read_text())
    assert any(k.startswith("loss_floor/") for k in on["metrics"])  # the section was turned on
    assert not any(k.startswith("loss_floor/") for k in off["metrics"])
    assert on["goldfish"]["k"] == 4 and on["epochs"] == 2
    assert (out / "pareto.png").stat().st_size > 5000 and "| 0.5 |" in (out / "summary.md").read_text()


def _gone(pid: int) -> bool:
    """The process no longer runs (reaped, or a zombie nobody has reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def test_sigkill_of_the_runner_takes_its_children_along(tmp_path, fake, monkeypatch):
    command, calls = fake
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    monkeypatch.setenv("FAKE_SLEEP", "120")
    runs = plan_runs(RECIPE, parse_grid(["goldfish.k=4,8"]), tmp_path / "abl", seeds=1, sections=SECTIONS,
                     parse=fake_parse)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([r.to_json() for r in runs]))
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import json
        from antimemo.ablate.runner import Run, execute
        execute([Run.from_json(r) for r in json.load(open({str(plan)!r}))], jobs=2, command={command!r},
                progress=False)
    """))
    proc = subprocess.Popen([sys.executable, str(driver)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while time.time() < deadline and not (pids.exists() and len(pids.read_text().split()) >= 2):
        time.sleep(0.1)
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2
    lock = json.loads((runs[0].dir / "run.lock").read_text())
    assert lock["pid"] in children and lock["runner_pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and not all(_gone(pid) for pid in children):
        time.sleep(0.1)
    assert all(_gone(pid) for pid in children), "a child outlived the SIGKILLed runner"
    # the rerun finds the stale locks (their processes are gone) and trains both runs, once each
    monkeypatch.delenv("FAKE_SLEEP")
    before = _n_calls(calls)
    outcome = execute(runs, command=command, progress=False)
    assert (outcome.finished, outcome.busy) == (2, []) and _n_calls(calls) == before + 2
    assert not (runs[0].dir / "run.lock").exists()


def test_a_run_held_by_a_live_process_is_not_started_twice(tmp_path, fake, capsys):
    from antimemo.ablate.runner import LOCK, _start_time, live_lock

    command, calls = fake
    runs = plan_runs(RECIPE, parse_grid(["goldfish.k=4,8"]), tmp_path / "abl", seeds=1, sections=SECTIONS,
                     parse=fake_parse)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runs[0].dir.mkdir(parents=True)
        (runs[0].dir / LOCK).write_text(json.dumps({"pid": holder.pid, "start_time": _start_time(holder.pid),
                                                    "runner_pid": holder.pid}))
        # a lock whose pid was reused by another process (different start time) is stale
        runs[1].dir.mkdir(parents=True)
        (runs[1].dir / LOCK).write_text(json.dumps({"pid": holder.pid, "start_time": "1"}))
        assert live_lock(runs[0].dir) is not None and live_lock(runs[1].dir) is None
        outcome = execute(runs, command=command, progress=False)
        err = capsys.readouterr().err
        assert outcome.busy == [runs[0]] and outcome.finished == 1 and _n_calls(calls) == 1
        assert f"still being trained by process {holder.pid}" in err and str(runs[0].dir / LOCK) in err
        assert not runs[0].report_path.exists() and runs[1].report_path.exists()
        assert (runs[0].dir / LOCK).exists()  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone, the rerun trains the run
    outcome = execute(runs, command=command, progress=False)
    assert (outcome.finished, outcome.skipped, outcome.busy) == (1, 1, []) and _n_calls(calls) == 2
