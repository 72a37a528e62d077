"""Green-list watermark detectability on the byte-level LM recipe (vocabulary 257), and its cost.

Setup (everything offline and seeded):

1. Data: ``TextDataModule(seq_len=64, num_train=None, num_holdout=512, seed=0)`` over the embedded
   corpus (CPython's help texts): all distinct 64-byte rows not held out are the training split,
   the 512 held-out rows are "real human text" for the false-positive rate.
2. Model: the LM recipe's ``CausalLMModule`` (``recipes/lm_goldfish.yaml``: hidden 128, 2 layers,
   4 heads, MLP 512, 0.6M parameters), trained here with AdamW (lr 2e-3, batch 32) for
   ``--train-steps`` steps on the training split (a plain torch loop, no callback). Its held-out
   loss is reported. ``--untrained`` uses the randomly initialised model instead.
3. Generation: for each ``(gamma, delta)``, ``--n`` sequences of 64 new tokens sampled at
   temperature 1 (no top-k / top-p) after a 16-byte prompt (the first 16 bytes of held-out rows),
   with :class:`antimemo.watermark.GreenListProcessor` (``context_width=1``, key 15485863); the
   same prompts and sampling seed without the processor give the null (unwatermarked) generations.
4. Detection: :func:`antimemo.watermark.detect_watermark` on the last prompt token + the 64
   generated tokens (64 scored positions); on the held-out rows, 63 scored positions each.

Reported per ``(gamma, delta)``: TPR at the analytic 1% FPR threshold (z > 2.326), the measured
FPR at that threshold on the held-out text and on the null generations, TPR at the empirical 1%
FPR threshold of the held-out text, TPR at z > 4, the mean green fraction of watermarked text,
and the mean per-token NLL of the watermarked samples under the model *without* the bias (how far
the watermark pushes the text away from what the model would write; the null samples give the
baseline) and the model's mean next-token entropy (low entropy = little room to watermark).

``--quality``: the cost of training on watermarked text, over ``--quality-seeds`` seeds. For seed
``s`` the trained model samples ``--quality-n`` sequences of 80 bytes (a 16-byte prompt from the
training split + 64 new tokens) once without the watermark and once per ``--quality-deltas`` value
(gamma 0.25): the same prompts and the same sampling generator for every condition of that seed
(same sampling budget). A fresh recipe model (initialised with the seed's init seed, the seed's
batch order) is trained for ``--quality-steps`` steps on each set, and its loss on the 512 real
held-out rows is compared. Seed ``s`` uses prompt order ``2 + 10 s``, sampling seed ``3 + 10 s``,
student init ``1 + 10 s`` and batch order ``4 + 10 s`` (seed 0 is the single run measured first).
Reported per delta: the median over seeds of the held-out loss and of the paired difference
(watermarked - unwatermarked, same seed) with its range; :func:`quality_summary`.

Run: ``python benchmarks/watermark_bench.py`` (CPU, one torch thread: about 2.5 minutes on a
busy shared 2-core machine; ``--quality`` trains 4 x 3 = 12 students by default: under a load
average of 10-20 a student took about 3.5 minutes and the whole ``--quality`` run 58 minutes). ``--json PATH`` writes the
figures. The results are in docs/collapse.md, "Watermark".
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from antimemo.lm.data import TextDataModule  # noqa: E402
from antimemo.lm.module import CausalLMModule  # noqa: E402
from antimemo.watermark import GreenListProcessor, detect_watermark  # noqa: E402

KEY = 15485863
PROMPT, NEW = 16, 64
Z_1PCT = 2.3263478740408408  # one-sided 1% quantile of N(0, 1)
RECIPE = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, max_position_embeddings=128)


def spread(values) -> dict:
    """``{"median", "min", "max", "n", "values"}`` of a list of numbers (the figures over seeds).

    Example:
        >>> spread([3.0, 1.0, 2.0])["median"], spread([3.0, 1.0, 2.0])["max"]
        (2.0, 3.0)
    """
    xs = [float(v) for v in values]
    if not xs or any(math.isnan(x) for x in xs):
        raise ValueError(f"spread needs at least one number and no NaN, got {values!r}")
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def train(model: torch.nn.Module, rows: torch.Tensor, steps: int, seed: int, batch_size: int = 32) -> None:
    """AdamW on random batches of ``rows`` (seeded), the model's own causal LM loss."""
    if steps == 0:
        return
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up 20 steps, then cosine to 10%
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = 2e-3 * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        batch = rows[torch.randint(0, rows.shape[0], (batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, rows: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=c, labels=c).loss) for c in rows.split(128)]
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(model, prompts: torch.Tensor, new: int, proc: GreenListProcessor | None, seed: int):
    """Temperature-1 sampling with a KV cache; returns (ids, mean NLL of the samples under the
    unbiased model, mean next-token entropy of the unbiased model)."""
    gen = torch.Generator().manual_seed(seed)
    ids = prompts
    out = model(input_ids=ids, use_cache=True)
    nll, ent = torch.zeros(prompts.shape[0], dtype=torch.float64), 0.0
    for _ in range(new):
        logits = out.logits[:, -1].float()
        logp = torch.log_softmax(logits, -1)
        ent += float(-(logp.exp() * logp).sum(-1).mean())
        biased = logits if proc is None else proc(ids, logits)
        nxt = torch.multinomial(torch.softmax(biased, -1), 1, generator=gen)
        nll -= logp.gather(1, nxt)[:, 0].double()
        ids = torch.cat([ids, nxt], dim=1)
        out = model(input_ids=nxt, cache=out.cache, use_cache=True)
    return ids, float(nll.mean()) / new, ent / new


