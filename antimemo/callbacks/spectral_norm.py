"""``SpectralNormPenalty``: ``lambda/2 * sum sigma_max(W)`` over the Linear weights (TinyMem)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from antimemo._checks import check_seed
from antimemo.callbacks._lm_loss_hook import check_key, resolve_module
from antimemo.callbacks._seams import grad_seam
from antimemo.callbacks._interactions import check_composition, declare
from antimemo.functional.regularizers import (
    _check_lam,
    _check_n_power_iterations,
    init_power_iteration_vectors,
    power_iteration,
)

__all__ = ["SpectralNormPenalty", "spectral_norm_weights"]


def spectral_norm_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The matrices :class:`SpectralNormPenalty` penalizes, as ``(name, weight)`` pairs.

    Every trainable 2-D ``weight`` of an ``nn.Linear`` (or Hugging Face ``Conv1D``) module of
    ``model``, in ``named_modules`` order, except the output embedding
    (``model.get_output_embeddings()``, e.g. ``lm_head``) and any Linear whose weight is shared
    with an input embedding. Embeddings, norms and biases are never included (as in TinyMem,
    whose GPT-2 ``lm_head`` is tied to the skipped token embedding).

    Args:
        model: the model (e.g. a ``LlamaForCausalLM``).

    Returns:
        A list of ``(parameter name relative to model, parameter)``.

    Example:
        >>> import torch.nn as nn
        >>> [name for name, _ in spectral_norm_weights(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)))]
        ['0.weight']
    """
    skip: set[int] = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                emb = fn()
            except (NotImplementedError, AttributeError):  # pragma: no cover - models without embeddings
                emb = None
            weight = getattr(emb, "weight", None)
            if isinstance(weight, Tensor):
                skip.add(id(weight))
    out = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or not weight.requires_grad:
            continue
        if id(weight) in skip:
            continue
        out.append((f"{name}.weight" if name else "weight", weight))
    return out


