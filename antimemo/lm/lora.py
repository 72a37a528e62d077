"""LoRA adapters (PEFT) on the recipe's causal LM, for (DP) fine-tuning of a pretrained model.

``LoRACausalLMModule`` is :class:`~antimemo.lm.module.CausalLMModule` with two more arguments:

- ``base_checkpoint``: a Lightning ``.ckpt`` of a ``CausalLMModule`` run (the "pretraining"); its
  weights are loaded (``torch.load(weights_only=True)``: nothing is unpickled) before the adapters
  are added;
- ``lora``: ``{"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": [...]}``: LoRA adapters are
  injected into the Hugging Face model *in place* (``peft.inject_adapter_in_model``) and every
  other weight is frozen. ``None`` trains every weight (full fine-tuning).

The adapters are injected, not wrapped: ``self.model`` stays the Hugging Face ``LlamaForCausalLM``
(its ``q_proj`` ... become ``peft`` ``lora.Linear`` layers holding the frozen base ``nn.Linear`` and
two trainable ``nn.Linear`` adapters). So everything that finds or hooks the causal LM keeps
working unchanged: :class:`~antimemo.callbacks.MemorizationMonitor` generates with it, the loss
chain's forward hook (goldfish, loss floor, DP's per-sequence reduction) sits on it, and
:class:`~antimemo.callbacks.DifferentialPrivacy` attaches Opacus' per-sample hooks only to modules
with trainable parameters: per-sample gradients, clipping and noise cover the adapters alone, the
frozen base weights get neither (and the callback refuses a base weight that is unfrozen during
training). Checkpoints hold the base and adapter weights; resuming rebuilds the same adapters.

peft is an optional dependency: ``pip install 'antimemo[lora]'``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from antimemo._checks import is_int, is_number
from antimemo._extras import require
from antimemo.lm.module import CausalLMModule

__all__ = ["DEFAULT_TARGET_MODULES", "LoRACausalLMModule", "apply_lora", "check_lora", "load_base_weights"]

#: The Llama attention projections: LoRA's usual targets.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(DEFAULT_TARGET_MODULES)}


def check_lora(lora: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``lora=`` mapping and return it with defaults filled in.

    Keys (all optional): ``r`` (rank, int >= 1, default 8), ``alpha`` (scale numerator, > 0,
    default 16: the adapter output is scaled by ``alpha / r``), ``dropout`` (in ``[0, 1)``, default
    0.0), ``target_modules`` (names of ``nn.Linear`` layers to adapt, default the attention
    projections ``q_proj, k_proj, v_proj, o_proj``).

    Raises:
        ValueError: naming the key, the bad value and the fix.

    Example:
        >>> check_lora({"r": 4})["alpha"], check_lora({"r": 4})["target_modules"]
        (16, ['q_proj', 'k_proj', 'v_proj', 'o_proj'])
        >>> check_lora({"rank": 4})
        Traceback (most recent call last):
        ...
        ValueError: lora: unknown key 'rank'; the keys are r, alpha, dropout, target_modules (e.g. lora={'r': 8, 'alpha': 16})
    """
    if not isinstance(lora, Mapping):
        raise ValueError(
            f"lora must be a mapping such as {{'r': 8, 'alpha': 16}} (or None for full fine-tuning), got {lora!r}"
        )
    for key in lora:
        if key not in _LORA_DEFAULTS:
            raise ValueError(
                f"lora: unknown key {key!r}; the keys are {', '.join(_LORA_DEFAULTS)} (e.g. lora={{'r': 8, 'alpha': 16}})"
            )
    out = {**_LORA_DEFAULTS, **dict(lora)}
    r, alpha, dropout, targets = out["r"], out["alpha"], out["dropout"], out["target_modules"]
    if not is_int(r) or r < 1:
        raise ValueError(f"lora.r must be an integer >= 1 (the adapter rank), got {r!r}; e.g. r=8")
    if not is_number(alpha) or alpha <= 0:
        raise ValueError(f"lora.alpha must be a number > 0 (adapters are scaled by alpha / r), got {alpha!r}; e.g. alpha=16")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"lora.dropout must be a number in [0, 1), got {dropout!r}; 0.0 disables adapter dropout")
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise ValueError(
            f"lora.target_modules must be a non-empty list of layer names, got {targets!r}; "
            f"e.g. target_modules={list(DEFAULT_TARGET_MODULES)}"
        )
    for name in targets:
        if not isinstance(name, str) or not name:
            raise ValueError(f"lora.target_modules must hold layer names (strings), got {name!r} in {list(targets)}")
    out["r"], out["alpha"], out["dropout"], out["target_modules"] = int(r), alpha, float(dropout), list(targets)
    return out


