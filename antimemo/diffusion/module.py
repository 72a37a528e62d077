"""``DiffusionModule``: a diffusers ``UNet2DModel`` + ``DDPMScheduler`` as a LightningModule.

The model lives at ``self.unet``, the training noise schedule at ``self.scheduler``. A training
step is the standard DDPM epsilon-prediction step of diffusers' training scripts:
``x0`` in ``[-1, 1]``, ``t ~ U{0..T-1}``, ``noise ~ N(0, I)``, ``x_t = scheduler.add_noise(x0,
noise, t)``, ``loss = mean((unet(x_t, t, class_labels).sample - noise)^2)``.

**Extension point for regularizers.** Every training step builds a :class:`DiffusionStep`
(inputs, timesteps, the model output and the predicted clean image) and adds the value of each
registered loss term: ``handle = module.add_loss_term(name, fn)`` with
``fn(step) -> Tensor | None`` (a scalar added to the loss and logged as ``train/{name}``;
``None`` adds nothing); ``handle.remove()`` unregisters it.
:class:`~antimemo.callbacks.ReplicaPenalty` uses it. With no terms (or only ``None`` values)
the step is exactly the plain step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from antimemo._checks import check_int
from antimemo._extras import require

__all__ = ["DiffusionModule", "DiffusionStep", "LossTermHandle"]


@dataclass
class DiffusionStep:
    """One training step's tensors, given to the loss terms of :meth:`DiffusionModule.add_loss_term`.

    Attributes:
        x0: clean images in model scale ``[-1, 1]``, ``[B, C, H, W]``.
        noise: the Gaussian noise added (the epsilon target).
        timesteps: ``[B]`` integer timesteps.
        noisy: ``x_t``.
        model_output: the UNet's epsilon prediction (carries gradients).
        labels: class labels ``[B]`` or ``None`` (unconditional).
        alphas_cumprod: ``[B]`` ``alphabar_t`` of each sample.
        batch: the batch as given to ``training_step``.
    """

    x0: Tensor
    noise: Tensor
    timesteps: Tensor
    noisy: Tensor
    model_output: Tensor
    labels: Tensor | None
    alphas_cumprod: Tensor
    batch: Any = None

    @property
    def sigma(self) -> Tensor:
        """``[B]`` noise standard deviation ``sqrt(1 - alphabar_t)``."""
        return (1.0 - self.alphas_cumprod).sqrt()

    @property
    def pred_x0(self) -> Tensor:
        """Predicted clean image ``(x_t - sqrt(1 - alphabar) eps_hat) / sqrt(alphabar)`` (differentiable)."""
        a = self.alphas_cumprod.view(-1, *([1] * (self.noisy.dim() - 1))).to(self.model_output.dtype)
        return (self.noisy - (1.0 - a).sqrt() * self.model_output) / a.sqrt()


class LossTermHandle:
    """Returned by :meth:`DiffusionModule.add_loss_term`; ``remove()`` unregisters the term."""

    def __init__(self, terms: dict[str, Callable[[DiffusionStep], Tensor | None]], name: str) -> None:
        self._terms, self.name = terms, name

    def remove(self) -> None:
        """Unregister the term (idempotent)."""
        self._terms.pop(self.name, None)


class DiffusionModule(pl.LightningModule):
    """A small diffusers DDPM (``UNet2DModel`` + ``DDPMScheduler``), class-conditional or not.

    Class conditioning uses diffusers' own mechanism: ``num_class_embeds=num_classes`` gives the
    UNet an ``nn.Embedding`` (``unet.class_embedding``) whose output is added to the timestep
    embedding; the label comes from ``batch[label_key]``. ``num_classes=None`` is unconditional.

    Args:
        image_size: side of the (square) images.
        in_channels: image channels.
        num_classes: number of classes for class conditioning, or ``None`` (unconditional).
        block_out_channels: UNet widths per resolution (one ``DownBlock2D`` / ``UpBlock2D`` each).
        layers_per_block: ResNet layers per block.
        norm_num_groups: GroupNorm groups (must divide every width).
        num_train_timesteps: ``T`` of the DDPM schedule (linear betas from 1e-4 to 0.02).
        num_inference_steps: sampling steps of :meth:`sample` (``None``: ``T``; fewer uses
            diffusers' DDPM step skipping).
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        image_key: key of the images (``[B, C, H, W]`` in ``[0, 1]``) in dict batches.
        label_key: key of the class labels in dict batches.
        seed: seed of the weight initialisation (the global RNG is left as it was).

    Example:
        >>> m = DiffusionModule(image_size=8, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4,
        ...                     num_train_timesteps=10)
        >>> batch = {"image": torch.rand(2, 1, 8, 8), "label": torch.tensor([0, 2])}
        >>> float(m.training_step(batch, 0)) > 0
        True
        >>> m.sample(2, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        image_size: int = 16,
        in_channels: int = 1,
        num_classes: int | None = 10,
        block_out_channels: Sequence[int] = (16, 32),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        num_train_timesteps: int = 1000,
        num_inference_steps: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        image_key: str = "image",
        label_key: str = "label",
        seed: int = 0,
    ) -> None:
        super().__init__()
        diffusers = require("diffusers", "DiffusionModule")
        DDPMScheduler, UNet2DModel = diffusers.DDPMScheduler, diffusers.UNet2DModel

        check_int("image_size", image_size, 4, "e.g. image_size=16")
        check_int("in_channels", in_channels, 1, "1 for grey images, 3 for RGB")
        if num_classes is not None:
            check_int("num_classes", num_classes, 1, "or None for an unconditional model")
        channels = tuple(block_out_channels)
        if not channels or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"block_out_channels must be positive integers, got {block_out_channels!r}; e.g. (16, 32)")
        check_int("norm_num_groups", norm_num_groups, 1, "it must divide every block_out_channels entry")
        if any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"norm_num_groups={norm_num_groups} must divide every width in block_out_channels={channels}; "
                "e.g. norm_num_groups=8 with (16, 32)"
            )
        if image_size % (2 ** (len(channels) - 1)):
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(block_out_channels) - 1) = "
                f"{2 ** (len(channels) - 1)} (one downsampling per extra block)"
            )
        check_int("num_train_timesteps", num_train_timesteps, 2, "e.g. 1000")
        if num_inference_steps is not None:
            check_int("num_inference_steps", num_inference_steps, 1, "or None for num_train_timesteps")
            if num_inference_steps > num_train_timesteps:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} must be <= num_train_timesteps={num_train_timesteps}"
                )
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}; e.g. lr=1e-3")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.image_key, self.label_key = image_key, label_key
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.num_inference_steps = num_inference_steps
        n = len(channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet = UNet2DModel(
                sample_size=image_size,
                in_channels=in_channels,
                out_channels=in_channels,
                block_out_channels=channels,
                layers_per_block=layers_per_block,
                down_block_types=("DownBlock2D",) * n,
                up_block_types=("UpBlock2D",) * n,
                norm_num_groups=norm_num_groups,
                add_attention=False,
                num_class_embeds=num_classes,
            )
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
        self._loss_terms: dict[str, Callable[[DiffusionStep], Tensor | None]] = {}
        self.last_step: DiffusionStep | None = None

    # ----------------------------------------------------------------------------- loss terms
    def add_loss_term(self, name: str, fn: Callable[[DiffusionStep], Tensor | None]) -> LossTermHandle:
        """Register ``fn(step) -> scalar | None``, added to every training loss (see the module docstring).

        Example:
            >>> m = DiffusionModule(image_size=8, block_out_channels=(8,), norm_num_groups=4)
            >>> h = m.add_loss_term("zero", lambda step: step.model_output.sum() * 0)
            >>> h.remove()
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in self._loss_terms:
            raise ValueError(f"a loss term named {name!r} is already registered; remove it first or pick another name")
        if not callable(fn):
            raise TypeError(f"fn must be callable (step -> Tensor | None), got {type(fn).__name__}")
        self._loss_terms[name] = fn
        return LossTermHandle(self._loss_terms, name)

    # ---------------------------------------------------------------------------------- steps
    def _inputs(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, dict):
            images = batch[self.image_key]
            labels = batch.get(self.label_key)
        elif isinstance(batch, (tuple, list)):
            images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            images, labels = batch, None
        if self.num_classes is None:
            labels = None
        elif labels is None:
            raise ValueError(
                f"this DiffusionModule is class-conditional (num_classes={self.num_classes}) but the batch has no "
                f"labels under label_key={self.label_key!r}; add them or use num_classes=None"
            )
        return images * 2.0 - 1.0, labels

    def diffusion_step(
        self, batch: Any, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiffusionStep]:
        """The epsilon-prediction MSE of one batch and its :class:`DiffusionStep`.

        Args:
            batch: a dict with ``image_key`` (and ``label_key``), or ``(images, labels)``.
            generator: CPU generator of the noise and timesteps (``None``: the global RNG).
        """
        x0, labels = self._inputs(batch)
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        out = self.unet(noisy, t, class_labels=labels).sample
        a = self.scheduler.alphas_cumprod.to(x0.device)[t].to(x0.dtype)
        step = DiffusionStep(x0, noise, t, noisy, out, labels, a, batch)
        return torch.nn.functional.mse_loss(out, noise), step

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, step = self.diffusion_step(batch)
        self.last_step = step
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=step.x0.shape[0])
        for name, fn in list(self._loss_terms.items()):
            term = fn(step)
            if term is not None:
                loss = loss + term
                self.log(f"train/{name}", term.detach(), on_step=False, on_epoch=True, batch_size=step.x0.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # fixed noise and timesteps per batch: val_loss is comparable across epochs and runs
        g = torch.Generator().manual_seed(10_000 + batch_idx)
        loss, step = self.diffusion_step(batch, generator=g)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=step.x0.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        num: int,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        labels: Tensor | Sequence[int] | None = None,
        batch_size: int = 64,
        num_inference_steps: int | None = None,
    ) -> Tensor:
        """Generate ``num`` images in ``[0, 1]`` with DDPM ancestral sampling, in batches.

        Args:
            num: number of images.
            generator: one CPU ``torch.Generator`` for all draws, or a list of ``num`` generators
                (one per image: image ``i`` then depends only on ``generator[i]``, whatever the
                batching, which is what makes sharded sampling equal single-process sampling).
                ``None``: the global RNG.
            labels: class labels ``[num]`` for a conditional model (``None``: ``i % num_classes``);
                must be ``None`` for an unconditional one.
            batch_size: images per UNet forward.
            num_inference_steps: denoising steps (``None``: the module's setting).

        Returns:
            ``[num, C, H, W]`` float images in ``[0, 1]`` on the module's device. The UNet's
            train/eval mode is restored afterwards.
        """
        check_int("num", num, 0, "the number of images to generate")
        check_int("batch_size", batch_size, 1, "e.g. 64")
        gens: list[torch.Generator] | None = None
        if isinstance(generator, (list, tuple)):
            gens = list(generator)
            if len(gens) != num:
                raise ValueError(f"generator is a list of {len(gens)} generators but num={num}; pass one per image")
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("labels must be None for an unconditional DiffusionModule (num_classes=None)")
            lab = None
        else:
            lab = torch.arange(num) % self.num_classes if labels is None else torch.as_tensor(labels).long().cpu()
            if lab.shape != (num,):
                raise ValueError(f"labels must have shape [{num}], got {tuple(lab.shape)}")
            if num and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise ValueError(f"labels must be in [0, {self.num_classes}), got values {lab.min()}..{lab.max()}")
        from diffusers.utils.torch_utils import randn_tensor

        steps = num_inference_steps or self.num_inference_steps or self.scheduler.config.num_train_timesteps
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(steps)
        cfg = self.unet.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        device = next(self.unet.parameters()).device
        was = self.unet.training
        self.unet.eval()
        out = []
        try:
            for s in range(0, num, batch_size):
                e = min(num, s + batch_size)
                g = gens[s:e] if gens is not None else generator
                x = randn_tensor((e - s, *shape), generator=g, device=device)
                y = None if lab is None else lab[s:e].to(device)
                for t in scheduler.timesteps:
                    eps = self.unet(x, t, class_labels=y).sample
                    x = scheduler.step(eps, t, x, generator=g).prev_sample
                out.append(((x.clamp(-1, 1) + 1) / 2).float())
        finally:
            self.unet.train(was)
        if not out:
            return torch.zeros(0, *shape, device=device)
        return torch.cat(out)
