"""Conditioning mitigations against replication: Gaussian noise on the conditioning embedding and
random label replacement (Somepalli et al., NeurIPS 2023, "Understanding and Mitigating Copying
in Diffusion Models": GN and RC; their code's defaults are noted in ``docs/diffusion.md``).

Both act only on training batches, between ``on_train_batch_start`` and ``on_train_batch_end``:
validation, sampling and the monitor's generations see the model unchanged. Neither consumes the
global RNG: every draw comes from a private generator seeded with
``(seed, epoch, batch_idx, global_rank)``, so runs, ranks and resumed runs are reproducible and
the callbacks keep no state.

- :class:`ConditioningNoise` (GN): a forward hook on the conditioning module (for
  :class:`~antimemo.diffusion.DiffusionModule`, diffusers' ``unet.class_embedding``; for a
  text-conditional model, e.g. the text encoder) adds ``std * N(0, I)`` to its output,
  ``e' = e + std * eps`` (their ``--rand_noise_lam``).
- :class:`LabelRandomization` (RC for class labels): with probability ``p`` each training label
  ``batch[label_key][i]`` is replaced, in place, by a label drawn uniformly from
  ``{0, ..., num_classes - 1}`` (so it may draw the same label; the expected fraction of changed
  labels is ``p * (1 - 1 / num_classes)``). The rewritten labels are tracked
  (:func:`~antimemo.callbacks._seams.track_use`): if no torch operation of the training step
  read them (a ``training_step`` that conditions on another key), ``on_before_backward`` raises
  instead of training silently without the mitigation.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from antimemo.callbacks._fit_handle import FitHandle
from antimemo.callbacks._lm_loss_hook import resolve_module
from antimemo.callbacks._interactions import check_composition, declare
from antimemo.callbacks._seams import track_use, was_used

__all__ = ["ConditioningNoise", "LabelRandomization", "batch_generator"]

_CONDITIONING_HINT = (
    "Set module_name to the module whose output is the conditioning embedding, e.g. "
    "'unet.class_embedding' or 'text_encoder'"
)


def batch_generator(seed: int, epoch: int, batch_idx: int, rank: int, salt: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, batch_idx, rank, salt)`` (splitmix-style mix).

    Example:
        >>> torch.rand(1, generator=batch_generator(0, 1, 2, 0, 7)) == torch.rand(1, generator=batch_generator(0, 1, 2, 0, 7))
        tensor([True])
    """
    x = 0
    for v in (seed, epoch, batch_idx, rank, salt):
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF)


