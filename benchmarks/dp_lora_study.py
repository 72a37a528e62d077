"""DP fine-tuning with LoRA against full DP fine-tuning and non-private fine-tuning (issue 19).

1. **Pretraining**: ``antimemo fit`` of ``recipes/lm_dp_lora.yaml`` without DP, without adapters,
   on the first ``--pretrain-train`` sequences after the held-out set (``train_offset 0``).
2. **Fine-tuning**, four arms from that checkpoint, same data (the 256 sequences after the
   pretraining ones, ``train_offset`` = ``--pretrain-train``), same seed, same schedule:
   ``DP LoRA`` (the recipe), ``DP full`` (``--model.init_args.lora null``), ``LoRA`` (``--dp
   null``) and ``full`` (both off).
3. **Before fine-tuning**: ``antimemo audit`` of the pretrained checkpoint with the same monitor on
   the same fine-tuning sequences (they were never trained on: the reference for memorization).
4. One markdown table (printed, and ``OUT/summary.md`` / ``OUT/summary.json``): epsilon,
   memorization of the fine-tuning sequences (the recipe's ``MemorizationMonitor`` probes them:
   greedy exact match, token match, near-verbatim, membership-inference AUC against the held-out
   set), held-out loss, trainable parameters, train wall time.

Every run is a subprocess with its own directory under ``OUT``; a run whose ``report.json``
exists is not run again (rerun the command after a crash). Arguments after ``--`` go to every
fine-tuning run (e.g. ``-- --trainer.max_epochs 10``).

    python benchmarks/dp_lora_study.py --out runs/dp_lora [--threads 1] [--only "DP LoRA,LoRA"]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "lm_dp_lora.yaml"

ARMS = {
    "DP LoRA": [],
    "DP full": ["--model.init_args.lora", "null"],
    "LoRA": ["--dp", "null"],
    "full": ["--dp", "null", "--model.init_args.lora", "null"],
}
BEFORE = "pretrained, before fine-tuning"
ROWS = [
    ("greedy exact match (fine-tuning seqs)", "exact_match", "{:.3f}"),
    ("token match", "token_match", "{:.3f}"),
    ("near-verbatim (edit sim >= 0.9)", "near_verbatim", "{:.3f}"),
    ("MIA loss AUC (fine-tuning vs held-out)", "memorization/mia/loss/auc", "{:.3f}"),
    ("MIA zlib AUC", "memorization/mia/zlib/auc", "{:.3f}"),
    ("held-out loss (val_loss)", "val_loss", "{:.3f}"),
    ("train loss (last epoch)", "train_loss", "{:.3f}"),
]


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def _run(cmd: list[str], run_dir: Path, env: dict[str, str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[dp_lora_study] {run_dir.name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(run_dir / "run.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        tail = (run_dir / "run.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"[dp_lora_study] {run_dir.name} failed (exit {rc}); the end of {run_dir / 'run.log'}:\n{tail}")
    print(f"[dp_lora_study] {run_dir.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def _fit(extra: list[str], run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "antimemo.cli", "fit", "--config", str(RECIPE), *extra,
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir),
        "--report_path", str(run_dir / "report.json"),
    ]  # fmt: skip


def pretrain_command(run_dir: Path, num_train: int, epochs: int) -> list[str]:
    """The ``antimemo fit`` command of the pretraining run (no DP, no adapters, no monitor)."""
    return _fit(
        [
            "--dp", "null", "--monitor", "null", "--model.init_args.lora", "null",
            "--model.init_args.base_checkpoint", "null", "--data.init_args.train_offset", "0",
            "--data.init_args.num_train", str(num_train), "--trainer.max_epochs", str(epochs),
            "--trainer.check_val_every_n_epoch", str(epochs),
        ],
        run_dir,
    )  # fmt: skip


def audit_command(run_dir: Path, ckpt: Path, offset: int) -> list[str]:
    """``antimemo audit`` of the pretrained checkpoint on the fine-tuning sequences (same monitor)."""
    return [
        sys.executable, "-m", "antimemo.cli", "audit", "--config", str(RECIPE), "--model.init_args.lora", "null",
        "--model.init_args.base_checkpoint", "null", "--ckpt_path", str(ckpt),
        "--data.init_args.train_offset", str(offset), "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir), "--report_path", str(run_dir / "report.json"),
    ]  # fmt: skip


def checkpoint_of(run_dir: Path) -> Path:
    """The last checkpoint a run wrote (``lightning_logs/version_*/checkpoints/*.ckpt``)."""
    found = sorted(run_dir.glob("lightning_logs/version_*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"[dp_lora_study] {run_dir} holds no checkpoint; delete {run_dir} and rerun")
    return found[-1]


def trainable_parameters(lora: bool) -> int:
    """Trainable parameters of the recipe's model with (``lora``) or without adapters."""
    import yaml

    from antimemo.lm.lora import LoRACausalLMModule

    args = dict(yaml.safe_load(RECIPE.read_text())["model"]["init_args"])
    args["base_checkpoint"] = None
    if not lora:
        args["lora"] = None
    model = LoRACausalLMModule(**args)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _value(report: dict, key: str) -> float | None:
    if key in report and report[key] is not None:
        return report[key]
    return report.get("metrics", {}).get(key)


def summarise(reports: dict[str, dict], pretrain: dict) -> tuple[str, dict]:
    """The markdown table and the JSON summary of the arms' reports."""
    names = list(reports)
    lines = ["| measure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    eps = []
    for name in names:
        g = reports[name].get("dp_guarantee")
        if name == BEFORE:
            eps.append("(not trained on them)")
        else:
            eps.append("inf (no DP)" if not g else f"{g['epsilon']:.2f} (delta {g['delta']:.1e}, {g['private_steps']} steps)")
    row("epsilon (fine-tuning data)", eps)
    for label, key, fmt in ROWS:
        row(label, [("n/a" if (v := _value(reports[n], key)) is None else fmt.format(v)) for n in names])
    params = {name: trainable_parameters("--model.init_args.lora" not in ARMS[name]) for name in names if name in ARMS}
    row("trainable parameters", [f"{params[n]:,}" if n in params else "-" for n in names])
    row("train wall time (s)", [f"{reports[n]['train_wall_time_s']:.0f}" if n in ARMS else "-" for n in names])
    row("fine-tuning steps", [str(reports[n]["global_step"]) if n in ARMS else "0" for n in names])
    summary = {
        "pretrain": {k: pretrain.get(k) for k in ("val_loss", "global_step", "train_wall_time_s")},
        "arms": {
            n: {
                "epsilon": (reports[n].get("dp_guarantee") or {}).get("epsilon"),
                **{key: _value(reports[n], key) for _, key, _ in ROWS},
                "trainable_parameters": params.get(n),
                "train_wall_time_s": reports[n].get("train_wall_time_s") if n in ARMS else None,
                "global_step": reports[n].get("global_step") if n in ARMS else 0,
            }
            for n in names
        },
    }
    table = "\n".join(lines)
    table += f"\n\nPretrained model before fine-tuning: held-out loss {pretrain.get('val_loss'):.3f} "
    table += f"({pretrain.get('global_step')} steps, {pretrain.get('train_wall_time_s'):.0f} s)."
    return table, summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dp_lora")
    parser.add_argument("--threads", type=int, default=None, help="OMP/torch threads per run")
    parser.add_argument("--pretrain-train", type=int, default=1024, help="pretraining sequences (the fine-tuning offset)")
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--only", default=None, help=f"comma-separated arms (default all: {', '.join(ARMS)})")
    args = parser.parse_args(argv)
    arms = list(ARMS) if args.only is None else [a.strip() for a in args.only.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--only: unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if args.pretrain_train < 1 or args.pretrain_epochs < 1:
        parser.error("--pretrain-train and --pretrain-epochs must be >= 1")
    out = Path(args.out).resolve()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    pre_dir = out / "pretrain"
    if not (pre_dir / "report.json").is_file():
        _run(pretrain_command(pre_dir, args.pretrain_train, args.pretrain_epochs), pre_dir, env)
    ckpt = checkpoint_of(pre_dir)
    reports = {}
    audit_dir = out / "before_fine_tuning"
    if not (audit_dir / "report.json").is_file():
        _run(audit_command(audit_dir, ckpt, args.pretrain_train), audit_dir, env)
    reports[BEFORE] = json.loads((audit_dir / "report.json").read_text())
    for name in arms:
        run_dir = out / _slug(name)
        if not (run_dir / "report.json").is_file():
            cmd = _fit(
                [
                    "--model.init_args.base_checkpoint", str(ckpt),
                    "--data.init_args.train_offset", str(args.pretrain_train), *ARMS[name], *extra,
                ],
                run_dir,
            )  # fmt: skip
            _run(cmd, run_dir, env)
        reports[name] = json.loads((run_dir / "report.json").read_text())
    table, summary = summarise(reports, json.loads((pre_dir / "report.json").read_text()))
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
