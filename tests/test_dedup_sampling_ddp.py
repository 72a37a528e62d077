"""DedupSampling under a real 2-process CPU DDP fit (ddp_spawn, gloo): disjoint shards per rank.

Everything the spawned processes unpickle is defined at the top level of this file.
"""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

from antimemo.callbacks.dedup import DedupSampling
from antimemo.sampling import DedupSampler

L = 16
EPOCHS = 2


def _rows():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 500, (L,), generator=g) for _ in range(25)]
    return rows + [rows[i].clone() for i in range(10)]  # 35 examples, 25 clusters (10 of size 2)


ROWS = _rows()


class RowDataset(Dataset):
    def __len__(self):
        return len(ROWS)

    def __getitem__(self, i):
        return {"input_ids": ROWS[i], "idx": i}


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(500, 4)

    def training_step(self, batch, batch_idx):
        return self.emb(batch["input_ids"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RankRecorder(Callback):
    def __init__(self, out_dir):
        self.out_dir = str(out_dir)
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch["idx"].tolist())

    def on_train_end(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler
        info = {
            "world_size": trainer.world_size,
            "sampler": type(sampler).__name__,
            "cluster_ids": [int(c) for c in trainer.callbacks[0].index.cluster_ids],
            "seen": {str(k): v for k, v in self.seen.items()},
        }
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(info))


@pytest.mark.ddp
def test_ranks_see_disjoint_shards_of_the_same_epoch_order(tmp_path):
    """With use_distributed_sampler=True (the default), where Lightning would inject a sampler.

    With use_distributed_sampler=False Lightning never touches samplers, so the loader is the same
    and the sharding is DedupSampler's own (tests/test_dedup_sampling.py checks it per rank)."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=True,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[DedupSampling(policy="drop", seed=3, progress=False), RankRecorder(tmp_path)],
    )
    trainer.fit(Tiny(), DataLoader(RowDataset(), batch_size=4, shuffle=True))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Lightning kept our sampler: not wrapped in a DistributedSampler(Wrapper) even when it injects one
    assert [r["sampler"] for r in ranks] == ["DedupSampler", "DedupSampler"]
    clusters = ranks[0]["cluster_ids"]
    assert clusters == ranks[1]["cluster_ids"] and len(set(clusters)) == 25  # each rank built the same index
    for epoch in range(EPOCHS):
        a, b = ranks[0]["seen"][str(epoch)], ranks[1]["seen"][str(epoch)]
        # 25 representatives padded to 26: 13 per rank; the only shared example is the padding one
        assert len(a) == len(b) == 13
        assert sorted(set(a) | set(b)) == list(range(25))
        order = DedupSampler(clusters, policy="drop", seed=3)
        order.set_epoch(epoch)
        global_order = order.epoch_order().tolist()
        padded = global_order + global_order[:1]
        assert a == padded[0::2] and b == padded[1::2]  # rank r takes positions r, r + 2, ...
        assert set(a) & set(b) == {global_order[0]}  # the padding repeats the first example
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]
