"""Gradient reduction for stages 0-2: where each parameter's gradient goes once autograd made it.

The engine registers ``register_post_accumulate_grad_hook`` on every trainable parameter; the hook
hands ``p.grad`` to a sink and frees it (``p.grad = None``), so the only lasting gradient storage
is the flat group's ``grad``. Reductions are sums; the engine divides by the world size (with the
loss scale) once, in fp32, at the optimizer step.

Every rank must issue the same collectives in the same order. Buckets complete in autograd's
order, which is the same on every rank for the same model; whatever has not completed when
backward returns is flushed in a fixed order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from zshard.train.zero._comm import Comm
from zshard.train.zero._flat import FlatParamGroup, Member


class GradSink(Protocol):
    def on_grad(self, group: FlatParamGroup, member: Member, grad: torch.Tensor) -> None: ...

    def finish_backward(self, boundary: bool) -> None:
        """Called after each backward; ``boundary`` marks the last micro step of the window."""
        ...


class WindowReducer:
    """Stages 0-1: accumulate full gradients in ``group.grad`` (N*P,) over the window, reduce at
    its end: all-reduce (stage 0) or reduce-scatter into the partition (stage 1), in buckets of at
    most ``bucket_numel`` elements."""

    def __init__(
        self, groups: Sequence[FlatParamGroup], comm: Comm, stage: int, bucket_numel: int
    ) -> None:
        self.groups = [g for g in groups if g.trainable]
        self.comm = comm
        self.stage = stage
        self.bucket_numel = bucket_numel

    def on_grad(self, group: FlatParamGroup, member: Member, grad: torch.Tensor) -> None:
        assert group.grad is not None
        group.grad[member.offset : member.offset + member.numel].add_(grad.reshape(-1))

    def finish_backward(self, boundary: bool) -> None:
        if not boundary or not self.comm.distributed:
            return
        for g in self.groups:
            assert g.grad is not None
            if self.stage == 0:
                for a in range(0, g.numel, self.bucket_numel):
                    self.comm.all_reduce(g.grad[a : min(g.numel, a + self.bucket_numel)])
            else:
                self._reduce_scatter(g, g.grad)

    def _reduce_scatter(self, g: FlatParamGroup, grad: torch.Tensor) -> None:
        # Bucket k is the same column range [a, b) of every rank's partition: reduce-scattering
        # (N, b - a) leaves each rank the sum over ranks of its own columns.
        n, p = self.comm.world_size, g.partition_numel
        lo, _ = g.partition_range
        columns = max(1, self.bucket_numel // n)
        by_rank = grad.view(n, p)
        for a in range(0, p, columns):
            b = min(p, a + columns)
            self.comm.reduce_scatter(grad[lo + a : lo + b], by_rank[:, a:b].contiguous().view(-1))


@dataclass
class _Bucket:
    group: FlatParamGroup
    start: int  # flat range [start, stop), cut at parameter boundaries
    stop: int
    size: int  # members in the bucket
    pending: int = 0
    buf: torch.Tensor | None = None
    done: bool = False


class BucketReducer:
    """Stage 2: gradients are reduced during backward, bucket by bucket, straight into the owning
    ranks' partitions (``group.grad`` is (P,)); full gradients never outlive their bucket.

    A bucket is a contiguous range of the flat buffer, so it lies in one or a few partitions; for
    each owner the overlapping piece is summed onto that rank (``reduce``), which moves each
    element once, as a reduce-scatter does.
    """

    def __init__(self, groups: Sequence[FlatParamGroup], comm: Comm, bucket_numel: int) -> None:
        self.comm = comm
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[int, _Bucket] = {}
        for g in groups:
            if not g.trainable:
                continue
            current: list[Member] = []
            for m in g.members:
                current.append(m)
                if sum(x.numel for x in current) >= bucket_numel:
                    self._add(g, current)
                    current = []
            if current:
                self._add(g, current)
        self._reset()

    def _add(self, g: FlatParamGroup, members: list[Member]) -> None:
        b = _Bucket(g, members[0].offset, members[-1].offset + members[-1].numel, len(members))
        self.buckets.append(b)
        for m in members:
            self.bucket_of[id(m)] = b

    def _reset(self) -> None:
        for b in self.buckets:
            b.pending, b.buf, b.done = b.size, None, False

    def on_grad(self, group: FlatParamGroup, member: Member, grad: torch.Tensor) -> None:
        b = self.bucket_of[id(member)]
        if b.buf is None:
            b.buf = torch.zeros(b.stop - b.start, dtype=grad.dtype, device=grad.device)
        lo = member.offset - b.start
        b.buf[lo : lo + member.numel].add_(grad.reshape(-1))
        b.pending -= 1
        if b.pending == 0:
            self._reduce(b)

    def _reduce(self, b: _Bucket) -> None:
        g = b.group
        assert g.grad is not None
        buf = b.buf
        if buf is None:  # no gradient reached this bucket: its contribution is zero
            buf = torch.zeros(b.stop - b.start, dtype=g.dtype, device=g.grad.device)
        p = g.partition_numel
        for owner in range(b.start // p, (b.stop - 1) // p + 1):
            lo, hi = max(b.start, owner * p), min(b.stop, (owner + 1) * p)
            piece = buf[lo - b.start : hi - b.start]
            self.comm.reduce(piece, dst=owner)
            if owner == self.comm.rank:
                g.grad[lo - owner * p : hi - owner * p].add_(piece)
        b.buf, b.done = None, True

    def finish_backward(self, boundary: bool) -> None:
        for b in self.buckets:
            if not b.done:
                self._reduce(b)
        self._reset()
