"""Cost of goldfish masking and of the memorization monitor, on the LM recipe's model.

Measurements, each against its alternative in the same run (interleaved, median):

1. Step level: one training step of the recipe model (forward, backward, AdamW step) against
   ``GoldfishTokenDropout.apply`` on the same batch (the work the callback adds per step), the
   bare ``goldfish_mask`` and, for comparison, the previous mask definition (a sequential
   splitmix64 fold over the ``h`` offsets, kept only in this script as ``_old_goldfish_mask``).
   Target: mask cost <= 1% of the step.
2. Monitor evaluation: one ``MemorizationMonitor`` evaluation (generation of every probe plus
   MIA scoring, ``holdout="val"``) on the recipe model, with the shared teacher-forced pass
   (members = probes) against the separate pass it replaced (``_SeparatePassMonitor``: prefix
   prefill for generation and a separate full forward over the members), in seconds and in
   training-step equivalents; in the same round-robin, the generation that
   ``MemorizationMonitor()`` does with its own defaults (``greedy_generate``, batch 32, no MIA)
   and its floor, one teacher-forced forward over every whole probe (what generation would cost
   if greedy decoding ran at teacher-forced speed).
3. Whole runs: ``Trainer.fit`` for ``--epochs`` epochs with validation every epoch, the
   configurations of ``--configs`` in interleaved order, ``--reps`` repetitions each, median
   wall time: ``plain`` (no antimemo callback), ``goldfish`` (``GoldfishTokenDropout``),
   ``monitor`` (``MemorizationMonitor`` at its default cadence, every epoch, with
   ``holdout="val"``), ``monitor_separate`` (the same with the old separate pass) and
   ``monitor_recipe`` (the recipe's cadence, ``monitor.every_n_epochs`` in the yaml) and
   ``monitor_default`` (``MemorizationMonitor()`` with its own defaults: every epoch, no MIA,
   the full greedy decode every ``decode_every_n_evaluations`` = 5 evaluations and in the last
   epoch, the teacher-forced fast path at the others), ``monitor_decode_all``
   (``MemorizationMonitor(decode_every_n_evaluations=1)``: decoding at every evaluation, the
   defaults before the fast path) and ``monitor_discoverable``
   (``MemorizationMonitor(discoverable=True)``: the defaults plus the probabilistic keys).
   Target: monitor cost <= 10% of training time. Runs with a monitor also report the monitor's
   own timing (``MemorizationMonitor.evaluation_seconds``) as a share of the rest of the fit,
   which is not subject to run-to-run noise the way a difference of two fits is.
   ``--num-train`` sets the epoch length, since an every-epoch cost is relative to the epoch: the
   recipe's 256 sequences are 16 steps; ``--num-train all`` trains on the whole embedded corpus,
   446 steps.

Usage::

    python benchmarks/lm_overhead_bench.py                       # recipe sizes, CPU
    python benchmarks/lm_overhead_bench.py --device cuda --epochs 10
    python benchmarks/lm_overhead_bench.py --skip-runs --json out.json
    python benchmarks/lm_overhead_bench.py --skip-monitor --configs plain,monitor_default --num-train all --epochs 1

Model and data sizes are read from ``recipes/lm_goldfish.yaml`` (``model`` and ``data``
sections); ``--epochs`` replaces the recipe's epoch count so the benchmark stays short.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
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


def _old_goldfish_mask(input_ids: torch.Tensor, k: int, h: int, seed: int = 0) -> torch.Tensor:
    """The mask definition antimemo used before (no padding, no exempt ids): state =
    mix64(seed + GAMMA), then state = mix64(state + GAMMA + token) for the tokens i-h .. i-1,
    oldest first. A Python loop of ~12 small int64 kernels per offset; for comparison only."""
    from antimemo.functional.goldfish import _GAMMA, _MASK63, _as_int64, _mix64, _mix64_

    b, t = input_ids.shape
    ids = input_ids.to(torch.int64)
    init = torch.tensor(_as_int64(_as_int64(seed) + _GAMMA), dtype=torch.int64)
    state = torch.full((b, t), int(_mix64(init)), dtype=torch.int64, device=ids.device)
    for d in range(min(h, t - 1), 0, -1):
        update = state[:, d:] + _GAMMA
        update += ids[:, : t - d]
        _mix64_(update)
        state[:, d:] = update
    has_context = (torch.arange(t, device=ids.device) >= 1).expand(b, t)
    return has_context & ((state & _MASK63) % k == 0)


def _interleaved_medians(fns: dict, device: torch.device, reps: int, warmup: int = 3) -> dict:
    """Median wall time of each function, timed round-robin so load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


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

    from antimemo.functional.goldfish import goldfish_mask

    k, h, seed = goldfish_kw.get("k", 4), goldfish_kw.get("h", 13), goldfish_kw.get("seed", 0)
    new_mask = goldfish_mask(batch_ids, k=k, h=h, seed=seed)
    old_mask = _old_goldfish_mask(batch_ids, k=k, h=h, seed=seed)
    timings = _interleaved_medians(
        {
            "train_step": train_step,
            "goldfish_apply": mask_step,
            "mask_new": lambda: goldfish_mask(batch_ids, k=k, h=h, seed=seed),
            "mask_old": lambda: _old_goldfish_mask(batch_ids, k=k, h=h, seed=seed),
        },
        device,
        reps,
    )
    step = timings["train_step"]
    return {
        "batch_shape": list(batch_ids.shape),
        "train_step_s": step,
        "goldfish_apply_s": timings["goldfish_apply"],
        "mask_new_s": timings["mask_new"],
        "mask_old_s": timings["mask_old"],
        "apply_over_step": timings["goldfish_apply"] / step,
        "mask_new_over_step": timings["mask_new"] / step,
        "mask_old_over_step": timings["mask_old"] / step,
        "old_over_new_mask": timings["mask_old"] / timings["mask_new"],
        "drop_rate_new": float(new_mask[:, 1:].float().mean()),
        "drop_rate_old": float(old_mask[:, 1:].float().mean()),
    }


