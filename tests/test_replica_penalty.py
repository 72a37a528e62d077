"""ReplicaPenalty: strength 0 is plain training bit for bit; otherwise the gradient is exactly that
of loss + strength * mean(replica_penalty(...)); invalid knobs raise."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from antimemo import ReplicaPenalty
from antimemo.functional.replica import replica_penalty

from _tiny_diffusion import X, Y, Data, tiny  # tests/ is on sys.path (pytest's rootdir-relative import)


def _fit(callbacks):
    pl.seed_everything(0)
    m = tiny()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(m, datamodule=Data())
    return m, trainer


def test_strength_zero_is_plain_training_bit_for_bit():
    a, _ = _fit([])
    b, tb = _fit([ReplicaPenalty(strength=0.0)])
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    assert "train/replica_penalty" not in tb.callback_metrics


def test_positive_strength_changes_training_and_logs_the_term():
    a, _ = _fit([])
    b, tb = _fit([ReplicaPenalty(strength=5.0, threshold=-1.0, min_noise=0.0)])
    assert float(tb.callback_metrics["train/replica_penalty"]) > 0
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    assert not b._loss_terms  # removed at teardown


@pytest.mark.parametrize("threshold, min_noise", [(-1.0, 0.0), (0.3, 0.9)])
def test_gradient_equals_autograd_of_loss_plus_penalty(threshold, min_noise):
    batch = {"image": X[:8], "label": Y[:8]}
    m = tiny()
    cb = ReplicaPenalty(strength=0.7, threshold=threshold, min_noise=min_noise)
    cb.setup(pl.Trainer(logger=False), m, "fit")
    torch.manual_seed(1)
    m.zero_grad()
    m.training_step(batch, 0).backward()
    got = [p.grad.clone() for p in m.parameters()]
    cb.teardown(None, m, "fit")

    torch.manual_seed(1)
    m.zero_grad()
    loss, step = m.diffusion_step(batch)
    sigma = (1 - m.scheduler.alphas_cumprod[step.timesteps]).sqrt()
    a = m.scheduler.alphas_cumprod[step.timesteps].view(-1, 1, 1, 1)
    pred_x0 = (step.noisy - (1 - a).sqrt() * step.model_output) / a.sqrt()
    total = loss + 0.7 * replica_penalty(pred_x0, batch["image"] * 2 - 1, sigma, threshold, min_noise).mean()
    total.backward()
    for g, p in zip(got, m.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strength": -0.1}, "strength"),
        ({"strength": float("inf")}, "strength"),
        ({"threshold": 1.0}, "threshold"),
        ({"min_noise": -0.5}, "min_noise"),
    ],
)
def test_invalid_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReplicaPenalty(**kwargs)


def test_module_without_hook_is_rejected():
    class Plain(pl.LightningModule):
        pass

    with pytest.raises(TypeError, match="add_loss_term"):
        ReplicaPenalty(strength=1.0).setup(pl.Trainer(logger=False), Plain(), "fit")
