"""Training data: the built-in byte-level text and the sampler that fixes the order of samples by
global index, so a run resumed at another world size sees the same samples in the same steps."""

from zshard.train.data._sampler import GlobalBatchSampler
from zshard.train.data._text import (
    DEFAULT_CORPUS,
    VOCAB_SIZE,
    CharDataset,
    collate,
    corpus_bytes,
    decode,
    encode,
)

__all__ = [
    "DEFAULT_CORPUS",
    "VOCAB_SIZE",
    "CharDataset",
    "GlobalBatchSampler",
    "collate",
    "corpus_bytes",
    "decode",
    "encode",
]
