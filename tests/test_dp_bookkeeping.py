"""Book-keeping per-sample clipping (antimemo.dp.bookkeeping) against Opacus' hooks, layer by layer."""

from __future__ import annotations

import pytest
import torch
import transformers
from opacus.grad_sample import GradSampleModule
from torch import nn

from antimemo.dp.bookkeeping import BookKeeping, bookkeeping_blocker, bookkeeping_optimizer_class, ghost_cheaper
from antimemo.dp.hf import register_grad_samplers


class Mixed(nn.Module):
    """Embedding with a padding row, a biased linear layer used twice, LayerNorm and a head."""

    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + torch.tanh(self.lin(h))
        h = h + torch.tanh(self.lin(h))  # the same layer again: its per-sample gradient sums both calls
        return self.head(self.norm(h))


def per_row_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def hooks_reference(model: nn.Module, ids: torch.Tensor, c: float, forward) -> tuple[dict, torch.Tensor]:
    """Opacus hooks: per-sample gradients, flat clipping as DPOptimizer does, the clipped sums."""
    register_grad_samplers()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    forward(gsm, ids).mean().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.reshape(len(ids), -1).norm(dim=1) for p in params], 1).norm(dim=1)
    factor = (c / (norms + 1e-6)).clamp(max=1.0)
    sums = {p: torch.einsum("b,b...->...", factor, p.grad_sample) for p in params}
    gsm._close()
    for p in params:
        p.grad = None
        p.grad_sample = None
    return sums, norms


def bk_sums(model: nn.Module, ids: torch.Tensor, c: float, forward) -> tuple[dict, torch.Tensor]:
    bk = BookKeeping(model).attach()
    forward(model, ids).mean().backward()
    sums = bk.clipped_sums(c)
    norms = bk.last_norms
    # no autograd graph through the kept activations (one would hold every activation of the step alive)
    assert norms.grad_fn is None and not any(t.requires_grad for t in sums.values())
    bk.detach()
    for p in model.parameters():
        p.grad = None
    return sums, norms


def compare(model: nn.Module, ids: torch.Tensor, c: float, forward) -> torch.Tensor:
    ref, ref_norms = hooks_reference(model, ids, c, forward)
    got, got_norms = bk_sums(model, ids, c, forward)
    torch.testing.assert_close(got_norms, ref_norms, rtol=1e-4, atol=1e-6)
    assert set(got) == set(ref)
    for p in ref:
        torch.testing.assert_close(got[p], ref[p], rtol=1e-4, atol=1e-6)
    return ref_norms


def mixed_forward(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return per_row_loss(m(ids), ids)


@pytest.mark.parametrize("seq", [3, 40])  # 3 tokens: ghost norms; 40: the layers' per-sample gradients
def test_mixed_model_matches_opacus_hooks(seq: int) -> None:
    # the linear layers see 2 x seq tokens per row for lin (two calls) and seq for head
    assert ghost_cheaper(3, 6, 11) and ghost_cheaper(3, 6, 6) and not ghost_cheaper(6, 6, 6)
    assert not ghost_cheaper(40, 6, 11)
    torch.manual_seed(0)
    model = Mixed()
    ids = torch.randint(0, 11, (5, seq))
    ids[1, 1:3] = 0  # padding tokens: the embedding's padding row gets no gradient
    norms = compare(model, ids, 1e9, mixed_forward)  # no clipping: the plain per-sample sum
    small = float(norms.median())
    compare(model, ids, small, mixed_forward)  # about half of the rows clipped


def llama(tie: bool = False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=31, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg)


def llama_forward(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return per_row_loss(m(input_ids=ids, position_ids=pos).logits, ids)


def test_llama_matches_opacus_hooks_with_clipping() -> None:
    assert ghost_cheaper(12, 64, 64) and ghost_cheaper(12, 64, 96) and ghost_cheaper(12, 64, 32)  # ghost norms
    model = llama()
    ids = torch.randint(0, 32, (4, 12))
    ids[0, -3:] = 31
    norms = compare(model, ids, 1e9, llama_forward)
    compare(model, ids, float(norms.min()) / 2, llama_forward)  # every row clipped


def test_lora_adapters_only() -> None:
    from antimemo.lm.lora import apply_lora

    model = llama()
    apply_lora(model, {"r": 2, "target_modules": ["q_proj", "v_proj"]})
    ids = torch.randint(0, 32, (3, 10))
    compare(model, ids, 0.05, llama_forward)
    bk = BookKeeping(model).attach()
    assert {r.kind for r in bk.records} == {"linear"} and len(bk.records) == 8  # 2 layers x q, v x A, B
    bk.detach()


def test_detach_restores_forward_and_no_grad_is_plain() -> None:
    model = Mixed()
    ids = torch.randint(1, 11, (2, 5))
    before = model(ids)
    bk = BookKeeping(model).attach()
    assert "forward" in model.lin.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before.detach())
    assert not any(r.grads for r in bk.records)
    bk.detach()
    assert "forward" not in model.lin.__dict__ and "forward" not in model.emb.__dict__


def test_two_backward_passes_refused() -> None:
    model = Mixed()
    bk = BookKeeping(model).attach()
    for _ in range(2):
        ids = torch.randint(1, 11, (3, 5))
        mixed_forward(model, ids).mean().backward()
    with pytest.raises(RuntimeError, match="2 backward passes"):
        bk.clipped_sums(1.0)


def test_weight_used_outside_its_layer_refused() -> None:
    model = Mixed()
    bk = BookKeeping(model).attach()
    ids = torch.randint(1, 11, (3, 5))
    loss = mixed_forward(model, ids).mean() + nn.functional.linear(model.emb(ids), model.lin.weight).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"layer lin \(Linear\) received a gradient from autograd"):
        bk.clipped_sums(1.0)


