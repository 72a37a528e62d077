"""The green-list watermark (antimemo.watermark) and the WatermarkFilter callback.

- the processor adds exactly delta to exactly the green ids, and the green ids are those of the
  scheme written in the module docstring (a plain-Python reference implementation here);
- green lists hold a gamma fraction of the vocabulary over many contexts, are deterministic,
  depend on the key and the context, and never touch the global RNG;
- detection: large z on text sampled with the processor from a tiny Llama, |z| small on text
  sampled without it and on uniform random text; p in [0, 1], decreasing in z; attention_mask and
  ignore_repeated score the right positions;
- WatermarkFilter in a real Trainer fit: drops exactly the watermarked items and logs the
  fraction; downweight with weight 0 never samples them; with DifferentialPrivacy + drop, DP
  Poisson-samples exactly the kept items; DP + downweight and DedupSampling are refused.
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import transformers
from _builders import quiet_trainer_kwargs, tiny_llama
from torch.utils.data import DataLoader, WeightedRandomSampler

from antimemo.callbacks import DedupSampling, DifferentialPrivacy, WatermarkFilter
from antimemo.callbacks._interactions import CompositionError
from antimemo.watermark import GreenListProcessor, detect_watermark, green_positions

warnings.filterwarnings("ignore", ".*does not have many workers.*")

V = 257  # the byte tokenizer's vocabulary
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


# ------------------------------------------------------------------------------------------------
# a plain-Python reference implementation of the documented scheme
# ------------------------------------------------------------------------------------------------


def _mix64(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _ref_green(key: int, context: list[int], token: int, gamma: float) -> bool:
    s = _mix64(key + GOLDEN)
    w = len(context)
    acc = sum(((_mix64(d * GOLDEN) | 1) * _mix64(context[w - d] + s)) for d in range(1, w + 1)) & M64
    c = _mix64(acc + s)
    u = _mix64(c + (token + 1) * GOLDEN) >> 32
    return u < round(gamma * 2**32)


@pytest.mark.parametrize("width,key", [(1, 42), (3, -7), (2, 2**70 + 5)])
def test_green_mask_is_the_documented_scheme(width, key):
    g = torch.Generator().manual_seed(width)
    ids = torch.randint(0, V, (3, 5), generator=g)
    mask = GreenListProcessor(0.3, 1.0, key, context_width=width).green_mask(ids, 40)
    for b in range(3):
        context = ids[b, -width:].tolist()
        expected = [_ref_green(key, context, v, 0.3) for v in range(40)]
        assert mask[b].tolist() == expected


# ------------------------------------------------------------------------------------------------
# the processor
# ------------------------------------------------------------------------------------------------


def test_processor_adds_exactly_delta_to_exactly_the_green_ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (6, 9), generator=g)
    scores = torch.randn(6, V, generator=g)
    proc = GreenListProcessor(gamma=0.25, delta=2.5, key=1234, context_width=2)
    out = proc(ids, scores.clone())
    green = proc.green_mask(ids, V)
    diff = out - scores
    assert torch.allclose(diff[green], torch.full_like(diff[green], 2.5))
    assert torch.equal(out[~green], scores[~green])  # bit for bit untouched
    assert green.any(1).all() and (~green).any(1).all()


def test_processor_leaves_padded_columns_and_short_rows_alone():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 300, generator=g)
    proc = GreenListProcessor(0.5, 3.0, key=9, vocab_size=V)
    out = proc(torch.tensor([[1], [2]]), scores)
    assert torch.equal(out[:, V:], scores[:, V:])
    assert (out[:, :V] != scores[:, :V]).any()
    wide = GreenListProcessor(0.5, 3.0, key=9, context_width=4)
    assert torch.equal(wide(torch.tensor([[1, 2, 3]]), scores[:1]), scores[:1])  # 3 < 4 tokens: no context
    with pytest.raises(ValueError, match="vocab_size=400 exceeds the 300 logit columns"):
        GreenListProcessor(0.5, 3.0, key=9, vocab_size=400)(torch.tensor([[1]]), scores)


@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_green_fraction_is_gamma_over_contexts(gamma):
    contexts = torch.arange(2000)[:, None] % V + torch.arange(2000)[:, None] // V  # 2000 contexts of width 2
    ids = torch.cat([contexts, (contexts * 7) % V], dim=1)
    mask = GreenListProcessor(gamma, 1.0, key=5, context_width=2).green_mask(ids, V)
    frac = mask.float().mean().item()
    se = math.sqrt(gamma * (1 - gamma) / mask.numel())
    assert abs(frac - gamma) < 5 * se
    per_context = mask.float().sum(1)
    # Binomial(V, gamma) per context: its spread, not an exact count
    assert abs(per_context.std().item() - math.sqrt(V * gamma * (1 - gamma))) < 1.0


def test_green_lists_are_deterministic_key_and_context_dependent_and_use_no_global_rng():
    ids = torch.randint(0, V, (50, 3), generator=torch.Generator().manual_seed(3))
    state = torch.get_rng_state()
    a = GreenListProcessor(0.5, 1.0, key=1).green_mask(ids, V)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, GreenListProcessor(0.5, 1.0, key=1).green_mask(ids.clone(), V))
    b = GreenListProcessor(0.5, 1.0, key=2).green_mask(ids, V)
    agree = (a == b).float().mean().item()
    assert 0.45 < agree < 0.55  # independent lists agree on half the ids at gamma=0.5
    shifted = ids.clone()
    shifted[:, -1] = (shifted[:, -1] + 1) % V
    assert 0.45 < (a == GreenListProcessor(0.5, 1.0, key=1).green_mask(shifted, V)).float().mean().item() < 0.55
    # only the last context_width tokens matter
    earlier = ids.clone()
    earlier[:, 0] = (earlier[:, 0] + 1) % V
    assert torch.equal(a, GreenListProcessor(0.5, 1.0, key=1).green_mask(earlier, V))


def test_green_positions_match_the_processor_prefix_by_prefix():
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(4))
    proc = GreenListProcessor(0.25, 1.0, key=77, context_width=3)
    green, scored = green_positions(ids, 0.25, 77, context_width=3)
    assert not scored[:, :3].any() and scored[:, 3:].all()
    for i in range(3, 12):
        assert torch.equal(proc.green_mask(ids[:, :i], V).gather(1, ids[:, i : i + 1])[:, 0], green[:, i])


# ------------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------------


def _sample(model, prompts, new_tokens, proc=None, seed=0):
    """Temperature-1 sampling with a KV cache and a seeded generator (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    ids = prompts
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(new_tokens):
            logits = out.logits[:, -1].float()
            if proc is not None:
                logits = proc(ids, logits)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
            out = model(input_ids=nxt, cache=out.cache, use_cache=True)  # transformers 5: `cache`
    return ids


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(vocab=V, hidden=32, layers=2, heads=4, max_positions=128, seed=0).eval()


def test_detection_flags_sampled_watermarked_text_and_not_unwatermarked_text(lm):
    prompts = torch.randint(0, V, (16, 4), generator=torch.Generator().manual_seed(5))
    proc = GreenListProcessor(gamma=0.25, delta=2.0, key=42)
    marked = _sample(lm, prompts, 64, proc, seed=1)
    plain = _sample(lm, prompts, 64, None, seed=1)
    z_marked, p_marked = detect_watermark(marked[:, 4:], gamma=0.25, key=42)
    z_plain, p_plain = detect_watermark(plain[:, 4:], gamma=0.25, key=42)
    assert (z_marked > 4).all(), z_marked
    assert (p_marked < 1e-4).all()
    assert (z_plain.abs() < 4).all(), z_plain
    # the wrong key sees no watermark
    z_wrong, _ = detect_watermark(marked[:, 4:], gamma=0.25, key=43)
    assert (z_wrong.abs() < 4).all(), z_wrong


def test_processor_works_inside_transformers_generate(lm):
    proc = GreenListProcessor(gamma=0.25, delta=4.0, key=11, vocab_size=V)
    prompts = torch.randint(0, V, (4, 4), generator=torch.Generator().manual_seed(6))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = lm.generate(
            prompts, do_sample=True, max_new_tokens=48, min_new_tokens=48, top_k=0, top_p=1.0,
            logits_processor=transformers.LogitsProcessorList([proc]), pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    assert out.shape == (4, 52)
    z, _ = detect_watermark(out[:, 4:], gamma=0.25, key=11)
    assert (z > 4).all(), z


def test_uniform_random_text_has_standard_normal_z():
    text = torch.randint(0, V, (400, 64), generator=torch.Generator().manual_seed(8))
    z, p = detect_watermark(text, gamma=0.25, key=42)
    assert abs(z.mean().item()) < 0.25  # 5 standard errors of the mean
    assert 0.8 < z.std().item() < 1.2
    assert (z.abs() < 5).all()
    assert 0.3 < p.median().item() < 0.7


def test_z_and_p_follow_the_formula_and_p_is_monotone_in_z():
    text = torch.randint(0, V, (64, 40), generator=torch.Generator().manual_seed(9))
    green, scored = green_positions(text, 0.25, 3)
    z, p = detect_watermark(text, gamma=0.25, key=3)
    t, g = scored.sum(1).double(), green.sum(1).double()
    assert torch.allclose(z, (g - 0.25 * t) / torch.sqrt(t * 0.25 * 0.75))
    assert ((p >= 0) & (p <= 1)).all()
    order = torch.argsort(z)
    assert (p[order].diff() <= 0).all()
    for zi, pi in zip(z.tolist(), p.tolist()):
        assert pi == pytest.approx(0.5 * math.erfc(zi / math.sqrt(2)), rel=1e-9, abs=1e-15)
    # extremes: all green gives a tiny p, no green a p near 1
    proc = GreenListProcessor(0.25, 1.0, key=3)
    ids = [5]
    for _ in range(30):  # greedy "always green" and "never green" continuations
        ids.append(int(proc.green_mask(torch.tensor([ids]), V)[0].nonzero()[0]))
    never = [5]
    for _ in range(30):
        never.append(int((~proc.green_mask(torch.tensor([never]), V)[0]).nonzero()[0]))
    z2, p2 = detect_watermark(torch.tensor([ids, never]), gamma=0.25, key=3)
    assert z2[0] == pytest.approx(30 * 0.75 / math.sqrt(30 * 0.25 * 0.75))
    assert z2[1] == pytest.approx(-30 * 0.25 / math.sqrt(30 * 0.25 * 0.75))
    assert p2[0] < 1e-9 and p2[1] > 0.999


def test_no_scored_position_gives_no_evidence():
    z, p = detect_watermark(torch.tensor([[1, 2], [3, 4]]), gamma=0.5, key=1, context_width=2)
    assert z.tolist() == [0.0, 0.0] and p.tolist() == [1.0, 1.0]


def test_attention_mask_excludes_padding_and_its_contexts():
    row = torch.randint(0, V, (30,), generator=torch.Generator().manual_seed(10))
    padded = torch.cat([torch.full((5,), 256), row, torch.full((7,), 256)])
    mask = torch.cat([torch.zeros(5), torch.ones(30), torch.zeros(7)]).long()
    z_row, _ = detect_watermark(row[None], 0.25, key=4, context_width=2)
    z_pad, _ = detect_watermark(padded[None], 0.25, key=4, context_width=2, attention_mask=mask[None])
    assert z_pad.item() == pytest.approx(z_row.item())
    _, scored = green_positions(padded[None], 0.25, 4, 2, attention_mask=mask[None])
    assert scored.sum().item() == 28 and scored[0, 7:35].all()


def test_ignore_repeated_scores_each_ngram_once():
    unit = torch.randint(0, V, (20,), generator=torch.Generator().manual_seed(11))
    text = torch.cat([unit, unit, unit])[None]  # the same 20 tokens three times
    green, scored = green_positions(text, 0.5, key=6, context_width=1)
    z_all, _ = detect_watermark(text, 0.5, key=6)
    z_once, _ = detect_watermark(text, 0.5, key=6, ignore_repeated=True)
    # reference: the first occurrence of each (previous token, token) pair
    seen, g, t = set(), 0, 0
    ids = text[0].tolist()
    for i in range(1, len(ids)):
        if (ids[i - 1], ids[i]) in seen:
            continue
        seen.add((ids[i - 1], ids[i]))
        t += 1
        g += int(green[0, i])
    assert t < int(scored.sum())
    assert z_once.item() == pytest.approx((g - 0.5 * t) / math.sqrt(t * 0.25))
    assert z_all.item() != pytest.approx(z_once.item())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"gamma": 0.0}, ValueError, r"gamma must be a number in \(0, 1\).*got 0.0; e.g. gamma=0.25"),
        ({"gamma": 1.0}, ValueError, r"gamma must be .* got 1.0"),
        ({"gamma": float("nan")}, ValueError, r"gamma must be .* got nan"),
        ({"delta": -1.0}, ValueError, r"delta must be a finite number >= 0.*got -1.0; e.g. delta=2.0"),
        ({"delta": float("inf")}, ValueError, r"delta must be .* got inf"),
        ({"key": 1.5}, TypeError, r"key must be an integer.*got 1.5.*e.g. key="),
        ({"key": True}, TypeError, r"key must be an integer.*got True"),
        ({"context_width": 0}, ValueError, r"context_width must be an integer >= 1, got 0; it is the number"),
        ({"vocab_size": 1}, ValueError, r"vocab_size must be an integer >= 2, got 1"),
    ],
)
def test_processor_argument_checks_name_argument_value_and_fix(kwargs, error, match):
    args = {"gamma": 0.25, "delta": 2.0, "key": 1, **kwargs}
    with pytest.raises(error, match=match):
        GreenListProcessor(**args)


