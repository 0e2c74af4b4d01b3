"""The built-in training data: a byte-level text dataset and a world-size-independent sampler.

:class:`CharDataset` cuts a text (by default the shipped Shakespeare corpus) into non-overlapping
windows of ``seq_len`` bytes. :class:`GlobalBatchSampler` fixes the data order by *global* sample
index: optimizer step ``s`` always trains on the same ``global_batch_size`` samples, whatever the
world size and gradient accumulation, so a run resumed at another world size sees the same samples
in the same steps. The sampler is stateless given ``(seed, step)``; a checkpoint records only its
:meth:`~GlobalBatchSampler.state_dict` and the step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from typing import Literal

import torch
from torch.utils.data import Dataset

from zshard.errors import ConfigError

DEFAULT_CORPUS = "shakespeare.txt"  # in zshard/train/data/corpus/; see SOURCE.md there
VOCAB_SIZE = 256  # byte-level: every file is valid input and no tokenizer ships


def corpus_bytes(name: str = DEFAULT_CORPUS) -> bytes:
    """The raw bytes of a corpus shipped in ``zshard/train/data/corpus/``."""
    return resources.files("zshard.train.data").joinpath("corpus").joinpath(name).read_bytes()


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor of token ids."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """Token ids back to text; a window may cut a multi-byte character, hence ``replace``."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(values).decode("utf-8", errors="replace")


class CharDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping byte windows of a text: sample ``i`` starts at byte ``i * seq_len``.

    Args:
        path: a text file to read; None reads the shipped corpus.
        seq_len: tokens per sample; each sample needs ``seq_len + 1`` bytes (targets shift by 1).
        split: ``"train"`` is the first ``1 - val_fraction`` of the bytes, ``"val"`` the rest.
        val_fraction: share of the text held out for validation.
    """

    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        seq_len: int = 128,
        split: Literal["train", "val"] = "train",
        val_fraction: float = 0.05,
    ) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ConfigError(f"data seq_len must be a positive integer, got {seq_len!r}")
        if split not in ("train", "val"):
            raise ConfigError(f"data split must be 'train' or 'val', got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data val_fraction must be in (0, 1), got {val_fraction!r}")
        if path is None:
            source, raw = f"shipped corpus {DEFAULT_CORPUS}", corpus_bytes()
        else:
            source = os.fspath(path)
            try:
                with open(source, "rb") as f:
                    raw = f.read()
            except FileNotFoundError as exc:
                raise ConfigError(
                    f"data file {source!r} not found; give a path to a text file, "
                    "or no path for the shipped corpus"
                ) from exc
        cut = int(len(raw) * (1.0 - val_fraction))
        part = raw[:cut] if split == "train" else raw[cut:]
        if len(part) < seq_len + 1:
            raise ConfigError(
                f"{source}: the {split} split has {len(part)} bytes, fewer than one sample of "
                f"seq_len + 1 = {seq_len + 1}; use a longer text or a smaller seq_len"
            )
        self.source = source
        self.split = split
        self.seq_len = seq_len
        # uint8 keeps the whole text at one byte per token; samples widen to int64 on read.
        # clone: own the memory rather than borrow the temporary bytearray's.
        self.data = torch.frombuffer(bytearray(part), dtype=torch.uint8).clone()  # (len(part),)
        self._len = (len(part) - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: int64 tensors of shape (seq_len,), with ``y[t] == x[t + 1]``."""
        if not -self._len <= i < self._len:
            raise IndexError(f"sample {i} out of range for {self._len} samples")
        i %= self._len
        window = self.data[i * self.seq_len : (i + 1) * self.seq_len + 1].to(torch.int64)
        return window[:-1], window[1:]


def collate(
    dataset: Dataset[tuple[torch.Tensor, torch.Tensor]], indices: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the samples at ``indices`` into ``(x, y)`` of shape (len(indices), seq_len).

    A dataset with a ``read_batch(indices)`` method (token files) reads the batch itself, its
    remote blocks fetched concurrently."""
    read_batch = getattr(dataset, "read_batch", None)
    if callable(read_batch):
        x, y = read_batch(list(indices))
        return x, y
    pairs = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
