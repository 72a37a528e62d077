"""Pure loss functions of the LM regularizers (antimemo.functional.regularizers) vs hand computations."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from antimemo.functional.regularizers import (
    example_tied_dropout,
    example_tied_dropout_mask,
    flood,
    init_power_iteration_vectors,
    loss_truncation_loss,
    per_sequence_lm_loss,
    power_iteration,
    sequence_flooding_loss,
    spectral_norm_penalty,
    truncation_threshold,
)

LN3, LN4 = math.log(3.0), math.log(4.0)


def _two_token_batch():
    """Logits [0, ln 3] at every position: p(token 1) = 3/4, p(token 0) = 1/4.

    CE of target 1 = ln(4/3) = 0.2876821, of target 0 = ln 4 = 1.3862944.
    Row 0: labels [7, 1, 0, -100]: targets 1 (pos 1) and 0 (pos 2); pos 3 ignored; pos 0 is never a target.
    Row 1: labels [7, 1, 1, 1]: three targets 1.
    """
    logits = torch.tensor([0.0, LN3]).expand(2, 4, 2).clone().requires_grad_()
    labels = torch.tensor([[7, 1, 0, -100], [7, 1, 1, 1]])
    return logits, labels


# ---------------------------------------------------------------------------------------------
# per_sequence_lm_loss
# ---------------------------------------------------------------------------------------------


def test_per_sequence_lm_loss_hand_computation():
    logits, labels = _two_token_batch()
    losses, n = per_sequence_lm_loss(logits, labels)
    # row 0: (ln(4/3) + ln 4) / 2 = (0.2876821 + 1.3862944) / 2 = 0.8369882
    # row 1: 3 * ln(4/3) / 3 = 0.2876821
    assert losses.tolist() == pytest.approx([0.8369882, 0.2876821], abs=1e-6)
    assert n.tolist() == [2, 3]
    assert n.dtype == torch.int64 and losses.dtype == torch.float32
    # target-weighted mean = Hugging Face's token mean: (2*0.8369882 + 3*0.2876821) / 5 = 0.5074045
    hf = F.cross_entropy(logits[:, :-1].detach().reshape(-1, 2), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float((losses * n).sum().detach() / n.sum()) == pytest.approx(0.5074045, abs=1e-6)
    assert float(hf) == pytest.approx(0.5074045, abs=1e-6)


def test_per_sequence_lm_loss_no_target_row_and_ignore_index():
    logits = torch.zeros(2, 3, 4)  # uniform: ln 4 per target
    labels = torch.tensor([[1, -1, -1], [1, 2, 3]])
    losses, n = per_sequence_lm_loss(logits, labels, ignore_index=-1)
    assert n.tolist() == [0, 2]
    assert losses.tolist() == pytest.approx([0.0, LN4])  # a row without targets has loss 0, not nan


def test_per_sequence_lm_loss_matches_llama_loss():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 40, (3, 10))
    labels = ids.clone()
    labels[0, 4:] = -100
    out = model(input_ids=ids, labels=labels)
    losses, n = per_sequence_lm_loss(out.logits, labels)
    torch.testing.assert_close((losses * n).sum() / n.sum(), out.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "logits, labels, exc, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), TypeError, r"logits must be a floating-point tensor \[B, T, V\]"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3), TypeError, "labels must be an integer tensor"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), ValueError, r"labels has shape \(2, 2\)"),
    ],
)
def test_per_sequence_lm_loss_errors(logits, labels, exc, match):
    with pytest.raises(exc, match=match):
        per_sequence_lm_loss(logits, labels)


# ---------------------------------------------------------------------------------------------
# Loss floor
# ---------------------------------------------------------------------------------------------


def test_flood_hand_computation():
    # b = 0.5: |0.2-0.5|+0.5 = 0.8; |0.5-0.5|+0.5 = 0.5; |1.0-0.5|+0.5 = 1.0
    assert flood(torch.tensor([0.2, 0.5, 1.0]), 0.5).tolist() == pytest.approx([0.8, 0.5, 1.0])
    # b = 0 is the identity on non-negative losses
    x = torch.tensor([0.0, 0.3, 2.0])
    assert torch.equal(flood(x, 0.0), x)


def test_sequence_flooding_loss_hand_computation_and_gradient():
    logits, labels = _two_token_batch()
    losses, n = per_sequence_lm_loss(logits, labels)  # [0.8369882, 0.2876821], n = [2, 3]
    loss = sequence_flooding_loss(losses, n, floor=0.5)
    # row 1 is below the floor: |0.2876821 - 0.5| + 0.5 = 0.7123179
    # (2 * 0.8369882 + 3 * 0.7123179) / 5 = (1.6739764 + 2.1369537) / 5 = 0.7621860
    assert float(loss) == pytest.approx(0.7621860, abs=1e-6)
    grad = torch.autograd.grad(loss, losses)[0]
    # d/dL0 = 2/5 (plain), d/dL1 = -3/5 (ascent below the floor)
    assert grad.tolist() == pytest.approx([0.4, -0.6])
    # num_items replaces the denominator: 3.8109301 / 10
    assert float(sequence_flooding_loss(losses, n, 0.5, num_items=10)) == pytest.approx(0.3810930, abs=1e-6)
    assert float(sequence_flooding_loss(losses, n, 0.5, num_items=torch.tensor(10))) == pytest.approx(0.3810930, abs=1e-6)
    # floor = 0: the plain target-mean loss 0.5074045
    assert float(sequence_flooding_loss(losses, n, 0.0)) == pytest.approx(0.5074045, abs=1e-6)


@pytest.mark.parametrize("floor", [-0.1, float("nan"), float("inf"), "0.5", None, True])
def test_floor_errors(floor):
    with pytest.raises(ValueError, match=r"floor must be a finite number >= 0 .*got .*floor=0 disables"):
        flood(torch.ones(2), floor)


def test_losses_shape_errors():
    with pytest.raises(TypeError, match="losses must be a 1-D floating-point tensor"):
        sequence_flooding_loss(torch.ones(2, 2), torch.ones(2), 0.5)
    with pytest.raises(ValueError, match=r"num_targets must be a tensor with the shape of losses \(3,\)"):
        loss_truncation_loss(torch.ones(3), torch.ones(2), 0.4)


# ---------------------------------------------------------------------------------------------
# Loss truncation
# ---------------------------------------------------------------------------------------------


def test_truncation_threshold_hand_computation():
    ref = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])  # order does not matter
    # c = 0.4: 0.6-quantile, position 0.6 * (5 - 1) = 2.4 in [1,2,3,4,5] -> 3 + 0.4 * (4 - 3) = 3.4
    assert float(truncation_threshold(ref, 0.4)) == pytest.approx(3.4)
    # c = 0.5: the median 3;  c = 0.9: position 0.1 * 4 = 0.4 -> 1 + 0.4 * (2 - 1) = 1.4
    assert float(truncation_threshold(ref, 0.5)) == pytest.approx(3.0)
    assert float(truncation_threshold(ref, 0.9)) == pytest.approx(1.4)
    assert float(truncation_threshold(ref, 0.4)) == pytest.approx(np.percentile(ref.numpy(), 60))  # TinyMem's numpy call
    assert truncation_threshold(ref, 0.0).item() == math.inf


def test_loss_truncation_loss_hand_computation_and_gradient():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    n = torch.tensor([1, 2, 1, 1, 5])
    loss = loss_truncation_loss(losses, n, c=0.4)
    # threshold 3.4 (above): keep 1, 2, 3 -> (1*1 + 2*2 + 1*3) / (1+2+1+1+5) = 8 / 10
    assert float(loss) == pytest.approx(0.8)
    grad = torch.autograd.grad(loss, losses)[0]
    assert grad.tolist() == pytest.approx([0.1, 0.2, 0.1, 0.0, 0.0])  # n_i / 10 if kept, else 0
    # a reference buffer sets the threshold: [0.5, 1.5, 2.5, 3.5], c = 0.5 -> position 1.5 -> 1.5 + 0.5 * 1 = 2.0
    # keep losses <= 2.0: (1*1 + 2*2) / 10 = 0.5
    ref = torch.tensor([0.5, 1.5, 2.5, 3.5])
    assert float(loss_truncation_loss(losses, n, 0.5, reference=ref)) == pytest.approx(0.5)
    # a loss equal to the threshold is kept: reference [1, 3] at c = 0.5 -> 2.0; keep 1 and 2 -> 0.5 again
    assert float(loss_truncation_loss(losses, n, 0.5, reference=torch.tensor([1.0, 3.0]))) == pytest.approx(0.5)
    # c = 0: plain target mean (1 + 4 + 3 + 4 + 25) / 10 = 3.7; num_items: 37 / 20
    assert float(loss_truncation_loss(losses, n, 0.0)) == pytest.approx(3.7)
    assert float(loss_truncation_loss(losses, n, 0.0, num_items=20)) == pytest.approx(1.85)


@pytest.mark.parametrize("c", [-0.1, 1.0, 1.5, "0.4", None])
def test_c_errors(c):
    with pytest.raises(ValueError, match=r"c must be a number in \[0, 1\), got .*c=0 disables"):
        truncation_threshold(torch.ones(3), c)


def test_truncation_reference_errors():
    with pytest.raises(ValueError, match="reference must be a non-empty 1-D tensor"):
        truncation_threshold(torch.ones(0), 0.4)


# ---------------------------------------------------------------------------------------------
# Spectral norm penalty
# ---------------------------------------------------------------------------------------------


def test_power_iteration_and_penalty_hand_computation():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]], requires_grad=True)
    u0 = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    # v = normalize(W^T u0) = [3, 1] / sqrt(10); u = normalize(W v) = [9, 1] / sqrt(82)
    u, v = power_iteration(w, u0)
    assert u.tolist() == pytest.approx([9 / math.sqrt(82), 1 / math.sqrt(82)])
    assert v.tolist() == pytest.approx([3 / math.sqrt(10), 1 / math.sqrt(10)])
    penalty, new_us = spectral_norm_penalty([w], [u0], lam=0.01)
    # sigma = u^T W v = (9*3*3 + 1*1*1) / sqrt(820) = 82 / sqrt(820) = sqrt(8.2) = 2.8635642
    # penalty = 0.01 / 2 * 2.8635642 = 0.01431782
    assert float(penalty) == pytest.approx(0.01431782, abs=1e-8)
    assert torch.allclose(new_us[0], u)
    grad = torch.autograd.grad(penalty, w)[0]
    # d penalty / dW = lam/2 * u v^T = 0.005 * [[27, 9], [3, 1]] / sqrt(820), sqrt(820) = 28.635642
    expected = torch.tensor([[0.00471444, 0.00157148], [0.00052383, 0.00017461]])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)


def test_power_iteration_converges_to_largest_singular_value():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(6, 4, generator=gen), torch.randn(3, 7, generator=gen)]
    us = init_power_iteration_vectors(weights, seed=0)
    for _ in range(200):
        _, us = spectral_norm_penalty(weights, us, lam=2.0)
    penalty, _ = spectral_norm_penalty(weights, us, lam=2.0)  # lam/2 = 1: the plain sum of sigmas
    exact = sum(float(torch.linalg.matrix_norm(w, ord=2)) for w in weights)
    assert float(penalty) == pytest.approx(exact, rel=1e-5)


def test_init_power_iteration_vectors_seeded_and_rng_free():
    weights = [torch.zeros(5, 3), torch.zeros(4, 4)]
    state, py_state = torch.get_rng_state(), random.getstate()
    a = init_power_iteration_vectors(weights, seed=3)
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state
    b = init_power_iteration_vectors(weights, seed=3)
    c = init_power_iteration_vectors(weights, seed=4)
    assert [x.shape for x in a] == [torch.Size([5]), torch.Size([4])]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert all(float(x.norm()) == pytest.approx(1.0) for x in a)


def test_spectral_norm_penalty_lam_zero_and_errors():
    w = torch.randn(3, 2, requires_grad=True)
    penalty, _ = spectral_norm_penalty([w], init_power_iteration_vectors([w]), lam=0.0)
    assert float(penalty) == 0.0
    with pytest.raises(ValueError, match=r"lam must be a finite number >= 0, got -1.*lam=0 disables"):
        spectral_norm_penalty([w], init_power_iteration_vectors([w]), lam=-1)
    with pytest.raises(ValueError, match="us has 0 vectors but weights has 1 matrices"):
        spectral_norm_penalty([w], [], lam=0.01)
    with pytest.raises(TypeError, match=r"weights\[0\] must be a 2-D floating-point tensor"):
        spectral_norm_penalty([torch.ones(3)], [torch.ones(3)], lam=0.01)
    with pytest.raises(ValueError, match="n_power_iterations must be an integer >= 1, got 0"):
        power_iteration(w, torch.ones(3), n_power_iterations=0)


# ---------------------------------------------------------------------------------------------
# Example-tied dropout
# ---------------------------------------------------------------------------------------------

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def _mix64(z):
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _reference_mask(example_id, n, p_fixed, p_mem, seed):
    """The documented definition, in plain Python integers."""
    n_fixed = math.floor(p_fixed * n + 1e-9)
    state = _mix64(_mix64(seed + GAMMA) + GAMMA + example_id)
    out = [True] * n_fixed
    for j in range(n_fixed, n):
        out.append((_mix64(state + GAMMA + j) >> 11) < math.floor(p_mem * 2**53))
    return out


def test_example_tied_dropout_mask_matches_definition():
    ids = torch.tensor([0, 1, 7, 123456789, 2**40])
    mask = example_tied_dropout_mask(ids, 50, p_fixed=0.2, p_mem=0.3, seed=11)
    expected = [_reference_mask(int(i), 50, 0.2, 0.3, 11) for i in ids]
    assert mask.tolist() == expected
    assert mask[:, :10].all()  # floor(0.2 * 50) = 10 shared neurons
    # a row depends only on its id, not on the batch
    single = example_tied_dropout_mask(ids[2:3], 50, p_fixed=0.2, p_mem=0.3, seed=11)
    assert torch.equal(single[0], mask[2])
    assert not torch.equal(mask[0], mask[1])
    assert not torch.equal(mask, example_tied_dropout_mask(ids, 50, p_fixed=0.2, p_mem=0.3, seed=12))


def test_example_tied_dropout_mask_rates():
    ids = torch.arange(400)
    mask = example_tied_dropout_mask(ids, 100, p_fixed=0.29, p_mem=0.1)
    assert mask[:, :29].all() and not mask[:, 29:].all()  # floor(0.29 * 100) = 29 (not 28)
    rate = mask[:, 29:].float().mean().item()  # 400 * 71 Bernoulli(0.1) draws: sd ~ 0.0018
    assert 0.09 < rate < 0.11
    assert not example_tied_dropout_mask(ids, 100, p_fixed=0.2, p_mem=0.0)[:, 20:].any()
    assert example_tied_dropout_mask(ids, 100, p_fixed=0.2, p_mem=1.0).all()


def test_example_tied_dropout_train_and_eval():
    hidden = torch.arange(1.0, 21.0).view(1, 2, 10).repeat(2, 1, 1)  # [B=2, T=2, n=10]
    ids = torch.tensor([3, 9])
    out = example_tied_dropout(hidden, ids, p_fixed=0.2, p_mem=0.5, seed=1)
    mask = example_tied_dropout_mask(ids, 10, p_fixed=0.2, p_mem=0.5, seed=1)
    assert torch.equal(out, hidden * mask[:, None, :].float())  # same mask at every position, no rescaling
    ev = example_tied_dropout(hidden, None, p_fixed=0.2, p_mem=0.1, training=False)
    # eval: neurons 0, 1 scaled by (0.2 + 0.1) / 0.2 = 1.5; neurons 2..9 zeroed
    assert ev[0, 0].tolist() == pytest.approx([1.5, 3.0] + [0.0] * 8)
    assert ev[1, 1].tolist() == pytest.approx([16.5, 18.0] + [0.0] * 8)
    # p_fixed = 1: identity in both modes
    assert example_tied_dropout(hidden, ids, p_fixed=1.0, p_mem=0.3) is hidden
    assert example_tied_dropout(hidden, None, p_fixed=1.0, training=False) is hidden


def test_example_tied_dropout_p_mem_zero_trains_the_evaluated_subnetwork():
    hidden = torch.randn(3, 4, 20)
    train = example_tied_dropout(hidden, torch.tensor([0, 1, 2]), p_fixed=0.25, p_mem=0.0)
    ev = example_tied_dropout(hidden, None, p_fixed=0.25, p_mem=0.0, training=False)  # scale (0.25+0)/0.25 = 1
    assert torch.equal(train, ev)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"p_fixed": 0.0}, ValueError, r"p_fixed must be a number in \(0, 1\], got 0.0.*p_fixed=1 disables"),
        ({"p_fixed": 1.2}, ValueError, r"p_fixed must be a number in \(0, 1\]"),
        ({"p_mem": -0.1}, ValueError, r"p_mem must be a number in \[0, 1\], got -0.1"),
        ({"p_mem": 2}, ValueError, r"p_mem must be a number in \[0, 1\]"),
        ({"seed": 1.5}, TypeError, "seed must be an integer, got 1.5"),
        ({"p_fixed": 0.05}, ValueError, r"keeps floor\(0.05 \* 10\) = 0 shared neurons"),
    ],
)
def test_example_tied_dropout_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        example_tied_dropout_mask(torch.tensor([0]), 10, **kwargs)


def test_example_tied_dropout_id_errors():
    with pytest.raises(TypeError, match="example_ids must be a 1-D integer tensor"):
        example_tied_dropout_mask(torch.tensor([0.5]), 10)
    with pytest.raises(ValueError, match="example_ids must be >= 0"):
        example_tied_dropout_mask(torch.tensor([-1]), 10)
    with pytest.raises(ValueError, match="needs example_ids"):
        example_tied_dropout(torch.ones(2, 10), None)
    with pytest.raises(ValueError, match="example_ids has \\(3,\\) ids but hidden has batch size 2"):
        example_tied_dropout(torch.ones(2, 10), torch.tensor([0, 1, 2]))
