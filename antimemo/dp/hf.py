"""Hugging Face causal LMs under DP-SGD: per-sequence loss, GPT-2 fixes, extra grad samplers.

Three problems stand between a Hugging Face causal LM and correct per-sample clipping in Opacus:

1. **The loss couples the sequences of a batch.** With ``labels=`` the model returns the mean
   cross-entropy over *all supervised tokens of the batch*, ``sum_i sum_t l_it / T`` with
   ``T = sum_i T_i``. Opacus (``loss_reduction="mean"``) takes the batch loss to be the mean of
   per-sample losses and multiplies the backprops by the batch size ``B``, so sequence ``i``'s
   "per-sample gradient" becomes ``(B / T) * sum_t grad l_it``: it depends on the *other*
   sequences' token counts (padding, goldfish-dropped or prompt targets), and adding or removing
   one record rescales every other record's clipped gradient. :class:`PerSequenceLoss` replaces
   the model's ``loss_function`` by :func:`per_sequence_causal_lm_loss`: the loss of sequence
   ``i`` is the mean over *its own* supervised targets, ``L_i = sum_t l_it / T_i``, and the batch
   loss is ``mean_i L_i``. The privacy unit is then one sequence. When every sequence has the
   same number of targets the two losses are equal.
2. **GPT-2 position embeddings are broadcast.** ``GPT2Model`` builds ``position_ids`` of shape
   ``[1, S]`` and adds ``wpe(position_ids)`` to the ``[B, S, D]`` token embeddings. Opacus'
   embedding grad sampler then sees a batch of 1 for ``wpe`` and produces a ``[1, ...]``
   per-sample gradient next to ``[B, ...]`` ones, and clipping fails with
   ``RuntimeError: stack expects each tensor to be equal size, but got [B] at entry 0 and [1]
   at entry 1`` (the "stack size" error). :func:`install_batched_position_ids` passes explicit
   ``[B, S]`` position ids during training, as dp-transformers' collator does.
3. **HF ``Conv1D`` (GPT-2's linear layers, weight ``[in, out]``) has no Opacus grad sampler**, so
   Opacus falls back to functorch (``vmap``) for every attention and MLP projection.
   :func:`register_grad_samplers` registers an einsum sampler for it (as dp-transformers does),
   one for ``LlamaRMSNorm``, and makes the ``nn.Embedding`` sampler honour ``padding_idx``
   (PyTorch gives the padding row no gradient; Opacus' sampler did).

No Lightning import here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from antimemo.functional.regularizers import shifted_sequence_losses

__all__ = [
    "PerSequenceLoss",
    "find_causal_lms",
    "install_batched_position_ids",
    "per_sequence_causal_lm_loss",
    "register_grad_samplers",
]


def per_sequence_causal_lm_loss(
    logits: Tensor,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal-LM loss with one sequence as the unit: the mean over sequences of per-sequence means.

    ``labels`` follow the Hugging Face convention (aligned with the inputs; shifted here, and
    the last position gets no target). A sequence with no supervised target has loss 0 and
    still counts in the batch mean. An empty batch gives a loss of 0 that is still connected to
    ``logits`` (so ``backward()`` works).

    Args:
        logits: ``[B, S, V]``.
        labels: ``[B, S]`` token ids, ``ignore_index`` where there is no target.
        ignore_index: label value without a target.
        shift_labels: already shifted ``[B, S]`` targets (Hugging Face's ``shift_labels``); then
            ``labels`` is not used.

    Returns:
        ``(loss, per_sequence)``: the scalar batch loss ``per_sequence.mean()`` and the
        ``[B]`` per-sequence losses.

    Example:
        >>> logits = torch.zeros(2, 3, 4)
        >>> labels = torch.tensor([[0, 1, 2], [0, 1, -100]])
        >>> loss, per_seq = per_sequence_causal_lm_loss(logits, labels)
        >>> per_seq  # uniform logits: log(4) per target, whatever the number of targets
        tensor([1.3863, 1.3863])
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if shift_labels is None:
        if labels is None:
            raise ValueError("labels or shift_labels is required")
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:2])}")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    per_sequence, _ = shifted_sequence_losses(logits, shift_labels.to(logits.device), ignore_index)
    loss = per_sequence.mean() if logits.shape[0] > 0 else per_sequence.sum()
    return loss, per_sequence


class PerSequenceLoss:
    """A Hugging Face ``loss_function`` replacement that uses :func:`per_sequence_causal_lm_loss`.

    Installed on a model (``model.loss_function = PerSequenceLoss(model)``), it applies only when
    the model is in training mode with autograd on, i.e. in a training step; evaluation keeps
    the model's original loss (so ``val_loss`` is unchanged). It records the per-sequence
    losses of the last training call (``last_per_sequence``) and counts the training calls
    (``calls``), which :class:`~antimemo.callbacks.dp.DifferentialPrivacy` uses to verify that
    the training loss really went through it and, in ghost-clipping mode, to get the per-sample
    losses. ``num_items_in_batch`` (Hugging Face's cross-batch token normalisation) is ignored
    on purpose in training: it is exactly the cross-sample coupling this class removes.

    Args:
        model: the Hugging Face model whose ``loss_function`` is replaced.

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> model = transformers.LlamaForCausalLM(cfg)
        >>> model.loss_function = PerSequenceLoss(model)
        >>> out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, -100]]))
        >>> model.loss_function.calls, model.loss_function.last_per_sequence.shape
        (1, torch.Size([1]))
        >>> PerSequenceLoss.uninstall(model)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.original: Callable[..., Tensor] = model.loss_function
        self.had_own = "_loss_function" in vars(model)
        self.calls = 0
        self.last_per_sequence: Tensor | None = None
        self.last_loss: Tensor | None = None

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor | None = None,
        vocab_size: int | None = None,
        num_items_in_batch: Any = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if not (self.model.training and torch.is_grad_enabled()):
            return self.original(
                logits=logits,
                labels=labels,
                vocab_size=vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        loss, per_sequence = per_sequence_causal_lm_loss(logits, labels, ignore_index, shift_labels)
        self.calls += 1
        self.last_per_sequence = per_sequence
        self.last_loss = loss
        return loss

    def reset(self) -> None:
        """Forget the recorded losses (called at the start of every training batch)."""
        self.calls = 0
        self.last_per_sequence = None
        self.last_loss = None

    @staticmethod
    def uninstall(model: nn.Module) -> None:
        """Restore the model's own ``loss_function`` if a :class:`PerSequenceLoss` is installed."""
        fn = vars(model).get("_loss_function")
        if isinstance(fn, PerSequenceLoss):
            if fn.had_own:
                model._loss_function = fn.original
            else:
                del model._loss_function


def find_causal_lms(module: nn.Module) -> list[nn.Module]:
    """Hugging Face decoder-only generative models (``*ForCausalLM``, ``GPT2LMHeadModel``...) inside ``module``.

    A submodule counts when it is a ``transformers.PreTrainedModel`` and a ``GenerationMixin``
    whose config is not encoder-decoder. Nested matches (a causal LM inside another) are all
    returned.

    Example:
        >>> find_causal_lms(nn.Linear(2, 2))
        []
    """
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return []
    out = []
    for m in module.modules():
        if isinstance(m, PreTrainedModel) and isinstance(m, GenerationMixin):
            if not getattr(getattr(m, "config", None), "is_encoder_decoder", False):
                out.append(m)
    return out


def install_batched_position_ids(module: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Make learned-position-embedding models (GPT-2 family) receive ``[B, S]`` position ids.

    A forward pre-hook on every submodule with an ``nn.Embedding`` named ``wpe`` (``GPT2Model``,
    ``GPTNeoModel``...) fills ``position_ids = arange(S).expand(B, S)`` when the call passes none,
    the module is in training mode, autograd is on and no key/value cache is in use (generation
    and evaluation keep the model's own behaviour).

    Args:
        module: the module to search.

    Returns:
        The hook handles (``handle.remove()`` undoes it).

    Example:
        >>> install_batched_position_ids(nn.Linear(2, 2))
        []
    """

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("position_ids") is not None or not (mod.training and torch.is_grad_enabled()):
            return None
        if len(args) > 5:  # position_ids passed positionally (not how transformers calls it)
            return None
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x: cache=
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            return None
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None or ref.dim() < 2:
            return None
        b, s = ref.shape[0], ref.shape[1]
        kwargs["position_ids"] = torch.arange(s, device=ref.device).unsqueeze(0).expand(b, s)
        return args, kwargs

    handles = []
    for m in module.modules():
        if isinstance(getattr(m, "wpe", None), nn.Embedding):
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _conv1d_grad_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    # HF Conv1D: y = x @ W + b with W of shape [in, out]  =>  dW_n = sum_t x_nt^T g_nt
    x = activations[0]
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.einsum("n...i,n...j->nij", x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.einsum("n...j->nj", backprops)
    return ret


def _llama_rms_norm_grad_sample(
    layer: nn.Module, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    # LlamaRMSNorm: y = w * (x / rms(x)).to(dtype)  =>  dw_n = sum_t g_nt * normed_nt
    x = activations[0]
    ret = {}
    if layer.weight.requires_grad:
        xf = x.to(torch.float32)
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)).to(x.dtype)
        prod = normed * backprops
        ret[layer.weight] = prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1)
    return ret


_REGISTERED = False


def register_grad_samplers() -> None:
    """Register the HF ``Conv1D`` and ``LlamaRMSNorm`` grad samplers and a padding-aware embedding sampler.

    Idempotent. Opacus' registry is global (``GradSampleHooks.GRAD_SAMPLERS``), so this affects
    every Opacus user in the process. The embedding sampler is Opacus' own followed by zeroing
    the ``padding_idx`` row, which is what PyTorch's own gradient does.

    Example:
        >>> register_grad_samplers()
        >>> from opacus.grad_sample import GradSampleHooks
        >>> from transformers.pytorch_utils import Conv1D
        >>> Conv1D in GradSampleHooks.GRAD_SAMPLERS
        True
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from opacus.grad_sample import GradSampleHooks, register_grad_sampler
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    register_grad_sampler(Conv1D)(_conv1d_grad_sample)
    register_grad_sampler(LlamaRMSNorm)(_llama_rms_norm_grad_sample)

    opacus_embedding = GradSampleHooks.GRAD_SAMPLERS[nn.Embedding]

    def embedding_grad_sample(layer: nn.Embedding, activations: list[Tensor], backprops: Tensor) -> dict:
        ret = opacus_embedding(layer, activations, backprops)
        if layer.padding_idx is not None and layer.weight in ret:
            ret[layer.weight][:, layer.padding_idx] = 0
        return ret

    embedding_grad_sample.__wrapped__ = opacus_embedding  # type: ignore[attr-defined]
    register_grad_sampler(nn.Embedding)(embedding_grad_sample)
    _REGISTERED = True
