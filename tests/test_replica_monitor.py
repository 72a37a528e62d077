"""ReplicaMonitor: logged figures, picture, TensorBoard hook, no side effects, and 2-process DDP.

Everything the spawned processes unpickle is defined at the top level of this file.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from PIL import Image
from torch.utils.data import DataLoader

from _builders import quiet_trainer_kwargs  # tests/ is on sys.path (pytest's rootdir-relative import)
from antimemo import ReplicaMonitor, ReplicaRate
from antimemo.diffusion import DiffusionModule, ImageDataset, load_digits_images
from antimemo.functional.replica import replica_scores
from antimemo.callbacks.replica_monitor import LABEL_HEIGHT

X, Y = load_digits_images(8)
TRAIN_ROWS = list(range(20)) + [0] * 5 + [1] * 3  # images 0 and 1 duplicated


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(ImageDataset(X[:20], Y[:20], rows=TRAIN_ROWS), batch_size=8, shuffle=False)

    def val_dataloader(self):
        return DataLoader(ImageDataset(X[100:116], Y[100:116]), batch_size=8, shuffle=False)


class Copier(pl.LightningModule):
    """Generates exact copies of training images 0..4 for even i, random noise for odd i."""

    num_classes = None

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.w.sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, num, generator=None, labels=None, batch_size=64):
        out = []
        for g in generator:
            i = int(torch.randint(0, 10**6, (1,), generator=g))  # depends on the image's generator only
            out.append(X[i % 5] if i % 2 == 0 else torch.rand(1, 8, 8, generator=g))
        return torch.stack(out)


class ImageLogger(Logger):
    """A logger whose experiment has add_image, like TensorBoard's SummaryWriter."""

    def __init__(self):
        super().__init__()
        self.images = []

    @property
    def name(self):
        return "fake"

    @property
    def version(self):
        return 0

    @property
    def experiment(self):
        return self

    def add_image(self, tag, image, global_step=None):
        self.images.append((tag, image.clone(), global_step))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _trainer(callbacks, tmp_path, epochs=1, logger=False, **kw):
    return pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
        **quiet_trainer_kwargs(logger=logger, **kw),
    )


def _expected_generations(n, seed=0):
    return Copier().sample(n, generator=[torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(n)])


def test_logged_figures_match_the_metric_and_the_picture_pairs_copies(tmp_path):
    mon = ReplicaMonitor(num_samples=12, similarity="cosine", threshold=0.95, num_pictures=4, save_dir=str(tmp_path / "pics"))
    logger = ImageLogger()
    trainer = _trainer([mon], tmp_path, logger=logger)
    trainer.fit(Copier(), datamodule=Data())
    # reference = distinct training images with their copy counts
    assert mon.reference.shape == (20, 1, 8, 8)
    assert mon.reference_copies[:3].tolist() == [6, 4, 1]
    gen = _expected_generations(12)
    ref = ReplicaRate(X[:20], "cosine", threshold=0.95)
    ref.update(gen)
    expect = ref.compute()
    m = trainer.callback_metrics
    for key in ("rate", "p50", "p95", "p99", "mean"):
        assert math.isclose(float(m[f"replication/{key}"]), float(expect[key]), rel_tol=1e-5), key
    copies = int(sum(1 for i in range(12) if torch.equal(gen[i], X[int(expect["indices"][i])])))
    assert copies >= 2 and math.isclose(float(m["replication/rate"]), copies / 12, rel_tol=1e-6)
    dup = (mon.reference_copies[expect["indices"]] > 1).float().mean()
    assert math.isclose(float(m["replication/dup_match_fraction"]), float(dup), rel_tol=1e-6)
    for key in ("carlini/rate", "vendi", "pairwise_distance"):
        assert f"replication/{key}" in m
    # background: the held-out validation images scored the same way
    bs, bi = replica_scores(X[100:116], X[:20], "cosine")
    assert math.isclose(float(m["replication/background/rate"]), float((bs > 0.95).float().mean()), abs_tol=1e-6)
    assert math.isclose(float(m["replication/background/dup_match_fraction"]), float((bi < 2).float().mean()), abs_tol=1e-6)
    # picture: top row generations, bottom row their nearest training images; the top replicas are copies
    path = Path(mon.last_picture_path)
    assert path.exists() and path.parent == tmp_path / "pics"
    pic = np.asarray(Image.open(path), dtype=np.float32) / 255
    lh = LABEL_HEIGHT  # three label strips: "generated", "nearest training image", the similarities
    assert pic.shape == (2 * (8 * 4 + 2) + 2 + 3 * lh, 4 * (8 * 4 + 2) + 2)
    top, bottom = pic[lh + 2 : lh + 2 + 32, 2 : 2 + 32], pic[2 * lh + 36 : 2 * lh + 36 + 32, 2 : 2 + 32]
    assert np.abs(top - bottom).max() <= 1 / 255 + 1e-6  # exact copy shown beside its source
    for strip in (pic[:lh], pic[lh + 34 : 2 * lh + 34], pic[-lh:]):  # each label strip has dark text
        assert (strip < 0.5).sum() > 20
    assert logger.images and logger.images[0][0] == "replication/top_replicas"
    assert logger.images[0][1].shape == (1, *pic.shape)