def detection(generated: torch.Tensor, gamma: float) -> torch.Tensor:
    """z-scores of the 64 new tokens (the last prompt token is their first context)."""
    z, _ = detect_watermark(generated[:, PROMPT - 1 :], gamma=gamma, key=KEY)
    return z


def quality_summary(losses: dict[str, list[float]]) -> dict[str, dict]:
    """Per watermark condition: ``spread`` of the held-out losses over seeds and of the paired
    differences from the unwatermarked condition (same seed, same index in each list).

    ``losses`` maps ``"unwatermarked"`` and one name per delta to one loss per seed.

    Example:
        >>> s = quality_summary({"unwatermarked": [1.0, 2.0, 3.0], "delta 2": [1.5, 2.1, 3.3]})
        >>> [round(x, 3) for x in s["delta 2"]["difference"]["values"]]
        [0.5, 0.1, 0.3]
        >>> round(s["delta 2"]["difference"]["median"], 3)
        0.3
    """
    base = losses.get("unwatermarked")
    if not base:
        raise ValueError(f"losses needs an 'unwatermarked' list of one loss per seed, got keys {sorted(losses)}")
    out = {}
    for name, values in losses.items():
        if len(values) != len(base):
            raise ValueError(f"losses[{name!r}] has {len(values)} seeds but 'unwatermarked' has {len(base)}; "
                             "pair every condition with the same seeds")
        out[name] = {"loss": spread(values), "difference": spread([v - b for v, b in zip(values, base)])}
    return out