class ConditioningNoise(FitHandle):
    """Add Gaussian noise to the conditioning embedding during training (Somepalli et al.'s GN).

    A forward hook on ``pl_module.<module_name>`` returns ``output + std * eps`` with
    ``eps ~ N(0, I)`` of the output's shape (for a tuple/``BaseModelOutput`` output, its first
    tensor, e.g. a text encoder's hidden states). The hook acts only inside a training batch
    (``on_train_batch_start`` to ``on_train_batch_end``) with gradients enabled.

    Args:
        std: noise standard deviation (the strength knob; 0 is plain training, bit for bit).
            Somepalli et al.'s code takes ``lambda`` in ``[0, 1]`` for CLIP text embeddings; a
            class embedding of ``DiffusionModule`` has entries of size about 1 at
            initialisation, so ``std`` around 0.5-2 is a strong perturbation there.
        module_name: dotted path of the conditioning module in the LightningModule.
        seed: seed of the noise (private generator per batch and rank).

    Example:
        >>> cb = ConditioningNoise(std=1.0)
        >>> trainer = pl.Trainer(callbacks=[cb])  # doctest: +SKIP
    """

    declaration = declare("model", domain="diffusion")

    def __init__(self, std: float = 1.0, module_name: str = "unet.class_embedding", seed: int = 0) -> None:
        super().__init__()
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0 or std != std:
            raise ValueError(f"std must be a number >= 0, got {std!r}; 0 turns the noise off, e.g. std=1.0")
        if not isinstance(module_name, str) or not module_name:
            raise ValueError(f"module_name must be a dotted attribute path, got {module_name!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.std, self.module_name, self.seed = float(std), module_name, seed
        self._handle: Any = None
        self._generator: torch.Generator | None = None
        self.calls = 0  # hooked forwards that received noise (for inspection)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register the hook (fit only)."""
        if stage != "fit":
            return
        check_composition(trainer)
        target = getattr(pl_module, "unet", None)
        if self.module_name == "unet.class_embedding" and target is not None and getattr(target, "class_embedding", None) is None:
            raise ValueError(
                "ConditioningNoise needs a conditional model: pl_module.unet.class_embedding is None (an unconditional "
                "UNet2DModel); build DiffusionModule(num_classes=...) or set module_name"
            )
        module = resolve_module(pl_module, self.module_name, type(self).__name__, hint=_CONDITIONING_HINT)
        self._remove_handle()
        self._handle = module.register_forward_hook(self._hook)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Activate the hook for this training batch."""
        self._generator = batch_generator(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank, 1)
        self._calls_before = self.calls

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Deactivate the hook; raise if the hooked module never ran in this training step."""
        self._generator = None
        if self.std > 0 and self.calls == getattr(self, "_calls_before", self.calls):
            raise RuntimeError(
                f"ConditioningNoise: pl_module.{self.module_name} (module_name) did not run with gradients on during "
                "this training step, so no noise reached the conditioning and the mitigation had no effect. Make "
                "training_step call the model through that module, or pass module_name=... naming the conditioning "
                "module your model uses"
            )

    def _noise(self, x: Tensor) -> Tensor:
        assert self._generator is not None
        eps = torch.randn(x.shape, generator=self._generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        return x + self.std * eps

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._generator is None or self.std == 0.0 or not torch.is_grad_enabled():
            return None
        self.calls += 1
        if isinstance(output, Tensor):
            return self._noise(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (self._noise(output[0]), *output[1:])
        if hasattr(output, "last_hidden_state"):
            output.last_hidden_state = self._noise(output.last_hidden_state)
            return output
        raise TypeError(
            f"ConditioningNoise cannot add noise to an output of type {type(output).__name__} from {self.module_name!r}; "
            "hook a module that returns a tensor"
        )


class LabelRandomization(Callback):
    """Replace training class labels at random (Somepalli et al.'s random caption replacement, for labels).

    In ``on_train_batch_start`` each label of ``batch[label_key]`` is, with probability ``p``,
    replaced in place by a uniform draw from ``{0, ..., num_classes - 1}``. Validation batches
    are never touched. The new ``batch[label_key]`` records whether a torch operation read it;
    if the training step never did (e.g. ``training_step`` conditions the model on another key),
    ``on_before_backward`` raises a ``RuntimeError``: the mitigation would have had no effect.

    Args:
        p: replacement probability (the strength knob; 0 is plain training). Somepalli et al.'s
            code default is 0.1.
        num_classes: number of classes; ``None``: ``pl_module.num_classes``.
        label_key: key of the labels in dict batches.
        seed: seed of the draws (private generator per batch and rank).

    Attributes:
        replaced: labels changed so far (for inspection).

    Raises:
        RuntimeError: in ``on_before_backward``, when the training step did not read the
            rewritten ``batch[label_key]``.

    Example:
        >>> cb = LabelRandomization(p=0.1)
        >>> trainer = pl.Trainer(callbacks=[cb])  # doctest: +SKIP
    """

    declaration = declare("labels", domain="diffusion")

    def __init__(self, p: float = 0.1, num_classes: int | None = None, label_key: str = "label", seed: int = 0) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}; e.g. p=0.1")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2 or None (read from the module), got {num_classes!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.p, self.num_classes, self.label_key, self.seed = float(p), num_classes, label_key, seed
        self.replaced = 0
        self._expected: Tensor | None = None  # this batch's rewritten labels, until the backward

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Read ``num_classes`` from the module when not given."""
        if stage == "fit":
            check_composition(trainer)
        if stage == "fit" and self.num_classes is None:
            n = getattr(pl_module, "num_classes", None)
            if not isinstance(n, int) or n < 2:
                raise ValueError(
                    f"LabelRandomization needs num_classes: the module's num_classes is {n!r}; pass "
                    "LabelRandomization(num_classes=...) or use a class-conditional module"
                )
            self._num_classes = n
        else:
            self._num_classes = self.num_classes

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Replace labels of this training batch in place."""
        if self.p == 0.0:
            return
        if not isinstance(batch, dict) or self.label_key not in batch:
            raise KeyError(
                f"LabelRandomization needs dict batches with the labels under label_key={self.label_key!r}, got "
                f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}"
            )
        labels = batch[self.label_key]
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point:
            raise TypeError(f"batch[{self.label_key!r}] must be an integer tensor of class labels, got {type(labels).__name__}")
        n = getattr(self, "_num_classes", None) or self.num_classes
        if n is None:
            raise RuntimeError("LabelRandomization.setup did not run; pass the callback to the Trainer")
        g = batch_generator(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank, 2)
        flip = torch.rand(labels.shape, generator=g) < self.p
        new = torch.randint(0, n, labels.shape, generator=g)
        out = torch.where(flip, new, labels.detach().cpu()).to(device=labels.device, dtype=labels.dtype)
        self.replaced += int((out != labels).sum())
        batch[self.label_key] = self._expected = track_use(out)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Raise if no torch operation of this training step read the rewritten labels."""
        expected, self._expected = self._expected, None
        if expected is None or was_used(expected):
            return
        key = self.label_key
        raise RuntimeError(
            f"LabelRandomization rewrote batch[{key!r}], but training_step never read it (no torch operation used "
            f"batch[{key!r}]; e.g. the model was conditioned on another key), so the mitigation had no effect. Fix: "
            f"condition the model on the rewritten labels, e.g. self.unet(noisy, t, class_labels=batch[{key!r}]), "
            "or set LabelRandomization(label_key=...) to the key training_step reads"
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Forget the batch's labels (a step that returned no loss has nothing to check)."""
        self._expected = None
