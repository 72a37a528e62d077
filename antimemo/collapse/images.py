"""The image side of ``antimemo recursive``: diffusion recipes (e.g. ``recipes/diffusion_collapse.yaml``).

A recipe whose ``model:`` class is (a subclass of) :class:`antimemo.diffusion.DiffusionModule` runs
the same loop as an LM recipe, with images in place of token rows:

- the real data is the recipe's ``data:`` module's training items (duplicates included) and its
  validation split, exported once as ``OUT/data/real_train.npy`` / ``real_val.npy`` (float
  images ``[N, C, H, W]`` in ``[0, 1]``) with ``*_labels.npy`` beside them (class labels);
- generation ``g >= 1`` samples ``samples`` images from generation ``g - 1``'s final checkpoint
  (DDPM ancestral sampling with the model's ``num_inference_steps``; image ``i`` has label
  ``i % num_classes`` and its own generator, so the draw does not depend on batching beyond float rounding);
- each fit reads its images with :class:`~antimemo.collapse.image_files.ImageFileDataModule`,
  validates on the REAL held-out images, and the recipe's ``replica_monitor:`` (required, with an
  ``fid_feature``) logs FID against them, the Vendi score and the replica rate per generation.

There is no image watermark, so ``--mix filter`` is refused for these recipes. Lightning-free at
the import level (the model class is imported from its class path only when a function runs).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from antimemo._atomic import atomic_write_bytes
from antimemo.sections import DEFAULT_MODEL_CLASS, import_recipe_class

__all__ = [
    "IMAGE_METRICS",
    "IMAGE_PLOTTED",
    "check_image_recipe",
    "data_section",
    "export_real_images",
    "is_image_recipe",
    "load_images",
    "sample_images",
    "save_images",
]

#: Report keys recorded per generation (the recipe's ReplicaMonitor logs them under ``replication/``).
IMAGE_METRICS = (
    "val_loss", "replication/fid", "replication/vendi", "replication/pairwise_distance", "replication/rate",
    "replication/p95", "replication/carlini/rate", "replication/background/rate",
)  # fmt: skip
#: The panels of ``collapse.png`` for an image recipe.
IMAGE_PLOTTED = ("replication/fid", "replication/vendi", "replication/rate", "val_loss")
#: ``recursive:`` settings that only the LM loop uses (watermark, prompts, DiversityMonitor).
LM_ONLY_SETTINGS = ("prompt_length", "temperature", "gamma", "delta", "key", "context_width", "z_threshold", "diversity")
_DIFFUSION_BASE = "antimemo.diffusion.module.DiffusionModule"


def _model_class_path(recipe: Mapping[str, Any]) -> str:
    model = recipe.get("model") or {}
    return model.get("class_path", DEFAULT_MODEL_CLASS) if isinstance(model, dict) else DEFAULT_MODEL_CLASS


def is_image_recipe(recipe: Mapping[str, Any]) -> bool:
    """Whether the recipe's ``model:`` class is a :class:`~antimemo.diffusion.DiffusionModule` (by its MRO).

    The default LM class is recognised without importing anything.

    Example:
        >>> is_image_recipe({"model": {"vocab_size": 257}})
        False
        >>> is_image_recipe({"model": {"class_path": "antimemo.diffusion.DiffusionModule"}})
        True
    """
    path = _model_class_path(recipe)
    if path == DEFAULT_MODEL_CLASS:
        return False
    cls = import_recipe_class(path, "model.class_path", "lightning.pytorch.LightningModule")
    return any(f"{c.__module__}.{c.__qualname__}" == _DIFFUSION_BASE for c in cls.__mro__)


def check_image_recipe(recipe: Mapping[str, Any], config_path: str, mixes: Sequence[str], given: Sequence[str]) -> None:
    """Refuse what the image loop cannot do, naming the setting and the fix.

    Args:
        recipe: the recipe dict.
        config_path: its path (for the messages).
        mixes: the ``--mix`` policies.
        given: the ``recursive:`` settings set in the recipe or by a flag.
    """
    model = _model_class_path(recipe)
    if "filter" in mixes:
        raise ValueError(
            f"--mix filter: the recipe {config_path!r} is a diffusion recipe ({model}) and antimemo has no image "
            "watermark, so the watermark filter would have nothing to detect; use --mix replace,accumulate"
        )
    lm_only = [name for name in LM_ONLY_SETTINGS if name in given]
    if lm_only:
        raise ValueError(
            f"--{lm_only[0]} (recursive.{lm_only[0]}) applies to LM recipes only (watermarked text sampling); the "
            f"diffusion recipe {config_path!r} samples images: remove it (image recipes take recursive.samples)"
        )
    monitor = recipe.get("replica_monitor")
    args = monitor.get("init_args", monitor) if isinstance(monitor, dict) else None
    if not isinstance(args, dict) or not args.get("fid_feature"):
        raise ValueError(
            f"replica_monitor: the diffusion recipe {config_path!r} needs a replica_monitor section with an "
            "fid_feature (e.g. antimemo.diffusion.DigitsFeatures): it logs each generation's FID, Vendi score and "
            "replica rate (see recipes/diffusion_collapse.yaml)"
        )


def save_images(path: str | os.PathLike[str], images: Any, labels: Any) -> Path:
    """Write float32 images ``[N, C, H, W]`` and int64 labels ``[N]`` as ``.npy`` atomically (two files)."""
    from antimemo.collapse.image_files import labels_path

    x = np.asarray(images.cpu() if hasattr(images, "cpu") else images, dtype=np.float32)
    y = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels, dtype=np.int64)
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"images must be [N, C, H, W] with labels [N], got {x.shape} and {y.shape}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for target, array in ((labels_path(path), y), (Path(path), x)):  # labels first: the images file marks completion
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(target, buffer.getvalue())
    return Path(path)


def load_images(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` as written by :func:`save_images` (``allow_pickle=False``)."""
    from antimemo.collapse.image_files import labels_path

    return np.load(path, allow_pickle=False), np.load(labels_path(path), allow_pickle=False)


