"""Training data: the built-in byte-level text, token files (local or any fsspec URL), local
Hugging Face datasets tokenized once into token files, and the sampler that fixes the order of
samples by global index, so a run resumed at another world size sees the same samples."""

from zshard.train.data._open import (
    BUILTIN,
    HF_DATASET,
    TOKENS,
    check_data,
    data_vocab_size,
    model_vocab_size,
    open_data,
)
from zshard.train.data._sampler import GlobalBatchSampler, read_ahead
from zshard.train.data._text import (
    DEFAULT_CORPUS,
    VOCAB_SIZE,
    CharDataset,
    collate,
    corpus_bytes,
    decode,
    encode,
)
from zshard.train.data._tokenize import TokenizeResult, cached_tokens, tokenize
from zshard.train.data._tokenizer import Tokenizer, load_tokenizer, tokenizer_vocab_size
from zshard.train.data._tokens import DTYPES, TokenDataset, list_files, read_meta

__all__ = [
    "BUILTIN",
    "DEFAULT_CORPUS",
    "DTYPES",
    "HF_DATASET",
    "TOKENS",
    "VOCAB_SIZE",
    "CharDataset",
    "GlobalBatchSampler",
    "TokenDataset",
    "TokenizeResult",
    "Tokenizer",
    "cached_tokens",
    "check_data",
    "collate",
    "corpus_bytes",
    "data_vocab_size",
    "decode",
    "encode",
    "list_files",
    "load_tokenizer",
    "model_vocab_size",
    "open_data",
    "read_ahead",
    "read_meta",
    "tokenize",
    "tokenizer_vocab_size",
]
