"""When the watermark is weak: detection at low deltas, and the recursive ``filter`` loop with escapes.

On the recursive recipe (``recipes/lm_collapse.yaml``: byte vocabulary 257, hidden 64, 128 real
sequences of 64 bytes, 10 epochs per generation) this script measures two things.

1. **Detection on the loop's own samples.** The reference loop's generation-0 model of each seed
   (``OUT/reference/runs/gen0/seed<S>``) samples ``--detect-n`` rows exactly the way the loop does
   (:func:`antimemo.collapse.synth.sample_synthetic`: the first ``prompt_length`` = 8 bytes of a
   real training row, then 56 sampled bytes, temperature 1, ``GreenListProcessor`` with the
   recipe's gamma 0.25, key and context width 1) at each ``--detect-deltas`` value, and with no
   watermark (delta 0). Each 64-byte row is scored as ``WatermarkFilter`` scores it
   (:func:`antimemo.watermark.detect_watermark` on the whole row: 63 scored positions, 56 of them
   sampled). Reported per delta: TPR at the nominal 1% FPR threshold (z > 2.326), TPR at the
   filter's threshold (z > 4, what ``WatermarkFilter`` drops), TPR at the empirical 1% FPR
   threshold of real text, the green fraction, and the NLL of the samples under the unbiased
   model (the distortion). False-positive rates are measured on real text: the recipe's 64
   held-out rows, and all 7263 distinct 64-byte rows of the embedded corpus.

2. **The loop at a weak delta.** ``antimemo recursive`` runs the reference (the shipped recipe,
   delta 4, ``--mix replace,filter``) and, for each ``--weak-deltas`` value, ``--mix filter`` on a
   copy of the recipe with ``recursive.delta`` lowered (written to ``OUT/lm_collapse_delta<d>.yaml``;
   the shipped recipe is not changed). Generation 0 does not depend on delta, so the weak runs
   start from a copy of the reference's real-data split and generation-0 runs (the loop resumes
   finished runs): every configuration shares the same generation 0. Per generation the script
   reports how many of that generation's synthetic samples escaped the filter (z <= 4), how many
   escaped samples the training set holds in all, and the real held-out loss, distinct-2,
   distinct-4 and bigram tail coverage (``generations.csv``), as the median over seeds with the
   range. It also samples ``--detect-n`` rows per seed from each weak generation's model *without*
   the watermark and scores them (:func:`radioactivity`): a model trained on escaped samples may
   have learned to write green tokens by itself.

Run (CPU, one torch thread per fit; 3 seeds and two weak deltas took 39 minutes on a 2-core machine
loaded by other jobs, load average 10-20)::

    python benchmarks/watermark_weak.py --out runs/watermark_weak --seeds 3 --weak-deltas 1.0 1.5 \\
        --json runs/watermark_weak/result.json

Rerunning the same command resumes: finished fits are not trained again. The figures are in
docs/collapse.md, "When the watermark is weak", and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from antimemo.collapse.loop import final_checkpoint, load_recipe  # noqa: E402
from antimemo.collapse.synth import load_checkpoint_model, sample_synthetic, watermark_flags  # noqa: E402
from antimemo.watermark import GreenListProcessor, detect_watermark  # noqa: E402
from watermark_bench import Z_1PCT, spread  # noqa: E402

RECIPE = ROOT / "recipes" / "lm_collapse.yaml"
SHOWN = ("val_loss", "diversity/distinct_2", "diversity/distinct_4", "diversity/tail_coverage")


def lowered_recipe(recipe: Mapping[str, Any], delta: float) -> dict[str, Any]:
    """A deep copy of ``recipe`` whose ``recursive.delta`` is ``delta`` (nothing else changes).

    Example:
        >>> lowered_recipe({"recursive": {"delta": 4.0, "gamma": 0.25}}, 2.0)["recursive"]
        {'delta': 2.0, 'gamma': 0.25}
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be a finite number >= 0 (the watermark bias), got {delta!r}; e.g. 2.0")
    section = recipe.get("recursive")
    if not isinstance(section, Mapping):
        raise ValueError(f"the recipe has no recursive: section (got {section!r}); use recipes/lm_collapse.yaml")
    out = copy.deepcopy(dict(recipe))
    out["recursive"] = {**copy.deepcopy(dict(section)), "delta": float(delta)}
    return out