def apply_lora(model: nn.Module, lora: Mapping[str, Any]) -> list[str]:
    """Inject LoRA adapters into ``model`` in place and freeze every other parameter.

    Args:
        model: a Hugging Face model (or any ``nn.Module``) without adapters.
        lora: see :func:`check_lora`.

    Returns:
        The names of the adapted layers.

    Raises:
        ValueError: a bad ``lora`` value, a target that names no ``nn.Linear`` of the model (the
            message lists the names there are), or a model that already has adapters.
        ImportError: peft is not installed (``pip install 'antimemo[lora]'``).

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> model = transformers.LlamaForCausalLM(cfg)
        >>> apply_lora(model, {"r": 2, "target_modules": ["q_proj", "v_proj"]})
        ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']
        >>> [n for n, p in model.named_parameters() if p.requires_grad][:2]
        ['model.layers.0.self_attn.q_proj.lora_A.default.weight', 'model.layers.0.self_attn.q_proj.lora_B.default.weight']
    """
    cfg = check_lora(lora)
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("apply_lora: the model already has LoRA adapters (parameters named lora_*); add them once")
    linear = sorted({name.rsplit(".", 1)[-1] for name, sub in model.named_modules() if isinstance(sub, nn.Linear)})
    missing = [t for t in cfg["target_modules"] if t not in linear]
    if missing:
        raise ValueError(
            f"lora.target_modules: {missing} name no nn.Linear layer of the model; its linear layers are {linear} "
            f"(e.g. target_modules={list(DEFAULT_TARGET_MODULES)})"
        )
    peft = require("peft", "LoRA fine-tuning (lora=...)")
    config = peft.LoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["alpha"],
        lora_dropout=cfg["dropout"],
        target_modules=cfg["target_modules"],
        bias="none",
    )
    peft.inject_adapter_in_model(config, model)
    adapted = []
    for name, sub in model.named_modules():
        if hasattr(sub, "lora_A") and hasattr(sub, "base_layer"):
            adapted.append(name)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return adapted


def load_base_weights(module: nn.Module, path: str | os.PathLike[str], argument: str = "base_checkpoint") -> int:
    """Load the ``model.*`` weights of a Lightning checkpoint of a ``CausalLMModule`` into ``module.model``.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain values only; nothing
    is unpickled). Returns the number of tensors loaded.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not a Lightning checkpoint, or its weights do not fit the model
            (other sizes); the message names the first differences and the fix.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{argument}: {str(path)!r} is not a file; pass the .ckpt a CausalLMModule fit wrote "
            "(e.g. runs/.../checkpoints/epoch=9-step=1280.ckpt)"
        )
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any load failure is reported with its reason
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{argument}: {str(path)!r} could not be read as a Lightning checkpoint with torch.load(weights_only=True) "
            f"({first}); pass a .ckpt written by a CausalLMModule fit"
        ) from None
    state = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{argument}: {str(path)!r} holds no 'state_dict'; pass a .ckpt written by a Lightning fit")
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    fix = "use the model sizes (hidden_size, num_layers, ...) of the run that wrote it"
    try:
        result = module.model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ValueError(f"{argument}: the weights in {str(path)!r} do not fit this model ({detail}); {fix}") from None
    problems = [*result.missing_keys, *result.unexpected_keys]
    if not problems:
        return len(weights)
    shown = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
    raise ValueError(
        f"{argument}: the weights in {str(path)!r} do not fit this model (missing {len(result.missing_keys)}, "
        f"unexpected {len(result.unexpected_keys)}: {shown}); {fix}"
    )


class LoRACausalLMModule(CausalLMModule):
    """:class:`~antimemo.lm.module.CausalLMModule` that starts from a checkpoint and trains LoRA adapters.

    Args:
        lora: ``{"r", "alpha", "dropout", "target_modules"}`` (:func:`check_lora`; missing keys
            take their defaults, ``{}`` is r=8, alpha=16 on the attention projections), or
            ``None`` to train every weight (full fine-tuning).
        base_checkpoint: a Lightning ``.ckpt`` of a ``CausalLMModule`` fit with the same sizes;
            its weights are the starting point. ``None`` starts from the seeded initialisation.
        **kwargs: the :class:`~antimemo.lm.module.CausalLMModule` arguments (sizes, ``lr``, ...).

    Under :class:`~antimemo.callbacks.DifferentialPrivacy`, epsilon covers the data of *this*
    fit; the data behind ``base_checkpoint`` is treated as public (the callback cannot see weights
    loaded before ``fit``, see docs/dp.md).

    Example:
        >>> m = LoRACausalLMModule(hidden_size=32, num_layers=1, num_heads=2, lora={"r": 2})
        >>> sum(p.numel() for p in m.parameters() if p.requires_grad)
        512
        >>> type(m.model).__name__
        'LlamaForCausalLM'
    """

    def __init__(self, lora: dict[str, Any] | None = None, base_checkpoint: str | None = None, **kwargs: Any) -> None:
        if lora is not None:
            check_lora(lora)  # before building anything
        super().__init__(**kwargs)
        if base_checkpoint is not None:
            load_base_weights(self, base_checkpoint)
        self.lora_layers: list[str] = []
        if lora is not None:
            with torch.random.fork_rng(devices=[]):  # the adapters' initialisation is seeded; the global RNG is left alone
                torch.manual_seed(self.hparams.seed + 1)
                self.lora_layers = apply_lora(self.model, lora)