def quality_cost(model: torch.nn.Module, train_rows: torch.Tensor, held: torch.Tensor, args) -> dict:
    """Held-out loss of students trained on unwatermarked vs watermarked samples, per seed and delta."""
    from tqdm.auto import tqdm

    gamma = 0.25
    names = ["unwatermarked", *[f"delta {d:g}" for d in args.quality_deltas]]
    procs = [None, *[GreenListProcessor(gamma, d, KEY, vocab_size=257) for d in args.quality_deltas]]
    losses: dict[str, list[float]] = {name: [] for name in names}
    sample_nll: dict[str, list[float]] = {name: [] for name in names}
    bar = tqdm(total=args.quality_seeds * len(names), desc="quality students", unit="student")
    for s in range(args.quality_seeds):
        order = torch.randperm(train_rows.shape[0], generator=torch.Generator().manual_seed(2 + 10 * s))
        qprompts = train_rows[order[: args.quality_n], :PROMPT]
        for name, proc in zip(names, procs):
            synthetic, nll, _ = sample(model, qprompts, NEW, proc, seed=3 + 10 * s)
            student = CausalLMModule(**RECIPE, seed=1 + 10 * s).model
            train(student, synthetic, args.quality_steps, seed=4 + 10 * s)
            losses[name].append(heldout_loss(student, held))
            sample_nll[name].append(nll)
            bar.update(1)
            bar.write(f"seed {s} {name:>13}: samples' NLL {nll:.3f}, student's real held-out loss {losses[name][-1]:.4f}")
    bar.close()
    summary = quality_summary(losses)
    print("condition      | held-out loss median (min-max) | minus unwatermarked, paired: median (min-max)")
    for name in names:
        lo, d = summary[name]["loss"], summary[name]["difference"]
        print(f"{name:>14} | {lo['median']:.4f} ({lo['min']:.4f}-{lo['max']:.4f}) | "
              f"{d['median']:+.4f} ({d['min']:+.4f} to {d['max']:+.4f})")
    return {"n": args.quality_n, "steps": args.quality_steps, "gamma": gamma, "seeds": args.quality_seeds,
            "losses": losses, "sample_nll": sample_nll, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--untrained", action="store_true", help="use the randomly initialised model")
    parser.add_argument("--n", type=int, default=256, help="generated sequences per configuration")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--deltas", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--quality", action="store_true", help="also measure the cost of training on watermarked text")
    parser.add_argument("--quality-n", type=int, default=1024)
    parser.add_argument("--quality-steps", type=int, default=300)
    parser.add_argument("--quality-seeds", type=int, default=3)
    parser.add_argument("--quality-deltas", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more threads thrash on a shared CPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    train_rows, held = TextDataModule(seq_len=64, num_train=None, num_holdout=512, seed=0).build_split()
    model = CausalLMModule(**RECIPE, seed=0).model
    steps = 0 if args.untrained else args.train_steps
    train(model, train_rows, steps, seed=0)
    result: dict = {
        "model": "untrained recipe model" if args.untrained else f"recipe model trained {steps} steps (batch 32)",
        "heldout_loss": heldout_loss(model, held),
        "n": args.n,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "configs": [],
    }
    print(f"{result['model']}: held-out loss {result['heldout_loss']:.3f} nats/byte ({time.perf_counter() - t0:.0f}s)")

    prompts = held[torch.arange(args.n) % held.shape[0], :PROMPT]
    plain, nll_plain, entropy = sample(model, prompts, NEW, None, seed=1)
    result["null_nll"], result["entropy"] = nll_plain, entropy
    print(f"unwatermarked samples: NLL {nll_plain:.3f} nats/token, model entropy {entropy:.3f} nats/token")
    header = "gamma delta | TPR@z>2.33 FPR_heldout FPR_null | TPR@emp.1%(held-out) TPR@z>4 | green  NLL"
    print(header)
    for gamma in args.gammas:
        z_held, _ = detect_watermark(held, gamma=gamma, key=KEY)
        z_null = detection(plain, gamma)
        emp = float(torch.quantile(z_held, 0.99))
        for delta in args.deltas:
            proc = GreenListProcessor(gamma, delta, KEY, vocab_size=257)
            marked, nll, _ = sample(model, prompts, NEW, proc, seed=1)
            z = detection(marked, gamma)
            green = float((z * math.sqrt(NEW * gamma * (1 - gamma)) + gamma * NEW).mean() / NEW)
            row = {
                "gamma": gamma,
                "delta": delta,
                "tpr_at_z2.33": float((z > Z_1PCT).double().mean()),
                "fpr_heldout_at_z2.33": float((z_held > Z_1PCT).double().mean()),
                "fpr_null_at_z2.33": float((z_null > Z_1PCT).double().mean()),
                "heldout_z99": emp,
                "tpr_at_heldout_1pct": float((z > emp).double().mean()),
                "tpr_at_z4": float((z > 4).double().mean()),
                "fpr_heldout_at_z4": float((z_held > 4).double().mean()),
                "mean_z": float(z.mean()),
                "green_fraction": green,
                "nll": nll,
            }
            result["configs"].append(row)
            print(
                f"{gamma:5.2f} {delta:5.1f} | {row['tpr_at_z2.33']:10.3f} {row['fpr_heldout_at_z2.33']:11.3f} "
                f"{row['fpr_null_at_z2.33']:8.3f} | {row['tpr_at_heldout_1pct']:20.3f} {row['tpr_at_z4']:7.3f} | "
                f"{green:.3f} {nll:.3f}"
            )

    if args.quality:
        result["quality"] = quality_cost(model, train_rows, held, args)
    result["seconds"] = time.perf_counter() - t0
    print(f"total {result['seconds']:.0f}s")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
