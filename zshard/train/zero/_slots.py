"""Staging buffers allocated once and reused every step.

Allocating and freeing multi-MB buffers every step fragments the host allocator's heap (RSS
creeps up step after step) and costs page faults; a :class:`SlotPool` holds a fixed number of
equal byte buffers for the whole run and hands them out as typed views.
"""

from __future__ import annotations

import torch

STAGE2_SLOTS = 2  # stage 2: gradient buckets in flight (one filling while one reduces)
# Stage 3: module gradients being reduce-scattered at once (native, qgZ); on gloo, gradient bytes
# in flight in units of the largest module.
STAGE3_SLOTS = 2
GATHER_SLOTS = 2  # stages 1-2, mode native: parameter all-gather buckets in flight
UPDATE_WINDOW = 1 << 19  # elements per optimizer-update window (elementwise optimizers)


class SlotPool:
    """``count`` buffers of ``nbytes`` each; :meth:`take` returns a free one's index or None."""

    def __init__(self, count: int, nbytes: int, device: torch.device) -> None:
        self.slot_bytes = nbytes
        self.device = device
        self._slots = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
        self._free = list(range(count - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * len(self._slots)

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def give(self, i: int) -> None:
        self._free.append(i)

    @property
    def free(self) -> int:
        return len(self._free)

    def view(self, i: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """Slot ``i`` as the first ``numel`` elements of ``dtype``."""
        size = numel * torch.empty((), dtype=dtype).element_size()
        if size > self.slot_bytes:
            raise ValueError(f"staging slot of {self.slot_bytes} bytes < {size} needed")
        return self._slots[i][:size].view(dtype)