def empirical_threshold(z_real: torch.Tensor, fpr: float = 0.01) -> float:
    """The smallest z threshold at which at most a fraction ``fpr`` of ``z_real`` lies strictly above.

    It is the ``floor(fpr * n) + 1``-th largest real z-score, so flagging ``z > threshold`` has an
    empirical false-positive rate ``<= fpr`` on ``z_real``.

    Example:
        >>> empirical_threshold(torch.arange(100.0), 0.01)
        98.0
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr!r}; e.g. 0.01")
    z = torch.as_tensor(z_real, dtype=torch.float64).flatten()
    if z.numel() == 0:
        raise ValueError("z_real is empty; pass the z-scores of real (unwatermarked) text")
    k = int(math.floor(fpr * z.numel()))
    return float(torch.sort(z, descending=True).values[k])


def rate_above(z: torch.Tensor, threshold: float) -> float:
    """Fraction of ``z`` strictly above ``threshold`` (a TPR on watermarked rows, an FPR on real ones)."""
    return float((torch.as_tensor(z) > threshold).double().mean())


@torch.no_grad()
def sample_nll(model: torch.nn.Module, rows: torch.Tensor, prompt_length: int) -> float:
    """Mean NLL (nats/token) of the sampled part of ``rows`` (after the prompt) under ``model``, unbiased."""
    logp = torch.log_softmax(model(input_ids=rows).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, rows[:, 1:, None])[..., 0]
    return float(nll[:, prompt_length - 1 :].mean())


def detection(reference: Path, seeds: Sequence[int], deltas: Sequence[float], n: int, settings: Mapping[str, Any],
              recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Detection figures of the loop's generation-0 models (see the module docstring), pooled over seeds."""
    from antimemo.lm.data import TextDataModule

    train = torch.from_numpy(np.load(reference / "data" / "real_train.npy", allow_pickle=False))
    held = torch.from_numpy(np.load(reference / "data" / "real_val.npy", allow_pickle=False))
    a, b = TextDataModule(seq_len=train.shape[1], num_train=None, num_holdout=512, seed=0).build_split()
    corpus = torch.cat([a, b])
    g, key, w, p = settings["gamma"], settings["key"], settings["context_width"], settings["prompt_length"]

    def z_of(rows: torch.Tensor) -> torch.Tensor:
        return detect_watermark(rows, gamma=g, key=key, context_width=w)[0]

    z_held, z_corpus = z_of(held), z_of(corpus)
    emp = empirical_threshold(z_corpus, 0.01)
    out: dict[str, Any] = {
        "n_per_seed": n, "seeds": list(seeds), "heldout_rows": int(held.shape[0]), "corpus_rows": int(corpus.shape[0]),
        "corpus_z99": emp,
        "fpr": {name: {"z>2.33": rate_above(z, Z_1PCT), "z>4": rate_above(z, 4.0), "count_z>4": int((z > 4).sum())}
                for name, z in (("heldout", z_held), ("corpus", z_corpus),
                                ("corpus_ignore_repeated", detect_watermark(corpus, g, key, w, ignore_repeated=True)[0]))},
        "deltas": [],
    }
    models = [load_checkpoint_model(final_checkpoint(reference / "runs" / "gen0" / f"seed{s}"), recipe).model for s in seeds]
    prompts = train[torch.arange(n) % train.shape[0], :p]
    for delta in [0.0, *deltas]:
        zs, nlls = [], []
        for s, model in zip(seeds, models):
            proc = None if delta == 0 else GreenListProcessor(g, delta, key, context_width=w, vocab_size=model.config.vocab_size)
            rows = sample_synthetic(model, prompts, train.shape[1], proc, seed=900_001 + s, temperature=settings["temperature"])
            zs.append(z_of(rows))
            nlls.append(sample_nll(model, rows, p))
        z = torch.cat(zs)
        scored = train.shape[1] - w
        out["deltas"].append({
            "delta": delta, "rows": int(z.numel()),
            "tpr_z2.33": rate_above(z, Z_1PCT), "tpr_z4": rate_above(z, 4.0), "tpr_emp1pct": rate_above(z, emp),
            "mean_z": float(z.mean()),
            "green_fraction": float((z * math.sqrt(scored * g * (1 - g)) + g * scored).mean() / scored),
            "nll": sum(nlls) / len(nlls),
        })
        r = out["deltas"][-1]
        print(f"delta {delta:4.1f}: TPR z>2.33 {r['tpr_z2.33']:.3f}  z>4 {r['tpr_z4']:.3f}  emp.1% {r['tpr_emp1pct']:.3f}  "
              f"green {r['green_fraction']:.3f}  NLL {r['nll']:.3f}", flush=True)
    return out


