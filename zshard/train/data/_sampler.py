"""The world-size-independent sampler: optimizer step ``s`` always trains on the same samples.

:class:`GlobalBatchSampler` fixes the data order by *global* sample index, whatever the world size
and gradient accumulation, so a run resumed at another world size sees the same samples in the
same steps. It is stateless given ``(seed, step)``; a checkpoint records only its
:meth:`~GlobalBatchSampler.state_dict` and the step.
"""

from __future__ import annotations

from typing import Any

import torch

from zshard.errors import ConfigError


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
        self._cached: tuple[int, torch.Tensor] | None = None  # (epoch, permutation)

    def _order(self, epoch: int) -> torch.Tensor:
        # A tensor (4 or 8 bytes a sample), not a list (~36): the order of a corpus of 10^8
        # windows costs 0.4 GB, not 3.6.
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_samples, generator=gen)
            if self.num_samples <= torch.iinfo(torch.int32).max:
                perm = perm.to(torch.int32)
            self._cached = (epoch, perm)
        return self._cached[1]

    def permutation(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``."""
        out: list[int] = self._order(epoch).tolist()
        return out

    def batch(self, step: int) -> list[int]:
        """The ``global_batch_size`` sample indices of optimizer step ``step``."""
        if step < 0:
            raise ConfigError(f"step must be non-negative, got {step}")
        pos, end = step * self.global_batch_size, (step + 1) * self.global_batch_size
        out: list[int] = []
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            out.extend(self._order(epoch)[offset : offset + take].tolist())
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


def read_ahead(
    dataset: Any,
    sampler: GlobalBatchSampler,
    step: int,
    accum_index: int,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    batches: int = 2,
) -> None:
    """Start reading this rank's next ``batches`` micro batches after ``(step, accum_index)``,
    for a dataset that can (``dataset.prefetch(indices)``: token files on an object store fetch
    them in the background while the model computes); otherwise nothing."""
    prefetch = getattr(dataset, "prefetch", None)
    if not callable(prefetch):
        return
    accum = sampler.grad_accum(world_size, micro_batch_size)
    s, a = step, accum_index
    for _ in range(batches):
        s, a = (s + 1, 0) if a + 1 == accum else (s, a + 1)
        prefetch(sampler.micro_batch(s, rank, world_size, micro_batch_size, a))
