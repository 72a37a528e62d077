"""The LM recipe: embedded corpus, byte tokenizer, data module and a small Llama LightningModule;
and, for ``antimemo audit`` of any saved Hugging Face causal LM, ``PretrainedCausalLM`` and
``TokenFileDataModule`` (token ids from ``.jsonl`` / ``.npy`` files).

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
from antimemo.lm.pretrained import PretrainedCausalLM
from antimemo.lm.token_files import TokenFileDataModule, TokenListDataset, read_token_file

__all__ = [
    "BYTE_PAD_ID",
    "BYTE_VOCAB_SIZE",
    "DEFAULT_CORPUS",
    "ByteTokenizer",
    "CausalLMModule",
    "PretrainedCausalLM",
    "SequenceDataset",
    "TextDataModule",
    "TokenFileDataModule",
    "TokenListDataset",
    "byte_decode",
    "chunk_ids",
    "load_text",
    "pydoc_topics_paragraphs",
    "read_token_file",
]
