"""Extraction risk as an attacker measures it, for four trainings of one recipe and seed.

Runs ``antimemo fit`` on ``recipes/lm_dedup.yaml`` (256 training sequences, 16 of them repeated 16
times) four times with the same seed: the baseline, goldfish k=4, ``DedupSampling(policy="drop")``
and DP-SGD at noise multiplier 1.0. Each run's monitors measure every kind of risk on the final
model: greedy exact match, the (n, p)-discoverable rates of probabilistic extraction (Hayes et al.
2024), untargeted extraction (sampled generations from empty, held-out and repeated-token prompts
looked up in the training set, beside a held-out baseline) and nv-recall; on all probes and on the
16 duplicated sequences. Prints one markdown table (docs/results.md, "Extraction risk").

    python benchmarks/extraction_risk.py --out runs/extraction_risk [--threads 1] [--only baseline,dp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

UNTARGETED = {"num_generations": 32, "num_tokens": 64, "min_span": 48, "bos_id": 10}
DISCOVERABLE = "true"

RUNS = {
    "baseline": [],
    "goldfish k=4": ["--goldfish.k", "4"],
    "dedup (drop)": ["--dedup.policy", "drop"],
    "DP (noise 1.0)": ["--dp.noise_multiplier", "1.0"],
}

ROWS = [
    ("greedy exact match", "memorization/exact_match", "{:.3f}"),
    ("greedy exact match, duplicated", "memorization_duplicates/exact_match", "{:.3f}"),
    ("reproduced length (tokens)", "memorization/reproduced_length", "{:.1f}"),
    ("(1, 0.5)-discoverable", "memorization/discoverable/n1_p0.5", "{:.3f}"),
    ("(100, 0.5)-discoverable", "memorization/discoverable/n100_p0.5", "{:.3f}"),
    ("(1000, 0.9)-discoverable", "memorization/discoverable/n1000_p0.9", "{:.3f}"),
    ("(1000, 0.9)-discoverable, duplicated", "memorization_duplicates/discoverable/n1000_p0.9", "{:.3f}"),
    ("median log10 p_z", "memorization/discoverable/median_log10_pz", "{:.1f}"),
    ("median log10 p_z, duplicated", "memorization_duplicates/discoverable/median_log10_pz", "{:.1f}"),
    ("untargeted extraction rate (>= 48 bytes)", "memorization/untargeted/extraction_rate", "{:.3f}"),
    ("  held-out text, same test", "memorization/untargeted/holdout_baseline/extraction_rate", "{:.3f}"),
    ("untargeted token coverage", "memorization/untargeted/token_coverage", "{:.3f}"),
    ("untargeted longest match (bytes)", "memorization/untargeted/longest_match", "{:.0f}"),
    ("  held-out text, same test", "memorization/untargeted/holdout_baseline/longest_match", "{:.0f}"),
    ("nv-recall (mean)", "memorization/untargeted/nv_recall_mean", "{:.3f}"),
    ("  held-out text, same test", "memorization/untargeted/holdout_baseline/nv_recall_mean", "{:.3f}"),
    ("MIA loss AUC", "memorization/mia/loss/auc", "{:.3f}"),
    ("held-out loss (val_loss)", "val_loss", "{:.3f}"),
]


def _command(name: str, extra: list[str], out: Path) -> list[str]:
    run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "").replace(".", "")
    monitor = [
        "--monitor.discoverable", DISCOVERABLE, "--monitor.decode_every_n_evaluations", "1",
        "--monitor.untargeted", json.dumps(UNTARGETED),
        "--duplicates_monitor.discoverable", DISCOVERABLE, "--duplicates_monitor.decode_every_n_evaluations", "1",
    ]  # fmt: skip
    return [
        sys.executable, "-m", "antimemo.cli", "fit", "--config", "recipes/lm_dedup.yaml", *monitor, *extra,
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir),
        "--report_path", str(run_dir / "report.json"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/extraction_risk")
    parser.add_argument("--threads", type=int, default=None, help="OMP/torch threads per run")
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all four)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    names = list(RUNS) if not args.only else [n.strip() for n in args.only.split(",")]
    reports = {}
    for name in names:
        cmd = _command(name, RUNS[name], out)
        report = Path(cmd[cmd.index("--report_path") + 1])
        if not report.exists():
            began = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            print(f"# {name}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
        reports[name] = json.loads(report.read_text())
    print("| measure | " + " | ".join(reports) + " |")
    print("|---|" + "---|" * len(reports))
    for label, key, fmt in ROWS:
        cells = []
        for r in reports.values():
            value = r.get("metrics", {}).get(key)
            cells.append("n/a" if value is None else fmt.format(float(value)))
        print(f"| {label} | " + " | ".join(cells) + " |")
    eps = [r.get("dp_guarantee") for r in reports.values()]
    for name, g in zip(reports, eps):
        if g:
            print(f"\n{name}: epsilon {g.get('epsilon')} at delta {g.get('delta')} ({g.get('accountant')}, "
                  f"{g.get('private_steps')} private steps)")  # fmt: skip
    import platform

    import torch
    import transformers

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
