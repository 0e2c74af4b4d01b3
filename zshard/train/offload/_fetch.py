"""Stage-3 parameter fetching with ``zero.offload_param``: a module's partition is read before its
forward and backward (``fetch``), read ahead by ``offload_param.buffer_count`` groups in the
order the first step recorded (``prefetch``), and dropped after the all-gather unless
``max_in_memory`` elements of cache remain (``done``).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from zshard.errors import ZshardError
from zshard.train.offload._stream import Array, HostArray, OffloadError, read_into
from zshard.train.offload._swap import SwapArray
from zshard.train.zero import FlatParamGroup


@dataclass(eq=False, kw_only=True)
class ParamFetcher:
    """Fetches the ``param`` arrays of ``arrays`` (the offload's, shared) on ``reader``'s thread;
    the caller invalidates it whenever parameter versions change."""

    arrays: Mapping[tuple[str, str], Array]
    reader: cf.ThreadPoolExecutor
    device: torch.device
    rank: int
    pin: bool  # pinned host buffers for the reads
    read_ahead: int  # partitions read ahead of use
    max_in_memory: int  # elements of fetched partitions kept cached after their all-gather
    _fetching: dict[str, cf.Future[torch.Tensor]] = field(default_factory=dict, init=False)
    _cache: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict, init=False)

    def _buffer(self, g: FlatParamGroup) -> tuple[SwapArray, torch.Tensor]:
        # Allocated here, on the training thread, even for background reads: memory a thread
        # allocates comes from that thread's malloc arena, and the reader's arena kept ~100 MB
        # of freed partitions resident in the stage-3 benchmark.
        arr = self.arrays[(g.name, "param")]
        assert isinstance(arr, SwapArray)
        return arr, torch.empty(arr.numel, dtype=g.dtype, pin_memory=self.pin)

    @staticmethod
    def _read_whole(arr: SwapArray, t: torch.Tensor) -> torch.Tensor:
        read_into(arr, 0, t)
        return t

    def fetch(self, g: FlatParamGroup) -> torch.Tensor:
        """``g``'s parameter partition (P,) on the compute device, for one all-gather."""
        arr = self.arrays[(g.name, "param")]
        if isinstance(arr, HostArray):
            return arr.tensor.to(self.device, non_blocking=True)
        t = self._cache.pop(g.name, None)
        if t is None:
            future = self._fetching.pop(g.name, None)
            try:
                t = future.result() if future is not None else self._read_whole(*self._buffer(g))
            except ZshardError as e:
                raise OffloadError(f"rank {self.rank}: fetching parameters: {e}") from e
        return t.to(self.device, non_blocking=True)

    def prefetch(self, g: FlatParamGroup) -> None:
        """Start reading ``g``'s partition in the background (at most ``read_ahead`` at once)."""
        arr = self.arrays.get((g.name, "param"))
        if (
            not isinstance(arr, SwapArray)
            or g.name in self._fetching
            or g.name in self._cache
            or len(self._fetching) >= self.read_ahead
        ):
            return
        self._fetching[g.name] = self.reader.submit(self._read_whole, *self._buffer(g))

    def done(self, g: FlatParamGroup, part: torch.Tensor) -> None:
        """The all-gather of ``part`` finished: keep it cached if ``max_in_memory`` allows."""
        budget = self.max_in_memory
        if budget <= 0 or not isinstance(self.arrays.get((g.name, "param")), SwapArray):
            return
        self._cache[g.name] = part.to("cpu") if part.device.type != "cpu" else part
        while sum(t.numel() for t in self._cache.values()) > budget:
            self._cache.popitem(last=False)

    def invalidate(self) -> None:
        """Forget fetched and prefetched partitions (their versions are about to change)."""
        for f in self._fetching.values():
            with contextlib.suppress(Exception):
                f.result()
        self._fetching.clear()
        self._cache.clear()

    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cache.values())