def test_no_backward_refused() -> None:
    bk = BookKeeping(Mixed()).attach()
    with pytest.raises(RuntimeError, match="no layer received a gradient"):
        bk.clipped_sums(1.0)


def test_tied_embeddings_and_unknown_layers_refused() -> None:
    assert "shared by the layers" in bookkeeping_blocker(llama(tie=True))
    with pytest.raises(ValueError, match=r"PReLU\): no book-keeping rule.*Use grad_sample_mode='hooks'"):
        BookKeeping(nn.Sequential(nn.Linear(3, 3), nn.PReLU())).attach()
    with pytest.raises(ValueError, match="max_norm"):
        BookKeeping(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0))).attach()


def test_unused_layer_gets_a_zero_sum() -> None:
    model = Mixed()
    model.spare = nn.Linear(3, 3)
    bk = BookKeeping(model).attach()
    ids = torch.randint(1, 11, (3, 5))
    mixed_forward(model, ids).mean().backward()
    sums = bk.clipped_sums(1.0)
    assert torch.equal(sums[model.spare.weight], torch.zeros(3, 3))
    assert not any(r.grads for r in bk.records)  # cleared after the sums


def test_optimizer_adds_noise_to_the_clipped_sum() -> None:
    """The optimizer class: BK's clipped sum, then Opacus' noise and scaling (noise 0 here)."""
    torch.manual_seed(0)
    model = Mixed()
    ids = torch.randint(1, 11, (4, 6))
    ref, _ = hooks_reference(model, ids, 0.5, mixed_forward)
    opt = bookkeeping_optimizer_class(distributed=False)(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=8
    )
    opt.bookkeeping = BookKeeping(model).attach()
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.zero_grad()
    mixed_forward(model, ids).mean().backward()
    opt.step()
    for p in model.parameters():
        torch.testing.assert_close(before[p] - p.detach(), ref[p] / 8, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------- through DifferentialPrivacy
import lightning.pytorch as pl  # noqa: E402

from antimemo.callbacks.dp import DifferentialPrivacy  # noqa: E402
from antimemo.lm.data import TextDataModule  # noqa: E402
from antimemo.lm.module import CausalLMModule  # noqa: E402

TINY = {"vocab_size": 257, "hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}


def _fit(mode: str, steps: int = 3, max_grad_norm: float = 0.1) -> tuple[DifferentialPrivacy, CausalLMModule]:
    pl.seed_everything(0, verbose=False)
    model = CausalLMModule(**TINY, max_position_embeddings=64, seed=0)
    data = TextDataModule(seq_len=16, num_train=64, num_holdout=8, batch_size=8, seed=0)
    dp = DifferentialPrivacy(
        noise_multiplier=1.0, max_grad_norm=max_grad_norm, grad_sample_mode=mode, reproducible_noise=True
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[dp],
    )
    trainer.fit(model, data)
    return dp, model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bookkeeping_trains_exactly_like_hooks():
    """Same seed, same Poisson batches, same noise: the weights after 3 clipped DP steps agree."""
    hooks, m_hooks = _fit("hooks")
    bk, m_bk = _fit("bookkeeping")
    assert bk.route == "bookkeeping" and bk.guarantee()["grad_sample_mode"] == "bookkeeping"
    assert bk.history == hooks.history and bk.epsilon == pytest.approx(hooks.epsilon)
    for (name, a), (_, b) in zip(m_hooks.named_parameters(), m_bk.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    changed = sum(float((a - b).abs().max()) for a, b in zip(m_hooks.parameters(), CausalLMModule(**TINY, seed=0).parameters()))
    assert changed > 0  # the steps did move the weights
    # the patches are gone after fit
    assert not any("forward" in sub.__dict__ for sub in m_bk.modules())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bookkeeping_under_bf16_mixed_precision_stays_as_close_to_fp32_as_hooks():
    """Under bf16 autocast the captured inputs and gradients are bf16: the steps still run, and
    book-keeping lands as near the fp32 weights as hooks does (Adam turns bf16 rounding of tiny
    gradient components into full-size update differences for both, so the bar is hooks' own)."""

    def fit(mode: str, precision: str) -> torch.Tensor:
        pl.seed_everything(0, verbose=False)
        model = CausalLMModule(**TINY, max_position_embeddings=64, seed=0)
        data = TextDataModule(seq_len=16, num_train=64, num_holdout=8, batch_size=8, seed=0)
        dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=0.1, grad_sample_mode=mode, reproducible_noise=True)
        trainer = pl.Trainer(
            accelerator="cpu", precision=precision, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[dp],
        )
        trainer.fit(model, data)
        assert dp.steps == 3
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    ref = fit("hooks", "32-true")
    hooks, bk = fit("hooks", "bf16-mixed"), fit("bookkeeping", "bf16-mixed")
    assert torch.isfinite(bk).all() and bk.dtype == torch.float32
    assert float((bk - ref).abs().mean()) <= 1.5 * float((hooks - ref).abs().mean()) + 1e-7
