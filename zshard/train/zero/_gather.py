"""Stages 1-2: the updated partitions back to every rank, overlapping the next forward.

After the optimizer step each rank holds new values for its partition of every trainable flat
group; the others' partitions must reach it before the parameters are used again. :meth:`start`
arms one asynchronous collective per bucket of ``allgather_bucket_size`` elements; the root
module's forward pre-hook starts them as the next forward begins, and a forward pre-hook on every
module that owns parameters waits for the buckets holding them (buckets are waited for in order),
so the gathers of later layers overlap the forward of earlier ones. They start with the forward,
not at the end of the step, so that a blocking collective issued between the two (a barrier, the
training loop's loss average or stop agreement) does not queue behind them.

- Mode ``allreduce`` (gloo): a bucket is a contiguous range of the flat buffer, in parameter
  order; what this rank does not own is zeroed and the range is all-reduced in place
  (``Comm.gather_from_owners``). No staging buffer: every bucket starts at once.
- Mode ``native`` (NCCL): a bucket is the same column range [a, b) of every rank's partition,
  all-gathered (``all_gather_single``) into one of ``GATHER_SLOTS`` staging slots allocated once,
  then copied into place; at most that many are in flight, the next one starts when one is
  waited for.

``zero.overlap_comm: false`` waits for every bucket in :meth:`start` (the blocking gather at the
end of the step). Parameters read outside their own module's forward before that forward (say by
user code between ``step()`` and the next forward) need ``engine.synchronize()`` first; the
engine does so itself before saving, loading, stepping and in ``gathered_parameters()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from zshard.train.zero._comm import Comm, Handle
from zshard.train.zero._flat import FlatParamGroup
from zshard.train.zero._slots import GATHER_SLOTS, SlotPool


@dataclass(eq=False)
class _Bucket:
    group: FlatParamGroup
    start: int  # allreduce: flat range; native: column range of every partition
    stop: int


class ParamGather:
    """Bucketed, asynchronous all-gather of updated partitions (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[FlatParamGroup],
        comm: Comm,
        *,
        bucket_numel: int,
        overlap: bool,
        device: torch.device,
    ) -> None:
        self.comm = comm
        self.overlap = overlap
        self._root = model
        self.native = comm.mode == "native"
        self.buckets: list[_Bucket] = []
        n = comm.world_size
        last: dict[int, int] = {}  # id(param) -> index of the last bucket it needs
        for g in groups:
            if not g.trainable:
                continue
            p = g.partition_numel
            if self.native:
                cols = max(1, bucket_numel // n)
                for a in range(0, p, cols):
                    self.buckets.append(_Bucket(g, a, min(p, a + cols)))
            else:
                for s in range(0, g.numel, bucket_numel):
                    self.buckets.append(_Bucket(g, s, min(g.numel, s + bucket_numel)))
        for i, b in enumerate(self.buckets):
            for m in b.group.members:
                if m.numel and self._covers(b, m.offset, m.offset + m.numel):
                    last[id(m.param)] = i
        self._need: dict[nn.Module, int] = {}
        for module in model.modules():
            need = [
                last[id(p)] for p in module._parameters.values() if p is not None and id(p) in last
            ]
            if need:
                self._need[module] = max(need)
        self.pool: SlotPool | None = None
        if self.native and self.buckets:
            nbytes = max(
                n * (b.stop - b.start) * torch.empty((), dtype=b.group.dtype).element_size()
                for b in self.buckets
            )
            self.pool = SlotPool(min(GATHER_SLOTS, len(self.buckets)), nbytes, device)
        self._handles: list[Handle | None] = [None] * len(self.buckets)
        self._launched = self._waited = len(self.buckets)  # nothing pending
        self._hooks: list[RemovableHandle] = []

    def _covers(self, b: _Bucket, lo: int, hi: int) -> bool:
        """Does bucket ``b`` hold any element of flat range [lo, hi)?"""
        if not self.native:
            return b.start < hi and lo < b.stop
        p = b.group.partition_numel
        for r in range(lo // p, (hi - 1) // p + 1):
            a, z = max(lo, r * p) - r * p, min(hi, (r + 1) * p) - r * p
            if b.start < z and a < b.stop:
                return True
        return False

    def install(self) -> None:
        self._hooks.append(self._root.register_forward_pre_hook(self._begin))
        for module in self._need:
            self._hooks.append(module.register_forward_pre_hook(self._pre_forward))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def buffer_bytes(self) -> int:
        return self.pool.nbytes if self.pool is not None else 0

    @property
    def pending(self) -> int:
        return len(self.buckets) - self._waited

    def _begin(self, module: nn.Module, args: Any) -> None:
        self._launch_first()

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        need = self._need.get(module)
        if need is not None and self._waited <= need:
            self.wait_until(need)

    # -- starting and waiting ----------------------------------------------------------------

    def start(self) -> None:
        """The partitions were updated: gather them, starting with the next forward (or now,
        blocking, without overlap)."""
        self.wait_all()
        self._launched = self._waited = 0
        if not self.overlap:
            self.wait_all()

    def _launch_first(self) -> None:
        """Start the buckets of an armed gather: all of them, or as many as there are slots."""
        limit = len(self.pool) if self.pool is not None else len(self.buckets)
        while self._launched < min(limit, len(self.buckets)):
            self._launch(self._launched)

    def _launch(self, i: int) -> None:
        b = self.buckets[i]
        g = b.group
        assert g.flat is not None and g.param_part is not None
        if not self.native:
            h = self.comm.gather_from_owners(
                g.flat[b.start : b.stop], b.start, g.partition_numel, async_op=True
            )
        else:
            assert self.pool is not None
            n, width = self.comm.world_size, b.stop - b.start
            slot = i % len(self.pool)
            out = self.pool.view(slot, g.dtype, n * width)
            h = self.comm.all_gather(out, g.param_part[b.start : b.stop], async_op=True)
            by_rank = g.flat.view(n, g.partition_numel)[:, b.start : b.stop]
            h.then(lambda: by_rank.copy_(out.view(n, width)))
        self._handles[i] = h
        self._launched = i + 1

    def wait_until(self, i: int) -> None:
        """Wait for buckets up to ``i`` in order (starting the next ones as slots free up)."""
        if self._waited <= i and self._waited < len(self.buckets):
            self._launch_first()
        while self._waited <= i and self._waited < len(self.buckets):
            k = self._waited
            while self._launched <= k:
                self._launch(self._launched)
            h = self._handles[k]
            assert h is not None
            h.wait()
            self._handles[k] = None
            self._waited = k + 1
            nxt = k + (len(self.pool) if self.pool is not None else len(self.buckets))
            if self.pool is not None and nxt < len(self.buckets) and self._launched == nxt:
                self._launch(nxt)

    def wait_all(self) -> None:
        self.wait_until(len(self.buckets) - 1)