def export_real_images(recipe: Mapping[str, Any], train_path: Path, val_path: Path) -> tuple[int, int]:
    """Build the recipe's ``data:`` module and write its training items and validation split.

    Returns:
        ``(training items, validation items)``.
    """
    import torch

    from antimemo.collapse.synth import _section

    class_path, init_args = _section(recipe, "data", "antimemo.diffusion.DigitsDataModule")
    cls = import_recipe_class(class_path, "data.class_path", "lightning.pytorch.LightningDataModule")
    dm = cls(**init_args)
    dm.setup("fit")
    counts = []
    for name, path in (("train_set", train_path), ("val_set", val_path)):
        dataset = getattr(dm, name, None)
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"data: {class_path} has no (or an empty) {name} after setup('fit'); the recursive loop "
                             "needs map-style train_set / val_set items {'image', 'label'} (as DigitsDataModule)")
        items = [dataset[i] for i in range(len(dataset))]
        if not all(isinstance(item, dict) and "image" in item and "label" in item for item in items[:1]):
            raise ValueError(f"data: the {name} items of {class_path} must be dicts with 'image' and 'label' keys")
        save_images(path, torch.stack([item["image"] for item in items]), torch.stack([torch.as_tensor(item["label"]) for item in items]))
        counts.append(len(items))
    return counts[0], counts[1]


def sample_images(module: Any, num: int, seed: int, batch_size: int = 64, progress: bool = True) -> tuple[Any, Any]:
    """``num`` images from a DiffusionModule, image ``i`` from ``Generator().manual_seed(seed + i)``.

    Returns:
        ``(images [num, C, H, W] in [0, 1], labels [num])``; labels are ``i % num_classes`` for a
        class-conditional module, ``-1`` for an unconditional one.
    """
    import torch

    from tqdm.auto import tqdm

    gens = [torch.Generator().manual_seed(seed + i) for i in range(num)]
    classes = getattr(module, "num_classes", None)
    labels = torch.arange(num) % classes if classes else None
    parts = []
    for s in tqdm(range(0, num, batch_size), desc="sampling images", unit="batch", leave=False, disable=not progress):
        e = min(num, s + batch_size)
        parts.append(module.sample(e - s, generator=gens[s:e], labels=None if labels is None else labels[s:e],
                                   batch_size=batch_size).cpu())
    images = torch.cat(parts) if parts else torch.zeros(0)
    return images, (labels if labels is not None else torch.full((num,), -1, dtype=torch.long))


def data_section(recipe: Mapping[str, Any], train_file: Path, val_file: Path) -> dict[str, Any]:
    """The fit config's ``data:``: an ImageFileDataModule over ``train_file`` and the real held-out images."""
    data = recipe.get("data") or {}
    args = data.get("init_args", data) if isinstance(data, dict) else {}
    return {"class_path": "antimemo.collapse.image_files.ImageFileDataModule", "init_args": {
        "train": str(train_file), "val": str(val_file), "batch_size": args.get("batch_size", 32),
    }}


def sample_grid(paths: Sequence[Path], per_row: int = 10, pad: int = 1) -> np.ndarray | None:
    """One grey picture: row ``k`` holds the first ``per_row`` images of ``paths[k]`` (missing files skipped).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "g.npy"
        >>> _ = save_images(p, np.ones((3, 1, 2, 2), np.float32), np.arange(3))
        >>> sample_grid([p, p.with_name("none.npy")], per_row=2).shape
        (4, 7)
    """
    rows = [load_images(p)[0][:per_row] for p in paths if Path(p).is_file()]
    if not rows:
        return None
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[2:]
    grid = np.ones((len(rows) * (h + pad) + pad, n * (w + pad) + pad), dtype=np.float32)
    for i, images in enumerate(rows):
        for j, image in enumerate(images):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top : top + h, left : left + w] = image.mean(axis=0)
    return grid