def _separate_pass_monitor_class():
    from antimemo.callbacks.monitor import MemorizationMonitor

    class _SeparatePassMonitor(MemorizationMonitor):
        """The evaluation before the shared pass: prefill-only generation, then a separate full
        forward over the members (the protocol and the results are the same)."""

        def _members_are_probes(self) -> bool:
            return False

    return _SeparatePassMonitor


def monitor_level(model_kw, data_kw, monitor_kw, device: torch.device, reps: int, step_s: float) -> dict:
    """Seconds per monitor evaluation (shared vs separate pass), outside a Trainer."""
    from types import SimpleNamespace

    from antimemo.callbacks.monitor import MemorizationMonitor
    from antimemo.lm import CausalLMModule, TextDataModule

    dm = TextDataModule(**data_kw)
    dm.setup("fit")
    module = CausalLMModule(**model_kw).to(device)
    trainer = SimpleNamespace(
        enable_validation=True,
        limit_val_batches=1.0,
        train_dataloader=dm.train_dataloader(),
        val_dataloaders=dm.val_dataloader(),
        world_size=1,
        global_rank=0,
    )
    kw = {"holdout": "val", **monitor_kw, "every_n_epochs": 1}
    monitors = {"shared": MemorizationMonitor(**kw), "separate": _separate_pass_monitor_class()(**kw)}
    for monitor in monitors.values():
        monitor.on_train_start(trainer, module)
    assert monitors["shared"]._members_are_probes(), "recipe MIA members should be the probes"
    results = {name: m._evaluate(trainer, module) for name, m in monitors.items()}
    from antimemo.functional.generation import greedy_generate

    probes = monitors["shared"].probes.to(device)
    prefix = monitors["shared"].prefix_length
    default_batch = inspect.signature(MemorizationMonitor).parameters["batch_size"].default

    def generate_default():
        # what MemorizationMonitor() with its own defaults does per evaluation (no MIA)
        greedy_generate(module.model, probes[:, :prefix], probes.shape[1] - prefix, batch_size=default_batch)

    from antimemo.probes import ProbeScorer

    fast = ProbeScorer(prefix_length=prefix, suffix_length=probes.shape[1] - prefix, batch_size=default_batch)
    fast_discoverable = ProbeScorer(
        prefix_length=prefix, suffix_length=probes.shape[1] - prefix, batch_size=default_batch, discoverable={}
    )

    def fast_path():
        # a MemorizationMonitor() evaluation between decodes: one teacher-forced pass, exact match
        with torch.inference_mode():
            fast.teacher_forced(module.model, probes.cpu(), device)

    def fast_path_discoverable():
        # the same with discoverable=True: reproduced length and (n, p)-discoverable rates too
        with torch.inference_mode():
            fast_discoverable.teacher_forced(module.model, probes.cpu(), device)

    def teacher_forced():
        # the floor: one forward over every whole probe, i.e. generation at teacher-forced speed
        with torch.no_grad():
            for start in range(0, probes.shape[0], default_batch):
                module.model(input_ids=probes[start : start + default_batch], use_cache=False)

    module.eval()
    fns = {name: (lambda m=m: m._evaluate(trainer, module)) for name, m in monitors.items()}
    fns.update(
        generate_default=generate_default,
        teacher_forced=teacher_forced,
        fast_path=fast_path,
        fast_path_discoverable=fast_path_discoverable,
    )
    timings = _interleaved_medians(fns, device, reps, warmup=1)
    out = {
        "num_probes": int(monitors["shared"].probes.shape[0]),
        "batch_size": monitors["shared"].batch_size,
        "eval_shared_s": timings["shared"],
        "eval_separate_s": timings["separate"],
        "eval_shared_in_steps": timings["shared"] / step_s,
        "eval_separate_in_steps": timings["separate"] / step_s,
        "steps_per_epoch_for_10pct": timings["shared"] / (0.10 * step_s),
        "default_batch_size": default_batch,
        "generate_default_s": timings["generate_default"],
        "generate_default_in_steps": timings["generate_default"] / step_s,
        "teacher_forced_s": timings["teacher_forced"],
        "teacher_forced_in_steps": timings["teacher_forced"] / step_s,
        "generate_over_teacher_forced": timings["generate_default"] / timings["teacher_forced"],
        "fast_path_s": timings["fast_path"],
        "fast_path_in_steps": timings["fast_path"] / step_s,
        "fast_path_discoverable_s": timings["fast_path_discoverable"],
        "fast_path_discoverable_in_steps": timings["fast_path_discoverable"] / step_s,
        "max_abs_result_difference": max(
            abs(results["shared"][key] - results["separate"][key]) for key in results["shared"]
        ),
    }
    return out


