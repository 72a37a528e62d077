"""DP-SGD on LoRA adapters against non-private LoRA: step time and peak memory (issue 19, target <= 1.2x).

Each configuration is a real Lightning fit, in a fresh subprocess, of ``LoRACausalLMModule``
(``recipes/lm_dp_lora.yaml``'s model and adapters: r=8, alpha=16 on q, k, v, o, gate, up, down)
on the recipe's fine-tuning data (``OffsetTextDataModule``; validation and monitor off):

- ``lora``: non-private LoRA (shuffled batches of ``batch_size``);
- ``dp_lora``: ``DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="hooks")`` on the same
  module (Poisson batches of expected size ``batch_size``; per-sample gradients of the adapters only);
- ``dp_lora_ghost``: the same with ``grad_sample_mode="ghost"``;
- ``dp_lora_bk``: the same with ``grad_sample_mode="bookkeeping"`` (book-keeping: ghost norms and
  the clipped sum from one backward pass, ``antimemo/dp/bookkeeping.py``);
- ``full`` and ``dp_full`` (``--with-full``): every weight trained, for reference.

A timing callback measures each step (``on_train_batch_start`` to ``on_train_batch_end``:
forward, backward, per-sample clipping, noise, optimizer step and the callback's own checks). The
first ``--warmup`` steps are dropped; a run's figure is the median of the rest. Configurations run
in turn ``--repeats`` times (interleaved, so drift on a shared machine hits all of them); the table
gives the median over repeats and the ratio to ``lora`` (or ``full``), and each process's peak RSS
(``ru_maxrss``) and its rise during the fit. ``--profile`` also prints torch-profiler tables of
``lora``, ``dp_lora`` and ``dp_lora_bk`` steps.

``--paired ROUNDS`` times instead, in ONE process per size, ROUNDS rounds of short fits of every
configuration in turn and reports the median of the per-round ratios: on a shared machine, fits
seconds apart see nearly the same load, separate processes minutes apart do not.

    python benchmarks/dp_lora_bench.py [--sizes 0.6M,7M] [--repeats 3] [--steps 10] [--json out.json]
    python benchmarks/dp_lora_bench.py --paired 7 --steps 6 --warmup 2     # step-time ratios only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "lm_dp_lora.yaml"
SIZES: dict[str, dict[str, int]] = {
    "0.6M": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 512},
    "7M": {"hidden_size": 384, "num_layers": 4, "num_heads": 6, "intermediate_size": 1536},
}
CONFIGS = ("lora", "dp_lora", "dp_lora_ghost", "dp_lora_bk")
FULL = ("full", "dp_full")


def _config(size: str, batch_size: int, seq_len: int) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load(RECIPE.read_text())
    model = {**cfg["model"]["init_args"], **SIZES[size], "base_checkpoint": None}
    model["max_position_embeddings"] = max(model["max_position_embeddings"], seq_len)
    data = {**cfg["data"]["init_args"], "batch_size": batch_size, "seq_len": seq_len}
    return {"model": model, "data": data}


def _timed_fit(name: str, cfg: dict[str, Any], steps: int, warmup: int, model: Any = None, profile: bool = False) -> dict[str, Any]:
    """One Lightning fit of ``steps + warmup`` steps of configuration ``name``; the step times after warm-up."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import lightning.pytorch as pl
    import transformers

    from antimemo.callbacks.dp import DifferentialPrivacy
    from antimemo.lm.lora import LoRACausalLMModule
    from antimemo.lm.splits import OffsetTextDataModule

    transformers.logging.set_verbosity_error()

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.sizes: list[int] = []
            self.t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
            self.sizes.append(int(batch["input_ids"].shape[0]))
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
            self.times.append(time.perf_counter() - self.t0)

    if model is None:
        model_args = dict(cfg["model"])
        if name in FULL:
            model_args["lora"] = None
        pl.seed_everything(0, verbose=False)
        model = LoRACausalLMModule(**model_args)
    data = OffsetTextDataModule(**cfg["data"])
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if name.startswith("dp_"):
        mode = {"ghost": "ghost", "bk": "bookkeeping"}.get(name.rsplit("_", 1)[-1], "hooks")
        callbacks.insert(0, DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps + warmup, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )  # fmt: skip
    table = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.fit(model, data)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    else:
        trainer.fit(model, data)
    return {"model": model, "times": timer.times[warmup:], "sizes": timer.sizes[warmup:], "profile": table}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this fresh process: step times, batch sizes, memory."""
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    run = _timed_fit(spec["name"], spec["config"], spec["steps"], spec["warmup"], profile=spec.get("profile", False))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = run["model"]
    return {
        "median_step_s": statistics.median(run["times"]),
        "mean_batch": statistics.fmean(run["sizes"]),
        "steps": len(run["times"]),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters()),
        "peak_rss_mb": peak,
        "fit_peak_rise_mb": peak - rss_before,
        "profile": run["profile"],
    }


def paired(spec: dict[str, Any]) -> dict[str, Any]:
    """``rounds`` rounds in ONE process; each round fits every configuration for a few steps, in turn.

    Consecutive short fits see nearly the same machine load, so the per-round ratio to ``lora`` is
    much less noisy on a shared machine than ratios between separate processes minutes apart.
    """
    models: dict[str, Any] = {}
    rounds: list[dict[str, float]] = []
    sizes: dict[str, list[int]] = {}
    for _ in range(spec["rounds"]):
        medians = {}
        for name in spec["names"]:
            run = _timed_fit(name, spec["config"], spec["steps"], spec["warmup"], model=models.get(name))
            models[name] = run["model"]
            medians[name] = statistics.median(run["times"])
            sizes.setdefault(name, []).extend(run["sizes"])
        rounds.append(medians)
    return {"rounds": rounds, "mean_batch": {n: statistics.fmean(v) for n, v in sizes.items()}}


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, timeout=1800
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{spec['name']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="0.6M,7M")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-full", action="store_true", help="also time full fine-tuning, plain and DP")
    parser.add_argument("--profile", action="store_true", help="print a torch-profiler table of dp_lora and lora")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="instead: ROUNDS rounds of short fits of every config in one process (per-round ratios)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(paired(spec) if "rounds" in spec else child(spec)))
        return 0
    sizes = [s.strip() for s in args.sizes.split(",")]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        parser.error(f"--sizes: unknown {bad}; choose from {', '.join(SIZES)}")
    names = [*CONFIGS, *(FULL if args.with_full else ())]
    if args.paired:
        return _main_paired(args, sizes, names)
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {s: {n: [] for n in names} for s in sizes}
    for size in sizes:
        cfg = _config(size, args.batch_size, args.seq_len)
        for rep in range(args.repeats):
            for name in names:
                spec = {"name": name, "config": cfg, "steps": args.steps, "warmup": args.warmup}
                r = _run_child(spec)
                results[size][name].append(r)
                print(f"{size} rep {rep} {name}: {r['median_step_s'] * 1000:.1f} ms/step (batch {r['mean_batch']:.1f})", flush=True)
        if args.profile:
            for name in ("lora", "dp_lora", "dp_lora_bk"):
                r = _run_child({"name": name, "config": cfg, "steps": args.steps, "warmup": args.warmup, "profile": True})
                print(f"\n### profile {size} {name} ({r['steps'] + args.warmup} steps)\n{r['profile']}")
    load_after = os.getloadavg()
    rows = ["| size | config | trainable params | step (ms, median) | ratio | mean batch | peak RSS (MB) | RSS rise in fit (MB) |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    summary: dict[str, Any] = {}
    for size in sizes:
        med = {n: statistics.median(r["median_step_s"] for r in results[size][n]) for n in names}
        for name in names:
            runs = results[size][name]
            base = "full" if name in FULL else "lora"
            ratio = med[name] / med[base]
            peak = statistics.median(r["peak_rss_mb"] for r in runs)
            rise = statistics.median(r["fit_peak_rise_mb"] for r in runs)
            batch = statistics.fmean(r["mean_batch"] for r in runs)
            rows.append(f"| {size} | {name} | {runs[0]['trainable']:,} | {med[name] * 1000:.1f} | {ratio:.2f}x | "
                        f"{batch:.1f} | {peak:.0f} | {rise:.0f} |")  # fmt: skip
            summary.setdefault(size, {})[name] = {
                "median_step_s": med[name], "ratio": ratio, "repeat_step_s": [r["median_step_s"] for r in runs],
                "peak_rss_mb": peak, "fit_peak_rise_mb": rise, "mean_batch": batch, "trainable": runs[0]["trainable"],
                "params": runs[0]["params"],
            }  # fmt: skip
    table = "\n".join(rows)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
               f"{os.environ.get('OMP_NUM_THREADS', 'default')}, load average before {load_before[0]:.2f}, "
               f"after {load_after[0]:.2f}")  # fmt: skip
    print(f"\n{table}\n\nbatch {args.batch_size}, seq {args.seq_len}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, {args.repeats} interleaved repeats; {machine}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "results": summary}, indent=2))
    return 0


def _main_paired(args: argparse.Namespace, sizes: list[str], names: list[str]) -> int:
    load_before = os.getloadavg()
    rows = ["| size | config | step (ms, median over rounds) | ratio to lora (median of per-round ratios) | per-round ratios | mean batch |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    out: dict[str, Any] = {}
    for size in sizes:
        spec = {"names": names, "config": _config(size, args.batch_size, args.seq_len), "steps": args.steps,
                "warmup": args.warmup, "rounds": args.paired}  # fmt: skip
        r = _run_child({**spec, "name": f"paired {size}"})
        out[size] = r
        for name in names:
            base = "full" if name in FULL else "lora"
            ratios = [rd[name] / rd[base] for rd in r["rounds"]]
            step = statistics.median(rd[name] for rd in r["rounds"])
            rows.append(f"| {size} | {name} | {step * 1000:.1f} | {statistics.median(ratios):.2f}x | "
                        f"{', '.join(f'{x:.2f}' for x in ratios)} | {r['mean_batch'][name]:.1f} |")  # fmt: skip
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    print("\n" + "\n".join(rows) + f"\n\nbatch {args.batch_size}, seq {args.seq_len}, {args.paired} rounds of "
          f"{args.steps} timed steps after {args.warmup} warm-up per config, one process per size; load average "
          f"before {load_before[0]:.2f}, after {load_after[0]:.2f}; {os.cpu_count()} CPUs, torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "paired": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
