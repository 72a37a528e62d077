"""``PretrainedCausalLM``: any Hugging Face causal LM saved with ``save_pretrained``, for auditing.

``antimemo audit`` measures memorization on a LightningModule whose causal LM sits at ``.model``
(what :class:`~antimemo.callbacks.MemorizationMonitor` generates with). This module wraps a model
directory written by ``model.save_pretrained(path)`` (GPT-2, Llama, Pythia, ...) so that a model
trained anywhere can be audited::

    antimemo audit --config recipes/audit_pretrained.yaml \\
        --model.init_args.path my_model/ --data.init_args.train train.jsonl --data.init_args.val val.jsonl

Loading is offline (``local_files_only=True``) and never runs code from the directory
(``trust_remote_code`` stays off).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["PretrainedCausalLM"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PretrainedCausalLM(pl.LightningModule):
    """A LightningModule around ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``.

    The model is at ``.model`` (in eval mode, weights as saved). ``validation_step`` logs
    ``val_loss``, the causal-LM loss with ``labels = input_ids`` (padding, ``attention_mask`` 0,
    excluded). It is meant for evaluation (``antimemo audit``, ``trainer.validate``); it has no
    ``training_step``. Its weights come from ``path``, so ``antimemo audit`` needs no
    ``--ckpt_path`` for it (:attr:`loads_own_weights`).

    Args:
        path: a directory written by ``save_pretrained`` (``config.json`` plus the weights).
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.

    Raises:
        FileNotFoundError: ``path`` is not a directory with a ``config.json``.
        ValueError: ``dtype`` is not one of the above, or the directory does not hold a causal LM
            that ``transformers`` can load offline (the message carries the loader's reason).

    Example:
        >>> import tempfile, transformers
        >>> d = tempfile.mkdtemp()
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2,
        ...                               bos_token_id=0, eos_token_id=0)
        >>> transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
        >>> lm = PretrainedCausalLM(d)
        >>> type(lm.model).__name__, lm.loads_own_weights
        ('GPT2LMHeadModel', True)
        >>> lm(torch.zeros(1, 8, dtype=torch.long)).logits.shape
        torch.Size([1, 8, 50])
    """

    #: ``antimemo audit`` runs without ``--ckpt_path``: the weights come from ``path``.
    loads_own_weights = True

    def __init__(self, path: str, dtype: str = "float32") -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"path must be a directory written by save_pretrained, got {path!r}")
        directory = Path(path)
        if not directory.is_dir() or not (directory / "config.json").is_file():
            what = "does not exist" if not directory.exists() else "has no config.json"
            raise FileNotFoundError(
                f"path: {str(path)!r} {what}; pass a directory written by model.save_pretrained(path) "
                "(config.json plus the weights)"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}; e.g. dtype='float32'")
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"path: {str(path)!r} could not be loaded as a causal LM by transformers.AutoModelForCausalLM "
                f"({first}); save it with model.save_pretrained(path)"
            ) from None
        model = model.to(_DTYPES[dtype])  # the same on every transformers version (4.x and 5.x load dtypes differently)
        model.eval()
        self.model = model
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """Run the Hugging Face model (``kwargs`` such as ``attention_mask`` pass through)."""
        return self.model(input_ids=input_ids, **kwargs)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Causal-LM loss with ``labels = input_ids`` (padding excluded); logs ``val_loss``."""
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError(
                "PretrainedCausalLM expects dict batches with an 'input_ids' LongTensor[B, S] (optionally "
                f"'attention_mask'), got {type(batch).__name__}"
            )
        ids = batch["input_ids"]
        high = int(ids.max())
        if high >= self.vocab_size:
            raise ValueError(
                f"the data holds token id {high}, but the model at path={self.hparams.path!r} has a vocabulary "
                f"of {self.vocab_size}; tokenize the data with this model's tokenizer"
            )
        mask = batch.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=ids.shape[0])
        return loss
