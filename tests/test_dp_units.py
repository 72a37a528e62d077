"""DP building blocks without a Trainer: Poisson sampler, accounting, HF per-sequence loss and grad samplers."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers
from opacus.accountants import create_accountant
from opacus.grad_sample import GradSampleHooks
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from antimemo.dp import (
    EmptySafeCollate,
    PerSequenceLoss,
    PoissonBatchSampler,
    compute_epsilon,
    extend_history,
    find_causal_lms,
    install_batched_position_ids,
    noise_multiplier_for,
    per_sequence_causal_lm_loss,
    register_grad_samplers,
    steps_within_budget,
)

transformers.logging.set_verbosity_error()


# ---------------------------------------------------------------- Poisson sampler


def test_poisson_inclusion_rate_and_variable_sizes():
    s = PoissonBatchSampler(num_samples=200, sample_rate=0.1, seed=3)
    assert len(s) == 10  # int(1 / 0.1)
    counts = torch.zeros(200)
    sizes = []
    for _ in range(30):  # 30 epochs x 10 batches = 300 Bernoulli(0.1) draws per record
        for batch in s:
            assert len(batch) == len(set(batch))  # no record twice in a batch
            counts[batch] += 1
            sizes.append(len(batch))
    # each record's inclusion frequency ~ 0.1; over all 200 x 300 draws the mean is 0.1 +- 0.0012 (1 sd)
    assert abs(counts.sum().item() / (200 * 300) - 0.1) < 0.005
    assert len(set(sizes)) > 5  # Poisson batches: sizes vary (mean 20, sd ~4.2)
    # no new stream per epoch is needed: 300 draws all differ (one stream per draw)
    assert s.draws == 300


def test_poisson_streams_are_per_draw_and_resume_continues():
    a = list(PoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=1))  # draws 0..4
    a2 = list(PoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=1))
    assert a == a2  # reproducible
    s = PoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=1)
    first, second = list(s), list(s)  # epochs 1 and 2 of one sampler: draws 0..4 then 5..9
    assert first == a and second != first
    resumed = list(PoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=1, start_draw=5))
    assert resumed == second  # a resumed run (start_draw = steps taken) never reuses a mask
    assert list(PoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=2)) != a


def test_poisson_ranks_have_disjoint_shards_covering_the_dataset():
    n, world = 11, 3
    samplers = [PoissonBatchSampler(num_samples=n, sample_rate=0.5, rank=r, world_size=world, seed=0) for r in range(world)]
    shards = [set(s.shard().tolist()) for s in samplers]
    assert set().union(*shards) == set(range(n))
    assert sum(len(x) for x in shards) == n  # disjoint (no padding, unlike DistributedSampler)
    for r, s in enumerate(samplers):
        for batch in s:
            assert all(i % world == r for i in batch)
    assert len({len(s) for s in samplers}) == 1  # same number of steps on every rank (int(1/0.5) = 2)


def test_poisson_sampler_arguments():
    with pytest.raises(ValueError, match="sample_rate must be in"):
        PoissonBatchSampler(num_samples=10, sample_rate=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        PoissonBatchSampler(num_samples=0, sample_rate=0.5)
    with pytest.raises(ValueError, match="rank must be"):
        PoissonBatchSampler(num_samples=10, sample_rate=0.5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="drop_last"):
        PoissonBatchSampler(None, 1, True, num_samples=10, sample_rate=0.5)
    ds = list(range(10))
    wrong = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    with pytest.raises(ValueError, match="DistributedSampler"):
        PoissonBatchSampler(wrong, num_samples=10, sample_rate=0.5, rank=0, world_size=2)
    # the matching injected sampler (what Lightning passes under DDP) is accepted and not used for sampling
    ok = PoissonBatchSampler(DistributedSampler(ds, num_replicas=2, rank=1), num_samples=10, sample_rate=0.5, rank=1, world_size=2)
    assert all(i % 2 == 1 for b in ok for i in b)


def test_empty_safe_collate_keeps_structure():
    ds = [{"input_ids": torch.arange(5), "y": torch.tensor(1.0), "text": "abc"} for _ in range(3)]
    collate = EmptySafeCollate(default_collate, ds)
    empty = collate([])
    assert empty["input_ids"].shape == (0, 5) and empty["input_ids"].dtype == torch.long
    assert empty["y"].shape == (0,) and empty["text"] == []
    full = collate(ds[:2])
    assert full["input_ids"].shape == (2, 5)
    pairs = [(torch.ones(3), torch.tensor(0))] * 2
    e2 = EmptySafeCollate(default_collate, pairs)([])
    assert [t.shape for t in e2] == [torch.Size([0, 3]), torch.Size([0])]


def test_loader_with_poisson_sampler_yields_empty_batches():
    ds = [{"x": torch.tensor([float(i)])} for i in range(8)]
    # q = 1/8: P(empty batch) = (7/8)^8 = 0.34; 40 batches give at least one (P(none) = 0.66^40 < 1e-7)
    bs = PoissonBatchSampler(num_samples=8, sample_rate=1 / 8, seed=0)
    loader = DataLoader(ds, batch_sampler=bs, collate_fn=EmptySafeCollate(default_collate, ds))
    sizes = [b["x"].shape[0] for _ in range(5) for b in loader]
    assert len(sizes) == 40 and 0 in sizes


# ---------------------------------------------------------------- accounting


@pytest.mark.parametrize("mechanism", ["prv", "rdp", "gdp"])
def test_epsilon_equals_opacus_accountant(mechanism):
    history = [(1.1, 0.05, 60)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = create_accountant(mechanism)
    acc.history = list(history)
    assert compute_epsilon(history, 1e-5, mechanism) == acc.get_epsilon(1e-5)


def test_epsilon_heterogeneous_history_and_edge_cases():
    hist = [(1.0, 0.1, 5), (2.0, 0.05, 7)]
    acc = create_accountant("prv")
    acc.history = list(hist)
    assert compute_epsilon(hist, 1e-4) == acc.get_epsilon(1e-4)
    assert compute_epsilon([], 1e-5) == 0.0
    assert compute_epsilon([(0.0, 0.1, 3)], 1e-5) == math.inf
    assert extend_history([(1.0, 0.1, 5)], 1.0, 0.1, 2) == [(1.0, 0.1, 7)]  # run-length, as Opacus
    with pytest.raises(ValueError, match="accountant must be one of"):
        compute_epsilon(hist, 1e-5, "moments")
    with pytest.raises(ValueError, match="gdp"):
        compute_epsilon(hist, 1e-5, "gdp")


def test_prv_grid_cap_gives_a_finite_upper_bound_for_weak_privacy():
    # (sigma 0.6, q 0.1, 100 steps) needs a grid of ~1.3e5 points at Opacus' eps_error=0.01 (what
    # max_prv_grid=1e6 keeps); capping it at 2e4 widens eps_error ~6x, which can only loosen the bound.
    hist = [(0.6, 0.1, 100)]
    exact = compute_epsilon(hist, 1e-3)
    acc = create_accountant("prv")
    acc.history = list(hist)
    assert exact == acc.get_epsilon(1e-3)  # below the cap: exactly Opacus
    capped = compute_epsilon(hist, 1e-3, max_prv_grid=20_000)
    assert exact <= capped <= exact + 0.1
    assert capped < compute_epsilon(hist, 1e-3, "rdp")  # still tighter than RDP


def test_noise_for_target_equals_opacus_and_steps_within_budget():
    from opacus.accountants.utils import get_noise_multiplier

    sigma = noise_multiplier_for(3.0, 1e-5, 0.02, 500, "rdp")
    assert sigma == get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.02, steps=500, accountant="rdp")
    eps = compute_epsilon([(sigma, 0.02, 500)], 1e-5, "rdp")
    assert 3.0 - 0.01 <= eps <= 3.0  # Opacus' binary search tolerance
    k = steps_within_budget(3.0, 1e-5, sigma, 0.02, "rdp", guess=500)
    assert k >= 500
    assert compute_epsilon([(sigma, 0.02, k)], 1e-5, "rdp") <= 3.0 < compute_epsilon([(sigma, 0.02, k + 1)], 1e-5, "rdp")
    # with a history already spent, fewer steps remain
    k2 = steps_within_budget(3.0, 1e-5, sigma, 0.02, "rdp", history=[(sigma, 0.02, 200)], guess=10)
    assert k2 == k - 200
    with pytest.raises(ValueError, match="cannot be reached"):
        noise_multiplier_for(1e-6, 1e-5, 0.02, 10, "rdp")


# ---------------------------------------------------------------- HF: per-sequence loss


def test_per_sequence_loss_by_hand():
    # vocab 2, uniform logits except one position: token losses are log 2 = 0.6931 ...
    logits = torch.zeros(2, 4, 2)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0)])  # p(target 1) = 3/4 -> loss -log(0.75) = 0.2877
    labels = torch.tensor([[9, 1, 0, 1], [9, 0, -100, -100]])
    loss, per_seq = per_sequence_causal_lm_loss(logits, labels)
    # sequence 0: targets labels[0,1:] = (1, 0, 1) at positions 0..2: (0.2877 + 0.6931 + 0.6931) / 3 = 0.5580
    # sequence 1: one target (0) at position 0: 0.6931 / 1 = 0.6931
    assert per_seq.tolist() == pytest.approx([(-math.log(0.75) + 2 * math.log(2)) / 3, math.log(2)], abs=1e-6)
    assert float(loss) == pytest.approx((0.5580 + 0.6931) / 2, abs=1e-4)
    # HF's token-mean loss weighs sequence 0 three times as much: (0.2877 + 3 * 0.6931) / 4 = 0.5918
    hf = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 2), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(hf) == pytest.approx((-math.log(0.75) + 3 * math.log(2)) / 4, abs=1e-6)
    empty_loss, empty_seq = per_sequence_causal_lm_loss(torch.zeros(0, 4, 2, requires_grad=True), torch.zeros(0, 4).long())
    assert empty_seq.shape == (0,) and float(empty_loss) == 0.0 and empty_loss.requires_grad


def _llama(pad=None):
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=pad,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg)


def test_per_sequence_loss_installs_only_for_training_and_uninstalls():
    model = _llama()
    x = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[0, 4:] = -100
    hf_loss = float(model(input_ids=x, labels=labels).loss)
    model.loss_function = PerSequenceLoss(model)
    assert find_causal_lms(torch.nn.ModuleDict({"m": model})) == [model]
    model.train()
    out = model(input_ids=x, labels=labels)
    fn = model.loss_function
    assert fn.calls == 1 and fn.last_per_sequence.shape == (3,)
    assert float(out.loss) == pytest.approx(float(fn.last_per_sequence.mean()), abs=1e-6)
    assert float(out.loss) != pytest.approx(hf_loss, abs=1e-4)  # unequal target counts: the two losses differ
    model.eval()
    with torch.no_grad():
        assert float(model(input_ids=x, labels=labels).loss) == pytest.approx(hf_loss, abs=1e-6)  # eval: HF loss
    assert fn.calls == 1
    PerSequenceLoss.uninstall(model)
    assert "_loss_function" not in vars(model)


# ---------------------------------------------------------------- HF: per-sample gradients


def _per_sample_grads_match(model, x, labels):
    """Per-sample grads from Opacus hooks vs. B separate backward passes on single sequences."""
    model.train()
    model.loss_function = PerSequenceLoss(model)
    handles = install_batched_position_ids(model)
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
    model(input_ids=x, labels=labels).loss.backward()
    gs = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    hooks.cleanup()
    for h in handles:
        h.remove()
    worst = 0.0
    for i in range(x.shape[0]):
        model.zero_grad()
        model(input_ids=x[i : i + 1], labels=labels[i : i + 1]).loss.backward()
        for n, p in model.named_parameters():
            assert gs[n].shape == (x.shape[0], *p.shape), n
            worst = max(worst, float((gs[n][i] - p.grad).abs().max()) / (float(p.grad.abs().max()) + 1e-12))
    PerSequenceLoss.uninstall(model)
    return worst


def test_gpt2_per_sample_grads_with_conv1d_sampler_and_batched_positions():
    register_grad_samplers()
    from transformers.pytorch_utils import Conv1D

    assert Conv1D in GradSampleHooks.GRAD_SAMPLERS
    model = _gpt2()
    x = torch.randint(1, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[1, 5:] = -100
    assert _per_sample_grads_match(model, x, labels) < 1e-4  # includes tied wte / lm_head


def test_gpt2_without_batched_position_ids_hits_the_stack_size_error():
    register_grad_samplers()
    model = _gpt2()
    model.train()
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
    x = torch.randint(1, 40, (4, 9))
    model(input_ids=x, labels=x).loss.backward()
    assert model.transformer.wpe.weight.grad_sample.shape[0] == 1  # position ids [1, S] broadcast over the batch
    assert model.transformer.wte.weight.grad_sample.shape[0] == 4
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        norms = [p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=-1) for p in model.parameters()]
        torch.stack(norms, dim=1)  # what DPOptimizer.clip_and_accumulate does
    hooks.cleanup()


def test_llama_per_sample_grads_with_rms_norm_sampler_and_padding_row():
    register_grad_samplers()
    model = _llama(pad=39)
    x = torch.randint(0, 39, (3, 8), generator=torch.Generator().manual_seed(2))
    x[2, 6:] = 39  # padding tokens: PyTorch gives the padding row no gradient, nor must the per-sample grads
    labels = x.clone()
    labels[2, 6:] = -100
    assert _per_sample_grads_match(model, x, labels) < 1e-4