def _fit_once(
    config: str, model_kw, data_kw, goldfish_kw, monitor_kw, epochs: int, device: torch.device
) -> tuple[float, float]:
    """Wall time of one fit and the seconds its monitor reports spending in evaluations (0
    without a monitor)."""
    import lightning.pytorch as pl

    from antimemo.callbacks.goldfish import GoldfishTokenDropout
    from antimemo.callbacks.monitor import MemorizationMonitor
    from antimemo.lm import CausalLMModule, TextDataModule

    callbacks = []
    if config == "goldfish":
        callbacks.append(GoldfishTokenDropout(**goldfish_kw))
    elif config == "monitor":  # the monitor's default cadence: every validation epoch
        callbacks.append(MemorizationMonitor(**{"holdout": "val", **monitor_kw, "every_n_epochs": 1}))
    elif config == "monitor_separate":  # the same, with the separate pass it replaced
        callbacks.append(
            _separate_pass_monitor_class()(**{"holdout": "val", **monitor_kw, "every_n_epochs": 1})
        )
    elif config == "monitor_default":  # MemorizationMonitor() as constructed with its own defaults:
        # 64 probes, batch 32, every epoch, holdout=None (no MIA scoring)
        callbacks.append(MemorizationMonitor())
    elif config == "monitor_decode_all":  # the defaults before the fast path: decode every evaluation
        callbacks.append(MemorizationMonitor(decode_every_n_evaluations=1))
    elif config == "monitor_discoverable":  # the defaults plus the probabilistic extraction keys
        callbacks.append(MemorizationMonitor(discoverable=True))
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
    elapsed = time.perf_counter() - t0
    evaluations = sum(sum(getattr(c, "evaluation_seconds", ())) for c in callbacks)
    return elapsed, evaluations


