"""Gradient reduction for stages 0-2: where each parameter's gradient goes once autograd made it.

The engine registers ``register_post_accumulate_grad_hook`` on every trainable parameter; the hook
hands ``p.grad`` to a sink and clears ``p.grad``. Reductions are sums; the engine divides by the
world size (with the loss scale) once, in fp32, at the optimizer step.

Buckets are ranges of ``reduce_bucket_size`` elements of each flat group (the last one shorter),
cut anywhere (a parameter may span two). A bucket is reduced, with an asynchronous collective
started from the gradient hook, as soon as the last gradient it covers arrived: autograd makes
gradients roughly in reverse parameter order, so the buckets at the end of the flat buffer go
first and their reduction overlaps the rest of backward. The engine waits for them only where it
needs the result, at the optimizer step (:meth:`GradReducer.wait`).

- Stages 0-1 accumulate full gradients in ``group.grad`` (N*P,) over the accumulation window;
  only the window's last backward reduces, in place in ``group.grad``: all-reduce (stage 0), or
  reduce to the owners of the bucket's elements (stage 1; see ``Comm.reduce_to_owners``). No
  staging buffer.
- Stage 2 reduces every backward. A bucket keeps the gradients it covers (autograd's tensors)
  until its last one arrives, then copies them into one of ``STAGE2_SLOTS`` staging slots
  (allocated once), frees them and starts the reduction; on completion the owner adds its piece
  to ``group.grad`` (P,) and the slot is free again. With every slot in flight, the hook waits for
  the oldest: a bounded number of reductions in flight.

``zero.overlap_comm: false`` keeps the blocking path: stages 0-1 reduce after backward, stage 2
waits for each bucket inside the hook.

Every rank must issue the same collectives in the same order. Buckets complete in autograd's
order, which is the same on every rank for the same model; buckets still open when backward
returns (parameters without a gradient) are flushed in bucket order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from zshard.errors import ZshardError
from zshard.train.zero._comm import Comm, Handle
from zshard.train.zero._flat import FlatParamGroup, Member
from zshard.train.zero._slots import STAGE2_SLOTS, SlotPool


class GradSink(Protocol):
    def begin_backward(self, boundary: bool) -> None:
        """Called before each backward; ``boundary`` marks the last micro step of the window."""
        ...

    def on_grad(self, group: FlatParamGroup, member: Member, grad: torch.Tensor) -> None: ...

    def finish_backward(self, boundary: bool) -> None:
        """Called after each backward: start what is left (reductions may stay in flight)."""
        ...

    def wait(self) -> None:
        """Complete every reduction started: ``group.grad`` holds the reduced gradients."""
        ...

    @property
    def pending(self) -> int:
        """Reductions started and not yet waited for."""
        ...

    def buffer_bytes(self) -> int:
        """Bytes of staging buffers held for the whole run."""
        ...


class DoubleGradientError(ZshardError):
    """A parameter's gradient arrived twice in one backward after its bucket was reduced."""


