"""Open the training data a config's ``data:`` section names, from plain values.

``name`` is ``builtin`` (the shipped corpus), ``tokens`` (token files, :class:`TokenDataset`),
``hf_dataset`` (local text tokenized once into a cached token file, then read like ``tokens``),
or the path of a text file (byte level). This module takes plain values (``data`` sits below
``config``), so ``open_data(**dataclasses.asdict(cfg.data), vocab_size=...)`` is the call.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from zshard.errors import ConfigError, ZshardError
from zshard.train.data._text import CharDataset
from zshard.train.data._tokenize import cached_tokens
from zshard.train.data._tokenizer import tokenizer_vocab_size
from zshard.train.data._tokens import PathSpec, TokenDataset, list_files, read_meta

BUILTIN = "builtin"
TOKENS = "tokens"
HF_DATASET = "hf_dataset"


def data_vocab_size(
    name: str, *, path: PathSpec | None = None, tokenizer: str | None = None, **_: Any
) -> int | None:
    """The vocabulary the data was made with, when it says: its tokenizer's, else (token files)
    the sidecar's of the first file; None for byte-level text or when unknown."""
    if tokenizer:
        return tokenizer_vocab_size(tokenizer)
    if name == TOKENS and path:
        with contextlib.suppress(ZshardError):
            meta = read_meta(list_files(path)[0])
            vocab = (meta or {}).get("vocab_size")
            if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
                return vocab
    return None


def model_vocab_size(model: nn.Module) -> int | None:
    """The number of token ids ``model`` embeds, if it tells (works on the ``meta`` device):
    ``get_input_embeddings()`` (transformers), else ``cfg.vocab_size`` / ``config.vocab_size``."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        with contextlib.suppress(Exception):
            emb = get()
            if isinstance(emb, nn.Embedding):
                return int(emb.num_embeddings)
    for attr in ("cfg", "config"):
        vocab = getattr(getattr(model, attr, None), "vocab_size", None)
        if isinstance(vocab, int) and not isinstance(vocab, bool):
            return vocab
    return None


def _check_bytes(ds: CharDataset, vocab_size: int | None) -> None:
    if vocab_size is not None and ds.data.numel() and int(ds.data.max()) >= vocab_size:
        raise ConfigError(
            f"{ds.source}: byte value {int(ds.data.max())} is >= the model's vocabulary size "
            f"{vocab_size}; byte-level text needs model.args.vocab_size >= 256"
        )


def open_data(
    name: str = BUILTIN,
    *,
    seq_len: int = 128,
    path: PathSpec | None = None,
    val_path: PathSpec | None = None,
    dtype: str | None = None,
    split: str = "train",
    val_split: str | None = None,
    text_field: str = "text",
    tokenizer: str | None = None,
    cache: str | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
) -> tuple[Dataset[Any], Dataset[Any] | None]:
    """The training set and the validation set (None if the data has none).

    Args mirror the ``data:`` config keys; ``vocab_size`` is the model's (None: unchecked).
    Raises ConfigError (one line) on bad input: missing, empty or malformed files, a glob that
    matches nothing, a corpus shorter than one sample, an unknown text field, a token id the
    model cannot embed.
    """
    if dtype == "auto":
        dtype = None  # token files: the sidecar's, else uint16; tokenizing: the smallest that fits
    if name == TOKENS:
        train = TokenDataset(path, seq_len=seq_len, dtype=dtype, vocab_size=vocab_size)
        val = None
        if val_path:
            val = TokenDataset(
                val_path, seq_len=seq_len, dtype=dtype, vocab_size=vocab_size, what="data.val_path"
            )
        return train, val
    if name == HF_DATASET:
        if not tokenizer:
            raise ConfigError("data.tokenizer: data name 'hf_dataset' needs a tokenizer directory")
        tok: str = tokenizer

        def cached(source: PathSpec | None, split_name: str, what: str) -> str:
            return cached_tokens(
                source,
                tokenizer=tok,
                split=split_name,
                text_field=text_field,
                dtype=dtype,
                cache=cache,
                progress=progress,
                what=what,
            )

        train = TokenDataset(
            cached(path, split, "data.path"), seq_len=seq_len, vocab_size=vocab_size
        )
        val = None
        if val_path or val_split:
            where = "data.val_path" if val_path else "data.path"
            val_file = cached(val_path or path, val_split or split, where)
            val = TokenDataset(val_file, seq_len=seq_len, vocab_size=vocab_size)
        return train, val
    text = None if name == BUILTIN else name
    train_text = CharDataset(text, seq_len=seq_len, split="train")
    val_text = CharDataset(text, seq_len=seq_len, split="val")
    _check_bytes(train_text, vocab_size)
    _check_bytes(val_text, vocab_size)
    return train_text, val_text


def check_data(**kwargs: Any) -> None:
    """Open the data as :func:`open_data` would, and close it: for a launcher's preflight, so bad
    data fails before any worker starts (and ``hf_dataset`` is tokenized once, here)."""
    for ds in open_data(**kwargs):
        close = getattr(ds, "close", None)
        if callable(close):
            close()