def test_fid_feature_and_state_dict(tmp_path):
    feat = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    mon = ReplicaMonitor(num_samples=8, fid_feature=feat, extra_similarities=(), num_pictures=0)
    trainer = _trainer([mon], tmp_path, epochs=2)
    trainer.fit(Copier(), datamodule=Data())
    assert math.isfinite(float(trainer.callback_metrics["replication/fid"]))
    assert "replication/carlini/rate" not in trainer.callback_metrics
    assert len(mon.history) == 2 and mon.last_picture_path is None
    state = mon.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    other = ReplicaMonitor()
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.history == mon.history and other.last_results == mon.last_results


def test_monitor_leaves_training_unchanged(tmp_path):
    """Same seed with and without the monitor: identical weights (no RNG consumed, modes restored)."""

    def run(callbacks):
        pl.seed_everything(0)
        m = DiffusionModule(image_size=8, block_out_channels=(8, 16), norm_num_groups=4, num_train_timesteps=20,
                            num_inference_steps=3)
        _trainer(callbacks, tmp_path, epochs=2).fit(m, datamodule=Data())
        return m

    plain = run([])
    mon = ReplicaMonitor(num_samples=6, batch_size=4, num_pictures=2, save_dir=str(tmp_path / "p"))
    monitored = run([mon])
    assert len(mon.history) == 2
    for (n, a), (_, b) in zip(plain.state_dict().items(), monitored.state_dict().items()):
        assert torch.equal(a, b), n


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="similarity"):
        ReplicaMonitor(similarity="sscd")
    with pytest.raises(ValueError, match="extra_similarities"):
        ReplicaMonitor(similarity="cosine", extra_similarities=("cosine",))
    with pytest.raises(ValueError, match="num_samples"):
        ReplicaMonitor(num_samples=0)

    class NoSample(Copier):
        sample = None

    with pytest.raises(TypeError, match="sample"):
        _trainer([ReplicaMonitor()], tmp_path).fit(NoSample(), datamodule=Data())


# ----------------------------------------------------------------------------------- DDP


class Saver(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("replication/")}
        torch.save({"logged": logged, "rank": trainer.global_rank}, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_logged_values_equal_single_process(tmp_path):
    mon = ReplicaMonitor(num_samples=9, num_pictures=3, save_dir=str(tmp_path / "pics"), extra_similarities=("carlini",))
    trainer = _trainer([mon, Saver(str(tmp_path))], tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn")
    trainer.fit(Copier(), datamodule=Data())
    single = ReplicaMonitor(num_samples=9, num_pictures=0, extra_similarities=("carlini",))
    t1 = _trainer([single], tmp_path)
    t1.fit(Copier(), datamodule=Data())
    expect = {k: float(v) for k, v in t1.callback_metrics.items() if k.startswith("replication/")}
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["logged"]
        assert set(got) == set(expect)
        for k in expect:
            assert math.isclose(got[k], expect[k], rel_tol=1e-5, abs_tol=1e-6), (r, k)
    assert (tmp_path / "pics" / "replicas_epoch000.png").exists()