def test_detect_argument_checks():
    with pytest.raises(ValueError, match=r"token_ids must be 2-D \[B, T\].*token_ids\[None\]"):
        detect_watermark(torch.tensor([1, 2, 3]), 0.25, 1)
    with pytest.raises(ValueError, match="must hold integer token ids, got dtype torch.float32"):
        detect_watermark(torch.zeros(1, 3), 0.25, 1)
    with pytest.raises(ValueError, match="gamma must be"):
        detect_watermark(torch.zeros(1, 3, dtype=torch.long), 2, 1)
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of the shape of token_ids \(1, 3\)"):
        detect_watermark(torch.zeros(1, 3, dtype=torch.long), 0.25, 1, attention_mask=torch.ones(1, 4))


# ------------------------------------------------------------------------------------------------
# WatermarkFilter in a real Trainer fit
# ------------------------------------------------------------------------------------------------

KEY, GAMMA, LENGTH = 99, 0.25, 32
MARKED = {1, 4, 6, 9, 13, 14}  # indices of the watermarked items among 16


@pytest.fixture(scope="module")
def mixed_rows(lm):
    g = torch.Generator().manual_seed(12)
    proc = GreenListProcessor(GAMMA, 4.0, KEY)
    marked = _sample(lm, torch.randint(0, V, (len(MARKED), 4), generator=g), LENGTH - 4, proc, seed=2)
    clean = torch.randint(0, 256, (16 - len(MARKED), LENGTH), generator=g)
    it_m, it_c = iter(marked), iter(clean)
    return [{"input_ids": next(it_m) if i in MARKED else next(it_c), "idx": i} for i in range(16)]


