"""A user's own LightningModule, in the shape users write it, with goldfish and the monitor.

Nothing here comes from ``antimemo.lm`` (the library's recipe): the model is a Hugging Face
``GPT2LMHeadModel`` built from a ``GPT2Config``, the tokenizer is a byte-level BPE trained at run
time with the ``tokenizers`` library, the documents are paragraphs of text of varying length, and
the user's own ``collate_fn`` pads them on the right. antimemo needs three things of such a
module (see docs/user_module.md):

1. training batches are dicts holding ``input_ids`` (and ``attention_mask``, ``labels``);
2. ``training_step`` passes ``labels=batch["labels"]`` to the model, so the labels goldfish
   rewrites are the ones the loss sees;
3. the causal LM is at ``pl_module.model`` (else tell the monitor with ``model_attr=``).

Everything is offline (the text ships with Python: ``pydoc_data.topics``) and small: the script
trains twice, without and with goldfish, in about 15 seconds on 2 idle CPU cores::

    python examples/gpt2_user_module.py
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from antimemo.callbacks import GoldfishTokenDropout, MemorizationMonitor
from antimemo.probes import draw_probes

PAD, EOS = "<pad>", "<eos>"
IGNORE_INDEX = -100  # the label value Hugging Face's loss skips


# ----------------------------------------------------------------------------------- the data


def pydoc_paragraphs() -> list[str]:
    """Paragraphs of the help texts that ship with CPython, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip("\n")
            if paragraph.strip():
                paragraphs.append(paragraph)
    return paragraphs


def build_tokenizer(texts: list[str], vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` tokens (``<pad>`` = 0, ``<eos>`` = 1), trained on ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


class Documents(Dataset):
    """One unpadded document per item: ``{"input_ids": LongTensor[n]}``, ``n`` varies.

    Each text is encoded, cut to ``max_length - 1`` tokens and ended with ``<eos>``.
    """

    def __init__(self, texts: list[str], tokenizer: Tokenizer, max_length: int) -> None:
        eos = tokenizer.token_to_id(EOS)
        self.docs = [
            torch.tensor(tokenizer.encode(text).ids[: max_length - 1] + [eos], dtype=torch.long)
            for text in texts
        ]

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.docs[index]}


def make_collate(pad_id: int):
    """A ``collate_fn`` that pads on the right: ``attention_mask`` 0 and label -100 at padding."""

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            attention_mask[row, :n] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


class DocumentData(pl.LightningDataModule):
    """Paragraphs of ``min_chars`` to ``max_chars`` characters, shuffled once with ``seed``:
    ``num_val`` for validation, the next ``num_train`` for training."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        num_train: int = 32,
        num_val: int = 32,
        max_length: int = 128,
        batch_size: int = 8,
        min_chars: int = 40,
        max_chars: int = 600,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.num_train, self.num_val = num_train, num_val
        self.max_length, self.batch_size = max_length, batch_size
        self.min_chars, self.max_chars, self.seed = min_chars, max_chars, seed
        self.collate = make_collate(tokenizer.token_to_id(PAD))

    def setup(self, stage: str | None = None) -> None:
        texts = [p for p in pydoc_paragraphs() if self.min_chars <= len(p) <= self.max_chars]
        random.Random(self.seed).shuffle(texts)
        self.val_set = Documents(texts[: self.num_val], self.tokenizer, self.max_length)
        end = self.num_val + self.num_train
        self.train_set = Documents(texts[self.num_val : end], self.tokenizer, self.max_length)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, collate_fn=self.collate)


# ---------------------------------------------------------------------------------- the model


class GPT2Module(pl.LightningModule):
    """A tiny GPT-2 from a config (no download) at ``self.model``, trained with AdamW."""

    def __init__(self, vocab_size: int, pad_id: int, eos_id: int, n_positions: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=64,
            n_layer=2,
            n_head=2,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.model = GPT2LMHeadModel(config)
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],  # goldfish rewrites these: pass them to the model's loss
        ).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        self.log("val_loss", loss, batch_size=len(batch["input_ids"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------ the run


def fit(
    goldfish_k: int | None = 4,
    epochs: int = 60,
    num_train: int = 32,
    prefix_length: int = 16,
    suffix_length: int = 16,
    num_probes: int = 16,
    every_n_epochs: int = 10,
    seed: int = 0,
    callbacks: list[Any] = (),
) -> dict[str, Any]:
    """Train the user's module with goldfish (``goldfish_k=None``: without) and the monitor.

    Returns a dict with the ``trainer``, ``module``, ``data``, ``monitor``, ``goldfish`` and
    ``tokenizer`` of the run.
    """
    pl.seed_everything(seed, verbose=False)
    tokenizer = build_tokenizer(pydoc_paragraphs())
    data = DocumentData(tokenizer, num_train=num_train, seed=seed)
    module = GPT2Module(
        tokenizer.get_vocab_size(), pad_id=tokenizer.token_to_id(PAD), eos_id=tokenizer.token_to_id(EOS)
    )
    monitor = MemorizationMonitor(
        num_probes=num_probes,
        prefix_length=prefix_length,
        suffix_length=suffix_length,
        every_n_epochs=every_n_epochs,
        holdout="val",
        decode=tokenizer.decode,  # the zlib score compresses the real text
    )
    goldfish = None
    extra = list(callbacks)
    if goldfish_k is not None:
        # the special tokens are never dropped: the model must still learn where a document ends
        goldfish = GoldfishTokenDropout(k=goldfish_k, h=13, exempt_token_ids=[tokenizer.token_to_id(EOS)])
        extra.append(goldfish)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[*extra, monitor],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=every_n_epochs,
    )
    trainer.fit(module, datamodule=data)
    return {
        "trainer": trainer,
        "module": module,
        "data": data,
        "monitor": monitor,
        "goldfish": goldfish,
        "tokenizer": tokenizer,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--goldfish-k", type=int, default=4, help="0 trains without goldfish")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a 64-wide model: more intra-op threads only add overhead
    for k in (None, args.goldfish_k or None) if args.goldfish_k else (None,):
        began = time.perf_counter()
        run = fit(goldfish_k=k, epochs=args.epochs)
        monitor, data = run["monitor"], run["data"]
        need = monitor.prefix_length + monitor.suffix_length
        eligible = draw_probes(data.train_set, count=None, length=need, seed=monitor.seed)
        lengths = sorted(len(item["input_ids"]) for item in data.train_set)
        print(f"\n== {'goldfish k=%d' % k if k else 'no goldfish'} ({time.perf_counter() - began:.1f} s)")
        print(
            f"{len(data.train_set)} training documents of {lengths[0]} to {lengths[-1]} tokens; "
            f"{len(eligible.indices)} have the {need} tokens of a probe, {monitor.num_probes} are probed"
        )
        for epoch, step, results in monitor.history:
            figures = ", ".join(
                f"{key} {results[key]:.3f}"
                for key in ("exact_match", "token_match", "near_verbatim", "mia/loss/auc")
            )
            print(f"epoch {epoch:3d} (step {step:4d}): {figures}")


if __name__ == "__main__":
    main()
