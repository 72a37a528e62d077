"""``ReplicaMonitor``: measure training-image replication of a diffusion model during validation.

At the end of validation the callback generates a fixed, seeded set of images with the
module's ``sample`` method, scores each against the training images with
:class:`~antimemo.metrics.ReplicaRate` (and optionally more similarities), measures fidelity
(:class:`~antimemo.metrics.FeatureFrechetDistance`) and diversity
(:class:`~antimemo.metrics.GenerationDiversity`), logs ``replication/*`` through
``pl_module.log`` and saves a picture of the top replicas beside their nearest training images.
See ``docs/diffusion.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from antimemo._checks import check_int
from antimemo.callbacks._interactions import declare
from antimemo.callbacks.monitor import (
    _cuda_in_use,
    _evaluation_due,
    _get_rng_state,
    _log_and_record,
    _module_modes,
    _set_rng_state,
)
from antimemo.dedup.datasets import dataset_view
from antimemo.dedup.images import image_content_hash
from antimemo.functional.replica import SIMILARITIES, check_images, check_replica_threshold, replica_scores
from antimemo.metrics.replica import DEFAULT_THRESHOLDS, FeatureFrechetDistance, GenerationDiversity, ReplicaRate

__all__ = ["LABEL_HEIGHT", "ReplicaMonitor", "labelled_replica_grid", "replica_grid", "save_png"]

_NAME = "ReplicaMonitor"


def replica_grid(generated: Tensor, matched: Tensor, scale: int = 4, pad: int = 2) -> Tensor:
    """A picture: generated images on the top row, their nearest training images below.

    Args:
        generated: ``[K, C, H, W]`` in ``[0, 1]``.
        matched: ``[K, C, H, W]`` in ``[0, 1]`` (the training image matched to each).
        scale: integer upscaling (nearest neighbour) of every image.
        pad: white border in pixels (after scaling).

    Returns:
        ``[C, 2 * (H*scale + pad) + pad, K * (W*scale + pad) + pad]`` float in ``[0, 1]``.

    Example:
        >>> replica_grid(torch.zeros(3, 1, 4, 4), torch.ones(3, 1, 4, 4), scale=2).shape
        torch.Size([1, 22, 32])
    """
    k, c, h, w = generated.shape
    hs, ws = h * scale, w * scale
    out = torch.ones(c, 2 * (hs + pad) + pad, k * (ws + pad) + pad)
    for row, imgs in enumerate((generated, matched)):
        big = imgs.detach().float().cpu().repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        for j in range(k):
            y, x = pad + row * (hs + pad), pad + j * (ws + pad)
            out[:, y : y + hs, x : x + ws] = big[j]
    return out


#: Height in pixels of one label strip of the picture (Pillow's default bitmap font is 11 px high).
LABEL_HEIGHT = 13


def _label_font() -> Any:
    """Pillow's built-in bitmap font (no file, no download)."""
    from PIL import ImageFont

    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1: the bitmap font
    return loader() if loader is not None else ImageFont.load_default()


