"""ConditioningNoise and LabelRandomization: exact changes on training batches, none on validation."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from antimemo import ConditioningNoise, LabelRandomization
from antimemo.callbacks.conditioning import batch_generator
from antimemo.diffusion import DiffusionModule, ImageDataset
from torch.utils.data import DataLoader, default_collate

from _tiny_diffusion import X, Y, Data, tiny  # tests/ is on sys.path (pytest's rootdir-relative import)


class Recorder(Callback):
    """Records the class-embedding outputs and the labels the model saw, per stage."""

    def setup(self, trainer, pl_module, stage):
        self.train_emb, self.val_emb, self.train_labels, self.val_labels = [], [], [], []
        self._stage = None

        def hook(module, args, output):
            (self.train_emb if pl_module.training else self.val_emb).append((args[0].clone(), output.detach().clone()))

        # callbacks' setup runs in list order, so this hook runs after ConditioningNoise's and
        # records the embedding's input (labels) and the output the UNet receives
        self.handle = pl_module.unet.class_embedding.register_forward_hook(hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_labels.append(batch["label"].clone())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val_labels.append(batch["label"].clone())

    def teardown(self, trainer, pl_module, stage):
        self.handle.remove()


def _fit(callbacks, epochs=1):
    pl.seed_everything(0)
    m = tiny()
    rec = Recorder()
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[*callbacks, rec], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(m, datamodule=Data())
    return m, rec


def test_conditioning_noise_adds_exactly_std_times_the_seeded_noise_in_training_only():
    _, plain = _fit([])
    _, noisy = _fit([ConditioningNoise(std=0.5, seed=3)])
    # hooks run in registration order: the recorder (registered after) sees the noised output
    assert len(noisy.train_emb) == 3
    for b, ((lab0, out0), (lab1, out1)) in enumerate(zip(plain.train_emb[:1], noisy.train_emb[:1])):
        g = batch_generator(3, 0, b, 0, 1)
        eps = torch.randn(out0.shape, generator=g)
        assert torch.equal(lab0, lab1)
        assert torch.allclose(out1, out0 + 0.5 * eps, atol=1e-6)
    # validation embeddings: no noise (the weights differ after training, so compare with a clean forward)
    m, rec = _fit([ConditioningNoise(std=0.5, seed=3)])
    for labels, out in rec.val_emb:
        assert torch.allclose(out, m.unet.class_embedding(labels), atol=1e-6)


def test_conditioning_noise_zero_is_plain_training_bit_for_bit():
    a, _ = _fit([])
    b, _ = _fit([ConditioningNoise(std=0.0)])
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_conditioning_noise_errors():
    with pytest.raises(ValueError, match="std"):
        ConditioningNoise(std=-1.0)
    m = DiffusionModule(image_size=8, num_classes=None, block_out_channels=(8,), norm_num_groups=4)
    trainer = pl.Trainer(logger=False)
    with pytest.raises(ValueError, match="unconditional"):
        ConditioningNoise(std=1.0).setup(trainer, m, "fit")
    with pytest.raises(ValueError, match=r"ConditioningNoise: .* no submodule 'unet.nope' \(module_name\).*'unet.class_embedding'"):
        ConditioningNoise(std=1.0, module_name="unet.nope").setup(trainer, tiny(), "fit")
    with pytest.raises(ValueError, match=r"no submodule 'lr' \(module_name\).*is not an nn.Module"):
        ConditioningNoise(std=1.0, module_name="lr").setup(trainer, tiny(), "fit")


def test_label_randomization_replaces_training_labels_at_rate_p_and_never_validation():
    _, rec = _fit([LabelRandomization(p=1.0, seed=5)], epochs=2)
    seen = torch.cat(rec.train_labels)
    orig = Y[:24].repeat(2)
    # p = 1: every label is a fresh uniform draw, exactly the callback's generator's
    expected = []
    for epoch in range(2):
        for b in range(3):
            g = batch_generator(5, epoch, b, 0, 2)
            torch.rand(8, generator=g)
            expected.append(torch.randint(0, 10, (8,), generator=g))
    assert torch.equal(seen, torch.cat(expected))
    assert (seen != orig).float().mean() > 0.6  # about 1 - 1/10 change
    assert torch.equal(torch.cat(rec.val_labels), Y[100:116].repeat(2))
    # the embedding saw the replaced labels
    assert torch.equal(torch.cat([lab for lab, _ in rec.train_emb]), seen)


def test_label_randomization_p_zero_and_errors():
    _, rec = _fit([LabelRandomization(p=0.0)])
    assert torch.equal(torch.cat(rec.train_labels), Y[:24])
    with pytest.raises(ValueError, match="probability"):
        LabelRandomization(p=1.5)
    cb = LabelRandomization(p=0.5)
    m = DiffusionModule(image_size=8, num_classes=None, block_out_channels=(8,), norm_num_groups=4)
    with pytest.raises(ValueError, match="num_classes"):
        cb.setup(pl.Trainer(logger=False), m, "fit")



class OtherKeyData(pl.LightningDataModule):
    """Data's training batches with a copy of the labels under "class" (the key the module below reads)."""

    def train_dataloader(self):
        def collate(items):
            batch = default_collate(items)
            batch["class"] = batch["label"].clone()
            return batch

        return DataLoader(ImageDataset(X[:24], Y[:24]), batch_size=8, shuffle=False, collate_fn=collate)