class SpectralNormPenalty(pl.Callback):
    """Add the gradient of ``lam/2 * sum_k sigma_max(W_k)`` to the weights' gradients.

    The matrices ``W_k`` are :func:`spectral_norm_weights` of ``pl_module.<module_name>`` (all
    Linear weights except the output embedding; each attention projection is one matrix, see
    ``docs/regularizers.md``). ``sigma_max`` is tracked by power iteration with persistent
    vectors: once per optimizer step, in ``on_before_optimizer_step`` (after the backward pass(es)
    and gradient accumulation, after AMP unscaling, before gradient clipping and the optimizer
    step), the callback runs ``n_power_iterations`` steps ``v = normalize(W^T u)``,
    ``u = normalize(W v)`` and adds ``lam/2 * u v^T`` to ``W.grad`` -- the exact gradient of
    :func:`antimemo.functional.spectral_norm_penalty` (``lam/2 * sum_k u_k^T W_k v_k`` with
    ``u, v`` held constant, as TinyMem and ``torch.nn.utils.spectral_norm`` do). The optimizer
    therefore steps on the gradient of ``loss + penalty``, without touching the LightningModule's
    loss; the logged ``train_loss`` excludes the penalty.

    Weights whose ``.grad`` is None at that point (not used, or the step's loss was skipped) are
    not penalized. Under DDP the loss gradients are already averaged when the hook runs; every
    rank adds the same penalty gradient, because the vectors start from the same seed
    (:func:`antimemo.functional.init_power_iteration_vectors`) and are updated from the same
    weights. Sharded strategies (FSDP, DeepSpeed) are not supported.

    Under :class:`~antimemo.callbacks.DifferentialPrivacy` the DP optimizer replaces ``W.grad`` by
    the clipped, noised sum of per-sample gradients, so the term is handed to the gradient seam
    and added right after the noise (:mod:`antimemo.callbacks._seams`). It depends on the weights
    only, which are already private, so the privacy guarantee is unchanged and the penalty acts
    as it does without DP.

    ``lam=0`` adds nothing (plain training, bit for bit); the vectors are still updated, so
    ``spectral_norm/sigma_sum`` can be compared across runs. Logged each step:
    ``spectral_norm/sigma_sum`` (``sum_k sigma_k``) and ``spectral_norm/penalty``
    (``lam/2 * sigma_sum``). ``state_dict`` holds the vectors (``{"names": [...], "u": {name:
    float32 CPU tensor}, ...}``), so a resumed run continues the same iteration.

    Args:
        lam: strength ``lambda >= 0`` (TinyMem: 0.01; 0 disables).
        n_power_iterations: power-iteration steps per optimizer step (TinyMem: 1).
        seed: seed of the initial vectors (same on every rank).
        module_name: attribute path of the model in the LightningModule (``""`` = the
            LightningModule itself).

    Example:
        >>> import lightning.pytorch as pl
        >>> cb = SpectralNormPenalty(lam=0.01)
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=10)  # doctest: +SKIP
        >>> cb.lam
        0.01
    """

    declaration = declare("grads", note="a data-independent gradient term")

    def __init__(self, lam: float = 0.01, n_power_iterations: int = 1, seed: int = 0, module_name: str = "model") -> None:
        super().__init__()
        self.lam = _check_lam(lam)
        self.n_power_iterations = _check_n_power_iterations(n_power_iterations)
        self.seed = check_seed(seed)
        self.module_name = check_key("module_name", module_name)
        self.names: list[str] = []
        self.vectors: dict[str, Tensor] = {}
        self._params: dict[str, nn.Parameter] = {}
        self._pending: dict[str, Any] | None = None
        self._stats: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"SpectralNormPenalty(lam={self.lam}, n_power_iterations={self.n_power_iterations}, seed={self.seed}, "
            f"module_name={self.module_name!r})"
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Collect the matrices and initialise (or restore) the power-iteration vectors (fit only)."""
        if stage != "fit":
            return
        check_composition(trainer)
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ValueError(
                f"SpectralNormPenalty needs full (unsharded) weights and gradients, but the Trainer uses {strategy}; "
                "use strategy='ddp' (or a single device)"
            )
        model = resolve_module(pl_module, self.module_name, "SpectralNormPenalty")
        pairs = spectral_norm_weights(model)
        if not pairs:
            raise ValueError(
                f"SpectralNormPenalty found no trainable Linear weight in pl_module.{self.module_name or '<itself>'} "
                f"({type(model).__name__}); pass module_name=... naming the model to regularize"
            )
        self._params = dict(pairs)
        names = [name for name, _ in pairs]
        if self.names != names or not self.vectors:
            self.names = names
            us = init_power_iteration_vectors([p for _, p in pairs], self.seed)
            self.vectors = dict(zip(names, us))
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._restore(state)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Update the vectors and add ``lam/2 * u v^T`` to each penalized weight's gradient."""
        if not self._params:
            raise RuntimeError("SpectralNormPenalty.on_before_optimizer_step ran before setup(stage='fit')")
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if self.lam > 0 and scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise NotImplementedError(
                "SpectralNormPenalty with 16-mixed precision needs unscaled gradients in on_before_optimizer_step, "
                f"but {type(optimizer).__name__} unscales inside step() (e.g. fused=True); use fused=False or "
                "precision='bf16-mixed'"
            )
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        sigmas = []
        terms: list[tuple[Tensor, Tensor, Tensor]] = []
        for name in self.names:
            weight = self._params[name]
            if id(weight) not in in_optimizer:
                continue
            u, v = power_iteration(weight, self.vectors[name], self.n_power_iterations)
            self.vectors[name] = u
            with torch.no_grad():
                sigmas.append(torch.dot(u, torch.mv(weight.detach().float(), v)))
            terms.append((weight, u, v))
        if self.lam > 0 and not terms:
            raise RuntimeError(
                f"SpectralNormPenalty: none of the {len(self.names)} weights of pl_module.{self.module_name or '<itself>'} "
                f"(e.g. {self.names[0]}) is in the optimizer's param_groups, so the penalty would change nothing. "
                "Return an optimizer over those parameters from configure_optimizers, or pass module_name=... naming "
                "the model the optimizer trains"
            )
        if self.lam > 0 and terms:
            lam = self.lam

            def apply() -> None:
                with torch.no_grad():
                    for weight, u, v in terms:
                        if weight.grad is not None:
                            weight.grad += torch.outer(u * (lam / 2), v).to(weight.grad.dtype)

            # now, or (under DifferentialPrivacy) right after the DP optimizer has set the noised gradient
            grad_seam(trainer).add(self, apply)
        if sigmas:
            total = torch.stack(sigmas).sum()
            self._stats = {"sigma_sum": total, "penalty": total * (self.lam / 2)}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log ``spectral_norm/sigma_sum`` and ``spectral_norm/penalty`` of the last optimizer step."""
        for key, value in self._stats.items():
            pl_module.log(f"spectral_norm/{key}", value, on_step=True, on_epoch=True, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        """``{"lam", "n_power_iterations", "seed", "names", "u"}``; ``u`` maps names to float32 CPU vectors."""
        return {
            "lam": self.lam,
            "n_power_iterations": self.n_power_iterations,
            "seed": self.seed,
            "names": list(self.names),
            "u": {name: self.vectors[name].detach().cpu().clone() for name in self.names},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the power-iteration vectors (now, or at ``setup`` if the model is not known yet).

        Raises:
            ValueError: the checkpoint's matrices differ from this model's.
        """
        missing = [k for k in ("names", "u") if k not in state_dict]
        if missing:
            raise ValueError(f"SpectralNormPenalty checkpoint state lacks {missing}; it was not written by this callback")
        if not self._params:
            self._pending = state_dict
            return
        self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        names = list(state["names"])
        if names != self.names:
            raise ValueError(
                f"The checkpoint's SpectralNormPenalty tracked {len(names)} matrices ({names[:3]}...) but this model has "
                f"{len(self.names)} ({self.names[:3]}...); resume with the same model and module_name"
            )
        for name in names:
            u = state["u"][name]
            if u.shape != (self._params[name].shape[0],):
                raise ValueError(
                    f"The checkpoint's vector for {name} has shape {tuple(u.shape)}, expected "
                    f"({self._params[name].shape[0]},); resume with the same model"
                )
            device = self._params[name].device
            self.vectors[name] = u.to(device=device, dtype=torch.float32).clone()