def escapes(run_root: Path, mix: str, seed: int, generations: int, settings: Mapping[str, Any]) -> list[dict[str, int]]:
    """Per generation g >= 1 of one (mix, seed): its samples, how many the filter misses (z <= z_threshold),
    and the escaped samples of generations 1..g together (what a ``filter`` training set keeps)."""
    rows, total = [], 0
    for gen in range(1, generations):
        path = run_root / "runs" / mix / f"seed{seed}" / "synthetic" / f"gen{gen}.npy"
        samples = np.load(path, allow_pickle=False)
        flagged = watermark_flags(samples, settings["gamma"], settings["key"], settings["context_width"],
                                  settings["z_threshold"])
        escaped = int((~flagged).sum())
        total += escaped
        rows.append({"generation": gen, "samples": int(samples.shape[0]), "escaped": escaped, "escaped_in_train": total})
    return rows


def radioactivity(run_root: Path, mix: str, seeds: Sequence[int], generations: int, n: int,
                  settings: Mapping[str, Any], recipe: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per generation: the mean z-score and the fraction above the filter's threshold of ``n`` rows
    sampled WITHOUT the watermark from that generation's model (a model that learned the green lists
    from escaped samples writes green tokens on its own), ``spread`` over seeds."""
    train = torch.from_numpy(np.load(run_root / "data" / "real_train.npy", allow_pickle=False))
    prompts = train[torch.arange(n) % train.shape[0], : settings["prompt_length"]]
    out = []
    for gen in range(generations):
        zs, flagged = [], []
        for s in seeds:
            model = load_checkpoint_model(final_checkpoint(_run_dir(run_root, mix, s, gen)), recipe).model
            rows = sample_synthetic(model, prompts, train.shape[1], None, seed=700_001 + s, temperature=settings["temperature"])
            z = detect_watermark(rows, gamma=settings["gamma"], key=settings["key"], context_width=settings["context_width"])[0]
            zs.append(float(z.mean()))
            flagged.append(rate_above(z, settings["z_threshold"]))
        out.append({"generation": gen, "mean_z": spread(zs), "flagged": spread(flagged)})
        print(f"{run_root.name} gen {gen}: unwatermarked samples' mean z {_fmt(out[-1]['mean_z'])}, "
              f"flagged {_fmt(out[-1]['flagged'])}", flush=True)
    return out


def _run_dir(run_root: Path, mix: str, seed: int, generation: int) -> Path:
    if generation == 0:
        return run_root / "runs" / "gen0" / f"seed{seed}"
    return run_root / "runs" / mix / f"seed{seed}" / f"gen{generation}"


def read_generations(csv_path: Path) -> list[dict[str, Any]]:
    """``generations.csv`` rows with numbers parsed (empty cells: None)."""
    out = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v) if v != "" else None
                except ValueError:
                    parsed[k] = v
            out.append(parsed)
    return out


def table(label: str, rows: Sequence[Mapping[str, Any]], mix: str, escaped: Mapping[int, list[dict[str, int]]] | None,
          generations: int) -> list[dict[str, Any]]:
    """One line per generation of ``mix``: ``spread`` over seeds of each shown metric (and of the escapes)."""
    lines = []
    for gen in range(generations):
        group = [r for r in rows if int(r["generation"]) == gen and r["mix"] == mix]  # gen 0: one row per mix
        line: dict[str, Any] = {"config": label, "generation": gen}
        for key in SHOWN:
            line[key] = spread([r[key] for r in group if r.get(key) is not None])
        if escaped is not None and gen >= 1:
            for k in ("escaped", "escaped_in_train"):
                line[k] = spread([escaped[s][gen - 1][k] for s in sorted(escaped)])
            line["samples"] = escaped[sorted(escaped)[0]][gen - 1]["samples"]
        lines.append(line)
    return lines


def _recursive(config: Path, out: Path, generations: int, mixes: str, seeds: int, threads: int) -> None:
    from antimemo.collapse.cli import main as recursive_main

    argv = ["--config", str(config), "--generations", str(generations), "--mix", mixes, "--seeds", str(seeds),
            "--out", str(out), "--threads", str(threads)]
    print("antimemo recursive " + " ".join(argv), flush=True)
    code = recursive_main(argv)
    if code != 0:
        raise SystemExit(f"antimemo recursive exited with status {code} for {out}; rerun this command to resume")


def _fmt(s: Mapping[str, float] | None, digits: int = 3) -> str:
    if not s:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/watermark_weak"))
    parser.add_argument("--generations", type=int, default=4, help="including generation 0 (real data)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--detect-deltas", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--detect-n", type=int, default=256, help="sampled rows per delta and seed")
    parser.add_argument("--weak-deltas", type=float, nargs="*", default=[1.0, 1.5],
                        help="deltas of the weak filter loops (none: only the reference and detection)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each fit and of sampling")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.generations < 2 or args.seeds < 1 or args.detect_n < 1:
        parser.error("--generations must be >= 2, --seeds and --detect-n >= 1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    recipe = load_recipe(RECIPE)
    settings = {**recipe["recursive"]}
    seeds = list(range(args.seeds))
    ref = args.out / "reference"

    _recursive(RECIPE, ref, args.generations, "replace,filter", args.seeds, args.threads)
    result: dict[str, Any] = {
        "recipe": str(RECIPE.relative_to(ROOT)), "generations": args.generations, "seeds": seeds,
        "python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
        "detection": detection(ref, seeds, args.detect_deltas, args.detect_n, settings, recipe),
    }
    ref_rows = read_generations(ref / "generations.csv")
    ref_esc = {s: escapes(ref, "filter", s, args.generations, settings) for s in seeds}
    lines = table("replace, delta 4", ref_rows, "replace", None, args.generations)
    lines += table("filter, delta 4", ref_rows, "filter", ref_esc, args.generations)
    for delta in args.weak_deltas:
        weak = args.out / f"filter_delta{delta:g}"
        config = args.out / f"lm_collapse_delta{delta:g}.yaml"
        config.write_text(f"# {RECIPE.relative_to(ROOT)} with recursive.delta lowered to {delta:g} "
                          "(written by benchmarks/watermark_weak.py)\n"
                          + yaml.safe_dump(lowered_recipe(recipe, delta), sort_keys=False), encoding="utf-8")
        for s in seeds:  # generation 0 does not depend on delta: share the reference's
            src, dst = ref / "runs" / "gen0" / f"seed{s}", weak / "runs" / "gen0" / f"seed{s}"
            if not dst.exists():
                shutil.copytree(src, dst)
        if not (weak / "data").exists():
            shutil.copytree(ref / "data", weak / "data")
        _recursive(config, weak, args.generations, "filter", args.seeds, args.threads)
        esc = {s: escapes(weak, "filter", s, args.generations, {**settings, "delta": delta}) for s in seeds}
        lines += table(f"filter, delta {delta:g}", read_generations(weak / "generations.csv"), "filter", esc, args.generations)
        result.setdefault("radioactivity", {})[f"filter, delta {delta:g}"] = radioactivity(
            weak, "filter", seeds, args.generations, args.detect_n, settings, recipe)
    result["loop"] = lines
    result["seconds"] = time.perf_counter() - t0

    print("\n| config | gen | escaped / samples (this gen) | escaped in training set | real held-out loss | "
          "distinct-2 | distinct-4 | tail coverage |")
    print("|---|---|---|---|---|---|---|---|")
    for ln in lines:
        esc_now = f"{_fmt(ln['escaped'], 0)} / {ln['samples']}" if "escaped" in ln else "-"
        esc_all = _fmt(ln["escaped_in_train"], 0) if "escaped" in ln else "-"
        print(f"| {ln['config']} | {ln['generation']} | {esc_now} | {esc_all} | {_fmt(ln['val_loss'])} | "
              f"{_fmt(ln['diversity/distinct_2'])} | {_fmt(ln['diversity/distinct_4'])} | "
              f"{_fmt(ln['diversity/tail_coverage'])} |")
    print(f"total {result['seconds']:.0f}s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
