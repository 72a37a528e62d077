"""DP-SGD step time and peak memory of every per-sample-gradient route, against non-private training.

Each configuration is a real Lightning fit of ``CausalLMModule`` on ``TextDataModule`` with the LM
recipe's ``model`` and ``data`` sections (``recipes/lm_goldfish.yaml``; goldfish and the monitor off,
validation off), resized by ``--sizes`` / ``--seq-lens`` / ``--batch-sizes``:

- ``plain``: no callback (shuffled batches of ``batch_size``),
- ``hooks`` / ``functorch`` / ``ghost``: ``DifferentialPrivacy(noise_multiplier=1.0,
  grad_sample_mode=route)`` (Opacus' per-layer grad samplers / vmap for every layer / ghost
  clipping: per-sample gradient norms and a second backward pass),
- ``auto``: ``DifferentialPrivacy(grad_sample_mode="auto")`` (the route the callback picks),
- ``ew`` (torch ExpandedWeights): the callback does not offer it; the benchmark tries
  ``torch.nn.utils._per_sample_grad.call_for_per_sample_grads`` on the model once per size and
  records whether it runs (on Llama it does not: ``LlamaRMSNorm`` multiplies its weight with
  ``mul``, which ExpandedWeights cannot handle).

Sizes (``--sizes``): ``0.6M`` is the recipe model (hidden 128, 2 layers, MLP 512), ``7M`` the issue's
"7M" configuration (hidden 384, 4 layers, 6 heads, MLP 1536: 9.6M parameters counted), ``30M``
hidden 512, 7 layers, 8 heads, MLP 2048 (29.6M parameters).

**Time.** A timing callback measures the wall time of every training step (``on_train_batch_start``
to ``on_train_batch_end``: forward, backward, per-sample clipping, noise, optimizer step and the
callback's own per-step checks; CUDA synchronised). The first ``--warmup`` steps are dropped and the
median of the rest is the run's step time. Every configuration runs in a **fresh subprocess**; the
routes of one (size, seq, batch) cell run in turn, ``--repeats`` times (interleaved, so the drift
of a shared machine hits all of them), and the table gives the median over repeats and the ratio
to ``plain`` measured in the same repeats. DP batches are Poisson samples whose size varies around
``batch_size``; their mean size is reported.

**Memory.** The peak resident set size (``ru_maxrss``) of the subprocess, and its rise over the RSS
just before ``fit`` (the model, data and imports already loaded): the training's own peak. Configs
whose per-sample gradients alone (``batch x parameters x 4 bytes``, hooks / functorch) would pass
``--mem-budget-gb`` are not run; the table says so.

``--paired ROUNDS`` fits the routes of one cell in turn in one process, ROUNDS times, and reports
the ratio to ``plain`` per round and per row of the batch (:func:`paired`).

``--profile`` instead runs ``torch.profiler`` over a few DP steps of one configuration (default 7M,
seq 64, batch 16, routes hooks and ghost) and prints where the step time goes: per-sample gradients
by layer type, clipping (per-sample norms and the clipped sum), noise, the optimizer update, the
Poisson loader, the callback's checks (the parameter fingerprint), forward and backward.

Run: ``python benchmarks/dp_bench.py`` (the whole table: 3 sizes x 2 lengths x 2 batches x 4 routes x 2
repeats, each in its own process; long on 2 CPU cores, and never run in one go here: docs/benchmarks.md
lists the cells that were run),
``python benchmarks/dp_bench.py --sizes 7M --seq-lens 64 --batch-sizes 16``,
``python benchmarks/dp_bench.py --profile``. ``--json PATH`` writes the figures; ``--device cuda``.
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
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

SIZES: dict[str, dict[str, int]] = {
    "0.6M": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 512},
    "7M": {"hidden_size": 384, "num_layers": 4, "num_heads": 6, "intermediate_size": 1536},
    "30M": {"hidden_size": 512, "num_layers": 7, "num_heads": 8, "intermediate_size": 2048},
}
ROUTES = ("plain", "hooks", "functorch", "ghost", "bookkeeping", "ew", "auto")
# timed steps per run by size (halved for seq 256 and for batch 64, at least 2), to keep the large cells short
DEFAULT_STEPS = {"0.6M": 10, "7M": 6, "30M": 4}
PER_SAMPLE_ROUTES = ("hooks", "functorch", "auto")  # materialise batch x parameters per-sample gradients


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


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


def build_config(recipe: str, size: str, seq_len: int, batch_size: int) -> dict[str, Any]:
    """The recipe's model and data sections at one size, sequence length and batch size."""
    with open(recipe) as f:
        cfg = yaml.safe_load(f)
    model = dict(cfg.get("model", {}))
    model.update(SIZES[size])
    model["max_position_embeddings"] = max(int(model.get("max_position_embeddings", 128)), seq_len)
    data = dict(cfg.get("data", {}))
    data.update(seq_len=seq_len, batch_size=batch_size)
    return {"model": model, "data": data}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trainer(route: str, steps: int, device: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    from antimemo.callbacks.dp import DifferentialPrivacy

    if route != "plain":
        callbacks = [DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=route), *callbacks]
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def probe_ew(cfg: dict[str, Any]) -> str:
    """Try torch ExpandedWeights per-sample gradients on the model: ``"runs"`` or the error it raises."""
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    from antimemo.lm.module import CausalLMModule

    module = CausalLMModule(**cfg["model"])
    lm = module.model
    x = torch.randint(0, 256, (2, 8))
    try:
        out = call_for_per_sample_grads(lm, batch_size=2, loss_reduction="mean")(input_ids=x, labels=x)
        out.loss.backward()
    except Exception as err:  # the finding is the error itself
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return "runs"


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process: step times, batch sizes, peak memory."""
    _quiet()
    from antimemo.lm.data import TextDataModule
    from antimemo.lm.module import CausalLMModule

    cfg = spec["config"]
    if spec["route"] == "ew":
        return {"error": probe_ew(cfg)}
    pl.seed_everything(0, verbose=False)
    model = CausalLMModule(**cfg["model"])
    data = TextDataModule(**cfg["data"])
    timer = StepTimer()
    trainer = _trainer(spec["route"], spec["steps"] + spec["warmup"], spec["device"], [timer])
    chosen = None
    rss_before = _rss_mb()
    trainer.fit(model, data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    if spec["route"] == "auto":
        chosen = next(cb.route for cb in trainer.callbacks if hasattr(cb, "route"))
    times = timer.times[spec["warmup"]:]
    return {
        "times": times,
        "sizes": timer.sizes[spec["warmup"]:],
        "median_step_s": statistics.median(times),
        "mean_batch": statistics.fmean(timer.sizes[spec["warmup"]:]),
        "steps": len(times),
        "params": sum(p.numel() for p in model.parameters()),
        "rss_before_fit_mb": rss_before,
        "peak_rss_mb": peak,
        "fit_peak_rise_mb": peak - rss_before,
        "chosen_route": chosen,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if spec["device"] == "cuda" else None,
    }


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def steps_for(size: str, seq_len: int, batch: int, override: int | None) -> int:
    if override is not None:
        return override
    steps = DEFAULT_STEPS[size]
    if seq_len > 64:
        steps //= 2
    if batch > 16:
        steps //= 2
    return max(2, steps)


def n_params(cfg: dict[str, Any]) -> int:
    from antimemo.lm.module import CausalLMModule

    return sum(p.numel() for p in CausalLMModule(**cfg["model"]).parameters())


# ---------------------------------------------------------------------------------------------- profile
def profile(args: argparse.Namespace) -> None:
    """torch.profiler over a few DP steps: where the step time goes, by labelled region."""
    _quiet()
    from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    from antimemo.callbacks.dp import DifferentialPrivacy
    from antimemo.dp.bookkeeping import BookKeeping
    from antimemo.dp.hf import register_grad_samplers
    from antimemo.lm.data import TextDataModule
    from antimemo.lm.module import CausalLMModule

    register_grad_samplers()  # the callback registers them at setup: label the final table

    def labelled(fn: Any, label: str) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            with record_function(label):
                return fn(*a, **k)

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    patches: list[tuple[Any, str, Any]] = []
    ours: set[str] = set()

    def patch(owner: Any, name: str, label: str) -> None:
        original = owner[name] if isinstance(owner, dict) else getattr(owner, name)
        patches.append((owner, name, original))
        ours.add(label)
        if isinstance(owner, dict):
            owner[name] = labelled(original, label)
        else:
            setattr(owner, name, labelled(original, label))

    for table, kind in (
        (GradSampleHooks.GRAD_SAMPLERS, "per-sample grad"),
        (GradSampleHooksFastGradientClipping.NORM_SAMPLERS, "ghost norm"),
    ):
        for layer in list(table):
            patch(table, layer, f"{kind}: {getattr(layer, '__name__', layer)}")
    patch(DPOptimizer, "clip_and_accumulate", "clip: per-sample norms + clipped sum")
    patch(DPOptimizer, "add_noise", "noise")
    patch(DPOptimizer, "pre_step", "DP pre-step: clip + noise (+ accounting)")
    patch(DPOptimizerFastGradientClipping, "add_noise", "noise")
    patch(DPOptimizerFastGradientClipping, "pre_step", "DP pre-step: clip + noise (+ accounting)")
    patch(BookKeeping, "_norms", "book-keeping: per-sample norms")
    patch(BookKeeping, "_sums", "book-keeping: clipped sums")
    patch(torch.optim.AdamW, "step", "optimizer update (AdamW)")
    patch(DifferentialPrivacy, "_take_fingerprint", "callback: parameter fingerprint")
    patch(DifferentialPrivacy, "on_before_optimizer_step", "callback: pre-step checks")
    patch(DifferentialPrivacy, "on_train_batch_end", "callback: post-step checks")
    patch(_BaseDataLoaderIter, "__next__", "loader: next batch (Poisson sample + collate)")
    patch(CausalLMModule, "training_step", "forward (training_step)")
    patch(torch.Tensor, "backward", "backward (Tensor.backward)")

    class Window(pl.Callback):
        """Profile the steps after warmup."""

        def __init__(self, prof: Any) -> None:
            self.prof, self.times, self.t0 = prof, [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
            self.times.append(time.perf_counter() - self.t0)

    size, seq, batch = args.sizes.split(",")[0], int(args.seq_lens.split(",")[0]), int(args.batch_sizes.split(",")[0])
    cfg = build_config(args.config, size, seq, batch)
    routes = [r for r in args.routes.split(",") if r not in ("ew",)]
    steps = args.steps or 4
    out: dict[str, Any] = {}
    try:
        for route in routes:
            pl.seed_everything(0, verbose=False)
            model = CausalLMModule(**cfg["model"])
            data = TextDataModule(**cfg["data"])
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                prof_cb = Window(prof)
                trainer = _trainer(route, steps + args.warmup, args.device, [prof_cb])
                trainer.fit(model, data)
            events = prof.key_averages()
            n_steps = len(prof_cb.times)
            step_ms = 1e3 * sum(prof_cb.times) / n_steps
            labels = {e.key: e.cpu_time_total / 1e3 / n_steps for e in events if e.key in ours}
            top_ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:8]
            out[route] = {
                "step_ms": step_ms,
                "regions_ms_per_step": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
                "top_aten_self_ms_per_step": {e.key: e.self_cpu_time_total / 1e3 / n_steps for e in top_ops},
                "steps_profiled": n_steps,
            }
            print(f"\n== {route}: {size} seq {seq} batch {batch}, {n_steps} steps profiled (incl. warmup), mean step "
                  f"{step_ms:.0f} ms under the profiler")
            print("| region | ms per step | share of step |\n|---|---|---|")
            for k, v in out[route]["regions_ms_per_step"].items():
                print(f"| {k} | {v:.1f} | {100 * v / step_ms:.1f}% |")
            print("| top aten ops (self time) | ms per step | |")
            for k, v in out[route]["top_aten_self_ms_per_step"].items():
                print(f"| {k} | {v:.1f} | {100 * v / step_ms:.1f}% |")
    finally:
        for owner, name, original in reversed(patches):
            if isinstance(owner, dict):
                owner[name] = original
            else:
                setattr(owner, name, original)
    print("machine:", machine(args.device))
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": out, "config": cfg, "machine": machine(args.device)}, indent=2))


def paired(args: argparse.Namespace) -> None:
    """``--paired ROUNDS``: every route of one cell fitted in turn in THIS process, ROUNDS times.

    Separate processes on a small VM differ by 10-20% in plain step time alone (allocator and
    cache state), which swamps a 1.3x-or-not question; fits seconds apart in one process do not.
    Per round: the ratio of the route's median step to plain's, and the same per row of the batch
    (the median over steps of ``time / batch size``: DP batches are Poisson draws of varying size,
    plain batches are exactly ``batch``). The table gives the medians over rounds."""
    _quiet()
    size, seq, batch = args.sizes.split(",")[0], int(args.seq_lens.split(",")[0]), int(args.batch_sizes.split(",")[0])
    cfg = build_config(args.config, size, seq, batch)
    routes = [r for r in args.routes.split(",") if r != "ew"]
    if "plain" not in routes:
        raise SystemExit("--paired needs plain among --routes (the ratios are to plain)")
    steps = steps_for(size, seq, batch, args.steps)
    rounds: list[dict[str, dict[str, float]]] = []
    load0 = os.getloadavg()
    for r in range(args.paired):
        row: dict[str, dict[str, float]] = {}
        for route in routes:
            out = child({"route": route, "config": cfg, "steps": steps, "warmup": args.warmup, "device": args.device})
            per_row = statistics.median(t / max(b, 1) for t, b in zip(out["times"], out["sizes"]))
            row[route] = {"step": out["median_step_s"], "per_row": per_row, "batch": out["mean_batch"]}
        for route in routes:
            row[route]["ratio"] = row[route]["step"] / row["plain"]["step"]
            row[route]["ratio_per_row"] = row[route]["per_row"] / row["plain"]["per_row"]
        rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{k} {v['step'] * 1e3:.0f} ms (x{v['ratio']:.2f}, per row x{v['ratio_per_row']:.2f}, "
                                          f"batch {v['batch']:.1f})" for k, v in row.items()), flush=True)  # fmt: skip
    print(f"\n{size} x seq {seq} x batch {batch}, {args.paired} rounds of {steps} timed steps after {args.warmup} warm-up, "
          f"one process; load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| route | step (ms, median over rounds) | ratio vs plain (median of per-round) | per round | ratio per row | mean batch |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for route in routes:
        ratios = [rd[route]["ratio"] for rd in rounds]
        per_row = [rd[route]["ratio_per_row"] for rd in rounds]
        summary[route] = {
            "step_ms": 1e3 * statistics.median(rd[route]["step"] for rd in rounds),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "ratio_per_row": statistics.median(per_row),
            "mean_batch": statistics.fmean(rd[route]["batch"] for rd in rounds),
        }
        v = summary[route]
        print(f"| {route} | {v['step_ms']:.0f} | {v['ratio']:.2f} | {', '.join(f'{x:.2f}' for x in ratios)} | "
              f"{v['ratio_per_row']:.2f} | {v['mean_batch']:.1f} |")  # fmt: skip
    print("machine:", machine(args.device))
    if args.json:
        Path(args.json).write_text(json.dumps({"paired": summary, "rounds": rounds, "config": cfg, "machine": machine(args.device)}, indent=2))


def machine(device: str) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "recipes" / "lm_goldfish.yaml"))
    ap.add_argument("--sizes", default="0.6M,7M,30M", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--seq-lens", default="64,256")
    ap.add_argument("--batch-sizes", default="16,64")
    ap.add_argument("--routes", default="plain,hooks,functorch,ghost,ew", help=f"comma list of {ROUTES}")
    ap.add_argument("--steps", type=int, default=None, help=f"timed steps per run (default by size: {DEFAULT_STEPS})")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mem-budget-gb", type=float, default=6.0, help="skip configs whose per-sample grads exceed this")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--profile", action="store_true", help="torch.profiler breakdown of one configuration")
    ap.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                    help="time the routes of the first size/seq/batch in ONE process, ROUNDS rounds (ratios per round)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    for name, values, valid in (("--sizes", args.sizes, SIZES), ("--routes", args.routes, ROUTES)):
        bad = [v for v in values.split(",") if v not in valid]
        if bad:
            ap.error(f"{name} got {bad}; valid values are {sorted(valid)}")
    if args.paired:
        paired(args)
        return
    if args.profile:
        if args.routes == ap.get_default("routes"):
            args.routes = "hooks,ghost"
        if args.sizes == ap.get_default("sizes"):
            args.sizes = "7M"
        profile(args)
        return
    _quiet()
    sizes, seqs = args.sizes.split(","), [int(s) for s in args.seq_lens.split(",")]
    batches, routes = [int(b) for b in args.batch_sizes.split(",")], args.routes.split(",")
    results: dict[str, dict[str, Any]] = {}
    params: dict[str, int] = {}
    t_start = time.time()
    if "ew" in routes:
        for size in sizes:
            r = run_child({"route": "ew", "config": build_config(args.config, size, 64, 16)}, args.timeout)
            results[f"{size}|-|-|ew"] = {"runs": [], "skipped": r.get("error")}
            print(f"ew {size}: {r.get('error')}", flush=True)
    cells = [(s, q, b) for s in sizes for q in seqs for b in batches]
    for rep in range(args.repeats):
        for size, seq, batch in cells:
            cfg = build_config(args.config, size, seq, batch)
            if size not in params:
                params[size] = n_params(cfg)
            steps = steps_for(size, seq, batch, args.steps)
            for route in routes:
                if route == "ew":
                    continue
                key = f"{size}|{seq}|{batch}|{route}"
                entry = results.setdefault(key, {"runs": [], "skipped": None})
                est_gb = batch * params[size] * 4 / 1e9
                if route in PER_SAMPLE_ROUTES and est_gb > args.mem_budget_gb:
                    entry["skipped"] = f"not run: per-sample grads ~{est_gb:.1f} GB > {args.mem_budget_gb:g} GB budget"
                    continue
                spec = {"route": route, "config": cfg, "steps": steps, "warmup": args.warmup, "device": args.device}
                r = run_child(spec, args.timeout)
                if "error" in r:
                    entry["skipped"] = r["error"]
                    print(f"repeat {rep} {key}: {r['error']}", flush=True)
                    continue
                entry["runs"].append(r)
                print(
                    f"repeat {rep} {key:24s} step {r['median_step_s'] * 1e3:9.1f} ms  batch {r['mean_batch']:5.1f}  "
                    f"peak RSS {r['peak_rss_mb']:7.0f} MB (fit +{r['fit_peak_rise_mb']:.0f})"
                    + (f"  chose {r['chosen_route']}" if r.get("chosen_route") else "")
                    + f"  [{time.time() - t_start:.0f} s, load {os.getloadavg()[0]:.1f}]",
                    flush=True,
                )
    print("\nparameters:", params)
    print("machine:", machine(args.device))
    print("\n| size | seq | batch | route | median step (ms) | ratio vs plain | mean batch | peak RSS (MB) | fit peak rise (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = []
    for key, entry in results.items():
        size, seq, batch, route = key.split("|")
        if not entry["runs"]:
            print(f"| {size} | {seq} | {batch} | {route} | {entry['skipped']} | | | | |")
            table.append({"key": key, "skipped": entry["skipped"]})
            continue
        med = statistics.median(r["median_step_s"] for r in entry["runs"])
        plain = results.get(f"{size}|{seq}|{batch}|plain", {}).get("runs")
        # ratio per repeat (the route and plain measured side by side), then the median
        ratios = (
            [r["median_step_s"] / p["median_step_s"] for r, p in zip(entry["runs"], plain)] if plain else []
        )
        ratio = statistics.median(ratios) if ratios else float("nan")
        peak = max(r["peak_rss_mb"] for r in entry["runs"])
        rise = max(r["fit_peak_rise_mb"] for r in entry["runs"])
        mb = statistics.fmean(r["mean_batch"] for r in entry["runs"])
        chosen = entry["runs"][0].get("chosen_route")
        name = f"{route} ({chosen})" if chosen else route
        print(f"| {size} | {seq} | {batch} | {name} | {med * 1e3:.1f} | {ratio:.2f} | {mb:.1f} | {peak:.0f} | {rise:.0f} |")
        table.append({"key": key, "median_step_s": med, "ratio_vs_plain": ratio, "peak_rss_mb": peak, "fit_peak_rise_mb": rise})
    print(f"\ntotal wall time {time.time() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"table": table, "results": results, "params": params, "machine": machine(args.device)}, indent=2)
        )


if __name__ == "__main__":
    main()
