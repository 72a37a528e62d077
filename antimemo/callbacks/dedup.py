"""``DedupSampling``: train so that each duplicate cluster counts once, by adding one callback.

Mechanism (Lightning 2.x). At ``setup("fit")`` the callback registers a transform, at order 100,
on the trainer's train-loader chain (:class:`antimemo.callbacks._seams.LoaderSeam`, the one
owner of the patch of Lightning's train-loader request). Every time Lightning requests the train
loader (at fit start and on each ``reload_dataloaders_every_n_epochs``), the transform builds or
checks the
:class:`~antimemo.dedup.DuplicateIndex`, creates a :class:`~antimemo.sampling.DedupSampler` for
this rank, and re-creates your DataLoader around it with Lightning's own ``_update_dataloader``
(the function Lightning uses to inject its ``DistributedSampler``), before Lightning measures its
length. ``teardown("fit")`` unregisters it. Under ``DifferentialPrivacy`` (order 1000) with
``policy='drop'`` or ``'cap'``, DP Poisson-samples the kept examples
(:meth:`~antimemo.sampling.DedupSampler.kept_indices`); ``'downweight'`` is refused there. Your DataModule and DataLoader code is unchanged.

Distributed training: ``DedupSampler`` subclasses ``DistributedSampler`` and shards itself
(``rank``, ``world_size`` from the trainer), so with ``use_distributed_sampler=True`` Lightning
leaves it alone (it only injects a sampler into loaders whose sampler is not a
``DistributedSampler``), and with ``use_distributed_sampler=False`` nothing changes either.

Resumption: the callback's ``state_dict`` stores the epoch and the samples this rank trained on
in it (``(batch_idx + 1) * batch_size``, counted in ``on_train_batch_end``, which runs before
``ModelCheckpoint`` saves). Lightning restarts a mid-epoch checkpoint with a fresh iterator and
then runs only the remaining ``len(loader) - batches_done`` batches, so the sampler skips the
samples already trained on: a resumed run sees exactly the batches of an uninterrupted one.
After the last batch of an epoch the saved position is the start of the next epoch, which is
where Lightning resumes such a checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler

from antimemo.callbacks._seams import loader_seam
from antimemo.dedup.datasets import dataset_view
from antimemo.dedup.index import DuplicateIndex, dataset_content_hashes
from antimemo.sampling import DedupSampler, check_policy
from antimemo.callbacks._interactions import check_composition, declare

__all__ = ["DedupSampling"]


class DedupSampling(pl.Callback):
    """Sample the training set so that duplicates count once: drop, cap or down-weight them.

    Args:
        index: a :class:`~antimemo.dedup.DuplicateIndex` of the train dataset, in dataset order,
            or the path of one saved with ``index.save`` / ``antimemo dedup ... --out PATH``;
            ``None`` builds one from the train dataset when fit starts (texts, token ids or
            images, detected from the items; ``index_kwargs`` go to the builder).
        policy: ``"downweight"`` (sample with weight ``1/cluster_size``, with replacement; an
            epoch has one sample per cluster), ``"drop"`` (one representative per cluster) or
            ``"cap"`` (at most ``max_copies`` per cluster).
        max_copies: copies kept per cluster by ``"cap"``.
        seed: seed of the epoch orders (``seed + epoch``); the global RNG is never used.
        num_samples: samples per epoch (all ranks) for ``"downweight"``; default: one per cluster.
        check_fingerprint: check that a given ``index`` was built from this dataset (one pass
            hashing the examples); the length is always checked.
        index_kwargs: keyword arguments of ``DuplicateIndex.from_texts`` / ``from_token_ids`` /
            ``from_images`` when the index is built here (e.g. ``{"threshold": 0.7, "num_workers": 4}``).
        progress: show progress bars while building or checking the index (rank 0 only).

    Logs ``dedup/effective_size`` (kept examples, or clusters for ``"downweight"``) and
    ``dedup/duplicate_fraction`` at the end of every training epoch.

    Example:
        >>> cb = DedupSampling(policy="drop")
        >>> trainer = pl.Trainer(callbacks=[cb], max_epochs=1, logger=False)  # doctest: +SKIP
    """

    declaration = declare("sampler", note="train-loader chain, order 100")

    def __init__(
        self,
        index: DuplicateIndex | str | None = None,
        policy: str = "downweight",
        max_copies: int = 1,
        seed: int = 0,
        *,
        num_samples: int | None = None,
        check_fingerprint: bool = True,
        index_kwargs: dict | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        check_policy(policy, max_copies)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}; e.g. seed=0")
        if isinstance(index, (str, os.PathLike)):
            index = DuplicateIndex.load(index)
        if index is not None and not isinstance(index, DuplicateIndex):
            raise TypeError(
                f"index must be a DuplicateIndex, the path of a saved one, or None (build it at fit start), got "
                f"{type(index).__name__}; wrap precomputed cluster ids with DuplicateIndex(cluster_ids)"
            )
        if num_samples is not None and policy != "downweight":
            raise ValueError(f"num_samples applies only to policy='downweight', got policy={policy!r}")
        self.policy = policy
        self.max_copies = int(max_copies)
        self.seed = seed
        self.num_samples = num_samples
        self.check_fingerprint = bool(check_fingerprint)
        self.index_kwargs = dict(index_kwargs or {})
        self.progress = bool(progress)
        self._given = index
        self.index: DuplicateIndex | None = index
        self.sampler: DedupSampler | None = None
        self._checked_for: Any = None  # the dataset object the index was built for / checked against
        self._pending: dict | None = None
        self._epoch = 0
        self._consumed: int | None = 0
        self._batch_size: int | None = None
        self._patched: Any = None
        self._warned_no_batch_size = False

    # ------------------------------------------------------------------ installation
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register the sampler on the trainer's train-loader chain (stage ``"fit"`` only)."""
        if stage != "fit":
            return
        check_composition(trainer)
        if self._patched is not None:
            self._patched.remove()
        self._patched = loader_seam(trainer).register(self, 100, lambda loader: self._inject(trainer, loader))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Unregister from the train-loader chain."""
        if stage == "fit" and self._patched is not None:
            self._patched.remove()
            self._patched = None

    # ------------------------------------------------------------------ index and sampler
    def _index_for(self, dataset: Any, trainer: pl.Trainer) -> DuplicateIndex:
        n = len(dataset)
        show = self.progress and trainer.is_global_zero
        if self._given is not None:
            idx = self._given
            if self._checked_for is dataset:
                return idx
            if idx.num_examples != n:
                raise ValueError(
                    f"the DuplicateIndex passed to DedupSampling has {idx.num_examples} examples but the train dataset "
                    f"has {n}: it was built from other data; rebuild it from the train dataset (in its order) or pass "
                    "index=None to build it at fit start"
                )
            if self.check_fingerprint:
                if idx.kind == "custom" or idx.content_hashes is None:
                    raise ValueError(
                        "the DuplicateIndex passed to DedupSampling has no fingerprint (built from cluster ids), so it "
                        "cannot be checked against the train dataset; pass DedupSampling(check_fingerprint=False) to "
                        "check only its length"
                    )
                try:
                    kind, view = dataset_view(dataset, idx.kind)
                except TypeError as err:
                    raise ValueError(
                        f"cannot check the fingerprint of the {idx.kind!r} DuplicateIndex against the train dataset: {err}. "
                        "If the index was built from another form of the same examples (e.g. raw texts of a tokenized "
                        "dataset), pass DedupSampling(check_fingerprint=False) to check only the length"
                    ) from None
                idx.check_matches(dataset_content_hashes(kind, view, progress=show), what="the train dataset")
            self._checked_for = dataset
            return idx
        if self.index is not None and self._checked_for is dataset:
            return self.index
        kind, view = dataset_view(dataset)
        kwargs = {"progress": show, **self.index_kwargs}
        if kind == "text":
            idx = DuplicateIndex.from_texts(view, **kwargs)
        elif kind == "tokens":
            idx = DuplicateIndex.from_token_ids(view, **kwargs)
        else:
            idx = DuplicateIndex.from_images(view, **kwargs)
        self.index = idx
        self._checked_for = dataset
        return idx

    def _inject(self, trainer: pl.Trainer, dataloader: Any) -> DataLoader:
        if not isinstance(dataloader, DataLoader):
            raise TypeError(
                "DedupSampling needs train_dataloader() (or fit(train_dataloaders=...)) to give one "
                f"torch.utils.data.DataLoader, got {type(dataloader).__name__}; for several loaders, deduplicate "
                "each dataset yourself with DedupSampler"
            )
        dataset = dataloader.dataset
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"DedupSampling needs a map-style dataset (len and indexing), got the IterableDataset "
                f"{type(dataset).__name__}; a sampler cannot reorder an iterable dataset"
            )
        if len(dataset) == 0:
            raise ValueError("the train dataset is empty: DedupSampling has nothing to sample")
        sampler_before = dataloader.sampler
        if not isinstance(sampler_before, (RandomSampler, SequentialSampler, DedupSampler)):
            rank_zero_warn(
                f"DedupSampling replaces the train DataLoader's sampler {type(sampler_before).__name__} "
                "with DedupSampler"
            )
        index = self._index_for(dataset, trainer)
        sampler = DedupSampler(
            index.cluster_ids,
            policy=self.policy,
            max_copies=self.max_copies,
            seed=self.seed,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            num_samples=self.num_samples,
        )
        if self.sampler is not None:
            sampler.set_epoch(self.sampler.epoch)
        if self._pending is not None:
            fp = self._pending.get("fingerprint")
            if fp is not None and index.fingerprint is not None and fp != index.fingerprint:
                raise ValueError(
                    f"the checkpoint's DedupSampling state belongs to a dataset with fingerprint {fp}, but the train "
                    f"dataset's index has fingerprint {index.fingerprint}: the saved sample order does not apply; "
                    "resume with the same training data"
                )
            sampler.load_state_dict(self._pending["sampler"])
            self._pending = None
        self.sampler = sampler
        try:
            new = _update_dataloader(dataloader, sampler, mode=RunningStage.TRAINING)
        except Exception as err:  # Lightning raises TypeError / MisconfigurationException
            raise TypeError(
                f"DedupSampling could not rebuild the train DataLoader with its sampler: {err}. Use a DataLoader "
                "with a batch_size (or a BatchSampler subclass whose __init__ takes `sampler`)"
            ) from err
        self._batch_size = getattr(new.batch_sampler, "batch_size", None)
        return new

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to train if the train loader was not built through this callback's sampler."""
        loader_seam(trainer).check_applied(
            self, "no deduplicated sampler is in use and duplicates would be trained on as usual"
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the epoch's order and reset the count of samples trained on."""
        if self.sampler is not None:
            self.sampler.set_epoch(trainer.current_epoch)
        self._epoch = trainer.current_epoch
        self._consumed = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the samples of this rank's shard trained on in this epoch."""
        if batch_idx + 1 >= trainer.num_training_batches:
            # the epoch is complete: a checkpoint saved from now on resumes at the next epoch, so
            # the next epoch's order is selected even before Lightning calls set_epoch (a loader
            # with workers draws its first indices as soon as its iterator is created)
            self._epoch, self._consumed = trainer.current_epoch + 1, 0
        else:
            self._epoch = trainer.current_epoch
            self._consumed = None if self._batch_size is None else (batch_idx + 1) * self._batch_size

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the effective dataset size and the duplicate fraction."""
        if self.sampler is None or self.index is None:
            return
        pl_module.log("dedup/effective_size", float(self.sampler.effective_size), rank_zero_only=True)
        pl_module.log("dedup/duplicate_fraction", float(self.index.duplicate_fraction), rank_zero_only=True)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The sampler position (epoch, samples trained on in it) and the dataset fingerprint."""
        if self.sampler is None:
            return {} if self._pending is None else dict(self._pending)
        consumed = self._consumed
        if consumed is None:
            if not self._warned_no_batch_size:
                rank_zero_warn(
                    "DedupSampling cannot tell how many samples a batch holds (the DataLoader has no batch_size), so "
                    "a checkpoint saved mid-epoch resumes from the start of that epoch"
                )
                self._warned_no_batch_size = True
            consumed = 0
        sampler_state = self.sampler.state_dict(num_yielded=consumed)
        sampler_state["epoch"] = int(self._epoch)  # the epoch of the trained-on count, maybe the next one
        return {"sampler": sampler_state, "fingerprint": None if self.index is None else self.index.fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the sampler position (applied when the train loader is built)."""
        if not state_dict:
            return
        self._pending = dict(state_dict)
        self._epoch = int(state_dict["sampler"]["epoch"])
        self._consumed = int(state_dict["sampler"]["num_yielded"])
        if self.sampler is not None:  # already running: apply now
            self.sampler.load_state_dict(state_dict["sampler"])
            self._pending = None
