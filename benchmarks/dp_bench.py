"""DP-SGD step time against non-private training, on the LM recipe's model (``recipes/lm_goldfish.yaml``).

Each configuration is a real Lightning fit of ``CausalLMModule`` on ``TextDataModule`` with the
recipe's ``model`` and ``data`` sections (goldfish and the monitor off, validation off):

- ``plain``: no callback (shuffled batches of ``batch_size``),
- ``hooks``: ``DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="hooks")``,
- ``ghost``: ``DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ghost")``.

A timing callback measures the wall time of every training step (``on_train_batch_start`` to
``on_train_batch_end``: forward, backward, per-sample clipping, noise, optimizer step and the
callback's own per-step checks; CUDA synchronised). The first ``--warmup`` steps are dropped and
the median of the rest is the run's step time. The three configurations are run in turn
``--repeats`` times (interleaved, so slow drift of a shared machine hits all of them), and the
report gives the median over repeats and the ratio DP / plain. DP batches are Poisson samples
whose size varies around ``batch_size``; their mean size is reported.

Run: ``python benchmarks/dp_bench.py`` (CPU; a few minutes on 2 cores) or
``python benchmarks/dp_bench.py --device cuda``. ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from antimemo.callbacks.dp import DifferentialPrivacy  # noqa: E402
from antimemo.lm.data import TextDataModule  # noqa: E402
from antimemo.lm.module import CausalLMModule  # noqa: E402


class StepTimer(pl.Callback):
    """Wall time of each training step, and the batch sizes."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.sizes: list[int] = []
        self._t0 = 0.0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        self._sync(pl_module)
        self.sizes.append(int(batch["input_ids"].shape[0]))
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._t0)


def run_once(mode: str, cfg: dict, steps: int, warmup: int, device: str) -> dict:
    pl.seed_everything(0, verbose=False)
    model = CausalLMModule(**cfg["model"])
    data = TextDataModule(**cfg["data"])
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if mode != "plain":
        callbacks.insert(0, DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode))
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=steps + warmup,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, data)
    times = timer.times[warmup:]
    return {
        "median_step_s": statistics.median(times),
        "mean_batch": statistics.fmean(timer.sizes[warmup:]),
        "steps": len(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "recipes" / "lm_goldfish.yaml"))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="plain,hooks,ghost")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()

    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    cfg = {"model": cfg.get("model", {}), "data": cfg.get("data", {})}
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode in modes:
            r = run_once(mode, cfg, args.steps, args.warmup, args.device)
            results[mode].append(r)
            print(f"repeat {rep} {mode:6s} median step {r['median_step_s'] * 1e3:8.2f} ms  mean batch {r['mean_batch']:.1f}", flush=True)
    summary = {m: statistics.median(r["median_step_s"] for r in rs) for m, rs in results.items()}
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print("\nmodel:", cfg["model"], "\ndata:", {k: cfg["data"].get(k) for k in ("seq_len", "batch_size", "num_train")})
    print("machine:", machine)
    print("\n| mode | median step (ms) | ratio vs plain |\n|---|---|---|")
    for m, t in summary.items():
        ratio = t / summary["plain"] if "plain" in summary else float("nan")
        print(f"| {m} | {t * 1e3:.2f} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary_s": summary, "runs": results, "machine": machine, "config": cfg}, indent=2))


if __name__ == "__main__":
    main()
