"""The helpers of benchmarks/watermark_bench.py (quality cost over seeds) and benchmarks/watermark_weak.py
(detection thresholds, the lowered-delta recipe copy, escape counts, the per-generation table)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _builders import tiny_llama

from antimemo.watermark import GreenListProcessor, detect_watermark

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    if str(_BENCH) not in sys.path:
        sys.path.insert(0, str(_BENCH))
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("watermark_bench")


@pytest.fixture(scope="module")
def weak():
    return _load("watermark_weak")


SETTINGS = {"gamma": 0.25, "key": 15485863, "context_width": 1, "z_threshold": 4.0}


def _green_rows(n: int, length: int, seed: int) -> torch.Tensor:
    """Rows whose every token (after the first) is green: z far above 4."""
    proc = GreenListProcessor(SETTINGS["gamma"], 1.0, SETTINGS["key"], vocab_size=257)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 256, (n, 1), generator=g)
    for _ in range(length - 1):
        mask = proc.green_mask(rows, 257)
        choice = torch.where(mask, torch.rand(mask.shape, generator=g), torch.full(mask.shape, -1.0)).argmax(1)
        rows = torch.cat([rows, choice[:, None]], dim=1)
    return rows


# ------------------------------------------------------------------------------------------------
# watermark_bench: spread and the paired quality summary
# ------------------------------------------------------------------------------------------------


def test_spread_median_min_max(bench):
    s = bench.spread([4.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 10.0, 4)
    assert s["values"] == [4.0, 1.0, 2.0, 10.0]  # seed order kept
    with pytest.raises(ValueError, match="at least one number"):
        bench.spread([])
    with pytest.raises(ValueError, match="NaN"):
        bench.spread([1.0, float("nan")])


def test_quality_summary_pairs_by_seed(bench):
    losses = {"unwatermarked": [2.0, 1.0, 3.0], "delta 2": [2.5, 1.0, 3.1], "delta 4": [1.0, 3.0, 2.0]}
    s = bench.quality_summary(losses)
    assert s["unwatermarked"]["difference"]["values"] == [0.0, 0.0, 0.0]
    assert [round(v, 6) for v in s["delta 2"]["difference"]["values"]] == [0.5, 0.0, 0.1]
    assert math.isclose(s["delta 2"]["difference"]["median"], 0.1)
    # pairing is per seed, not a difference of medians: both medians are 2.0, the paired median is -1
    assert s["delta 4"]["loss"]["median"] == s["unwatermarked"]["loss"]["median"] == 2.0
    assert s["delta 4"]["difference"]["median"] == -1.0
    with pytest.raises(ValueError, match="same seeds"):
        bench.quality_summary({"unwatermarked": [1.0, 2.0], "delta 1": [1.0]})
    with pytest.raises(ValueError, match="unwatermarked"):
        bench.quality_summary({"delta 1": [1.0]})


# ------------------------------------------------------------------------------------------------
# watermark_weak: the recipe copy, thresholds, NLL, escapes, the table
# ------------------------------------------------------------------------------------------------


def test_lowered_recipe_changes_only_delta_and_the_loop_reads_it(weak, tmp_path):
    recipe = weak.load_recipe(weak.RECIPE)
    low = weak.lowered_recipe(recipe, 1.5)
    assert recipe["recursive"]["delta"] == 4.0  # the shipped recipe (and the dict) are untouched
    assert low["recursive"]["delta"] == 1.5
    assert {k: v for k, v in low.items() if k != "recursive"} == {k: v for k, v in recipe.items() if k != "recursive"}
    assert {k: v for k, v in low["recursive"].items() if k != "delta"} == {
        k: v for k, v in recipe["recursive"].items() if k != "delta"}
    # the written copy is what `antimemo recursive` plans with
    from antimemo.collapse.cli import _parser, build_plan

    path = tmp_path / "low.yaml"
    path.write_text(yaml.safe_dump(low), encoding="utf-8")
    plan = build_plan(_parser().parse_args(["--config", str(path), "--generations", "2", "--mix", "filter",
                                            "--out", str(tmp_path / "out")]))
    assert plan.settings["delta"] == 1.5 and plan.settings["z_threshold"] == 4.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "2"])
def test_lowered_recipe_refuses_bad_delta(weak, bad):
    with pytest.raises(ValueError, match="delta must be a finite number >= 0"):
        weak.lowered_recipe({"recursive": {"delta": 4.0}}, bad)


def test_lowered_recipe_needs_the_recursive_section(weak):
    with pytest.raises(ValueError, match="no recursive: section"):
        weak.lowered_recipe({"model": {}}, 2.0)


@pytest.mark.parametrize("n,fpr", [(100, 0.01), (7263, 0.01), (64, 0.01), (10, 0.2), (50, 0.0)])
def test_empirical_threshold_is_the_tightest_with_fpr_at_most(weak, n, fpr):
    z = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    t = weak.empirical_threshold(z, fpr)
    assert weak.rate_above(z, t) <= fpr
    below = z[z < t]
    if below.numel():  # any lower threshold (the next real score down) flags more than fpr
        assert weak.rate_above(z, float(below.max())) > fpr


def test_empirical_threshold_with_ties_and_bad_input(weak):
    z = torch.tensor([0.0, 1.0, 5.0, 5.0, 5.0])
    t = weak.empirical_threshold(z, 0.2)  # floor(0.2 * 5) = 1: one score above is allowed, three tie at 5
    assert t == 5.0 and weak.rate_above(z, t) == 0.0
    with pytest.raises(ValueError, match="fpr must be in"):
        weak.empirical_threshold(z, 1.0)
    with pytest.raises(ValueError, match="empty"):
        weak.empirical_threshold(torch.tensor([]), 0.01)


def test_sample_nll_scores_only_the_sampled_part(weak):
    torch.manual_seed(0)
    model = tiny_llama(vocab=48).eval()
    rows = torch.randint(0, 48, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = float(model(input_ids=rows, labels=rows).loss)  # HF's mean over the 11 shifted targets
        logits = model(input_ids=rows).logits
    assert math.isclose(weak.sample_nll(model, rows, 1), whole, rel_tol=1e-5)
    logp = torch.log_softmax(logits[:, 4:-1].float(), -1)  # targets 5..11: those after a 5-token prompt
    manual = float(-logp.gather(-1, rows[:, 5:, None]).mean())
    assert math.isclose(weak.sample_nll(model, rows, 5), manual, rel_tol=1e-5)
    assert not math.isclose(manual, whole, rel_tol=1e-3)


def test_escapes_counts_unflagged_samples_per_generation(weak, tmp_path):
    from antimemo.collapse.synth import save_tokens

    marked = _green_rows(6, 64, seed=0)
    plain = torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(5))
    assert (detect_watermark(marked, gamma=0.25, key=SETTINGS["key"])[0] > 4).all()
    assert (detect_watermark(plain, gamma=0.25, key=SETTINGS["key"])[0] <= 4).all()
    root = tmp_path / "run"
    synth = root / "runs" / "filter" / "seed1" / "synthetic"
    save_tokens(synth / "gen1.npy", torch.cat([marked[:4], plain[:2]]))  # 2 escape
    save_tokens(synth / "gen2.npy", torch.cat([marked[4:], plain[2:]]))  # 4 escape
    rows = weak.escapes(root, "filter", 1, 3, SETTINGS)
    assert rows == [
        {"generation": 1, "samples": 6, "escaped": 2, "escaped_in_train": 2},
        {"generation": 2, "samples": 6, "escaped": 4, "escaped_in_train": 6},
    ]
    # a lower z threshold flags the plain rows too (max z of the plain rows is below 4, above -10)
    assert all(r["escaped"] == 0 for r in weak.escapes(root, "filter", 1, 3, {**SETTINGS, "z_threshold": -10.0}))


def test_table_takes_median_over_seeds_and_shares_generation_zero(weak, tmp_path):
    csv_path = tmp_path / "generations.csv"
    header = "generation,mix,seed,val_loss,diversity/distinct_2,diversity/distinct_4,diversity/tail_coverage,run_dir\n"
    lines = [
        "0,replace,0,2.0,0.5,0.9,0.1,a", "0,replace,1,3.0,0.4,0.8,0.2,b", "0,replace,2,2.5,0.6,1.0,0.3,c",
        "0,filter,0,2.0,0.5,0.9,0.1,a", "0,filter,1,3.0,0.4,0.8,0.2,b", "0,filter,2,2.5,0.6,1.0,0.3,c",
        "1,replace,0,9.0,0.1,0.1,0.0,d", "1,replace,1,9.0,0.1,0.1,0.0,e", "1,replace,2,9.0,0.1,0.1,0.0,f",
        "1,filter,0,3.0,0.5,0.9,,g", "1,filter,1,4.0,0.5,0.9,0.2,h", "1,filter,2,5.0,0.5,0.9,0.4,i",
    ]
    csv_path.write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    rows = weak.read_generations(csv_path)
    assert rows[9]["diversity/tail_coverage"] is None and rows[0]["mix"] == "replace"
    esc = {s: [{"generation": 1, "samples": 8, "escaped": e, "escaped_in_train": e}] for s, e in enumerate([1, 5, 3])}
    out = weak.table("filter, delta 2", rows, "filter", esc, 2)
    assert out[0]["val_loss"]["median"] == 2.5 and out[0]["val_loss"]["n"] == 3  # gen 0 rows of the filter mix
    assert out[1]["val_loss"]["median"] == 4.0 and out[1]["val_loss"]["min"] == 3.0
    assert out[1]["diversity/tail_coverage"]["n"] == 2  # the empty cell is left out, not read as 0
    assert out[1]["escaped"]["median"] == 3 and out[1]["escaped"]["max"] == 5 and out[1]["samples"] == 8
    assert "escaped" not in out[0]
    assert weak.table("replace", rows, "replace", None, 2)[1]["val_loss"]["median"] == 9.0


def test_radioactivity_samples_each_generation_without_the_watermark(weak, tmp_path):
    from antimemo.collapse.synth import sample_synthetic, save_tokens
    from antimemo.lm.module import CausalLMModule

    arch = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=32)
    recipe = {"model": {"class_path": "antimemo.lm.CausalLMModule", "init_args": arch}}
    settings = {**SETTINGS, "prompt_length": 4, "temperature": 1.0}
    root = tmp_path / "weak"
    save_tokens(root / "data" / "real_train.npy", torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(3)))
    models = {}
    for seed in (0, 1):
        for gen in (0, 1):
            module = CausalLMModule(**arch, seed=10 * seed + gen)
            run = root / "runs" / "gen0" / f"seed{seed}" if gen == 0 else root / "runs" / "filter" / f"seed{seed}" / f"gen{gen}"
            run.mkdir(parents=True)
            torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, run / "last.ckpt")
            models[seed, gen] = module.model.eval()
    out = weak.radioactivity(root, "filter", [0, 1], 2, 6, settings, recipe)
    assert [r["generation"] for r in out] == [0, 1]
    train = torch.from_numpy(np.load(root / "data" / "real_train.npy"))
    prompts = train[torch.arange(6) % 5, :4]
    for gen in (0, 1):  # the figures are those of each generation's own checkpoint, sampled with no bias
        expect = []
        for seed in (0, 1):
            rows = sample_synthetic(models[seed, gen], prompts, 24, None, seed=700_001 + seed)
            expect.append(float(detect_watermark(rows, gamma=0.25, key=SETTINGS["key"])[0].mean()))
        assert out[gen]["mean_z"]["values"] == pytest.approx(expect)
        assert 0.0 <= out[gen]["flagged"]["min"] <= out[gen]["flagged"]["max"] <= 1.0
    assert out[0]["mean_z"]["values"] != out[1]["mean_z"]["values"]