class _Recording(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama(vocab=V, hidden=16, layers=1, heads=2, max_positions=64, seed=1)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen += [int(i) for i in batch["idx"]]
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(rows, callbacks, **trainer_kwargs):
    module = _Recording()
    trainer = pl.Trainer(callbacks=callbacks, **quiet_trainer_kwargs(accelerator="cpu", **trainer_kwargs))
    loader = DataLoader(rows, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, train_dataloaders=loader)
    return trainer, module


def test_filter_drops_exactly_the_watermarked_items_and_logs_the_fraction(mixed_rows):
    cb = WatermarkFilter(gamma=GAMMA, key=KEY, policy="drop")
    trainer, module = _fit(mixed_rows, [cb], max_epochs=2)
    assert set(torch.nonzero(cb.flagged).flatten().tolist()) == MARKED
    assert cb.kept_indices == [i for i in range(16) if i not in MARKED]
    assert sorted(module.seen) == sorted(cb.kept_indices * 2)  # every kept item, twice; no marked one
    assert trainer.callback_metrics["watermark/filtered_fraction"].item() == pytest.approx(len(MARKED) / 16)
    assert (cb.z_scores[sorted(MARKED)] > 4).all()


def test_filter_with_a_p_threshold_and_the_wrong_key_keeps_everything(mixed_rows):
    cb = WatermarkFilter(gamma=GAMMA, key=KEY + 1, p_threshold=1e-3)
    trainer, module = _fit(mixed_rows, [cb], max_epochs=1)
    assert sorted(module.seen) == list(range(16))
    assert trainer.callback_metrics["watermark/filtered_fraction"].item() == 0.0


def test_downweight_with_weight_zero_never_samples_a_marked_item(mixed_rows):
    cb = WatermarkFilter(gamma=GAMMA, key=KEY, policy="downweight", flagged_weight=0.0, seed=3)
    trainer, module = _fit(mixed_rows, [cb], max_epochs=2)
    assert isinstance(trainer.train_dataloader.sampler, WeightedRandomSampler)
    assert len(module.seen) == 2 * 16  # len(dataset) draws per epoch, with replacement
    assert not set(module.seen) & MARKED
    assert trainer.callback_metrics["watermark/filtered_fraction"].item() == pytest.approx(len(MARKED) / 16)


def test_dp_poisson_samples_exactly_the_kept_items(mixed_rows):
    warnings.filterwarnings("ignore", ".*clips per-sample gradients.*")
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    cb = WatermarkFilter(gamma=GAMMA, key=KEY, policy="drop")
    trainer, module = _fit(mixed_rows, [dp, cb], max_epochs=3)
    assert dp.dataset_size == len(cb.kept_indices) == 16 - len(MARKED)
    assert dp.sample_rate == pytest.approx(4 / (16 - len(MARKED)))
    assert trainer.global_step > 0 and module.seen
    assert set(module.seen) <= set(cb.kept_indices)
    assert dp.steps == trainer.global_step and dp.epsilon > 0


def test_dp_with_downweight_is_refused_naming_both(mixed_rows):
    with pytest.raises(CompositionError, match=r"DifferentialPrivacy \+ WatermarkFilter.*policy='drop'"):
        _fit(mixed_rows, [DifferentialPrivacy(noise_multiplier=1.0), WatermarkFilter(GAMMA, KEY, policy="downweight")], max_epochs=1)


def test_dedup_sampling_is_refused_naming_both(mixed_rows):
    with pytest.raises(CompositionError, match=r"DedupSampling \+ WatermarkFilter"):
        _fit(mixed_rows, [DedupSampling(policy="drop", progress=False), WatermarkFilter(GAMMA, KEY)], max_epochs=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"gamma": 1.5}, r"gamma must be a number in \(0, 1\)"),
        ({"key": "secret"}, r"key must be an integer"),
        ({"context_width": 0}, r"context_width must be an integer >= 1"),
        ({"policy": "cap"}, r"policy must be one of \('drop', 'downweight'\), got 'cap'"),
        ({"z_threshold": 4.0, "p_threshold": 0.01}, r"give z_threshold or p_threshold, not both"),
        ({"p_threshold": 0.0}, r"p_threshold must be a number in \(0, 1\), got 0.0"),
        ({"z_threshold": float("nan")}, r"z_threshold must be a finite number, got nan"),
        ({"policy": "downweight", "flagged_weight": 1.0}, r"flagged_weight must be a number in \[0, 1\)"),
        ({"flagged_weight": 0.5}, r"flagged_weight applies only to policy='downweight'"),
    ],
)
def test_filter_argument_checks(kwargs, match):
    args = {"gamma": 0.25, "key": 1, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        WatermarkFilter(**args)


def test_filter_declares_a_sampler_change_in_the_lm_domain():
    decl = WatermarkFilter.declaration
    assert decl.changes == frozenset({"sampler"}) and decl.domain == "lm" and not decl.repeatable
