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
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from zshard.errors import ConfigError

DEFAULT_CORPUS = "shakespeare.txt"  # in zshard/train/corpus/; see SOURCE.md there
VOCAB_SIZE = 256  # byte-level: every file is valid input and no tokenizer ships


def corpus_bytes(name: str = DEFAULT_CORPUS) -> bytes:
    """The raw bytes of a corpus shipped in ``zshard/train/corpus/``."""
    return resources.files("zshard.train").joinpath("corpus").joinpath(name).read_bytes()


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
    """Stack the samples at ``indices`` into ``(x, y)`` of shape (len(indices), seq_len)."""
    pairs = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


class GlobalBatchSampler:
    """Sample indices of each optimizer step, defined by global position in the data stream.

    The stream is the concatenation of epochs; epoch ``e`` is a permutation of
    ``range(num_samples)`` drawn from ``torch.Generator().manual_seed(seed + e)``. Step ``s``
    takes stream positions ``[s * G, (s + 1) * G)`` (``G = global_batch_size``); a batch may
    straddle two epochs. Nothing here depends on the world size.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int = 0) -> None:
        self.num_samples = _positive_int("num_samples", num_samples)
        self.global_batch_size = _positive_int("global_batch_size", global_batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self._cached: tuple[int, list[int]] | None = None  # (epoch, permutation)

    def permutation(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``."""
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._cached = (epoch, torch.randperm(self.num_samples, generator=gen).tolist())
        return self._cached[1]

    def batch(self, step: int) -> list[int]:
        """The ``global_batch_size`` sample indices of optimizer step ``step``."""
        if step < 0:
            raise ConfigError(f"step must be non-negative, got {step}")
        pos, end = step * self.global_batch_size, (step + 1) * self.global_batch_size
        out: list[int] = []
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            out.extend(self.permutation(epoch)[offset : offset + take])
            pos += take
        return out

    def grad_accum(self, world_size: int, micro_batch_size: int) -> int:
        """Micro batches per rank per step: ``G // (world_size * micro_batch_size)``."""
        _positive_int("world_size", world_size)
        _positive_int("micro_batch_size", micro_batch_size)
        per_pass = world_size * micro_batch_size
        if self.global_batch_size % per_pass != 0:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not divisible by world_size "
                f"{world_size} x micro_batch_size {micro_batch_size} = {per_pass}; "
                "pick a global batch that is a multiple of their product"
            )
        return self.global_batch_size // per_pass

    def micro_batch(
        self, step: int, rank: int, world_size: int, micro_batch_size: int, accum_index: int
    ) -> list[int]:
        """Rank ``rank``'s ``accum_index``-th micro batch of step ``step``.

        Position ``p`` of :meth:`batch` goes to ``accum_index = p // (world_size * micro)`` and
        ``rank = (p % (world_size * micro)) // micro``; so concatenating the micro batches in
        (accum_index, rank) order gives back ``batch(step)`` exactly.
        """
        accum = self.grad_accum(world_size, micro_batch_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} out of range for world_size {world_size}")
        if not 0 <= accum_index < accum:
            raise ConfigError(f"accum_index {accum_index} out of range for grad_accum {accum}")
        start = accum_index * world_size * micro_batch_size + rank * micro_batch_size
        return self.batch(step)[start : start + micro_batch_size]

    def state_dict(self) -> dict[str, int]:
        """Everything that fixes the data order; with the step it is the data position."""
        return {
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GlobalBatchSampler:
        """Rebuild a sampler saved by :meth:`state_dict`."""
        try:
            return cls(state["num_samples"], state["global_batch_size"], state["seed"])
        except KeyError as exc:
            raise ConfigError(f"sampler state is missing key {exc.args[0]!r}") from exc
