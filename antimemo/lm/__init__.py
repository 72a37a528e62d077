"""The LM recipe: embedded corpus, byte tokenizer, data module and a small Llama LightningModule.

Example:
    >>> from antimemo.lm import CausalLMModule, TextDataModule
    >>> dm = TextDataModule(seq_len=64, num_train=256, num_holdout=64)
    >>> model = CausalLMModule(hidden_size=64, num_layers=2, num_heads=4)
"""

from antimemo.lm.corpus import (
    BYTE_PAD_ID,
    BYTE_VOCAB_SIZE,
    DEFAULT_CORPUS,
    ByteTokenizer,
    byte_decode,
    chunk_ids,
    load_text,
    pydoc_topics_paragraphs,
)
from antimemo.lm.data import SequenceDataset, TextDataModule
from antimemo.lm.module import CausalLMModule

__all__ = [
    "BYTE_PAD_ID",
    "BYTE_VOCAB_SIZE",
    "DEFAULT_CORPUS",
    "ByteTokenizer",
    "CausalLMModule",
    "SequenceDataset",
    "TextDataModule",
    "byte_decode",
    "chunk_ids",
    "load_text",
    "pydoc_topics_paragraphs",
]
