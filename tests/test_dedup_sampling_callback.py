"""DedupSampling in single-process Lightning fits: sampling, exact resumption, checks, errors."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from antimemo.callbacks.dedup import DedupSampling
from antimemo.dedup import DuplicateIndex
from antimemo.sampling import DedupSampler

L = 24


def _token_rows():
    """40 random rows, then 8 exact copies of rows 0..3 (two each) and 4 near copies of rows 4..7."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 1000, (L,), generator=g) for _ in range(40)]
    rows += [rows[i].clone() for i in (0, 0, 1, 1, 2, 2, 3, 3)]
    for i in range(4, 8):
        near = rows[i].clone()
        near[-1] = 1001  # changes 1 of 20 shingles: J = 19 / 21 = 0.90
        rows.append(near)
    return rows


ROWS = _token_rows()  # 52 examples in 40 clusters: cluster sizes 3,3,3,3 (0..3), 2,2,2,2 (4..7), 1 x 32


class RowDataset(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "idx": i}


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1002, 4)
        self.head = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.head(self.emb(batch["input_ids"]).mean(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Recorder(Callback):
    def __init__(self):
        self.seen = []  # (epoch, batch_idx, [example indices])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch_idx, batch["idx"].tolist()))

    def on_train_end(self, trainer, pl_module):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


class DM(pl.LightningDataModule):
    def __init__(self, rows=ROWS, batch_size=4, num_workers=0):
        super().__init__()
        self.rows, self.batch_size, self.num_workers = rows, batch_size, num_workers

    def train_dataloader(self):
        return DataLoader(RowDataset(self.rows), batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)


def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_epochs", 3)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )


def _by_epoch(seen):
    out = {}
    for epoch, _, idx in seen:
        out.setdefault(epoch, []).extend(idx)
    return out


def test_drop_policy_trains_on_one_representative_per_cluster(tmp_path):
    rec = Recorder()
    cb = DedupSampling(policy="drop", progress=False)
    dm = DM()
    _trainer(tmp_path, [cb, rec], enable_checkpointing=False).fit(Tiny(), datamodule=dm)
    idx = cb.index
    assert idx.kind == "tokens" and idx.num_examples == 52 and idx.num_clusters == 40
    assert [idx.cluster_ids[i] for i in (0, 40, 41)] == [0, 0, 0] and idx.cluster_ids[48] == idx.cluster_ids[4]
    epochs = _by_epoch(rec.seen)
    assert sorted(epochs) == [0, 1, 2]
    for seen in epochs.values():
        assert sorted(seen) == list(range(40))  # the first example of every cluster, once
    assert epochs[0] != epochs[1]  # the order changes with the epoch (set_epoch)
    assert isinstance(dm.train_dataloader().sampler, RandomSampler)  # the user's loader is untouched
    # logged: effective size 40 kept examples; duplicate fraction (52 - 40) / 52 = 0.2308
    assert rec.metrics["dedup/effective_size"] == 40.0
    assert rec.metrics["dedup/duplicate_fraction"] == pytest.approx(12 / 52)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_sees_the_same_batches_as_an_uninterrupted_run(tmp_path, num_workers):
    """With workers the DataLoader draws indices as soon as its iterator exists (before set_epoch)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    full = Recorder()
    _trainer(tmp_path, [DedupSampling(progress=False), full, ckpt]).fit(Tiny(), datamodule=DM(num_workers=num_workers))
    # downweight: 40 samples per epoch (one per cluster), 10 batches of 4; step 15 is epoch 1, batch 4
    assert len(full.seen) == 30
    path = tmp_path / "ckpt" / "epoch=1-step=15.ckpt"
    assert path.is_file()
    resumed = Recorder()
    _trainer(tmp_path, [DedupSampling(progress=False), resumed]).fit(
        Tiny(), datamodule=DM(num_workers=num_workers), ckpt_path=path
    )
    assert resumed.seen == full.seen[15:]
    assert resumed.seen[0][:2] == (1, 5)  # it continued mid-epoch, not from the epoch's first batch
    assert resumed.seen[0][2] != full.seen[10][2]  # which would have replayed epoch 1's batch 0
    # an epoch-end checkpoint (step 10 = the last batch of epoch 0) resumes at epoch 1, batch 0
    at_end = Recorder()
    _trainer(tmp_path, [DedupSampling(progress=False), at_end]).fit(
        Tiny(), datamodule=DM(num_workers=num_workers), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=10.ckpt"
    )
    assert at_end.seen == full.seen[10:]


def test_resume_at_an_epoch_boundary(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # one checkpoint per epoch end
    full = Recorder()
    _trainer(tmp_path, [DedupSampling(policy="cap", max_copies=2, progress=False), full, ckpt]).fit(
        Tiny(), datamodule=DM()
    )
    resumed = Recorder()
    cb = DedupSampling(policy="cap", max_copies=2, progress=False)
    _trainer(tmp_path, [cb, resumed]).fit(Tiny(), datamodule=DM(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=12.ckpt")
    assert resumed.seen == [s for s in full.seen if s[0] >= 1]
    assert cb.sampler.epoch == 2


def test_resume_with_another_policy_is_refused(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    _trainer(tmp_path, [DedupSampling(policy="drop", progress=False), ckpt], max_epochs=1).fit(Tiny(), datamodule=DM())
    with pytest.raises(ValueError, match="saved state has policy='drop' but this sampler has policy='downweight'"):
        _trainer(tmp_path, [DedupSampling(progress=False)], max_epochs=2).fit(
            Tiny(), datamodule=DM(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=10.ckpt"
        )


def test_given_index_is_checked_against_the_dataset(tmp_path):
    good = DuplicateIndex.from_token_ids(ROWS, progress=False)
    rec = Recorder()
    _trainer(tmp_path, [DedupSampling(good, policy="drop", progress=False), rec], max_epochs=1,
             enable_checkpointing=False).fit(Tiny(), datamodule=DM())
    assert sorted(_by_epoch(rec.seen)[0]) == list(range(40))

    short = DuplicateIndex.from_token_ids(ROWS[:-1], progress=False)
    with pytest.raises(ValueError, match="has 51 examples but the train dataset has 52"):
        _trainer(tmp_path, [DedupSampling(short, progress=False)], max_epochs=1).fit(Tiny(), datamodule=DM())

    other = list(ROWS)
    other[7] = torch.arange(L)
    with pytest.raises(ValueError, match="example 7 differs"):
        _trainer(tmp_path, [DedupSampling(good, progress=False)], max_epochs=1).fit(Tiny(), datamodule=DM(other))

    rec = Recorder()  # a saved index given by its path (as in a YAML config)
    path = good.save(tmp_path / "train.dedup.npz")
    _trainer(tmp_path, [DedupSampling(str(path), policy="drop", progress=False), rec], max_epochs=1,
             enable_checkpointing=False).fit(Tiny(), datamodule=DM())
    assert sorted(_by_epoch(rec.seen)[0]) == list(range(40))

    custom = DuplicateIndex(good.cluster_ids)  # no content hashes, so no fingerprint
    with pytest.raises(ValueError, match="has no fingerprint"):
        _trainer(tmp_path, [DedupSampling(custom, progress=False)], max_epochs=1).fit(Tiny(), datamodule=DM())
    rec = Recorder()
    _trainer(tmp_path, [DedupSampling(custom, policy="drop", check_fingerprint=False, progress=False), rec],
             max_epochs=1, enable_checkpointing=False).fit(Tiny(), datamodule=DM())
    assert sorted(_by_epoch(rec.seen)[0]) == list(range(40))


def test_reloaded_dataloaders_keep_the_dedup_sampler(tmp_path):
    rec = Recorder()
    cb = DedupSampling(policy="drop", progress=False)
    _trainer(tmp_path, [cb, rec], reload_dataloaders_every_n_epochs=1, enable_checkpointing=False).fit(
        Tiny(), datamodule=DM()
    )
    epochs = _by_epoch(rec.seen)
    assert all(sorted(v) == list(range(40)) for v in epochs.values())
    ref = DedupSampler(cb.index.cluster_ids, policy="drop")
    for e in range(3):
        ref.set_epoch(e)
        assert epochs[e] == list(ref)


class TextDataset(Dataset):
    TEXTS = ["the cat sat on the mat", "The  cat sat on the MAT", "a dog ran", "a bird flew", "a dog ran"]

    def __len__(self):
        return len(self.TEXTS)

    def __getitem__(self, i):
        return self.TEXTS[i]


class TextModule(Tiny):
    def training_step(self, batch, batch_idx):
        return self.head.weight.sum() * 0.0 + self.head.bias.pow(2).sum()


class ImageDataset(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(6, 1, 8, 8, generator=g)
        self.x[5] = self.x[0]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return self.x[i], i % 2  # torchvision-style (image, label)


def test_index_is_built_from_text_and_image_datasets(tmp_path):
    cb = DedupSampling(policy="drop", progress=False)
    _trainer(tmp_path, [cb], max_epochs=1, enable_checkpointing=False).fit(
        TextModule(), train_dataloaders=DataLoader(TextDataset(), batch_size=2)
    )
    assert cb.index.kind == "text" and cb.index.cluster_ids.tolist() == [0, 0, 1, 2, 1]
    cb = DedupSampling(policy="drop", progress=False)
    _trainer(tmp_path, [cb], max_epochs=1, enable_checkpointing=False).fit(
        TextModule(), train_dataloaders=DataLoader(ImageDataset(), batch_size=2)
    )
    assert cb.index.kind == "images" and cb.index.cluster_ids.tolist() == [0, 1, 2, 3, 4, 0]


class Stream(IterableDataset):
    def __iter__(self):
        yield from ROWS


class Floats(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"features": torch.rand(4)}


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="policy must be one of"):
        DedupSampling(policy="keep-one")
    with pytest.raises(TypeError, match="index must be a DuplicateIndex, the path of a saved one, or None"):
        DedupSampling(index=[0, 1])
    with pytest.raises(TypeError, match="needs a map-style dataset"):
        _trainer(tmp_path, [DedupSampling(progress=False)], max_epochs=1).fit(
            Tiny(), train_dataloaders=DataLoader(Stream(), batch_size=2)
        )
    with pytest.raises(TypeError, match=r"item 0 is a dict with keys \['features'\].*DedupSampling\(index="):
        _trainer(tmp_path, [DedupSampling(progress=False)], max_epochs=1).fit(
            Tiny(), train_dataloaders=DataLoader(Floats(), batch_size=2)
        )
    with pytest.raises(ValueError, match="the train dataset is empty"):
        _trainer(tmp_path, [DedupSampling(progress=False)], max_epochs=1).fit(
            Tiny(), train_dataloaders=DataLoader(RowDataset([]), batch_size=2)
        )
    with pytest.raises(TypeError, match="one torch.utils.data.DataLoader"):
        _trainer(tmp_path, [DedupSampling(progress=False)], max_epochs=1).fit(
            Tiny(), train_dataloaders=[DataLoader(RowDataset(ROWS)), DataLoader(RowDataset(ROWS))]
        )


@pytest.mark.parametrize("use_distributed_sampler", [True, False])
def test_lightning_never_wraps_the_dedup_sampler_under_ddp(use_distributed_sampler):
    """Lightning injects its DistributedSampler(Wrapper) only into loaders whose sampler is not a
    DistributedSampler; DedupSampler is one, so it keeps its own sharding either way (the 2-process
    fit in test_dedup_sampling_ddp.py checks the shards)."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         use_distributed_sampler=use_distributed_sampler)
    ours = DataLoader(RowDataset(ROWS), batch_size=4, sampler=DedupSampler([0] * 52, num_replicas=2, rank=1))
    plain = DataLoader(RowDataset(ROWS), batch_size=4, shuffle=True)
    connector = trainer._data_connector
    assert connector._requires_distributed_sampler(ours) is False
    assert connector._requires_distributed_sampler(plain) is use_distributed_sampler  # the check has teeth
