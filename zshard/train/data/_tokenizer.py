"""Local tokenizers for ``zshard tokenize`` and ``data: {name: hf_dataset}``: a directory saved by
``save_pretrained`` (``tokenizer.json`` read with the ``tokenizers`` library, else transformers'
``AutoTokenizer(local_files_only=True)``) or a ``tokenizer.json`` file; nothing is downloaded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zshard.errors import ConfigError
from zshard.store.storage import is_remote
from zshard.train.data._tokens import DTYPES, local_path

INSTALL_HINT = (
    "tokenizing needs Hugging Face datasets and tokenizers: pip install zshard[data] (or: pip "
    "install datasets tokenizers)"
)


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer, reduced to what tokenizing a corpus needs."""

    path: str
    vocab_size: int  # highest id + 1, added tokens included
    eos_id: int | None
    fingerprint: str  # sha256 of the files that define it
    encode_batch: Callable[[list[str]], list[list[int]]]


def _sha256_files(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _configured_eos(directory: str) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as f:
                eos = _token_content(json.load(f).get("eos_token"))
                if eos:
                    return eos
    return None


def load_tokenizer(path: str, what: str = "tokenizer") -> Tokenizer:
    """Load a local tokenizer directory (or ``tokenizer.json``); nothing is downloaded."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{what}: expected a local tokenizer directory, got {path!r}")
    if is_remote(path):
        raise ConfigError(f"{what}: {path!r} is a URL; give a local tokenizer directory")
    p = local_path(path)
    if os.path.isdir(p):
        directory, tj = p, os.path.join(p, "tokenizer.json")
    elif os.path.isfile(p) and p.endswith(".json"):
        directory, tj = os.path.dirname(p), p
    else:
        raise ConfigError(
            f"{what}: no tokenizer at {path!r}; give a local directory saved with "
            "save_pretrained, or a tokenizer.json file"
        )
    if os.path.isfile(tj):
        return _load_fast(path, directory, tj, what)
    return _load_transformers(path, directory, what)


def _load_fast(path: str, directory: str, tj: str, what: str) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    try:
        tok = HFTokenizer.from_file(tj)
    except Exception as exc:  # the Rust side raises plain Exceptions
        raise ConfigError(f"{what}: cannot load {tj}: {' '.join(str(exc).split())}") from None
    tok.no_padding()
    tok.no_truncation()
    vocab = tok.get_vocab(with_added_tokens=True)
    if not vocab:
        raise ConfigError(f"{what}: {tj} has an empty vocabulary")
    eos_token = _configured_eos(directory) if directory else None
    eos_id = tok.token_to_id(eos_token) if eos_token else None
    files = [tj] + [
        os.path.join(directory, n)
        for n in ("tokenizer_config.json", "special_tokens_map.json")
        if os.path.isfile(os.path.join(directory, n))
    ]

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return Tokenizer(path, max(vocab.values()) + 1, eos_id, _sha256_files(files), encode_batch)


def _load_transformers(path: str, directory: str, what: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(
            f"{what}: {path!r} has no tokenizer.json; reading it needs transformers: "
            "pip install zshard[hf]"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{what}: cannot load a tokenizer from {path!r}: {' '.join(str(exc).split())}"
        ) from None
    files = sorted(
        os.path.join(directory, n)
        for n in os.listdir(directory)
        if os.path.isfile(os.path.join(directory, n))
    )

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return list(tok(texts, add_special_tokens=False)["input_ids"])

    vocab = max(tok.get_vocab().values()) + 1
    eos = tok.eos_token_id if isinstance(tok.eos_token_id, int) else None
    return Tokenizer(path, vocab, eos, _sha256_files(files), encode_batch)


def tokenizer_vocab_size(path: str) -> int:
    """The vocabulary size (highest id + 1) of a local tokenizer."""
    return load_tokenizer(path).vocab_size


def pick_dtype(dtype: str | None, vocab_size: int, what: str = "dtype") -> str:
    """``dtype`` checked against the vocabulary, or the smallest that holds it."""
    if dtype is None:
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if dtype not in DTYPES:
        raise ConfigError(f"{what}: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if vocab_size - 1 > np.iinfo(DTYPES[dtype]).max:
        raise ConfigError(
            f"{what}: the tokenizer's vocabulary of {vocab_size} does not fit {dtype}; use uint32"
        )
    return dtype
