"""Sampling watermarked synthetic data from a generation's checkpoint, and exporting the real data.

Lightning-free at the import level: the model and data classes are imported from the recipe's
class paths (:func:`antimemo.sections.import_recipe_class`) only when a function runs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from antimemo._atomic import atomic_write_bytes
from antimemo.functional.generation import sample_generate
from antimemo.sections import DEFAULT_DATA_CLASS, DEFAULT_MODEL_CLASS, import_recipe_class
from antimemo.watermark import GreenListProcessor, detect_watermark

__all__ = ["WatermarkedLM", "export_real_data", "load_checkpoint_model", "sample_synthetic", "save_tokens", "watermark_flags"]


def save_tokens(path: str | os.PathLike[str], rows: torch.Tensor | np.ndarray) -> Path:
    """Write a 2-D int64 array of token ids as ``.npy`` atomically (what ``TokenFileDataModule`` reads).

    Example:
        >>> import tempfile
        >>> p = save_tokens(tempfile.mkdtemp() + "/x.npy", torch.arange(6).view(2, 3))
        >>> np.load(p).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    array = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
    if array.ndim != 2:
        raise ValueError(f"token rows must be 2-D (sequences, tokens), got shape {array.shape}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


def _section(config: Mapping[str, Any], name: str, default_class: str) -> tuple[str, dict[str, Any]]:
    section = dict(config.get(name) or {})
    class_path = section.pop("class_path", default_class)
    init_args = dict(section.pop("init_args", {}) or {})
    init_args.update(section)
    return class_path, init_args


def export_real_data(config: Mapping[str, Any], train_path: str | os.PathLike[str], val_path: str | os.PathLike[str]) -> tuple[int, int]:
    """Build the recipe's ``data:`` module and write its training and held-out splits as ``.npy``.

    Returns:
        ``(training rows, held-out rows)``.
    """
    class_path, init_args = _section(config, "data", DEFAULT_DATA_CLASS)
    cls = import_recipe_class(class_path, "data.class_path", "lightning.pytorch.LightningDataModule")
    dm = cls(**init_args)
    dm.setup("fit")
    splits = []
    for name in ("train_dataset", "val_dataset"):
        dataset = getattr(dm, name, None)
        if dataset is None:
            raise ValueError(f"data: {class_path} has no {name} after setup('fit'); the recursive loop needs a map-style "
                             "train_dataset and val_dataset of token ids (TextDataModule or TokenFileDataModule)")
        rows = [torch.as_tensor(dataset[i]["input_ids"] if isinstance(dataset[i], dict) else dataset[i]) for i in range(len(dataset))]
        lengths = {int(r.numel()) for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"data: the {name} rows differ in length ({sorted(lengths)[:5]}); set data.seq_len so "
                             "that every sequence has the same length")
        splits.append(torch.stack(rows))
    save_tokens(train_path, splits[0])
    save_tokens(val_path, splits[1])
    return int(splits[0].shape[0]), int(splits[1].shape[0])


def load_checkpoint_model(ckpt_path: str | os.PathLike[str], config: Mapping[str, Any]) -> Any:
    """The LightningModule of the config's ``model:`` class with the weights of a Lightning ``.ckpt``.

    The checkpoint is read with ``torch.load(weights_only=True)`` (no pickle); the architecture
    comes from its saved ``hyper_parameters`` (else the config's ``model:`` arguments).
    """
    class_path, init_args = _section(config, "model", DEFAULT_MODEL_CLASS)
    cls = import_recipe_class(class_path, "model.class_path", "lightning.pytorch.LightningModule")
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    hparams = {k: v for k, v in dict(ckpt.get("hyper_parameters") or init_args).items() if k in accepted}
    module = cls(**hparams)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    return module


class WatermarkedLM(torch.nn.Module):
    """Wrap a causal LM so that its last-position logits get a :class:`GreenListProcessor`'s bias.

    :func:`sample_generate` then samples watermarked text, with or without a KV cache: the wrapper
    keeps each row's token history (a call without a cache starts it anew), so the green list of
    every step is drawn from the true previous ``context_width`` tokens.

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        >>> proc = GreenListProcessor(gamma=0.25, delta=8.0, key=7, vocab_size=32)
        >>> lm = WatermarkedLM(transformers.LlamaForCausalLM(cfg), proc)
        >>> out = sample_generate(lm, torch.zeros(4, 1, dtype=torch.long), 40, generator=torch.Generator().manual_seed(0))
        >>> z, _ = detect_watermark(out, gamma=0.25, key=7)
        >>> bool((z > 4).all())
        True
    """

    def __init__(self, module: torch.nn.Module, processor: GreenListProcessor) -> None:
        super().__init__()
        self.module = module  # _cache_keyword looks through ``module`` for the cache keyword
        self.processor = processor
        self._history: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        fresh = kwargs.get("cache") is None and kwargs.get("past_key_values") is None
        self._history = input_ids if fresh or self._history is None else torch.cat([self._history, input_ids], dim=1)
        output = self.module(input_ids=input_ids, **kwargs)
        logits = output.logits if hasattr(output, "logits") else output
        biased = logits.clone()
        biased[:, -1, :] = self.processor(self._history, logits[:, -1, :].float()).to(logits.dtype)
        if hasattr(output, "logits"):
            output.logits = biased
            return output
        return biased


def sample_synthetic(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    seq_len: int,
    processor: GreenListProcessor | None,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """``[M, seq_len]`` rows: each prompt followed by ``seq_len - prompt length`` sampled tokens.

    With a ``processor`` the sampled tokens are watermarked (:class:`WatermarkedLM`); the draws
    come from ``torch.Generator().manual_seed(seed)`` (the global RNG is untouched).
    """
    new = seq_len - prompts.shape[1]
    if new < 1:
        raise ValueError(f"prompt_length ({prompts.shape[1]}) must be below the sequence length ({seq_len})")
    lm = model if processor is None else WatermarkedLM(model, processor)
    tokens = sample_generate(lm, prompts, new, temperature=temperature, batch_size=batch_size,
                             generator=torch.Generator().manual_seed(seed))
    return torch.cat([prompts.to(tokens.device), tokens], dim=1).cpu()


def watermark_flags(rows: torch.Tensor | np.ndarray, gamma: float, key: int, context_width: int = 1,
                    z_threshold: float = 4.0) -> torch.Tensor:
    """Bool per row: ``detect_watermark``'s z above ``z_threshold`` (what ``WatermarkFilter`` drops).

    Example:
        >>> watermark_flags(torch.zeros(2, 8, dtype=torch.long) + torch.arange(8), gamma=0.25, key=1).tolist()
        [False, False]
    """
    ids = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    if ids.numel() == 0:
        return torch.zeros(ids.shape[0], dtype=torch.bool)
    z, _ = detect_watermark(ids, gamma=gamma, key=key, context_width=context_width)
    return z > z_threshold
