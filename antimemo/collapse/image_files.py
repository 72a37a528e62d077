"""``ImageFileDataModule``: images and class labels from ``.npy`` files (the recursive loop's image data).

``antimemo recursive`` with a diffusion recipe writes every generation's training set and the
real held-out split as two ``.npy`` files each (see :mod:`antimemo.collapse.images`):

- ``<name>.npy``: float images ``[N, C, H, W]`` in ``[0, 1]``;
- ``<name>_labels.npy``: int64 class labels ``[N]``.

Both are read with ``np.load(allow_pickle=False)`` and checked when the module is built, so a bad
file is a configuration error that names the argument. The items are the dicts of
:class:`antimemo.diffusion.ImageDataset` (``image``, ``label``, ``index``), which
:class:`~antimemo.diffusion.DiffusionModule` and :class:`~antimemo.callbacks.ReplicaMonitor` read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from antimemo._checks import check_int
from antimemo.diffusion.data import ImageDataset, ImageLoaders

__all__ = ["ImageFileDataModule", "labels_path", "read_image_file"]


def labels_path(images: str | os.PathLike[str]) -> Path:
    """The labels file beside an images file: ``x/train.npy`` -> ``x/train_labels.npy``.

    Example:
        >>> labels_path("runs/gen1/train.npy").as_posix()
        'runs/gen1/train_labels.npy'
    """
    p = Path(images)
    return p.with_name(p.stem + "_labels.npy")


def _load(path: Path, argument: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: {str(path)!r} does not exist; write it with np.save (antimemo recursive does)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays need pickle, which is refused
        raise ValueError(f"{argument}: {str(path)!r} cannot be read without pickle ({err}); save a numeric array") from None


def read_image_file(path: str | os.PathLike[str], argument: str = "path") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, C, H, W] float32 in [0, 1], labels [N] int64)`` from ``path`` and its labels file.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> np.save(d / "x.npy", np.zeros((2, 1, 4, 4), np.float32)); np.save(d / "x_labels.npy", np.array([3, 1]))
        >>> x, y = read_image_file(d / "x.npy")
        >>> tuple(x.shape), y.tolist()
        ((2, 1, 4, 4), [3, 1])
    """
    p = Path(path)
    images = _load(p, argument)
    fix = "save float images [N, C, H, W] in [0, 1]"
    if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{argument}: {str(p)!r} holds a {images.dtype} array of shape {tuple(images.shape)}; {fix}")
    if images.size and (not np.isfinite(images).all() or images.min() < 0 or images.max() > 1):
        raise ValueError(f"{argument}: {str(p)!r} has values outside [0, 1] (or non-finite ones); {fix}")
    labels = _load(labels_path(p), f"{argument} (labels)")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{argument}: {str(labels_path(p))!r} holds a {labels.dtype} array of shape {tuple(labels.shape)}; "
            f"expected {images.shape[0]} integer class labels, one per image of {str(p)!r}"
        )
    return torch.from_numpy(images.astype(np.float32, copy=False)), torch.from_numpy(labels.astype(np.int64, copy=False))


class ImageFileDataModule(ImageLoaders):
    """Train and validation images (with labels) from ``.npy`` files (see the module docstring).

    Args:
        train: the training images file (its labels: :func:`labels_path`).
        val: the validation images file.
        batch_size: batch size of both loaders.
        num_workers: DataLoader workers.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> for name, n in (("tr", 6), ("va", 2)):
        ...     np.save(d / f"{name}.npy", np.zeros((n, 1, 4, 4), np.float32)); np.save(d / f"{name}_labels.npy", np.zeros(n, int))
        >>> dm = ImageFileDataModule(str(d / "tr.npy"), str(d / "va.npy"), batch_size=4)
        >>> dm.setup("fit"); len(dm.train_set), len(dm.val_set), sorted(dm.train_set[0])
        (6, 2, ['image', 'index', 'label'])
    """

    def __init__(self, train: str, val: str, batch_size: int = 32, num_workers: int = 0) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1, "e.g. batch_size=32")
        check_int("num_workers", num_workers, 0, "0 loads in the main process")
        self.save_hyperparameters()
        self.train_images, self.train_labels = read_image_file(train, "train")
        self.val_images, self.val_labels = read_image_file(val, "val")
        if self.train_images.shape[0] == 0:
            raise ValueError(f"train: {train!r} holds no images; the loop writes at least one per generation")
        if self.train_images.shape[1:] != self.val_images.shape[1:]:
            raise ValueError(f"train and val images differ in shape: {tuple(self.train_images.shape[1:])} vs "
                             f"{tuple(self.val_images.shape[1:])}; both must come from the same recipe")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = ImageDataset(self.train_images, self.train_labels)
            self.val_set = ImageDataset(self.val_images, self.val_labels)
