"""The stateful regularizers under a real 2-process CPU DDP fit (ddp_spawn, gloo).

LossTruncation gathers the per-sequence losses of both ranks into one rolling buffer (same
buffer and threshold on every rank); SpectralNormPenalty's power-iteration vectors are the same
on every rank. ExampleTiedDropout runs alongside (ids are global dataset indices).
Everything the spawned processes unpickle is defined at the top level of this file.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from _builders import TinyCausalLM, quiet_trainer_kwargs, token_rows  # tests/ is on sys.path
from antimemo.callbacks.regularizers import ExampleTiedDropout, LossTruncation, SpectralNormPenalty, WithExampleIds
from antimemo.functional.regularizers import per_sequence_lm_loss

VOCAB, LENGTH = 32, 12


TRAIN = WithExampleIds(token_rows(12, VOCAB, LENGTH, seed=400))  # 6 per rank, batch 2 per rank: 3 steps per epoch


def _tiny_lm():
    return TinyCausalLM(optimizer="sgd", lr=0.5, vocab=VOCAB)  # the tiny Llama (seed 0), its own LM loss


class Probe(pl.Callback):
    """On each rank: the local per-sequence losses of every training forward (an independent hook),
    and at the end the regularizers' states and the weights, saved to rank{r}.pt."""

    def __init__(self, out_dir, truncation, spectral):
        self.out_dir = str(out_dir)
        self.truncation = truncation
        self.spectral = spectral

    def on_train_start(self, trainer, pl_module):
        self.local = []

        def hook(module, args, kwargs, output):
            if torch.is_grad_enabled() and kwargs.get("labels") is not None:
                self.local.append(per_sequence_lm_loss(output.logits.detach(), kwargs["labels"])[0])

        self.handle = pl_module.model.register_forward_hook(hook, with_kwargs=True)

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()
        torch.save(
            {
                "world_size": trainer.world_size,
                "local": torch.stack(self.local),
                "truncation": self.truncation.state_dict(),
                "spectral": self.spectral.state_dict(),
                "weights": {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()},
            },
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_ddp_gathered_truncation_buffer_and_identical_spectral_vectors(tmp_path):
    truncation = LossTruncation(c=0.5, buffer_size=8)
    spectral = SpectralNormPenalty(lam=0.5, seed=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        default_root_dir=tmp_path,
        **quiet_trainer_kwargs(),
        callbacks=[truncation, spectral, ExampleTiedDropout(p_fixed=0.5, p_mem=0.3), Probe(tmp_path, truncation, spectral)],
    )
    trainer.fit(_tiny_lm(), DataLoader(TRAIN, batch_size=2))

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["local"].shape == r1["local"].shape == (4, 2)  # 4 steps x 2 sequences per rank
    assert not torch.equal(r0["local"], r1["local"])  # the ranks train on different shards

    # LossTruncation: every rank inserted the gathered losses (rank 0's then rank 1's, step by step):
    # 16 losses into 8 slots -> the buffer holds exactly those of steps 3 and 4, on both ranks
    for r in (r0, r1):
        assert r["truncation"]["count"] == 16
        expected = torch.cat([r0["local"][2], r1["local"][2], r0["local"][3], r1["local"][3]])
        torch.testing.assert_close(r["truncation"]["buffer"], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(r0["truncation"]["buffer"], r1["truncation"]["buffer"])

    # SpectralNormPenalty: the same vectors on both ranks, moved away from their seeded start
    assert r0["spectral"]["names"] == r1["spectral"]["names"]
    for name in r0["spectral"]["names"]:
        assert torch.equal(r0["spectral"]["u"][name], r1["spectral"]["u"][name]), name
    start = SpectralNormPenalty(lam=0.5, seed=2)
    start.setup(pl.Trainer(logger=False), _tiny_lm(), "fit")
    assert any(not torch.equal(start.vectors[n], r0["spectral"]["u"][n]) for n in start.names)

    # and DDP kept the replicas identical
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])



class FloorProbe(pl.Callback):
    """Per rank: the loss the model returned (after the loss chain) and the local per-sequence losses."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def on_train_start(self, trainer, pl_module):
        self.returned, self.local = [], []

        def hook(module, args, kwargs, output):  # registered after the chain's hook: sees the floored loss
            if module.training and torch.is_grad_enabled() and kwargs.get("labels") is not None:
                self.returned.append(output.loss.detach())
                self.local.append(per_sequence_lm_loss(output.logits.detach(), kwargs["labels"]))

        self.handle = pl_module.model.register_forward_hook(hook, with_kwargs=True)

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()
        torch.save(
            {"returned": torch.stack(self.returned), "losses": torch.stack([l for l, _ in self.local]),
             "targets": torch.stack([n for _, n in self.local]),
             "weights": {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()}},
            Path(self.out_dir) / f"floor_rank{trainer.global_rank}.pt",
        )  # fmt: skip


@pytest.mark.ddp
def test_ddp_loss_floor_floors_each_ranks_sequences(tmp_path):
    """LossFloor under 2-process DDP: each rank's loss is the floored loss of its own sequences, the floor
    acts on some sequences and not others, and DDP keeps the replicas identical."""
    from antimemo.callbacks.regularizers import LossFloor
    from antimemo.functional.regularizers import sequence_flooding_loss

    floor = 3.47  # about log(32): the tiny model's sequences start on both sides of it
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, default_root_dir=tmp_path,
                         **quiet_trainer_kwargs(), callbacks=[LossFloor(floor=floor), FloorProbe(tmp_path)])  # fmt: skip
    trainer.fit(_tiny_lm(), DataLoader(TRAIN, batch_size=2))
    r0, r1 = (torch.load(tmp_path / f"floor_rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert r["returned"].shape == (3,)
        for step in range(3):
            expected = sequence_flooding_loss(r["losses"][step], r["targets"][step], floor)
            torch.testing.assert_close(r["returned"][step], expected, rtol=1e-5, atol=1e-6)
    below = torch.cat([r0["losses"].flatten(), r1["losses"].flatten()]) < floor
    assert below.any() and not below.all()
    assert not torch.equal(r0["losses"], r1["losses"])  # different shards
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