def labelled_replica_grid(generated: Tensor, matched: Tensor, scores: Tensor, scale: int = 4, pad: int = 2) -> Tensor:
    """:func:`replica_grid` with labels: "generated" above the top row, "nearest training image"
    above the bottom row, and each pair's similarity under it (three strips of
    :data:`LABEL_HEIGHT` pixels, black text in Pillow's default bitmap font).

    Args:
        generated, matched, scale, pad: as for :func:`replica_grid`.
        scores: ``[K]`` similarity of each pair (printed with 3 decimals).

    Returns:
        ``[C, H + 3 * LABEL_HEIGHT, max(W, label width + 2 * pad)]`` float in ``[0, 1]``, where
        ``[C, H, W]`` is the shape of :func:`replica_grid`.

    Example:
        >>> labelled_replica_grid(torch.zeros(3, 1, 4, 4), torch.ones(3, 1, 4, 4), torch.ones(3), scale=2).shape
        torch.Size([1, 61, 136])
    """
    from PIL import Image, ImageDraw

    grid = replica_grid(generated, matched, scale, pad)
    c, gh, gw = grid.shape
    hs, ws = generated.shape[2] * scale, generated.shape[3] * scale
    lh = LABEL_HEIGHT
    font = _label_font()
    titles = ("generated", "nearest training image")
    width = max(gw, *(int(font.getbbox(t)[2]) + 2 * pad for t in titles))
    out = torch.ones(c, gh + 3 * lh, width)
    split = pad + hs  # the grid's rows above this line are the generated images
    out[:, lh : lh + split, :gw] = grid[:, :split]
    out[:, 2 * lh + split : 2 * lh + gh, :gw] = grid[:, split:]
    canvas = Image.new("L", (width, gh + 3 * lh), 255)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 1), titles[0], fill=0, font=font)
    draw.text((pad, lh + split + 1), titles[1], fill=0, font=font)
    for j, score in enumerate(scores.detach().float().cpu().tolist()):
        text = f"{score:.3f}"
        x = pad + j * (ws + pad) + max(0, (ws - int(font.getbbox(text)[2])) // 2)
        draw.text((x, 2 * lh + gh + 1), text, fill=0, font=font)
    ink = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
    return torch.minimum(out, ink.unsqueeze(0))


def save_png(image: Tensor, path: str | Path) -> Path:
    """Save a ``[C, H, W]`` float image in ``[0, 1]`` (C = 1 or 3) as PNG with Pillow.

    Example:
        >>> import tempfile
        >>> save_png(torch.rand(1, 4, 4), tempfile.mkdtemp() + "/x.png").suffix
        '.png'
    """
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if arr.shape[0] == 1:
        Image.fromarray(arr[0], mode="L").save(path)
    else:
        Image.fromarray(np.ascontiguousarray(arr[:3].transpose(1, 2, 0)), mode="RGB").save(path)
    return path


def _images_of(dataset: Any, what: str) -> Tensor:
    try:
        _, view = dataset_view(dataset, "images")
    except TypeError as err:
        raise TypeError(
            f"{_NAME}: cannot read images from the {what} dataset ({type(dataset).__name__}): {err}. Items must be "
            "[C, H, W] float tensors, (image, label) tuples or dicts with an 'image' key; or pass reference=..."
        ) from None
    if len(view) == 0:
        raise ValueError(f"{_NAME}: the {what} dataset is empty")
    return torch.stack([view[i].detach().float().cpu() for i in range(len(view))])


def _dataset_of(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if len(loaders) == 1 else None
    return getattr(loaders, "dataset", None)


class ReplicaMonitor(Callback):
    """Log how often a diffusion model replicates training images, with fidelity and diversity.

    **Reference.** At train start the training images are read from the train dataloader's
    dataset (items: ``[C, H, W]`` float tensors in ``[0, 1]``, ``(image, label)`` tuples or dicts
    with an ``"image"`` key) and byte-identical copies are merged: the reference holds each
    distinct training image once, with its number of copies (``reference_copies``). Or pass
    ``reference=`` images yourself.

    **Evaluation.** At ``on_validation_epoch_end`` of every ``every_n_epochs``-th epoch (never in
    the sanity check, only while fitting) the module generates ``num_samples`` images with
    ``pl_module.sample(num, generator=[one generator per image], labels=...)`` (the protocol of
    :class:`~antimemo.diffusion.DiffusionModule`; image ``i`` uses the generator seeded with
    ``seed * 1_000_003 + i`` and, for a class-conditional module, label ``i % num_classes``), in
    batches of ``batch_size``. The same images are therefore generated at every evaluation,
    whatever the number of ranks. These keys are logged (``{p}`` = ``log_prefix``):

    - ``{p}/rate``, ``{p}/mean``, ``{p}/p50``, ``{p}/p95``, ``{p}/p99``: the top-1 score of
      ``similarity`` (:class:`~antimemo.metrics.ReplicaRate`); ``rate`` is the fraction above
      ``threshold``;
    - ``{p}/{name}/rate``, ``/p50``, ``/p95`` for each of ``extra_similarities`` (default
      thresholds);
    - ``{p}/dup_match_fraction``: fraction of generations whose nearest training image has more
      than one copy in the training set, and ``{p}/dup_rate``: fraction that are replicas of
      such an image;
    - ``{p}/fid`` (when ``fid_feature`` is given): Fréchet distance between the generations and
      the validation images (``fid_real="val"``) or the distinct training images (``"train"``)
      in ``fid_feature``'s space;
    - ``{p}/vendi``, ``{p}/pairwise_distance``: diversity of the generations in
      ``fid_feature``'s space (or the pixel embedding without one);
    - with ``background=True``: ``{p}/background/rate``, ``/p95``, ``/dup_match_fraction``,
      ``/dup_rate``: the same figures for the real held-out validation images against the
      training images (computed once), i.e. the level that a model generating fresh real
      images would show. Compare the generations with it: with weak similarities (pixels on
      small images) real held-out images already pass the threshold often.

    **Picture.** Rank 0 saves ``{save_dir}/replicas_epoch{E:03d}.png`` (``save_dir`` default:
    ``<log_dir>/replicas``): the ``num_pictures`` generations with the highest scores on top,
    their nearest training images below, labelled ("generated", "nearest training image") with
    each pair's similarity (``similarity``) printed under it (Pillow, built-in bitmap font:
    :func:`labelled_replica_grid`). The path is in :attr:`last_picture_path` and in the
    ``antimemo fit`` report. With a logger whose ``experiment`` has
    ``add_image`` (TensorBoard), the same picture is logged as ``{p}/top_replicas``.

    **DDP.** Rank ``r`` generates images ``r, r + W, ...``; the metrics' ``compute()`` gathers
    all shards, so every rank logs the same values, and the images are all-gathered for the
    picture. The reference is read on every rank (deterministically).

    **Side effects.** None: RNG states (torch, CUDA when initialized, Python, NumPy) and the
    train/eval mode of every submodule are restored; sampling runs under ``torch.no_grad()``.

    Args:
        num_samples: generations per evaluation.
        every_n_epochs: evaluate when ``(current_epoch + 1) % every_n_epochs == 0``.
        batch_size: images per sampling batch.
        seed: base seed of the generations.
        similarity: ``"cosine"``, ``"l2"`` or ``"carlini"`` (see :mod:`antimemo.functional.replica`).
        threshold: replica threshold of ``similarity`` (``None``: its default, e.g. 0.5 for cosine).
        embedder: ``nn.Module`` for ``"cosine"`` (``None``: weights-free pixel embedding).
        extra_similarities: more similarities logged under ``{p}/{name}/...``.
        fid_feature: ``nn.Module`` ``[B, C, H, W] -> [B, D]`` for the Fréchet distance and the
            diversity (e.g. :class:`~antimemo.diffusion.DigitsFeatures`); ``None``: no FID.
        fid_real: ``"val"`` or ``"train"``: the real images of the Fréchet distance.
        num_pictures: replicas shown in the picture (0: no picture).
        save_dir: directory of the pictures (``None``: ``<log_dir>/replicas``).
        num_inference_steps: sampling steps passed to ``sample`` (``None``: the module's).
        reference: explicit reference images ``[R, C, H, W]`` in ``[0, 1]``.
        log_prefix: prefix of the logged keys.
        background: also log the figures of the validation images (see above).

    Attributes:
        reference: ``[R, C, H, W]`` distinct training images (after fit start).
        reference_copies: ``[R]`` copies of each in the training set.
        last_results: floats of the last evaluation, keyed without ``log_prefix``.
        history: list of ``(epoch, global_step, results)``.
        last_picture_path: path of the last PNG (rank 0), or ``None``.

    Example:
        >>> from antimemo.diffusion import DigitsFeatures
        >>> monitor = ReplicaMonitor(num_samples=64, similarity="cosine", threshold=0.9,
        ...                          fid_feature=DigitsFeatures(epochs=0))
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[monitor])  # doctest: +SKIP
        >>> trainer.fit(DiffusionModule(), datamodule=DigitsDataModule())  # doctest: +SKIP
        >>> monitor.last_results["rate"]  # doctest: +SKIP
    """

    declaration = declare("evaluation", domain="diffusion", repeatable=True)

    def __init__(
        self,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        seed: int = 0,
        similarity: str = "cosine",
        threshold: float | None = None,
        embedder: nn.Module | None = None,
        extra_similarities: Sequence[str] = ("carlini",),
        fid_feature: nn.Module | None = None,
        fid_real: str = "val",
        num_pictures: int = 8,
        save_dir: str | None = None,
        num_inference_steps: int | None = None,
        reference: Tensor | None = None,
        log_prefix: str = "replication",
        background: bool = True,
    ) -> None:
        super().__init__()
        self.num_samples = check_int("num_samples", num_samples, 1, "e.g. num_samples=64")
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, 1, "1 evaluates after every epoch")
        self.batch_size = check_int("batch_size", batch_size, 1, "images per sampling batch, e.g. 64")
        self.seed = check_int("seed", seed, 0, "e.g. seed=0")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.similarity = similarity
        self.threshold = DEFAULT_THRESHOLDS[similarity] if threshold is None else check_replica_threshold(threshold, similarity)
        if embedder is not None and not isinstance(embedder, nn.Module):
            raise TypeError(f"embedder must be a torch.nn.Module or None, got {type(embedder).__name__}")
        self.embedder = embedder
        extra = tuple(extra_similarities or ())
        bad = [s for s in extra if s not in SIMILARITIES or s == similarity]
        if bad or len(set(extra)) != len(extra):
            raise ValueError(
                f"extra_similarities must be distinct names from {SIMILARITIES} other than similarity={similarity!r}, "
                f"got {extra!r}"
            )
        self.extra_similarities = extra
        if fid_feature is not None and not isinstance(fid_feature, nn.Module):
            raise TypeError(f"fid_feature must be a torch.nn.Module or None, got {type(fid_feature).__name__}")
        self.fid_feature = fid_feature
        if fid_real not in ("val", "train"):
            raise ValueError(f"fid_real must be 'val' or 'train', got {fid_real!r}")
        self.fid_real = fid_real
        self.num_pictures = check_int("num_pictures", num_pictures, 0, "0 saves no picture")
        self.save_dir = save_dir
        if num_inference_steps is not None:
            check_int("num_inference_steps", num_inference_steps, 1, "or None for the module's setting")
        self.num_inference_steps = num_inference_steps
        if reference is not None:
            check_images(reference, "reference")
        self._given_reference = reference
        if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
            raise ValueError(f"log_prefix must be a non-empty string not ending in '/', got {log_prefix!r}")
        self.log_prefix = log_prefix
        if not isinstance(background, bool):
            raise TypeError(f"background must be a bool, got {background!r}")
        self.background = background
        self._background: dict[str, float] | None = None
        self.reference: Tensor | None = None
        self.reference_copies: Tensor | None = None
        self._metrics: dict[str, ReplicaRate] = {}
        self._fid: FeatureFrechetDistance | None = None
        self._fid_real_added = False
        self._diversity: GenerationDiversity | None = None
        self.last_results: dict[str, float] = {}
        self.history: list[tuple[int, int, dict[str, float]]] = []
        self.last_picture_path: str | None = None

    # ------------------------------------------------------------------------------ set-up
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the reference images and build the metrics."""
        if not callable(getattr(pl_module, "sample", None)):
            raise TypeError(
                f"{_NAME} needs the LightningModule to have sample(num, generator=..., labels=...) returning images "
                f"in [0, 1] (as antimemo.diffusion.DiffusionModule); {type(pl_module).__name__} has none"
            )
        rng = _get_rng_state(_cuda_in_use())
        try:
            if self._given_reference is not None:
                self.reference = self._given_reference.detach().float().cpu()
                self.reference_copies = torch.ones(self.reference.shape[0], dtype=torch.long)
            else:
                dataset = _dataset_of(trainer.train_dataloader)
                if dataset is None:
                    raise TypeError(f"{_NAME}: the train dataloader has no map-style dataset; pass reference=...")
                self.reference, self.reference_copies = self._distinct(_images_of(dataset, "train"))
        finally:
            _set_rng_state(rng)  # a dataset's __getitem__ may use the global RNGs
        check_images(self.reference, "reference (training images)")
        self._metrics = {
            self.similarity: ReplicaRate(self.reference, self.similarity, self.threshold, self.embedder),
            **{s: ReplicaRate(self.reference, s) for s in self.extra_similarities},
        }
        self._diversity = GenerationDiversity(self.fid_feature)
        if self.fid_feature is not None:
            self._fid = FeatureFrechetDistance(
                self.fid_feature, input_shape=tuple(self.reference.shape[1:]), reset_real_features=False
            )
            self._fid_real_added = False

    @staticmethod
    def _distinct(images: Tensor) -> tuple[Tensor, Tensor]:
        hashes = [image_content_hash(x) for x in images]
        first: dict[int, int] = {}
        counts: dict[int, int] = {}
        for i, h in enumerate(hashes):
            first.setdefault(h, i)
            counts[h] = counts.get(h, 0) + 1
        keep = sorted(first.values())
        return images[keep].contiguous(), torch.tensor([counts[hashes[i]] for i in keep], dtype=torch.long)

    # ---------------------------------------------------------------------------- evaluate
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Generate, score and log, unless sanity checking, not fitting, or not an evaluation epoch."""
        if not _evaluation_due(trainer, self.every_n_epochs):
            return
        if self.reference is None:
            raise RuntimeError(f"{_NAME} has no reference: on_train_start did not run; pass it to the Trainer before fit")
        rng = _get_rng_state(_cuda_in_use())
        modes = _module_modes(pl_module)
        try:
            results, images, scores, indices = self._evaluate(trainer, pl_module)
        finally:
            for module, mode in modes:
                module.training = mode
            _set_rng_state(rng)
        _log_and_record(self, trainer, pl_module, results)
        if self.num_pictures and trainer.is_global_zero and images is not None:
            self._picture(trainer, images, scores, indices)

    def _shard(self, trainer: pl.Trainer) -> list[int]:
        return list(range(trainer.global_rank, self.num_samples, trainer.world_size))

    def _generate(self, pl_module: pl.LightningModule, ids: list[int]) -> Tensor:
        gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + i) for i in ids]
        kwargs: dict[str, Any] = {"generator": gens, "batch_size": self.batch_size}
        num_classes = getattr(pl_module, "num_classes", None)
        if num_classes:
            kwargs["labels"] = torch.tensor([i % num_classes for i in ids], dtype=torch.long)
        if self.num_inference_steps is not None:
            kwargs["num_inference_steps"] = self.num_inference_steps
        with torch.no_grad():
            out = pl_module.sample(len(ids), **kwargs)
        return out.detach().float().cpu()

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, float], Any, Any, Any]:
        ids = self._shard(trainer)
        generated = self._generate(pl_module, ids)
        if self.fid_feature is not None:  # move the extractor to the images' device (CPU)
            self.fid_feature.to("cpu")
        results: dict[str, float] = {}
        primary = None
        for name, metric in self._metrics.items():
            metric.reset()
            if generated.shape[0]:
                metric.update(generated)
            out = metric.compute()
            if name == self.similarity:
                primary = out
                results.update({k: float(out[k]) for k in ("rate", "mean", "p50", "p95", "p99")})
            else:
                results.update({f"{name}/{k}": float(out[k]) for k in ("rate", "p50", "p95")})
        assert primary is not None
        dup = (self.reference_copies[primary["indices"].cpu()] > 1).double()
        results["dup_match_fraction"] = float(dup.mean())
        results["dup_rate"] = float((dup * (primary["scores"].cpu().double() > self.threshold)).mean())
        assert self._diversity is not None
        self._diversity.reset()
        if generated.shape[0]:
            self._diversity.update(generated)
        div = self._diversity.compute()
        results["vendi"], results["pairwise_distance"] = float(div["vendi"]), float(div["pairwise_distance"])
        if self._fid is not None:
            if not self._fid_real_added:
                real = self._fid_real_images(trainer)
                shard = real[trainer.global_rank :: trainer.world_size]
                if shard.shape[0]:
                    self._fid.update(shard, real=True)
                self._fid_real_added = True
            self._fid.reset()  # keeps the real features (reset_real_features=False)
            if generated.shape[0]:
                self._fid.update(generated, real=False)
            results["fid"] = float(self._fid.compute())
        if self.background:
            results.update(self._background_results(trainer))
        results["num_samples"] = float(self.num_samples)
        images = self._gather_images(trainer, generated) if self.num_pictures else None
        return results, images, primary["scores"].cpu(), primary["indices"].cpu()

    def _background_results(self, trainer: pl.Trainer) -> dict[str, float]:
        """The same figures for the held-out validation images (computed once, identically on every rank)."""
        if self._background is None:
            dataset = _dataset_of(trainer.val_dataloaders)
            if dataset is None:
                self._background = {}
                return {}
            real = _images_of(dataset, "validation")
            metric = self._metrics[self.similarity]
            scores, idx = replica_scores(
                real, self.reference, self.similarity, metric.embedder, k=metric.k, alpha=metric.alpha, grid=metric.grid
            )
            dup = (self.reference_copies[idx] > 1).double()
            self._background = {
                "background/rate": float((scores > self.threshold).double().mean()),
                "background/p95": float(torch.quantile(scores.double(), 0.95)),
                "background/dup_match_fraction": float(dup.mean()),
                "background/dup_rate": float((dup * (scores > self.threshold).double()).mean()),
            }
        return dict(self._background)

    def _fid_real_images(self, trainer: pl.Trainer) -> Tensor:
        if self.fid_real == "train":
            assert self.reference is not None
            return self.reference
        dataset = _dataset_of(trainer.val_dataloaders)
        if dataset is None:
            raise TypeError(f"{_NAME}: fid_real='val' needs a single validation DataLoader; use fid_real='train'")
        return _images_of(dataset, "validation")

    def _gather_images(self, trainer: pl.Trainer, generated: Tensor) -> Tensor:
        """All generations, in the order of the metrics' gathered states (rank 0's shard first)."""
        world = trainer.world_size
        if world == 1:
            return generated
        per = -(-self.num_samples // world)
        padded = torch.zeros(per, *generated.shape[1:])
        padded[: generated.shape[0]] = generated
        gathered = trainer.strategy.all_gather(padded.to(trainer.strategy.root_device)).cpu()  # [W, per, ...]
        parts = [gathered[r, : len(range(r, self.num_samples, world))] for r in range(world)]
        return torch.cat(parts)

    def _picture(self, trainer: pl.Trainer, images: Tensor, scores: Tensor, indices: Tensor) -> None:
        assert self.reference is not None
        k = min(self.num_pictures, images.shape[0])
        top = torch.argsort(scores, descending=True, stable=True)[:k]
        grid = labelled_replica_grid(images[top], self.reference[indices[top]], scores[top])
        root = self.save_dir or str(Path(trainer.log_dir or trainer.default_root_dir) / "replicas")
        path = save_png(grid, Path(root) / f"replicas_epoch{trainer.current_epoch:03d}.png")
        self.last_picture_path = str(path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and callable(getattr(experiment, "add_image", None)):
                experiment.add_image(f"{self.log_prefix}/top_replicas", grid, global_step=trainer.global_step)

    # ------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The evaluation history (plain values)."""
        return {"history": [[int(e), int(s), dict(r)] for e, s, r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the evaluation history."""
        self.history = [(int(e), int(s), {str(k): float(v) for k, v in r.items()}) for e, s, r in state_dict.get("history", [])]
        self.last_results = dict(self.history[-1][2]) if self.history else {}