def _other_key_fit(cb):
    pl.seed_everything(0)
    m = DiffusionModule(
        image_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=20, num_inference_steps=2,
        label_key="class",  # conditions on batch["class"], never on batch["label"]
    )
    before = [p.detach().clone() for p in m.parameters()]
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    return m, before, trainer


def test_label_randomization_raises_when_training_step_ignores_the_rewritten_labels():
    cb = LabelRandomization(p=1.0, seed=5)
    m, before, trainer = _other_key_fit(cb)
    with pytest.raises(RuntimeError) as err:
        trainer.fit(m, datamodule=OtherKeyData())
    msg = str(err.value)
    assert "LabelRandomization rewrote batch['label']" in msg
    assert "had no effect" in msg
    assert "Fix: condition the model on the rewritten labels, e.g. self.unet(noisy, t, class_labels=batch['label'])" in msg
    assert cb.replaced > 0  # it did rewrite them
    # raised before the first backward: no weight moved
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_label_randomization_with_another_label_key_follows_that_key():
    # the fix the message offers: point label_key at the key training_step reads
    cb = LabelRandomization(p=1.0, seed=5, label_key="class")
    m, _, trainer = _other_key_fit(cb)
    trainer.fit(m, datamodule=OtherKeyData())
    assert trainer.global_step == 3 and cb.replaced > 0


def test_label_randomization_p_zero_checks_nothing():
    cb = LabelRandomization(p=0.0)
    m, _, trainer = _other_key_fit(cb)
    trainer.fit(m, datamodule=OtherKeyData())  # nothing rewritten, nothing to prove
    assert trainer.global_step == 3 and cb.replaced == 0


def test_label_randomization_real_module_reads_the_tracked_labels():
    class Check(Callback):
        used = []

        def on_before_backward(self, trainer, pl_module, loss):
            # runs after LabelRandomization's check (callbacks in list order), which cleared its record
            self.used.append(cb._expected is None)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.used.append(type(batch["label"]).__name__)

    cb = LabelRandomization(p=0.5, seed=1)
    m, rec = _fit([cb, Check()])
    assert Check.used == ["_UseTracked", True] * 3  # three steps, each tracked, each checked
    assert cb.replaced > 0
    assert torch.equal(torch.cat([lab for lab, _ in rec.train_emb]), torch.cat(rec.train_labels))


# ----------------------------------------------------------------------------------- DDP


class LabelSaver(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.labels = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.labels.append((trainer.current_epoch, batch_idx, batch["label"].clone(), batch["index"].clone()))

    def on_train_end(self, trainer, pl_module):
        penalty = trainer.callback_metrics.get("train/replica_penalty")
        torch.save(
            {"labels": self.labels, "penalty": None if penalty is None else float(penalty)},
            f"{self.out_dir}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_ddp_each_rank_draws_its_own_labels_and_the_penalty_trains(tmp_path):
    from antimemo import ReplicaPenalty

    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[LabelRandomization(p=1.0, seed=5), ConditioningNoise(std=0.5), ReplicaPenalty(1.0, -1.0, 0.0),
                   LabelSaver(str(tmp_path))],
    )
    trainer.fit(tiny(), datamodule=Data())
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["penalty"] is not None and saved["penalty"] > 0
        for epoch, b, labels, _ in saved["labels"]:
            g = batch_generator(5, epoch, b, rank, 2)
            torch.rand(labels.shape, generator=g)
            assert torch.equal(labels, torch.randint(0, 10, labels.shape, generator=g)), (rank, b)


def test_conditioning_noise_raises_when_the_conditioning_module_never_runs():
    class Unconditioned(DiffusionModule):  # a training step that never calls the UNet's class embedding
        def training_step(self, batch, batch_idx):
            x = batch["image"] if isinstance(batch, dict) else batch[0]
            return self.unet.conv_in(x).pow(2).mean()

    module = Unconditioned(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=20,
                           num_inference_steps=2)  # fmt: skip
    trainer = pl.Trainer(callbacks=[ConditioningNoise(std=0.5)], max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"ConditioningNoise: pl_module.unet.class_embedding \(module_name\) did not run"):
        trainer.fit(module, Data())