@dataclass(eq=False)
class _Bucket:
    index: int
    group: FlatParamGroup
    start: int  # flat range [start, stop)
    stop: int
    members: tuple[Member, ...]  # every member overlapping the range
    pending: int = 0
    launched: bool = False
    held: dict[int, torch.Tensor] = field(default_factory=dict)  # stage 2: id(member) -> grad


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class GradReducer:
    """Stages 0-2 (see module doc)."""

    def __init__(
        self,
        groups: Sequence[FlatParamGroup],
        comm: Comm,
        *,
        stage: int,
        bucket_numel: int,
        overlap: bool,
        device: torch.device,
    ) -> None:
        self.comm = comm
        self.stage = stage
        self.overlap = overlap
        self.groups = [g for g in groups if g.trainable]
        self.buckets: list[_Bucket] = []
        self._buckets_of: dict[int, list[_Bucket]] = {}
        for g in self.groups:
            for start in range(0, g.numel, bucket_numel):
                stop = min(g.numel, start + bucket_numel)
                members = tuple(
                    m for m in g.members if m.offset < stop and m.offset + m.numel > start
                )
                b = _Bucket(len(self.buckets), g, start, stop, members)
                self.buckets.append(b)
                for m in members:
                    self._buckets_of.setdefault(id(m), []).append(b)
        self._reducing = False
        self._inflight: deque[Handle] = deque()
        self.pool: SlotPool | None = None
        if stage == 2 and comm.distributed and self.buckets:
            nbytes = max((b.stop - b.start) * _itemsize(b.group.dtype) for b in self.buckets)
            self.pool = SlotPool(STAGE2_SLOTS, nbytes, device)

    @property
    def pending(self) -> int:
        return sum(1 for h in self._inflight if not h.done)

    def buffer_bytes(self) -> int:
        return self.pool.nbytes if self.pool is not None else 0

    def begin_backward(self, boundary: bool) -> None:
        self._reducing = self.comm.distributed and (self.stage == 2 or boundary)
        if self._reducing:
            for b in self.buckets:
                b.pending, b.launched = len(b.members), False
                b.held.clear()

    def on_grad(self, group: FlatParamGroup, member: Member, grad: torch.Tensor) -> None:
        flat = grad.reshape(-1)
        if self.stage < 2 or not self.comm.distributed:
            assert group.grad is not None  # (N*P,), or (P,) = everything at world size 1
            group.grad[member.offset : member.offset + member.numel].add_(flat)
        if not self._reducing:
            return
        for b in self._buckets_of.get(id(member), ()):
            if b.launched:
                raise DoubleGradientError(
                    f"the gradient of {member.name!r} arrived twice in one backward, after its "
                    "reduction had started (reentrant activation checkpointing?); use "
                    "torch.utils.checkpoint with use_reentrant=False, or set "
                    "zero.overlap_comm: false (stages 0-1)"
                )
            if self.stage == 2:
                b.held[id(member)] = flat
            b.pending -= 1
            if b.pending == 0 and (self.overlap or self.stage == 2):
                self._launch(b)

    def _take_slot(self) -> int:
        assert self.pool is not None
        while (i := self.pool.take()) is None:
            self._inflight.popleft().wait()  # its completion gives its slot back
        return i

    def _launch(self, b: _Bucket) -> None:
        b.launched = True
        g = b.group
        assert g.grad is not None
        p = g.partition_numel
        if self.stage == 0:
            h = self.comm.start_all_reduce(g.grad[b.start : b.stop])
        elif self.stage == 1:
            h = self.comm.reduce_to_owners(g.grad[b.start : b.stop], b.start, p, async_op=True)
        else:
            h = self._launch_staged(b)
        self._inflight.append(h)
        if not self.overlap:
            self.wait()

    def _launch_staged(self, b: _Bucket) -> Handle:
        """Stage 2: the held gradients into a slot, freed; the slot reduced to the owners."""
        assert self.pool is not None
        g = b.group
        slot = self._take_slot()
        buf = self.pool.view(slot, g.dtype, b.stop - b.start)
        for m in b.members:
            lo, hi = max(m.offset, b.start), min(m.offset + m.numel, b.stop)
            grad = b.held.get(id(m))
            dest = buf[lo - b.start : hi - b.start]
            if grad is None:  # no gradient reached it: its contribution is zero
                dest.zero_()
            else:
                dest.copy_(grad[lo - m.offset : hi - m.offset])
        b.held.clear()
        h = self.comm.reduce_to_owners(buf, b.start, g.partition_numel, async_op=True)
        plo, phi = g.partition_range
        a, z = max(b.start, plo), min(b.stop, phi)
        pool, grad_part = self.pool, g.grad
        assert grad_part is not None

        def finish() -> None:
            if a < z:
                grad_part[a - plo : z - plo].add_(buf[a - b.start : z - b.start])
            pool.give(slot)

        return h.then(finish)

    def finish_backward(self, boundary: bool) -> None:
        if self._reducing:
            for b in self.buckets:
                if not b.launched:
                    self._launch(b)
        self._reducing = False
        if not self.overlap:
            self.wait()

    def wait(self) -> None:
        while self._inflight:
            self._inflight.popleft().wait()