def run_level(model_kw, data_kw, goldfish_kw, monitor_kw, epochs: int, reps: int, device: torch.device,
              configs=("plain", "goldfish", "monitor", "monitor_separate", "monitor_recipe")) -> dict:
    configs = tuple(configs)
    times: dict[str, list[float]] = {c: [] for c in configs}
    shares: dict[str, list[float]] = {c: [] for c in configs}  # monitor time / the rest of the fit
    _fit_once("plain", model_kw, data_kw, goldfish_kw, monitor_kw, 1, device)  # warm-up (imports, allocator)
    for rep in range(reps):
        order = configs if rep % 2 == 0 else tuple(reversed(configs))
        for config in order:
            elapsed, evaluations = _fit_once(config, model_kw, data_kw, goldfish_kw, monitor_kw, epochs, device)
            times[config].append(elapsed)
            shares[config].append(evaluations / (elapsed - evaluations))
    med = {c: statistics.median(v) for c, v in times.items()}
    from antimemo.lm import TextDataModule

    dm = TextDataModule(**data_kw)
    dm.setup("fit")  # the loader the fits use: duplicates and batch size included
    out = {"epochs": epochs, "reps": reps, "train_sequences": len(dm.train_dataset),
           "steps_per_epoch": len(dm.train_dataloader()),
           "times_s": times, "median_s": med,
           "monitor_timed_share": {c: statistics.median(v) for c, v in shares.items() if any(v)}}
    if "plain" in med:
        for config in configs:
            if config != "plain":
                out[f"{config}_cost_fraction"] = (med[config] - med["plain"]) / med["plain"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "lm_goldfish.yaml")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per whole run (default 3)")
    parser.add_argument("--reps", type=int, default=3, help="whole-run repetitions per configuration")
    parser.add_argument("--step-reps", type=int, default=20, help="timed repetitions at step level")
    parser.add_argument("--monitor-reps", type=int, default=5, help="timed monitor evaluations per variant")
    parser.add_argument("--skip-runs", action="store_true", help="no whole-run measurement")
    parser.add_argument("--skip-monitor", action="store_true", help="no monitor-evaluation measurement")
    parser.add_argument(
        "--configs",
        default="plain,goldfish,monitor,monitor_separate,monitor_recipe",
        help="comma-separated whole-run configurations",
    )
    parser.add_argument(
        "--num-train",
        default=None,
        help="replace the recipe's data.num_train: an integer, or 'all' for every sequence of the "
        "corpus not held out (7135 sequences = 446 steps per epoch for pydoc_topics)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()

    device = torch.device(args.device)
    model_kw, data_kw, goldfish_kw, monitor_kw = _recipe_args(args.recipe)
    if args.num_train is not None:
        if args.num_train == "all":
            data_kw["num_train"] = None
        elif args.num_train.isdigit() and int(args.num_train) > 0:
            data_kw["num_train"] = int(args.num_train)
        else:
            parser.error(f"--num-train must be a positive integer or 'all', got {args.num_train!r}")
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
        f"step level, batch {s['batch_shape']} (median of {args.step_reps}, interleaved): "
        f"train step {s['train_step_s'] * 1e3:.2f} ms\n"
        f"  goldfish_mask (new)  {s['mask_new_s'] * 1e3:.3f} ms = {s['mask_new_over_step']:.3%} of the step (target <= 1%)\n"
        f"  goldfish_mask (old)  {s['mask_old_s'] * 1e3:.3f} ms = {s['mask_old_over_step']:.3%} of the step; "
        f"old / new = {s['old_over_new_mask']:.1f}x\n"
        f"  GoldfishTokenDropout.apply {s['goldfish_apply_s'] * 1e3:.3f} ms = {s['apply_over_step']:.3%} of the step\n"
        f"  drop rate new {s['drop_rate_new']:.4f}, old {s['drop_rate_old']:.4f} (1/k = {1 / goldfish_kw.get('k', 4):.4f})"
    )
    if not args.skip_monitor:
        result["monitor_level"] = monitor_level(model_kw, data_kw, monitor_kw, device, args.monitor_reps, s["train_step_s"])
        m = result["monitor_level"]
        print(
            f"monitor evaluation ({m['num_probes']} probes, batch {m['batch_size']}, holdout='val', median of "
            f"{args.monitor_reps}, interleaved):\n"
            f"  shared pass   {m['eval_shared_s']:.3f} s = {m['eval_shared_in_steps']:.1f} training steps\n"
            f"  separate pass {m['eval_separate_s']:.3f} s = {m['eval_separate_in_steps']:.1f} training steps\n"
            f"  every-epoch cost <= 10% needs epochs of >= {m['steps_per_epoch_for_10pct']:.0f} steps; "
            f"max |result difference| = {m['max_abs_result_difference']:.2e}\n"
            f"  MemorizationMonitor() defaults (greedy generation, batch {m['default_batch_size']}, no MIA): "
            f"{m['generate_default_s']:.3f} s = {m['generate_default_in_steps']:.2f} training steps\n"
            f"  floor, one teacher-forced forward over every probe: {m['teacher_forced_s']:.3f} s = "
            f"{m['teacher_forced_in_steps']:.2f} training steps (generation / floor = "
            f"{m['generate_over_teacher_forced']:.1f}x)\n"
            f"  fast path (MemorizationMonitor() between decodes: teacher-forced exact match): "
            f"{m['fast_path_s']:.3f} s = {m['fast_path_in_steps']:.2f} training steps; with discoverable=True "
            f"{m['fast_path_discoverable_s']:.3f} s = {m['fast_path_discoverable_in_steps']:.2f} steps"
        )
    if not args.skip_runs:
        configs = [c for c in args.configs.split(",") if c]
        result["run_level"] = run_level(
            model_kw, data_kw, goldfish_kw, monitor_kw, args.epochs, args.reps, device, configs
        )
        r = result["run_level"]
        print(
            f"whole runs ({r['epochs']} epochs of {r['steps_per_epoch']} steps ({r['train_sequences']} "
            f"sequences), median of {r['reps']}):"
        )
        for name, t in r["median_s"].items():
            cost = r.get(f"{name}_cost_fraction")
            each = ", ".join(f"{x:.1f}" for x in r["times_s"][name])
            own = r["monitor_timed_share"].get(name)
            print(
                f"  {name:16s} {t:8.2f} s" + ("" if cost is None else f"  ({cost:+.1%} vs plain)") + f"  [{each}]"
                + ("" if own is None else f"; its own evaluations: {own:.1%} of the rest of the fit")
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=lambda o: getattr(o, "__qualname__", repr(o))))


if __name__ == "__main__":
    main()
