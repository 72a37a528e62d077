"""Probabilistic discoverable extraction (Hayes et al. 2024) and the teacher-forced greedy verdict.

- ``suffix_sampling_probability`` against Monte Carlo: ``transformers``' own
  ``generate(do_sample=True, ...)`` samples many suffixes with the same scheme; the frequency of
  exact reproductions must lie in its binomial (Wilson) interval around ``p_z``, family-wise
  99.9% (Bonferroni over every probe and scheme).
- ``teacher_forced_greedy_match`` against ``greedy_generate``, probe for probe.
- ``DiscoverableExtraction``: keys, stable ``1 - (1 - p_z)^n``, exact DDP sync (2-process gloo).
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from scipy import stats

from antimemo.functional import (
    discoverable_probability,
    greedy_generate,
    suffix_sampling_log_probability,
    suffix_sampling_probability,
    teacher_forced_greedy_match,
)
from antimemo.functional.discoverable import sampling_log_probs, suffix_logits
from antimemo.metrics import DiscoverableExtraction

V, P, S = 8, 4, 3
SCHEMES = [
    {"temperature": 1.0, "top_k": None, "top_p": None},
    {"temperature": 0.7, "top_k": 3, "top_p": None},
    {"temperature": 1.0, "top_k": None, "top_p": 0.8},
    {"temperature": 1.5, "top_k": 5, "top_p": 0.9},
]
SAMPLES = 4000
FAMILY_ALPHA = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_llama(seed=0, init=0.5):
    """A 1-layer Llama over 8 tokens whose large initial weights make its next-token
    distributions peaked, so that 3-token suffixes have probabilities worth estimating."""
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, initializer_range=init,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _generate(model, prefixes, scheme, samples=1):
    """``transformers`` sampling with the scheme: top_k=0 / top_p=1.0 switch a truncation off
    (generate's own default would be top_k=50)."""
    rows = prefixes.repeat_interleave(samples, dim=0)
    with torch.no_grad():
        out = model.generate(
            rows, attention_mask=torch.ones_like(rows), do_sample=True, max_new_tokens=S, min_new_tokens=S,
            temperature=scheme["temperature"], top_k=scheme["top_k"] or 0, top_p=scheme["top_p"] or 1.0,
            pad_token_id=0,
        )
    return out[:, P:]


def _wilson(successes, n, z):
    phat = successes / n
    center = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return center - half, center + half


def test_suffix_probability_matches_monte_carlo_sampling_of_transformers_generate():
    model = _tiny_llama()
    gen = torch.Generator().manual_seed(1)
    prefixes = torch.randint(0, V, (6, P), generator=gen)
    torch.manual_seed(2)
    # targets: suffixes the model itself samples (probable ones), plus two uniform random ones
    targets = torch.cat([_generate(model, prefixes[:4], SCHEMES[0]), torch.randint(0, V, (2, S), generator=gen)])
    probes = torch.cat([prefixes, targets], dim=1)
    with torch.no_grad():
        logits = suffix_logits(model(input_ids=probes).logits, P)
    z = stats.norm.ppf(1 - FAMILY_ALPHA / (2 * len(SCHEMES) * len(probes)))
    outside_untruncated = 0
    zero_probes = 0
    for i, scheme in enumerate(SCHEMES):
        p_z = suffix_sampling_probability(logits, targets, **scheme)
        assert p_z.dtype == torch.float64 and bool(((p_z >= 0) & (p_z <= 1)).all())
        plain = suffix_sampling_probability(logits, targets, temperature=scheme["temperature"])
        torch.manual_seed(100 + i)
        hits = (_generate(model, prefixes, scheme, SAMPLES).view(len(probes), SAMPLES, S) == targets[:, None]).all(-1).sum(1)
        for probe in range(len(probes)):
            low, high = _wilson(int(hits[probe]), SAMPLES, z)
            assert low <= float(p_z[probe]) <= high, (scheme, probe, int(hits[probe]), float(p_z[probe]))
            if float(p_z[probe]) == 0.0:  # a true token truncated away: never sampled
                assert int(hits[probe]) == 0
                zero_probes += 1
            outside_untruncated += not low <= float(plain[probe]) <= high
        if scheme["top_k"] is None and scheme["top_p"] is None:
            assert torch.equal(p_z, plain)
    # not vacuous: several probes are truncated away, and ignoring truncation and
    # renormalisation would put p_z outside the intervals
    assert zero_probes >= 3
    assert outside_untruncated >= 3
    assert int((suffix_sampling_probability(logits, targets) > 0.05).sum()) >= 2  # estimable p_z


def test_truncation_order_is_temperature_then_top_k_then_top_p_like_transformers_processors():
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 3
    for temperature, top_k, top_p in [(0.5, 10, 0.7), (2.0, 3, 0.95), (1.3, None, 0.5), (0.8, 7, None)]:
        processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k is not None:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None:
            processors.append(TopPLogitsWarper(top_p))
        expected = processors(None, logits.clone()).log_softmax(-1)
        got = sampling_log_probs(logits, temperature, top_k, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        assert torch.allclose(got[torch.isfinite(got)], expected[torch.isfinite(expected)], atol=1e-6)
    # top-p after top-k renormalises over the top-k survivors: a different set than top-p alone
    alone = sampling_log_probs(logits, 1.0, None, 0.5)
    after_k = sampling_log_probs(logits, 1.0, 2, 0.5)
    assert (torch.isfinite(after_k).sum(-1) <= 2).all() and not torch.equal(torch.isfinite(alone), torch.isfinite(after_k))


def test_log_probability_is_a_float64_sum_that_does_not_underflow():
    logits = torch.zeros(2, 400, 1000)  # uniform over 1000 tokens: p_z = 1e-1200, below float64
    target = torch.zeros(2, 400, dtype=torch.long)
    log_pz = suffix_sampling_log_probability(logits, target)
    assert log_pz.dtype == torch.float64
    assert torch.allclose(log_pz / math.log(10), torch.full((2,), -1200.0, dtype=torch.float64), atol=1e-3)
    assert bool((suffix_sampling_probability(logits, target) == 0).all())  # the probability itself underflows
    # the (n, p) rule from the log: 1 - (1 - 1e-300)^1000 = 1e-297, not 0
    tiny = discoverable_probability(torch.tensor([-300 * math.log(10)], dtype=torch.float64), n=1000)
    assert float(tiny[0]) == pytest.approx(1e-297, rel=1e-9)
    near_one = discoverable_probability(torch.tensor([math.log1p(-1e-12)], dtype=torch.float64), n=2)
    assert float(near_one[0]) == pytest.approx(1 - 1e-24, abs=1e-15)


def test_greedy_match_from_teacher_forcing_equals_greedy_decoding_probe_for_probe():
    model = _tiny_llama(seed=3, init=0.3)
    gen = torch.Generator().manual_seed(5)
    prefixes = torch.randint(0, V, (40, P), generator=gen)
    greedy = greedy_generate(model, prefixes, S)
    targets = greedy.clone()
    # corrupt some suffixes at one position: reproduced_length must stop there
    cut = torch.randint(0, S + 1, (40,), generator=gen)  # S: untouched
    for row, position in enumerate(cut.tolist()):
        if position < S:
            targets[row, position] = (targets[row, position] + 1) % V
    with torch.no_grad():
        logits = suffix_logits(model(input_ids=torch.cat([prefixes, targets], 1)).logits, P)
    exact, reproduced = teacher_forced_greedy_match(logits, targets)
    decoded = greedy_generate(model, prefixes, S)
    leading = (decoded == targets).long().cumprod(-1).sum(-1)
    assert torch.equal(reproduced, leading) and torch.equal(reproduced, cut)
    assert torch.equal(exact, (decoded == targets).all(-1))
    assert 0 < int(exact.sum()) < 40


def test_argmax_ties_pick_the_first_maximum_like_greedy_generate():
    logits = torch.zeros(1, 2, 4)  # every token tied: argmax is token 0 at each position
    exact, reproduced = teacher_forced_greedy_match(logits, torch.tensor([[0, 0]]))
    assert bool(exact[0]) and int(reproduced[0]) == 2
    exact, reproduced = teacher_forced_greedy_match(logits, torch.tensor([[0, 1]]))
    assert not bool(exact[0]) and int(reproduced[0]) == 1


def test_metric_counts_n_p_discoverable_probes_and_the_median():
    log_pz = torch.tensor([math.log(0.6), math.log(0.01), math.log(1e-5), -math.inf], dtype=torch.float64)
    target = torch.zeros(4, 1, dtype=torch.long)
    logits = torch.stack([torch.tensor([lp, math.log1p(-math.exp(lp)) if lp > -math.inf else 0.0]) for lp in log_pz.tolist()])
    logits = logits[:, None, :].float()  # 2 tokens: target 0 has probability p_z
    metric = DiscoverableExtraction(ns=(1, 100, 1000), ps=(0.5, 0.9))
    metric.update(logits, target)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert list(out) == metric.keys == [
        "exact_match", "reproduced_length",
        "discoverable/n1_p0.5", "discoverable/n1_p0.9", "discoverable/n100_p0.5", "discoverable/n100_p0.9",
        "discoverable/n1000_p0.5", "discoverable/n1000_p0.9", "discoverable/median_log10_pz",
    ]
    # p_z 0.6: (1, 0.5) yes; 0.01: 1 - 0.99^100 = 0.634, 1 - 0.99^1000 = 1.0; 1e-5: 1 - e^-0.01 = 0.01
    assert out["discoverable/n1_p0.5"] == 0.25 and out["discoverable/n1_p0.9"] == 0.0
    assert out["discoverable/n100_p0.5"] == 0.5 and out["discoverable/n100_p0.9"] == 0.25
    assert out["discoverable/n1000_p0.5"] == 0.5 and out["discoverable/n1000_p0.9"] == 0.5
    assert out["discoverable/median_log10_pz"] == pytest.approx((-2 - 5) / 2, abs=1e-4)
    assert out["exact_match"] == 0.25 and out["reproduced_length"] == 0.25  # only row 0's target is the argmax
    greedy_only = DiscoverableExtraction(probabilistic=False)
    greedy_only.update(logits, target)
    assert list(greedy_only.compute()) == ["exact_match", "reproduced_length"]


def test_metric_median_is_minus_infinity_when_most_suffixes_are_truncated_away():
    logits = torch.tensor([[[2.0, 1.0, 0.0]], [[2.0, 1.0, 0.0]], [[2.0, 1.0, 0.0]]])
    metric = DiscoverableExtraction(ns=(10,), ps=(0.5,), top_k=1)
    metric.update(logits, torch.tensor([[0], [2], [1]]))
    out = metric.compute()
    assert float(out["discoverable/median_log10_pz"]) == -math.inf
    assert float(out["discoverable/n10_p0.5"]) == pytest.approx(1 / 3)
    assert float(out["exact_match"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, r"temperature must be a finite number > 0, got 0.0"),
        ({"top_k": 0}, r"top_k must be None \(no top-k truncation\) or an integer >= 1, got 0"),
        ({"top_p": 1.5}, r"top_p must be None .* in \(0, 1\], got 1.5"),
        ({"ns": ()}, r"ns must be a non-empty sequence of integers >= 1"),
        ({"ps": (0.5, 1.0)}, r"ps must be a non-empty sequence of probabilities 0 < p < 1, got \(0.5, 1.0\)"),
        ({"ns": (10, 10)}, r"ns and ps must hold distinct values"),
    ],
)
def test_metric_argument_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiscoverableExtraction(**kwargs)


def test_functional_input_errors():
    with pytest.raises(ValueError, match=r"logits must be \[N, S, V\] and target \[N, S\]"):
        suffix_sampling_log_probability(torch.zeros(2, 5, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target token ids must be in \[0, V\) = \[0, 4\)"):
        teacher_forced_greedy_match(torch.zeros(1, 2, 4), torch.tensor([[1, 4]]))
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        teacher_forced_greedy_match(torch.zeros(1, 2, 4, dtype=torch.long), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        discoverable_probability(torch.zeros(1), 0)


# ------------------------------------------------------------------------------------- DDP


def _ddp_data():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 3, 6, generator=gen) * 2
    target = torch.randint(0, 6, (9, 3), generator=gen)
    target[:3] = logits[:3].argmax(-1)  # some greedy exact matches
    return logits, target


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        logits, target = _ddp_data()
        metric = DiscoverableExtraction(ns=(1, 10, 100), ps=(0.5, 0.9), temperature=1.3, top_k=4, top_p=0.9)
        rows = slice(0, 7) if rank == 0 else slice(7, 9)  # uneven shards
        metric.update(logits[rows], target[rows])
        torch.save({k: float(v) for k, v in metric.compute().items()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_metric_syncs_exactly_across_two_ddp_processes(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    logits, target = _ddp_data()
    single = DiscoverableExtraction(ns=(1, 10, 100), ps=(0.5, 0.9), temperature=1.3, top_k=4, top_p=0.9)
    single.update(logits, target)
    expected = {k: float(v) for k, v in single.compute().items()}
    assert ranks[0] == ranks[1] == expected
    assert 0.0 < expected["discoverable/n10_p0.5"] < 1.0 and expected["exact_match"] > 0.0
