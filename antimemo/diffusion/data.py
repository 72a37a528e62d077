"""``DigitsDataModule``: scikit-learn's 8x8 digits (bundled, offline), upsampled, with duplicates.

scikit-learn ships the 1797 UCI handwritten digits (8x8, 17 grey levels) inside the package, so
nothing is downloaded. Images are scaled to ``[0, 1]`` (``/ 16``) and resized bilinearly to
``image_size``. The training set can contain heavily duplicated images, the condition under
which diffusion models replicate training data (Carlini et al. 2023; Somepalli et al. 2023).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from antimemo._checks import check_int
from antimemo._extras import require

__all__ = ["DigitsDataModule", "ImageDataset", "load_digits_images"]


def load_digits_images(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as ``([1797, 1, S, S]`` float in ``[0, 1]``, ``[1797]`` labels).

    Example:
        >>> x, y = load_digits_images(16)
        >>> tuple(x.shape), int(y.max()), 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
        ((1797, 1, 16, 16), 9, True)
    """
    load_digits = require("sklearn.datasets", "load_digits_images (the digits data)").load_digits

    check_int("image_size", image_size, 4, "e.g. image_size=16")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).contiguous(), torch.tensor(d.target, dtype=torch.long)


class ImageDataset(Dataset):
    """Map-style dataset of ``{"image": [C, H, W], "label": int64, "index": int64}`` items.

    ``index`` is the row of the image in ``images``; duplicates share it.

    Example:
        >>> ds = ImageDataset(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), rows=[0, 1, 1])
        >>> len(ds), int(ds[2]["index"])
        (3, 1)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, rows: Any = None) -> None:
        self.images, self.labels = images, labels
        self.rows = torch.arange(images.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.rows[i])
        return {"image": self.images[r], "label": self.labels[r], "index": torch.tensor(r)}


class ImageLoaders(pl.LightningDataModule):
    """The train / val loaders of an image data module: ``train_set`` shuffled, ``val_set`` in
    order, both with ``batch_size`` and ``num_workers`` (set by the subclass; ``setup`` fills the sets)."""

    train_set: Dataset | None
    val_set: Dataset | None
    batch_size: int
    num_workers: int

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


class DigitsDataModule(ImageLoaders):
    """Digits train/val split with some training images repeated many times.

    The 1797 digits are shuffled with ``seed``; the first ``num_train`` form the unique training
    images, the next ``num_val`` the validation set. Then ``num_duplicated`` of the training
    images (the first ones of the shuffled order) appear ``copies`` times each in the training
    set (``copies - 1`` extra copies, byte-identical). So the training set has
    ``num_train + num_duplicated * (copies - 1)`` items.

    Args:
        image_size: side of the upsampled images (8 keeps the native size).
        num_train: unique training images.
        num_val: validation images (disjoint from training).
        num_duplicated: how many training images are duplicated (0: no duplicates).
        copies: occurrences of each duplicated image (>= 1).
        batch_size: batch size of both loaders.
        seed: seed of the split (a private generator).
        num_workers: DataLoader workers.

    Attributes (after ``setup``): ``train_set``, ``val_set``, ``train_images`` (the unique
    training images ``[num_train, 1, S, S]``), ``train_labels``, ``duplicated_rows`` (rows of
    ``train_images`` that are duplicated).

    Example:
        >>> dm = DigitsDataModule(num_train=100, num_val=50, num_duplicated=2, copies=10)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set), dm.duplicated_rows.tolist()
        (118, 50, [0, 1])
    """

    def __init__(
        self,
        image_size: int = 16,
        num_train: int = 256,
        num_val: int = 256,
        num_duplicated: int = 8,
        copies: int = 32,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("image_size", image_size, 4, "e.g. image_size=16")
        check_int("num_train", num_train, 1, "e.g. num_train=256")
        check_int("num_val", num_val, 0, "e.g. num_val=256")
        if num_train + num_val > 1797:
            raise ValueError(f"num_train + num_val must be <= 1797 (the digits available), got {num_train + num_val}")
        check_int("num_duplicated", num_duplicated, 0, "0 disables duplication")
        if num_duplicated > num_train:
            raise ValueError(f"num_duplicated={num_duplicated} must be <= num_train={num_train}")
        check_int("copies", copies, 1, "copies=1 means no extra copies")
        check_int("batch_size", batch_size, 1, "e.g. batch_size=32")
        check_int("num_workers", num_workers, 0, "0 loads in the main process")
        # "seed" is left out of the hparams: Lightning refuses to log a module and a datamodule
        # whose hparams share a key with different values (DiffusionModule has its own seed)
        self.save_hyperparameters(ignore=["seed"])
        self.image_size, self.num_train, self.num_val = image_size, num_train, num_val
        self.num_duplicated, self.copies = num_duplicated, copies
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_images(self.image_size)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
        tr, va = perm[: self.num_train], perm[self.num_train : self.num_train + self.num_val]
        self.train_images, self.train_labels = x[tr].contiguous(), y[tr].contiguous()
        self.duplicated_rows = torch.arange(self.num_duplicated)
        rows = torch.cat([torch.arange(self.num_train), self.duplicated_rows.repeat_interleave(self.copies - 1)])
        self.train_set = ImageDataset(self.train_images, self.train_labels, rows)
        self.val_set = ImageDataset(x[va].contiguous(), y[va].contiguous())
