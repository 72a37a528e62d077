"""Fail-closed DP-SGD (Opacus) as one Lightning callback: ``Trainer(callbacks=[DifferentialPrivacy(...)])``.

What the callback changes, and when (Lightning 2.6 hook order):

- ``setup("fit")``: checks the trainer configuration (no gradient accumulation, no
  ``gradient_clip_val``, no fp16, single device or DDP), validates the model with Opacus'
  ``ModuleValidator`` (``fix=True`` replaces e.g. BatchNorm by GroupNorm, in place, before
  ``configure_optimizers`` runs) and wraps the trainer's train-dataloader source so that the
  loader Lightning builds samples batches with :class:`~antimemo.dp.sampler.PoissonBatchSampler`.
- the train loader (when Lightning requests it): same dataset, collate function and workers,
  but Poisson sampling at ``q = batch_size * world_size / len(dataset)``, ``int(1/q)`` batches
  per epoch.
- ``on_train_start``: attaches Opacus' per-sample-gradient hooks to the LightningModule's
  submodules (no wrapper: the module Lightning runs is the module with the hooks), replaces the
  strategy's optimizer by Opacus' ``DPOptimizer`` (``DistributedDPOptimizer`` under DDP: noise
  added once, on rank 0, to the all-reduced clipped sum), installs the per-sequence loss and
  the GPT-2 fixes on Hugging Face causal LMs, and checks that the train loader is the Poisson
  loader.
- every step: before the optimizer step, every trainable parameter must have a per-sample
  gradient (ghost mode: a per-sample norm) for exactly the batch's samples, the optimizer must
  be the DP optimizer and (with ``target_epsilon``) the step must fit the budget; after the
  step, the accountant must have recorded exactly one step. At the first step the per-sample
  gradients must also add up to the ordinary batch gradient. Any failure raises: training never
  continues without privacy while an epsilon is reported.
- every step, also: no parameter may have changed since the last DP step except through the DP
  optimizer's own step (a raw optimizer the user kept, a ``.data`` write...), the optimizer
  ``configure_optimizers`` returned may only be stepped by the DP optimizer, and no parameter may
  have become trainable after fit start (its per-sample gradients would be missing).
- ``on_train_start`` also refuses a start from non-private training it can see (a checkpoint
  without DP state, or more trained steps than private ones) unless ``allow_nonprivate_start=True``.
- ``on_train_epoch_end`` logs ``dp/epsilon`` and ``dp/nonprivate_steps``; ``on_train_end`` stores
  the final values in ``trainer.callback_metrics``; :meth:`DifferentialPrivacy.guarantee` states
  the whole guarantee (what the report prints).
- ``state_dict`` holds the accountant history, so a resumed run continues the privacy spend. The
  noise generator's seed is never saved: it is drawn from the OS entropy source at every fit.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from antimemo.dp.accounting import compute_epsilon, noise_multiplier_for, steps_within_budget
from antimemo.callbacks._seams import grad_seam, loader_seam, loss_seam, per_sequence_reduction
from antimemo.dp.config import check_dp_arguments
from antimemo.dp.hf import find_causal_lms, install_batched_position_ids, register_grad_samplers
from antimemo.dp.loader import poisson_loader
from antimemo.dp.routes import available_memory, choose_route, ghost_blocker
from antimemo.dp.validate import check_no_tied_ghost, validate_model
from antimemo.sampling import DedupSampler
from antimemo.dp.bookkeeping import BookKeeping, bookkeeping_optimizer_class
from antimemo.dp.sampler import EmptySafeCollate, PoissonBatchSampler, mix_seed
from antimemo.callbacks._interactions import check_composition, declare

__all__ = ["DifferentialPrivacy"]

_NOISE_STREAM = 0x6E6F697365  # "noise": tag of the noise generator's seed stream
_SUPPORTED_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed", "bf16-true")


def _import_opacus() -> Any:
    try:
        import opacus
    except ImportError as err:  # pragma: no cover - opacus is installed in the test environment
        raise ImportError(
            "DifferentialPrivacy needs Opacus, which is not installed; install it with pip install 'antimemo[dp]'"
        ) from err
    return opacus


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_checksum(t: Tensor) -> Tensor:
    """Sum of ``t``'s bits read as integers, in wrapping int64 arithmetic: exact and order-free.

    A contiguous tensor is read as 64-bit words (two float32 per word: about 1.7x faster than
    widening each int32); any other as integers of its element width. Either way a change of one
    element changes one word by a nonzero amount below 2^64, so the sum changes.
    """
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_contiguous() and (t.numel() * t.element_size()) % 8 == 0 and t.numel() > 0:
        return t.reshape(-1).view(torch.int64).sum()
    return t.view(_INT_OF_WIDTH[t.element_size()]).sum(dtype=torch.int64)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for item in items:
        size = _batch_size(item)
        if size is not None:
            return size
    return None


class DifferentialPrivacy(pl.Callback):
    """Train with DP-SGD (Opacus): per-sample clipping, Gaussian noise, Poisson sampling, accounting.

    Add it to the trainer and train as usual; the callback makes the training differentially
    private and refuses to run when it cannot (see the module docstring for what it changes and
    verifies). The privacy unit is one training example: one row of the dataset, i.e. one
    sequence for causal LMs. The guarantee is (epsilon, delta)-DP under add/remove-one adjacency
    for the *final and every intermediate* model, given that the noise and sampling randomness
    stays secret: by default both are drawn from generators seeded from the OS entropy source at
    every fit (never from the global seed, never saved in checkpoints); ``secure_mode=True`` uses
    a cryptographically secure generator instead; ``reproducible_noise=True`` (tests only) seeds
    them from the global seed, which voids the guarantee against anyone who knows the seed.

    **Non-private starts** are refused: resuming a checkpoint without DP state, or one that was
    trained for more steps than its DP history records, raises unless
    ``allow_nonprivate_start=True``; then the non-private steps are counted
    (:attr:`nonprivate_steps`, logged as ``dp/nonprivate_steps``) and every report of epsilon says
    that it covers only the steps after the private start. Weights trained before ``fit`` without
    a checkpoint (e.g. ``load_from_checkpoint`` or ``load_state_dict`` of a non-private model)
    cannot be detected: starting from private (or public) weights is the user's responsibility.

    **Loss.** Opacus' ``loss_reduction="mean"`` requires the loss of a batch to be the *mean of
    per-sample losses* (e.g. ``F.cross_entropy(logits, y)`` for classification). Hugging Face
    causal LMs called with ``labels=`` instead average over all tokens of the batch, which makes
    each sequence's gradient depend on the others' token counts; the callback therefore replaces
    their ``loss_function`` during training by a per-sequence mean
    (:func:`~antimemo.dp.hf.per_sequence_causal_lm_loss`), see :mod:`antimemo.dp.hf`.

    **Noise.** Either ``noise_multiplier`` (sigma; ``0`` means clipping only, epsilon ``inf``)
    or ``target_epsilon``: then sigma is Opacus' ``get_noise_multiplier(target_epsilon, delta,
    q, steps)`` for ``steps = epochs * int(1/q)`` (``epochs`` defaults to ``max_epochs``, capped
    by ``max_steps``), and training stops (``trainer.should_stop``) before a step would push
    epsilon past ``target_epsilon``.

    **Logged:** ``dp/epsilon`` (at ``delta``) and ``dp/nonprivate_steps`` (steps before the private
    start that epsilon does not cover; 0 normally) at every epoch end and, after training, in
    ``trainer.callback_metrics``; :attr:`epsilon` gives the current value, :attr:`noise_multiplier`
    the sigma in use, :attr:`sample_rate` q, :attr:`delta` the delta, and :meth:`guarantee` the
    whole guarantee (what ``report.json`` stores).

    **Weights change only through the DP step.** Stepping the optimizer ``configure_optimizers``
    returned other than through the DP optimizer, any other change of a parameter between DP
    steps (a second optimizer, ``p.data`` writes), and a parameter that becomes trainable after
    fit start all raise, naming the parameter or optimizer and the fix.

    Args:
        noise_multiplier: Gaussian noise std as a multiple of ``max_grad_norm`` (>= 0).
        target_epsilon: privacy budget (> 0) instead of ``noise_multiplier``.
        delta: delta of the guarantee; default ``1 / (10 N)`` for ``N`` training examples. Must
            be ``< 1/N`` (a larger delta allows releasing a whole record).
        max_grad_norm: per-sample clipping norm ``C`` (> 0).
        epochs: number of epochs the ``target_epsilon`` noise is computed for (default: the
            trainer's ``max_epochs``). Only with ``target_epsilon``.
        accountant: ``"prv"`` (default, tightest), ``"rdp"`` or ``"gdp"`` (Opacus accountants).
        poisson_sampling: must be ``True``: the accountants assume Poisson sampling, and fixed-size
            shuffled batches make their epsilon an underestimate.
        grad_sample_mode: ``"hooks"`` (default: Opacus' per-layer grad samplers, functorch for
            layers without one), ``"bookkeeping"`` (the same clipping from one backward pass:
            ghost norms and the clipped sum from each layer's kept input and output gradient,
            :mod:`antimemo.dp.bookkeeping`; the fastest route measured), ``"functorch"``
            (functorch for every layer), ``"ghost"`` (ghost clipping: per-sample gradient *norms*
            only, two backward passes, much less memory; needs Hugging Face causal LMs whose loss
            comes from ``labels=``, see the docs) or ``"auto"`` (at fit start,
            :func:`~antimemo.dp.routes.choose_route`: ``"bookkeeping"`` where it is valid, else
            ``"hooks"``, or ``"ghost"`` where hooks' per-sample gradients would not fit in memory;
            the choice is logged and stored in :attr:`route` and :meth:`guarantee`).
        secure_mode: use a cryptographically secure RNG (``torchcsprng``) for noise and sampling.
        fix: replace layers Opacus does not support (BatchNorm, LSTM, MultiheadAttention) by
            their DP-compatible equivalents (``opacus.validators.ModuleValidator.fix``), in place,
            before the optimizer is built; otherwise such layers raise an error naming them.
        allow_nonprivate_start: accept a start from weights trained without DP that the callback
            can see (a resumed checkpoint without DP state or with more steps than DP steps). The
            non-private steps are recorded and reported; epsilon covers only the later steps.
        reproducible_noise: seed the noise and the Poisson sampling from the global seed
            (``seed_everything``), so that two runs are bit-identical. For tests and debugging
            only: anyone who knows the seed can regenerate the noise and subtract it (a warning
            says so). Default ``False``: both are seeded from the OS entropy source at every fit.

    Example:
        >>> import lightning.pytorch as pl
        >>> from antimemo.callbacks.dp import DifferentialPrivacy
        >>> dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0)
        >>> trainer = pl.Trainer(callbacks=[dp], max_epochs=3)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> trainer.callback_metrics["dp/epsilon"]  # doctest: +SKIP
        >>> DifferentialPrivacy(target_epsilon=8.0, accountant="rdp").accountant
        'rdp'
    """

    declaration = declare("loss", "grads", "sampler", "optimizer", note="per-sequence reduction, Poisson sampling (order 1000), DP optimizer")

    def __init__(
        self,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
        max_grad_norm: float = 1.0,
        epochs: int | None = None,
        accountant: str = "prv",
        poisson_sampling: bool = True,
        grad_sample_mode: str = "hooks",
        secure_mode: bool = False,
        fix: bool = False,
        allow_nonprivate_start: bool = False,
        reproducible_noise: bool = False,
    ) -> None:
        super().__init__()
        check_dp_arguments(
            noise_multiplier, target_epsilon, delta, max_grad_norm, epochs, accountant, poisson_sampling,
            grad_sample_mode, secure_mode, fix, allow_nonprivate_start, reproducible_noise,
        )
        opacus = _import_opacus()
        if secure_mode:
            try:
                import torchcsprng  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "secure_mode=True needs torchcsprng (a cryptographically secure RNG), which is not installed; "
                    "install it (https://github.com/pytorch/csprng) or use secure_mode=False for experiments"
                ) from err
        from opacus.accountants import create_accountant

        self.noise_multiplier_arg = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.delta_arg = None if delta is None else float(delta)
        self.max_grad_norm = float(max_grad_norm)
        self.epochs = epochs
        self.accountant = accountant
        self.poisson_sampling = poisson_sampling
        self.grad_sample_mode = grad_sample_mode
        #: the per-sample-gradient route in use: grad_sample_mode, or what "auto" chose at fit start
        self.route: str | None = None if grad_sample_mode == "auto" else grad_sample_mode
        #: why "auto" chose :attr:`route` (None for an explicit grad_sample_mode)
        self.route_reason: str | None = None
        self.secure_mode = secure_mode
        self.fix = fix
        self.allow_nonprivate_start = allow_nonprivate_start
        self.reproducible_noise = reproducible_noise
        self.opacus_version = opacus.__version__
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="GDP accounting is experimental")
            self._accountant = create_accountant(mechanism=accountant)
        if noise_multiplier == 0:
            warnings.warn(
                "DifferentialPrivacy(noise_multiplier=0) clips per-sample gradients but adds no noise: "
                "there is no privacy guarantee (epsilon is logged as inf)",
                UserWarning,
                stacklevel=2,
            )
        if reproducible_noise:
            warnings.warn(
                "DifferentialPrivacy(reproducible_noise=True) draws the Gaussian noise and the Poisson sampling from "
                "streams seeded by the global seed (seed_everything): anyone who knows or guesses the seed can "
                "regenerate the noise, subtract it from the released weights and see which examples were in each "
                "batch, so the reported epsilon is no guarantee against them. Use it for tests and debugging only; "
                "keep reproducible_noise=False (noise seeded from the OS entropy source) for real training",
                UserWarning,
                stacklevel=2,
            )
        # run state
        self.noise_multiplier: float | None = self.noise_multiplier_arg
        self.delta: float | None = self.delta_arg
        self.sample_rate: float | None = None
        self.dataset_size: int | None = None
        self.world_size = 1
        self.rank = 0
        self.fixed_layers: list[str] = []
        self.stopped_by_budget = False
        #: steps the model was trained without DP before the private start (allow_nonprivate_start=True)
        self.nonprivate_steps = 0
        #: True when training started from weights the callback knows were trained without DP
        self.nonprivate_start = False
        self._seed = 0
        self._ckpt_seen = False
        self._ckpt_global_step: int | None = None
        self._state_loaded = False
        self._trainable_at_start: set[int] = set()
        self._watched: list[Tensor] = []  # trainable at fit start: checked before and after every DP step
        self._fingerprint: tuple[tuple[int, ...], Tensor] | None = None
        self._frozen: list[Tensor] = []  # frozen at fit start: no step may change them, checked once per batch
        self._frozen_fingerprint: tuple[tuple[int, ...], Tensor] | None = None
        self._dp_step_ready = False
        self._opt_handles: list[Any] = []
        self._steps_before_batch = 0
        self._batch_size: int | None = None
        self._budget_ok_until: int | None = None
        self._checked_sum = False
        self._warned_loss = False
        self._restored_noise: float | None = None
        self._hooks: Any = None
        self._dp_optimizer: Any = None
        self._original_optimizer: Any = None
        self._seams: list[Any] = []
        self._placeholder = False
        self._seam_handles: list[Any] = []
        self._pos_handles: list[Any] = []
        self._loader_handle: Any = None
        self._grad_handle: Any = None
        self._grad_seam: Any = None
        self._ddp_model: Any = None
        self._patched_backward = False
        self._pl_module: pl.LightningModule | None = None
        self._eps_cache: tuple[Any, float] | None = None

    # ------------------------------------------------------------------ accounting
    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history ``[(noise_multiplier, sample_rate, steps)]`` (Opacus' format)."""
        return [tuple(e) for e in self._accountant.history]  # type: ignore[misc]

    @property
    def steps(self) -> int:
        """Number of DP steps taken (accounted), resumes included."""
        return int(sum(e[2] for e in self._accountant.history))

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta` (0.0 before any step; ``inf`` without noise).

        Example:
            >>> DifferentialPrivacy(noise_multiplier=1.0).epsilon
            0.0
        """
        history = self.history
        if not history:
            return 0.0
        if self.delta is None:
            raise RuntimeError("delta is not known yet: it is set when the training data is known (fit start)")
        key = (tuple(history), self.delta)
        if self._eps_cache is None or self._eps_cache[0] != key:
            self._eps_cache = (key, compute_epsilon(history, self.delta, self.accountant))
        return self._eps_cache[1]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the trainer configuration and the model; route the train loader through Poisson sampling."""
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        check_composition(trainer)
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"DifferentialPrivacy does not support Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}): "
                "Lightning accumulates over separately sampled batches and scales the loss by 1/k, which breaks both "
                "Poisson sampling and per-sample clipping. Set accumulate_grad_batches=1 and raise the batch size "
                "instead (grad_sample_mode='ghost' needs much less memory per sample)"
            )
        if trainer.gradient_clip_val not in (None, 0, 0.0):
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the batch gradient, which the DP "
                "optimizer then replaces (a silent no-op); DP-SGD clips each sample's gradient at "
                "DifferentialPrivacy(max_grad_norm=...). Remove gradient_clip_val"
            )
        precision = str(trainer.precision)
        if precision not in _SUPPORTED_PRECISIONS:
            raise ValueError(
                f"DifferentialPrivacy does not support Trainer(precision={precision!r}): fp16 training scales the loss "
                "with a GradScaler that unscales p.grad but not the per-sample gradients Opacus clips. Use "
                "precision='32-true' or 'bf16-mixed'"
            )
        strategy = trainer.strategy
        strategy_ok = type(strategy) is SingleDeviceStrategy or (
            isinstance(strategy, DDPStrategy) and type(strategy).__name__ != "DeepSpeedStrategy"
        )
        if not strategy_ok:
            raise ValueError(
                f"DifferentialPrivacy supports single-device training and DDP, got strategy {type(strategy).__name__}; "
                "use Trainer(strategy='auto' | 'ddp' | 'ddp_spawn')"
            )
        self.world_size = int(trainer.world_size)
        self.rank = int(trainer.global_rank)
        # the Poisson sampling's seed: the global seed only with reproducible_noise=True; otherwise a fresh secret
        # from the OS entropy source at every fit (knowing which examples were in a batch would void the privacy
        # amplification by subsampling the accountant relies on). Never saved in checkpoints.
        seed = int(torch.initial_seed()) % (1 << 63) if self.reproducible_noise else secrets.randbits(63)
        self._seed = int(strategy.broadcast(seed, src=0))
        self._ckpt_seen, self._ckpt_global_step, self._state_loaded = False, None, False
        self.fixed_layers = validate_model(pl_module, self.fix) or self.fixed_layers
        register_grad_samplers()
        if self._loader_handle is not None:
            self._loader_handle.remove()
        self._loader_handle = loader_seam(trainer).register(self, 1000, self._poisson_loader)
        if self._grad_handle is not None:
            self._grad_handle.remove()
        self._grad_seam = grad_seam(trainer)
        self._grad_handle = self._grad_seam.claim(self)

    def _poisson_loader(self, loader: Any) -> DataLoader:
        """The train-loader chain's last transform: Poisson sampling over the (kept) examples."""
        kept = None
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DedupSampler):
            kept = sampler.kept_indices()
            if kept is None:  # refused at setup; reached only if the policy changed since
                raise ValueError(
                    "DifferentialPrivacy cannot Poisson-sample DedupSampling(policy='downweight'); use policy='drop' "
                    "or 'cap'"
                )
        generator = None
        if self.secure_mode:
            import torchcsprng as csprng

            generator = csprng.create_random_device_generator("/dev/urandom")
        new, q, n = poisson_loader(
            loader,
            world_size=self.world_size,
            rank=self.rank,
            seed=self._seed,
            start_draw=self.steps,
            generator=generator,
            kept_indices=kept,
        )
        delta_default = 1.0 / (10 * n)
        if self.delta_arg is not None and self.delta_arg >= 1.0 / n:
            raise ValueError(
                f"delta={self.delta_arg:g} must be below 1/N = 1/{n} = {1.0 / n:.3g} for N={n} training examples (with "
                f"delta >= 1/N a mechanism may publish one whole record); e.g. delta=None for 1/(10 N) = {delta_default:.3g}"
            )
        if self.sample_rate is not None and self.sample_rate != q:
            rank_zero_warn(
                f"DifferentialPrivacy: the sample rate changed from {self.sample_rate:.6g} to {q:.6g} (the train "
                "loader was rebuilt with another size); the accountant records the new rate from now on"
            )
        self.sample_rate = q
        self.dataset_size = n
        self.delta = self.delta_arg if self.delta_arg is not None else delta_default
        if self._dp_optimizer is not None:
            self._dp_optimizer.expected_batch_size = q * n / self.world_size
        return new

    # ------------------------------------------------------------------ train start
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the per-sample hooks, swap in the DP optimizer, verify the Poisson loader."""
        if self.sample_rate is None or trainer.train_dataloader is None:
            raise RuntimeError(
                "DifferentialPrivacy: the train loader did not go through the Poisson-sampling wrapper (no train "
                "loader was built by fit_loop.setup_data); refusing to train without DP"
            )
        self._check_loader(trainer)
        self._check_private_start(trainer)
        self._pl_module = pl_module
        # Opacus' backward hooks on the first layer (an embedding, whose input ids need no gradient)
        # make torch warn at every step; the per-sample gradients are still checked every step.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")
        opacus = _import_opacus()  # noqa: F841
        from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
        from opacus.optimizers import DPOptimizer, get_optimizer_class
        from opacus.utils.module_utils import trainable_parameters

        self.fixed_layers = validate_model(pl_module, self.fix) or self.fixed_layers
        if self._hooks is None:
            self._resolve_route(trainer, pl_module)
            if self.route == "bookkeeping":
                self._hooks = BookKeeping(pl_module).attach()
            elif self.route == "ghost":
                check_no_tied_ghost(pl_module)
                self._hooks = GradSampleHooksFastGradientClipping(
                    pl_module,
                    batch_first=True,
                    loss_reduction="mean",
                    strict=True,
                    max_grad_norm=self.max_grad_norm,
                    use_ghost_clipping=True,
                )
            else:
                self._hooks = GradSampleHooks(
                    pl_module,
                    batch_first=True,
                    loss_reduction="mean",
                    strict=True,
                    force_functorch=self.route == "functorch",
                )
                self._hooks.forbid_grad_accumulation()

        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"DifferentialPrivacy supports exactly one optimizer, configure_optimizers returned {len(optimizers)}; "
                "return one optimizer over all trainable parameters (each Poisson batch must give one DP step)"
            )
        original = optimizers[0]
        if isinstance(original, DPOptimizer):
            original = original.original_optimizer
        trainable = {id(p) for _, p in trainable_parameters(pl_module)}
        for group in original.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in trainable:
                    raise ValueError(
                        f"the optimizer configure_optimizers returned holds a trainable parameter of shape "
                        f"{tuple(p.shape)} that is not part of the LightningModule; DifferentialPrivacy can only "
                        "compute per-sample gradients of the module's parameters. Register it on the module (e.g. as "
                        "an nn.Parameter attribute) or freeze it (requires_grad=False)"
                    )
        self.noise_multiplier = self._resolve_noise(trainer)
        distributed = self.world_size > 1
        if self.route == "bookkeeping":
            cls = bookkeeping_optimizer_class(distributed)
        else:
            cls = get_optimizer_class(clipping="flat", distributed=distributed, grad_sample_mode=self.route)
        generator = None
        if self.secure_mode:
            import torchcsprng as csprng

            generator = csprng.create_random_device_generator("/dev/urandom")
        else:
            generator = torch.Generator(device=pl_module.device)
            if not self.reproducible_noise:
                # a fresh secret per fit, from the OS entropy source: the global seed cannot regenerate the noise.
                # Never saved (state_dict holds none of it); reproducible_noise=True reseeds per step instead.
                generator.manual_seed(secrets.randbits(63))
        self._noise_generator = generator
        assert self.dataset_size is not None
        dp_opt = cls(
            original,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.sample_rate * self.dataset_size / self.world_size,
            loss_reduction="mean",
            generator=generator,
            secure_mode=self.secure_mode,
        )
        if self.route == "bookkeeping":
            dp_opt.bookkeeping = self._hooks
        dp_opt.attach_step_hook(self._after_noise)
        self._original_optimizer = original
        self._dp_optimizer = dp_opt
        trainer.strategy.optimizers = [dp_opt]
        # the optimizer configure_optimizers returned may only be stepped by the DP optimizer (a user may keep a
        # reference to it, e.g. self.raw, and step it with the raw gradient): refuse before any weight changes
        for handle in self._opt_handles:
            handle.remove()
        self._dp_step_ready = False
        self._opt_handles = [
            original.register_step_pre_hook(self._before_original_step),
            original.register_step_post_hook(self._after_original_step),
        ]
        self._trainable_at_start = set(trainable)
        self._watched = [p for p in pl_module.parameters() if id(p) in trainable]
        self._frozen = [p for p in pl_module.parameters() if id(p) not in trainable]
        self._frozen_fingerprint = self._take_fingerprint(self._frozen)

        from torch.nn.parallel import DistributedDataParallel

        if isinstance(trainer.strategy.model, DistributedDataParallel):
            # DistributedDPOptimizer all-reduces the clipped, noised gradient itself; DDP's own all-reduce of the
            # unclipped gradient would be wasted work (and would make p.grad differ from the local per-sample sum).
            self._ddp_model = trainer.strategy.model
            self._ddp_model.require_backward_grad_sync = False

        for handle in self._seam_handles:
            handle.remove()
        self._seams = [loss_seam(lm) for lm in find_causal_lms(pl_module)]
        self._seam_handles = [seam.set_reduction(self, self._reduce) for seam in self._seams]
        self._pos_handles = install_batched_position_ids(pl_module)
        if self.route == "ghost":
            self._patch_backward(pl_module)
        self._checked_sum = False
        if self.target_epsilon is not None:
            self._budget_ok_until = None
            planned = self._planned_steps(trainer)
            if not self._budget_allows(trainer, self.steps + 1, guess=max(1, planned - self.steps)):
                self._stop(trainer)
        self._fingerprint = self._take_fingerprint()
        rank_zero_info(
            f"DifferentialPrivacy: noise_multiplier={self.noise_multiplier:.4g}, max_grad_norm={self.max_grad_norm:g}, "
            f"sample_rate={self.sample_rate:.4g} (expected batch {self.sample_rate * self.dataset_size:.1f} of "
            f"{self.dataset_size} examples, {int(1 / self.sample_rate)} steps/epoch), delta={self.delta:.3g}, "
            f"accountant={self.accountant}, grad_sample_mode={self.route}"
            f"{' (auto)' if self.grad_sample_mode == 'auto' else ''}, world_size={self.world_size}, "
            f"noise={self._noise_source()}{self._coverage_note()}"
        )

    def _resolve_route(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``grad_sample_mode="auto"``: bookkeeping where valid, else hooks, or ghost where hooks'
        per-sample gradients would not fit; log it."""
        if self.grad_sample_mode != "auto":
            self.route = self.grad_sample_mode
            return
        from antimemo.lm.module import CausalLMModule

        # CausalLMModule's own training_step returns the LM's labels= loss unchanged (ghost's requirement)
        known_loss = isinstance(pl_module, CausalLMModule) and (
            type(pl_module).training_step is CausalLMModule.training_step
        )
        blocker = ghost_blocker(pl_module, known_loss)
        assert self.sample_rate is not None and self.dataset_size is not None
        expected_batch = self.sample_rate * self.dataset_size / self.world_size
        choice = choose_route(pl_module, blocker, expected_batch, available_memory(pl_module.device))
        self.route, self.route_reason = choice.route, choice.reason
        rank_zero_info(f"DifferentialPrivacy: grad_sample_mode='auto' chose '{choice.route}': {choice.reason}")

    # ------------------------------------------------------------------ non-private starts
    def _check_private_start(self, trainer: pl.Trainer) -> None:
        """Refuse (or, with ``allow_nonprivate_start``, record) a start from visibly non-private training."""
        global_step = int(trainer.global_step)
        ckpt = trainer.ckpt_path
        resumed = self._ckpt_seen or ckpt is not None
        where = f"the checkpoint {str(ckpt)!r}" if ckpt is not None else "the loaded checkpoint"
        previous = self.nonprivate_steps
        if resumed and not self._state_loaded:
            new = max(global_step, self._ckpt_global_step or 0)
            total = new
            situation = (
                f"resuming from {where}, which holds no DifferentialPrivacy state (it was written by a run without "
                f"DP, or saved without callback states): its weights come from {new} training steps without DP"
            )
        else:
            new = global_step - self.steps - previous
            if new <= 0 and previous == 0:
                return
            total = previous + max(new, 0)
            if new > 0:
                situation = (
                    f"the model has taken {global_step} training steps but the DP history records only {self.steps} "
                    f"private steps{f' and {previous} earlier non-private ones' if previous else ''}: {new} steps were "
                    "taken without DP (e.g. a checkpoint of a run that trained without DP first, or a trainer that "
                    "trained without this callback before)"
                )
            else:
                situation = (
                    f"{where if resumed else 'this callback'} records {previous} non-private training steps before its "
                    "private start (the run that wrote it used allow_nonprivate_start=True)"
                )
        if not self.allow_nonprivate_start:
            raise RuntimeError(
                f"DifferentialPrivacy refuses a non-private start: {situation}. An epsilon computed from the DP steps "
                f"alone would not cover those {total} non-private steps. Fix: train with DifferentialPrivacy from the "
                "first step (resume only checkpoints written by a DP run, or fit without ckpt_path from untrained or "
                "public weights), or pass DifferentialPrivacy(allow_nonprivate_start=True) to accept that the "
                "guarantee covers only the steps after the private start (dp/nonprivate_steps and the report then "
                "say so)"
            )
        self.nonprivate_steps = total
        self.nonprivate_start = True
        self._eps_cache = None
        rank_zero_warn(
            f"DifferentialPrivacy(allow_nonprivate_start=True): {situation}. The reported epsilon covers only the "
            f"DP steps after the private start, not the {total} non-private steps before it: the model as a whole "
            "has no DP guarantee for its training data"
        )

    def _coverage_note(self) -> str:
        if not self.nonprivate_start:
            return ""
        return (
            f" (the guarantee covers only the steps after the private start: {self.nonprivate_steps} earlier steps "
            "were not private)"
        )

    def _noise_source(self) -> str:
        if self.secure_mode:
            return "secure (torchcsprng)"
        if self.reproducible_noise:
            return "REPRODUCIBLE from the global seed (reproducible_noise=True)"
        return "secret (seeded from the OS entropy source)"

    # ------------------------------------------------------------------ parameter changes outside the DP step
    def _take_fingerprint(self, params: list[Tensor] | None = None) -> tuple[tuple[int, ...], Tensor] | None:
        """Version counters and a bit-exact checksum of every parameter: one read of the weights.

        The version counters see every in-place update except writes to ``p.data`` and fused
        optimizers. The checksum sees those: the sum, in wrapping int64 arithmetic, of each
        parameter's elements read as integers of their width (float32 as int32, bf16 as int16...).
        Integer addition is exact and order-free, so any change of one element (a single ulp, a
        sign flip) changes it; only changes whose bit-pattern differences cancel exactly go
        unseen. It replaced float64 L2 and L1 norms (two reads and a float64 copy of every weight,
        which missed sign flips): the profile in docs/benchmarks.md "DP-SGD routes" showed them at
        about 18% of a DP step of the 7M model.
        """
        params = self._watched if params is None else params
        if not params:
            return None
        versions = tuple(int(p._version) for p in params)
        with torch.no_grad():
            sums = [_bit_checksum(p.detach()) for p in params]
        return versions, torch.stack([s.to(sums[0].device) for s in sums])

    def _check_fingerprint(self, when: str, frozen: bool = False) -> None:
        """Refuse if a parameter changed since the last DP step (``frozen``: since fit start).

        Trainable parameters are compared before each DP step and at batch end with the
        fingerprint taken after the previous step. Frozen ones (e.g. a LoRA base model: 97% of the
        weights of the 7M LoRA benchmark) cannot be changed by any DP step, so they are compared
        once per batch, at its end, with the fingerprint of fit start: a write to one is refused
        at the end of the batch it happens in, before any checkpoint callback runs.
        """
        params = self._frozen if frozen else self._watched
        before = self._frozen_fingerprint if frozen else self._fingerprint
        if before is None:
            return
        now = self._take_fingerprint(params)
        assert now is not None
        same_values = before[1] == now[1]
        if before[0] == now[0] and bool(same_values.all()):
            return
        changed = [
            self._param_name(p) for i, p in enumerate(params) if before[0][i] != now[0][i] or not bool(same_values[i])
        ]
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise RuntimeError(
            f"DifferentialPrivacy: parameter(s) {shown} changed {when} without going through the DP optimizer's step "
            "(e.g. a second optimizer over the model's parameters, such as self.raw = torch.optim.SGD(...), was "
            "stepped, or p.data was written): such an update uses a non-private gradient, so no epsilon can be "
            "reported. Refusing. Fix: update the weights only through the optimizer Lightning gives you "
            "(self.optimizers() in manual optimization, which is the DP optimizer) and keep no other optimizer or "
            "reference to the original one"
        )

    def _before_original_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Step pre-hook of the optimizer configure_optimizers returned: only the DP optimizer may step it."""
        if not self._dp_step_ready:
            raise RuntimeError(
                f"DifferentialPrivacy: the optimizer configure_optimizers returned ({type(optimizer).__name__}) was "
                "stepped directly, not through the DP optimizer: that step would apply the raw, unclipped, noise-free "
                "gradient. Refusing (the weights were not changed). Fix: step the optimizer Lightning gives you "
                "(self.optimizers() in manual optimization, which is the DP optimizer) and keep no reference to the "
                "original optimizer (e.g. self.raw = ...)"
            )
        self._dp_step_ready = False

    def _after_original_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._fingerprint = self._take_fingerprint()

    def _check_loader(self, trainer: pl.Trainer) -> None:
        loader = trainer.train_dataloader
        bs = getattr(loader, "batch_sampler", None)
        if not (
            isinstance(loader, DataLoader)
            and isinstance(bs, PoissonBatchSampler)
            and bs.sample_rate == self.sample_rate
            and bs.world_size == self.world_size
            and bs.rank == self.rank
            and isinstance(loader.collate_fn, EmptySafeCollate)
        ):
            raise RuntimeError(
                "DifferentialPrivacy: trainer.train_dataloader is not the Poisson-sampling loader it built "
                f"(got {type(loader).__name__} with batch sampler {type(bs).__name__}); refusing to train without "
                "Poisson sampling at the accounted rate"
            )

    def _planned_steps(self, trainer: pl.Trainer) -> int:
        steps_per_epoch = int(1 / self.sample_rate)  # type: ignore[operator]
        epochs = self.epochs if self.epochs is not None else trainer.max_epochs
        planned = None
        if epochs is not None and epochs > 0:
            planned = epochs * steps_per_epoch
        if trainer.max_steps is not None and trainer.max_steps > 0:
            planned = trainer.max_steps if planned is None else min(planned, trainer.max_steps)
        if planned is None:
            raise ValueError(
                "target_epsilon needs the planned length of training to set the noise: pass "
                "DifferentialPrivacy(epochs=...) or Trainer(max_epochs=...) / Trainer(max_steps=...)"
            )
        return planned

    def _resolve_noise(self, trainer: pl.Trainer) -> float:
        if self.noise_multiplier_arg is not None:
            return self.noise_multiplier_arg
        if self._restored_noise is not None:
            return self._restored_noise
        if self.noise_multiplier is not None and self.history:
            return self.noise_multiplier
        planned = self._planned_steps(trainer)
        assert self.target_epsilon is not None and self.delta is not None
        sigma = noise_multiplier_for(self.target_epsilon, self.delta, self.sample_rate, planned, self.accountant)
        rank_zero_info(
            f"DifferentialPrivacy: noise_multiplier={sigma:.4g} reaches epsilon<={self.target_epsilon:g} at "
            f"delta={self.delta:.3g} after {planned} steps"
        )
        return sigma

    def _budget_allows(self, trainer: pl.Trainer, total_steps: int, guess: int | None = None) -> bool:
        """True if ``total_steps`` accounted steps keep epsilon <= target_epsilon."""
        if self.target_epsilon is None:
            return True
        if self._budget_ok_until is not None and total_steps <= self._budget_ok_until:
            return True
        assert self.noise_multiplier is not None and self.sample_rate is not None and self.delta is not None
        if guess is None:
            guess = max(1, total_steps - self.steps)
        k = steps_within_budget(
            self.target_epsilon,
            self.delta,
            self.noise_multiplier,
            self.sample_rate,
            self.accountant,
            history=self.history,
            guess=guess,
        )
        self._budget_ok_until = self.steps + k
        return total_steps <= self._budget_ok_until

    def _stop(self, trainer: pl.Trainer) -> None:
        if not self.stopped_by_budget:
            rank_zero_info(
                f"DifferentialPrivacy: stopping training after {self.steps} steps: one more step would push epsilon "
                f"past target_epsilon={self.target_epsilon:g} at delta={self.delta:.3g} "
                f"(epsilon now {self.epsilon:.4g}){self._coverage_note()}"
            )
            rank_zero_warn(
                f"DifferentialPrivacy stopped training: the privacy budget target_epsilon={self.target_epsilon:g} "
                f"allows no further step (epsilon {self.epsilon:.4g} after {self.steps} steps){self._coverage_note()}"
            )
        self.stopped_by_budget = True
        trainer.should_stop = True

    def _after_noise(self, optimizer: Any) -> None:
        """Opacus' step hook, after clipping, noise and scaling: account the step, then add the
        data-independent gradient terms (e.g. SpectralNormPenalty's) to the private gradient."""
        self._account_step(optimizer)
        if self._grad_seam is not None:
            self._grad_seam.flush()
        self._dp_step_ready = True

    def _account_step(self, optimizer: Any) -> None:
        assert self.sample_rate is not None
        self._accountant.step(
            noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate * optimizer.accumulated_iterations
        )

    def _patch_backward(self, pl_module: pl.LightningModule) -> None:
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        def ghost_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            called = [seam for seam in self._seams if seam.calls > 0]
            if len(called) != 1 or called[0].calls != 1 or called[0].last_per_sequence is None:
                raise RuntimeError(
                    "grad_sample_mode='ghost' needs the per-sequence losses of the batch, which the callback takes "
                    "from exactly one Hugging Face causal LM called once with labels= in training_step "
                    f"(found {sum(seam.calls for seam in self._seams)} such calls); use grad_sample_mode='hooks' "
                    "for other models"
                )
            fn = called[0]
            assert fn.last_loss is not None and fn.last_per_sequence is not None
            if not torch.allclose(loss.detach().float(), fn.last_loss.detach().float(), rtol=1e-5, atol=1e-7):
                raise RuntimeError(
                    f"grad_sample_mode='ghost': training_step returned a loss ({float(loss):.6g}) that is not the "
                    f"model's per-sequence loss ({float(fn.last_loss):.6g}); ghost clipping back-propagates the "
                    "per-sequence losses themselves, so return the Hugging Face loss unchanged or use "
                    "grad_sample_mode='hooks'"
                )
            DPTensorFastGradientClipping(self._hooks, self._dp_optimizer, fn.last_per_sequence, "mean").backward()

        pl_module.backward = ghost_backward  # type: ignore[method-assign]
        self._patched_backward = True

    # ------------------------------------------------------------------ per step
    def _reduce(self, seq: Any) -> tuple[Tensor, Tensor]:
        """The loss chain's reduction under DP: the per-sequence mean; a placeholder row (an empty
        Poisson batch, see :meth:`on_train_batch_start`) contributes exactly zero."""
        loss, per = per_sequence_reduction(seq)
        if self._placeholder:
            per = per * 0.0
            loss = per.sum()
        return loss, per

    def _fill_empty_batch(self, batch: Any) -> bool:
        """Poisson sampling can draw an empty batch, on which Hugging Face causal LMs cannot run a
        forward (``view(0, ..., -1, ...)`` is ambiguous). For those models the empty dict batch gets
        one placeholder row (token 0, attention on, labels -100) whose loss the DP reduction sets to
        exactly 0: its per-sample gradient is zero, so the step is noise only, as DP-SGD prescribes
        for an empty draw. Other batches are left as they are."""
        if not self._seams or not isinstance(batch, MutableMapping):
            return False
        for key, value in list(batch.items()):
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == 0:
                if key == "labels":
                    batch[key] = torch.full((1, *value.shape[1:]), -100, dtype=value.dtype, device=value.device)
                elif key == "attention_mask":
                    batch[key] = torch.ones((1, *value.shape[1:]), dtype=value.dtype, device=value.device)
                else:
                    batch[key] = torch.zeros((1, *value.shape[1:]), dtype=value.dtype, device=value.device)
        return True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Record the batch size and the step count before this batch (an empty Poisson batch gets a
        zero-loss placeholder row for Hugging Face causal LMs)."""
        self._batch_size = _batch_size(batch)
        if self._batch_size is None:
            raise TypeError(
                f"DifferentialPrivacy could not find a batched tensor in the training batch ({type(batch).__name__}); "
                "batches must hold tensors whose first dimension is the batch"
            )
        self._placeholder = self._batch_size == 0 and self._fill_empty_batch(batch)
        if self._placeholder:
            self._batch_size = 1
        self._steps_before_batch = self.steps
        if isinstance(self._hooks, BookKeeping):
            self._hooks.clear()  # only this batch's backward pass may feed its DP step
        for seam in self._seams:
            seam.open((trainer.global_step, batch_idx))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Verify that the step about to happen is a DP step on per-sample gradients of this batch."""
        if optimizer is not self._dp_optimizer:
            raise RuntimeError(
                f"DifferentialPrivacy: Lightning is about to step {type(optimizer).__name__}, not the DP optimizer; "
                "refusing to train without DP"
            )
        if self._pl_module is not None:
            for name, p in self._pl_module.named_parameters():
                if p.requires_grad and id(p) not in self._trainable_at_start:
                    raise RuntimeError(
                        f"DifferentialPrivacy: parameter {name} became trainable after DP started (it was frozen, or "
                        "did not exist, at fit start); per-sample gradients are computed only for parameters trainable "
                        "at fit start, so its gradient could not be clipped per example. Unfreeze it before fit, or "
                        "restart the fit (e.g. from a checkpoint) after unfreezing"
                    )
        self._check_fingerprint("since the last DP step")
        b = self._batch_size
        ghost = self.route == "ghost"
        params = self._dp_optimizer.params
        if not params:
            raise RuntimeError("DifferentialPrivacy: the optimizer has no trainable parameters")
        # BookKeeping checks its captures itself when the DP optimizer asks it for the clipped sums
        for p in params if self.route != "bookkeeping" else ():  # a name is looked up only for an error
            if ghost:
                ns = getattr(p, "_norm_sample", None)
                if ns is None or ns.shape[0] != b:
                    raise RuntimeError(
                        f"DifferentialPrivacy: parameter {self._param_name(p)} has no per-sample gradient norm for the "
                        f"{b} samples of this batch (got {None if ns is None else tuple(ns.shape)}); the forward pass did not run "
                        "through the hooked modules"
                    )
                continue
            gs = getattr(p, "grad_sample", None)
            if not isinstance(gs, Tensor) or gs.shape[0] != b or gs.shape[1:] != p.shape:
                got = type(gs).__name__ if not isinstance(gs, Tensor) else tuple(gs.shape)
                raise RuntimeError(
                    f"DifferentialPrivacy: parameter {self._param_name(p)} has no per-sample gradient of shape ({b}, "
                    f"{', '.join(map(str, p.shape))}) for this batch (got {got}). Either training_step returned no "
                    "loss, the forward pass bypassed the LightningModule's submodules, or a module broadcasts over "
                    "the batch (e.g. position ids of shape [1, S])"
                )
        if self.route in ("hooks", "functorch") and not self._checked_sum and b:
            self._check_per_sample_sum(trainer, params, b)
            self._checked_sum = True
        if self._seams and not self._warned_loss and not any(seam.calls for seam in self._seams):
            self._warned_loss = True
            rank_zero_warn(
                "DifferentialPrivacy: the LightningModule holds a Hugging Face causal LM but its training loss did not "
                "come from the model's labels= loss (which the callback makes per-sequence). Make sure your loss is "
                "the mean over the batch of per-sequence losses; a token mean over the whole batch couples sequences"
            )
        if not self._budget_allows(trainer, self.steps + 1):
            raise RuntimeError(
                f"DifferentialPrivacy: this step would push epsilon past target_epsilon={self.target_epsilon:g} "
                f"(after {self.steps} steps); training should have stopped (Trainer min_epochs/min_steps override "
                "trainer.should_stop: lower them)"
            )
        if self.reproducible_noise:
            self._noise_generator.manual_seed(mix_seed(self._seed, _NOISE_STREAM, self.rank, self.steps))

    def _param_name(self, p: Tensor) -> str:
        if self._pl_module is not None:
            for n, q in self._pl_module.named_parameters():
                if q is p:
                    return n
        return f"<{tuple(p.shape)}>"

    def _check_per_sample_sum(self, trainer: pl.Trainer, params: list[Tensor], b: int) -> None:
        loose = "bf16" in str(trainer.precision)
        rtol, atol = (5e-2, 1e-3) if loose else (1e-3, 1e-6)
        for p in params:
            if p.grad is None:
                raise RuntimeError(f"DifferentialPrivacy: parameter {self._param_name(p)} got no gradient")
            mean = p.grad_sample.to(p.grad.dtype).sum(0) / b
            err = float((mean - p.grad).abs().max())
            scale = float(p.grad.abs().max())
            if err > atol + rtol * scale:
                raise RuntimeError(
                    f"DifferentialPrivacy: the per-sample gradients of {self._param_name(p)} do not add up to its batch "
                    f"gradient (max error {err:.3g} at scale {scale:.3g}): a layer's per-sample gradient rule does not "
                    "fit how the model uses it (e.g. an input that is not batch-first, or a module reused with "
                    "different inputs)"
                )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Verify that exactly one DP step was accounted; stop when the budget allows no further step."""
        for seam in self._seams:
            seam.close()
        self._check_fingerprint("after this batch's DP step")
        self._check_fingerprint("during this batch (it was frozen at fit start, so no DP step may change it)", frozen=True)
        self._dp_step_ready = False
        taken = self.steps - self._steps_before_batch
        if taken != 1:
            raise RuntimeError(
                f"DifferentialPrivacy: {taken} DP steps were accounted for this batch instead of 1; each Poisson batch "
                "must give exactly one DP optimizer step"
            )
        if self.target_epsilon is not None and not self._budget_allows(trainer, self.steps + 1):
            self._stop(trainer)

    # ------------------------------------------------------------------ logging / end
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``dp/epsilon`` at the configured delta."""
        # identical on every rank (each rank's accountant records the same steps); sync_dist averages equal values
        pl_module.log("dp/epsilon", float(self.epsilon), on_step=False, on_epoch=True, sync_dist=self.world_size > 1)
        # epsilon is never logged alone: the steps it does not cover are logged with it
        pl_module.log(
            "dp/nonprivate_steps", float(self.nonprivate_steps), on_step=False, on_epoch=True, sync_dist=self.world_size > 1
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Store the final ``dp/epsilon`` and ``dp/nonprivate_steps`` in ``trainer.callback_metrics``."""
        trainer.callback_metrics["dp/epsilon"] = torch.tensor(float(self.epsilon))
        trainer.callback_metrics["dp/nonprivate_steps"] = torch.tensor(float(self.nonprivate_steps))
        if self.nonprivate_start:
            rank_zero_warn(
                f"DifferentialPrivacy: epsilon={self.epsilon:.4g} at delta={self.delta:.3g} covers only the "
                f"{self.steps} DP steps after the private start; the {self.nonprivate_steps} steps before it were not "
                "private (allow_nonprivate_start=True)"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks and patches and give the strategy its original optimizer back."""
        if stage != "fit":
            return
        if self._hooks is not None:
            if isinstance(self._hooks, BookKeeping):
                self._hooks.detach()
            else:
                self._hooks.cleanup()
            self._hooks = None
        for h in self._pos_handles:
            h.remove()
        self._pos_handles = []
        for handle in self._seam_handles:
            handle.remove()
        self._seam_handles, self._seams = [], []
        if self._patched_backward:
            vars(pl_module).pop("backward", None)
            self._patched_backward = False
        if self._ddp_model is not None:
            self._ddp_model.require_backward_grad_sync = True
            self._ddp_model = None
        if self._original_optimizer is not None and trainer.strategy.optimizers and (
            trainer.strategy.optimizers[0] is self._dp_optimizer
        ):
            trainer.strategy.optimizers = [self._original_optimizer]
        if self._dp_optimizer is not None:
            for p in self._dp_optimizer.params:
                for attr in ("summed_grad", "grad_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
        self._dp_optimizer = None
        self._original_optimizer = None
        for handle in self._opt_handles:
            handle.remove()
        self._opt_handles = []
        self._dp_step_ready = False
        self._fingerprint = self._frozen_fingerprint = None
        self._watched, self._frozen = [], []
        for attr in ("_loader_handle", "_grad_handle"):
            handle = getattr(self, attr)
            if handle is not None:
                handle.remove()
                setattr(self, attr, None)
        self._grad_seam = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The accountant history and the privacy parameters (plain Python values).

        Example:
            >>> DifferentialPrivacy(noise_multiplier=1.0).state_dict()["accountant"]
            {'history': [], 'mechanism': 'prv'}
        """
        return {
            "accountant": {"history": [list(e) for e in self.history], "mechanism": self._accountant.mechanism()},
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "nonprivate_steps": self.nonprivate_steps,
            "nonprivate_start": self.nonprivate_start,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the accountant history, so epsilon continues from the checkpoint (never from zero).

        Raises:
            ValueError: if the checkpoint used another accountant.
        """
        acc = state_dict.get("accountant")
        if not isinstance(acc, Mapping) or "history" not in acc or "mechanism" not in acc:
            raise ValueError(f"not a DifferentialPrivacy state: {sorted(state_dict)}")
        if acc["mechanism"] != self._accountant.mechanism():
            raise ValueError(
                f"the checkpoint's privacy history was accounted with accountant={acc['mechanism']!r} but this "
                f"DifferentialPrivacy uses accountant={self.accountant!r}; resume with accountant={acc['mechanism']!r}"
            )
        self._accountant.history = [(float(s), float(q), int(k)) for s, q, k in acc["history"]]
        if state_dict.get("max_grad_norm") not in (None, self.max_grad_norm):
            rank_zero_warn(
                f"DifferentialPrivacy: resuming with max_grad_norm={self.max_grad_norm:g}, the checkpoint used "
                f"{state_dict['max_grad_norm']:g} (the accounting is unaffected)"
            )
        if self.target_epsilon is not None and state_dict.get("noise_multiplier") is not None:
            self._restored_noise = float(state_dict["noise_multiplier"])
        self.nonprivate_steps = int(state_dict.get("nonprivate_steps", 0) or 0)
        self.nonprivate_start = bool(state_dict.get("nonprivate_start", False)) or self.nonprivate_steps > 0
        self._state_loaded = True
        self._eps_cache = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Note that a checkpoint is being resumed (its DP state, if any, arrives through :meth:`load_state_dict`)."""
        self._ckpt_seen = True
        step = checkpoint.get("global_step")
        self._ckpt_global_step = int(step) if isinstance(step, int) else None

    # ------------------------------------------------------------------ the guarantee
    def guarantee(self) -> dict[str, Any]:
        """The privacy guarantee of the training so far, as plain values (what ``report.json`` stores).

        Keys: ``epsilon``, ``delta``, ``accountant``, ``private_steps``, ``noise_multiplier``,
        ``max_grad_norm``, ``sample_rate``, ``dataset_size``, ``unit``, ``noise`` (``"secret"``,
        ``"secure"`` or ``"reproducible"``), ``reproducible_noise``, ``nonprivate_start``,
        ``nonprivate_steps``, ``grad_sample_mode`` (the route in use; what ``"auto"`` chose after
        fit start), ``grad_sample_mode_reason`` (why ``"auto"`` chose it) and ``statement`` (one
        sentence that never gives epsilon without what it covers).

        Example:
            >>> g = DifferentialPrivacy(noise_multiplier=1.0).guarantee()
            >>> g["epsilon"], g["private_steps"], g["nonprivate_steps"], g["noise"]
            (0.0, 0, 0, 'secret')
        """
        try:
            epsilon: float | None = float(self.epsilon)
        except RuntimeError:  # history restored but delta not known yet
            epsilon = None
        noise = "secure" if self.secure_mode else "reproducible" if self.reproducible_noise else "secret"
        steps = self.steps
        if epsilon is None or self.delta is None:
            statement = f"{steps} DP steps; epsilon not known yet (delta is set when the training data is known)"
        elif math.isinf(epsilon):
            statement = (
                f"no privacy guarantee: epsilon=inf (noise_multiplier={self.noise_multiplier}, clipping only) "
                f"over {steps} steps"
            )
        else:
            statement = (
                f"({epsilon:.4g}, {self.delta:.3g})-DP for one training example (add/remove one), {self.accountant} "
                f"accountant, {steps} private steps at noise_multiplier={self.noise_multiplier:.4g}, "
                f"max_grad_norm={self.max_grad_norm:g}, sample_rate={self.sample_rate if self.sample_rate is None else f'{self.sample_rate:.4g}'}; "
                "for the final and every intermediate model, given that the noise and sampling stay secret"
            )
        if self.nonprivate_start:
            statement += (
                f". It covers ONLY the {steps} steps after the private start: the model was trained for "
                f"{self.nonprivate_steps} non-private steps before (allow_nonprivate_start=True), which no epsilon covers"
            )
        if self.reproducible_noise:
            statement += (
                ". WARNING: the noise and sampling were seeded from the global seed (reproducible_noise=True): "
                "anyone who knows the seed can remove the noise, so there is no guarantee against them"
            )
        return {
            "epsilon": epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "private_steps": steps,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "dataset_size": self.dataset_size,
            "unit": "one training example (add/remove-one adjacency)",
            "noise": noise,
            "reproducible_noise": self.reproducible_noise,
            "nonprivate_start": self.nonprivate_start,
            "nonprivate_steps": self.nonprivate_steps,
            "grad_sample_mode": self.route if self.route is not None else self.grad_sample_mode,
            "grad_sample_mode_reason": self.route_reason,
            "statement": statement,
        }
