"""Cost of goldfish masking and of the memorization monitor, on the LM recipe's model.

Two measurements, each against its alternative in the same run:

1. Step level: one training step of the recipe model (forward, backward, AdamW step) against
   ``GoldfishTokenDropout.apply`` on the same batch (the work the callback adds per step).
   Target: mask cost <= 1% of the step.
2. Whole runs: ``Trainer.fit`` for ``--epochs`` epochs with validation every epoch, three
   configurations in interleaved order, ``--reps`` repetitions each, median wall time:
   ``plain`` (no antimemo callback), ``goldfish`` (``GoldfishTokenDropout``) and ``monitor``
   (``MemorizationMonitor`` at its default cadence, every epoch, with ``holdout="val"``) and
   ``monitor_recipe`` (the recipe's cadence, ``monitor.every_n_epochs`` in the yaml).
   Target: monitor cost <= 10% of training time.

Usage::

    python benchmarks/lm_overhead_bench.py                       # recipe sizes, CPU
    python benchmarks/lm_overhead_bench.py --device cuda --epochs 10
    python benchmarks/lm_overhead_bench.py --json out.json

Model and data sizes are read from ``recipes/lm_goldfish.yaml`` (``model`` and ``data``
sections); ``--epochs`` replaces the recipe's epoch count so the benchmark stays short.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _recipe_args(path: Path) -> tuple[dict, dict, dict, dict]:
    cfg = yaml.safe_load(path.read_text())

    def init_args(section):
        section = cfg.get(section) or {}
        return dict(section.get("init_args", section))

    model = {k: v for k, v in init_args("model").items() if k != "class_path"}
    data = {k: v for k, v in init_args("data").items() if k != "class_path"}
    goldfish = dict(cfg.get("goldfish") or {"k": 4, "h": 13})
    monitor = dict(cfg.get("monitor") or {})
    if isinstance(monitor.get("decode"), str):  # a dotted import path, as LightningCLI resolves it
        module_name, _, attr = monitor["decode"].rpartition(".")
        monitor["decode"] = getattr(importlib.import_module(module_name), attr)
    return model, data, goldfish, monitor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_level(model_kw: dict, data_kw: dict, goldfish_kw: dict, device: torch.device, reps: int) -> dict:
    from antimemo.callbacks.goldfish import GoldfishTokenDropout
    from antimemo.lm import CausalLMModule, TextDataModule

    dm = TextDataModule(**data_kw)
    dm.setup("fit")
    batch_ids = torch.stack([dm.train_dataset[i]["input_ids"] for i in range(dm.batch_size)]).to(device)
    module = CausalLMModule(**model_kw).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    callback = GoldfishTokenDropout(**goldfish_kw)

    def train_step():
        loss = module.model(input_ids=batch_ids, labels=batch_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def mask_step():
        callback.apply({"input_ids": batch_ids})

    timings = {}
    for name, fn in (("train_step", train_step), ("goldfish_apply", mask_step)):
        for _ in range(3):  # warm-up
            fn()
        _sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        timings[name] = statistics.median(times)
    return {
        "batch_shape": list(batch_ids.shape),
        "train_step_s": timings["train_step"],
        "goldfish_apply_s": timings["goldfish_apply"],
        "mask_over_step": timings["goldfish_apply"] / timings["train_step"],
    }


def _fit_once(config: str, model_kw, data_kw, goldfish_kw, monitor_kw, epochs: int, device: torch.device) -> float:
    import lightning.pytorch as pl

    from antimemo.callbacks.goldfish import GoldfishTokenDropout
    from antimemo.callbacks.monitor import MemorizationMonitor
    from antimemo.lm import CausalLMModule, TextDataModule

    callbacks = []
    if config == "goldfish":
        callbacks.append(GoldfishTokenDropout(**goldfish_kw))
    elif config == "monitor":  # the monitor's default cadence: every validation epoch
        callbacks.append(MemorizationMonitor(**{"holdout": "val", **monitor_kw, "every_n_epochs": 1}))
    elif config == "monitor_recipe":  # the recipe's cadence (monitor.every_n_epochs in the yaml)
        callbacks.append(MemorizationMonitor(**{"holdout": "val", **monitor_kw}))
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(**data_kw)
    module = CausalLMModule(**model_kw)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    _sync(device)
    return time.perf_counter() - t0


def run_level(model_kw, data_kw, goldfish_kw, monitor_kw, epochs: int, reps: int, device: torch.device) -> dict:
    configs = ("plain", "goldfish", "monitor", "monitor_recipe")
    times: dict[str, list[float]] = {c: [] for c in configs}
    _fit_once("plain", model_kw, data_kw, goldfish_kw, monitor_kw, 1, device)  # warm-up (imports, allocator)
    for rep in range(reps):
        order = configs if rep % 2 == 0 else tuple(reversed(configs))
        for config in order:
            times[config].append(_fit_once(config, model_kw, data_kw, goldfish_kw, monitor_kw, epochs, device))
    med = {c: statistics.median(v) for c, v in times.items()}
    return {
        "epochs": epochs,
        "reps": reps,
        "times_s": times,
        "median_s": med,
        "goldfish_over_plain": med["goldfish"] / med["plain"],
        "monitor_over_plain": med["monitor"] / med["plain"],
        "monitor_cost_fraction": (med["monitor"] - med["plain"]) / med["plain"],
        "monitor_recipe_cost_fraction": (med["monitor_recipe"] - med["plain"]) / med["plain"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "lm_goldfish.yaml")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per whole run (default 3)")
    parser.add_argument("--reps", type=int, default=3, help="whole-run repetitions per configuration")
    parser.add_argument("--step-reps", type=int, default=20, help="timed repetitions at step level")
    parser.add_argument("--skip-runs", action="store_true", help="only the step-level measurement")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()

    device = torch.device(args.device)
    model_kw, data_kw, goldfish_kw, monitor_kw = _recipe_args(args.recipe)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    result = {"machine": machine, "model": model_kw, "data": data_kw, "goldfish": goldfish_kw, "monitor": monitor_kw}
    result["step_level"] = step_level(model_kw, data_kw, goldfish_kw, device, args.step_reps)
    s = result["step_level"]
    print(f"machine: {machine}")
    print(
        f"step level, batch {s['batch_shape']}: train step {s['train_step_s'] * 1e3:.2f} ms, "
        f"goldfish apply {s['goldfish_apply_s'] * 1e3:.3f} ms, ratio {s['mask_over_step']:.4%} (target <= 1%)"
    )
    if not args.skip_runs:
        result["run_level"] = run_level(model_kw, data_kw, goldfish_kw, monitor_kw, args.epochs, args.reps, device)
        r = result["run_level"]
        print(f"whole runs ({r['epochs']} epochs, median of {r['reps']}):")
        for name, t in r["median_s"].items():
            print(f"  {name:9s} {t:8.2f} s")
        print(f"  goldfish / plain = {r['goldfish_over_plain']:.3f}")
        print(f"  monitor cost, every epoch (default cadence) = {r['monitor_cost_fraction']:.1%} of plain training (target <= 10%)")
        print(f"  monitor cost, recipe cadence = {r['monitor_recipe_cost_fraction']:.1%} of plain training")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
