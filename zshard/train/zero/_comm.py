"""Collectives over the data-parallel group, with a world-size-1 path that needs no process group.

The process group comes from the environment (torchrun style: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``). Without ``WORLD_SIZE``
and without an existing group, the engine runs as one process and every collective is a local
copy, so single-process training and tests pay nothing for distribution.

Every collective the engine issues goes through :class:`Comm`, which

- starts it synchronously or asynchronously (``async_op=True`` returns a :class:`Handle`, whose
  ``wait()`` blocks until it completed and then runs its completion callbacks in order);
- picks the implementation by backend (:func:`collective_mode`): on gloo, reduce-scatter and
  all-gather are slower than an all-reduce of the same buffer (57M fp32 elements, 2 ranks:
  reduce_scatter_single 0.35 s, all_gather_single 0.31 s, all_reduce 0.18 s), so mode
  ``allreduce`` builds both on all-reduce (reduce-scatter: all-reduce the full buffer and keep
  this rank's chunk; all-gather: all-reduce a buffer that is zero except this rank's chunk).
  Mode ``native`` (NCCL and every other backend) calls reduce-scatter and all-gather themselves.
  Both give the same sums: a sum over ranks of the same elements.
- counts, per kind of collective, the calls and the bytes handed to torch.distributed
  (:meth:`Comm.counters`), and how many of those bytes cross a node boundary.

torch 2.13 deprecates ``all_gather_into_tensor``/``reduce_scatter_tensor`` in favour of
``all_gather_single``/``reduce_scatter_single`` (gloo implements both); older torch has only the
former, so each is looked up once.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from zshard.errors import ConfigError
from zshard.train.config import DistConfig

log = logging.getLogger(__name__)

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

Mode = Literal["allreduce", "native", "local"]
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "reduce", "broadcast", "all_to_all")
# Environment override of the backend's choice, for tests and experiments: allreduce | native.
MODE_ENV = "ZSHARD_COLLECTIVES"


def collective_mode(backend: str | None) -> Mode:
    """``allreduce`` on gloo (its reduce-scatter and all-gather are slower than all-reduce),
    ``native`` elsewhere (NCCL keeps reduce-scatter and all-gather); ``ZSHARD_COLLECTIVES``
    overrides it."""
    env = os.environ.get(MODE_ENV, "auto")
    if env in ("allreduce", "native"):
        return env  # type: ignore[return-value]
    if env != "auto":
        raise ConfigError(f"{MODE_ENV}: expected auto, allreduce or native, got {env!r}")
    return "allreduce" if (backend or "").lower() == "gloo" else "native"


class Work(Protocol):
    def wait(self) -> Any: ...


class Handle:
    """One collective (possibly several torch works) started by :class:`Comm`.

    ``wait()`` blocks until every work completed, then runs the completion callbacks (added with
    :meth:`then`) once, in order. Waiting twice is a no-op.
    """

    __slots__ = ("_callbacks", "_comm", "_works", "done", "kind")

    def __init__(self, comm: Comm | None, kind: str, works: list[Any]) -> None:
        self._comm = comm
        self.kind = kind
        self._works = works
        self._callbacks: list[Callable[[], object]] = []
        self.done = False
        if comm is not None:
            comm.in_flight += 1

    def then(self, fn: Callable[[], object]) -> Handle:
        """Run ``fn`` once the collective completed (now, if it already has)."""
        if self.done:
            fn()
        else:
            self._callbacks.append(fn)
        return self

    def wait(self) -> bool:
        if self.done:
            return True
        for w in self._works:
            if w is not None:
                w.wait()
        self.done = True
        self._works = []
        if self._comm is not None:
            self._comm.in_flight -= 1
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()
        return True


def _done(kind: str = "local") -> Handle:
    h = Handle(None, kind, [])
    h.done = True
    return h


def resolve_device(cfg: DistConfig) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is asked for or available (``auto``), else CPU."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("dist.device: 'cuda' was asked for but CUDA is not available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """The data-parallel group: rank, world size and the collectives the engine uses.

    All tensors are flat 1-D buffers. Sums only: gloo has no AVG, so callers divide by the world
    size themselves (once, in fp32, at the optimizer step).

    ``in_flight`` counts the asynchronous collectives started and not yet waited for.
    """

    def __init__(
        self,
        group: Any | None,
        rank: int,
        world_size: int,
        *,
        owns_group: bool,
        timeout_s: float = 300.0,
        backend: str | None = None,
        local_world_size: int | None = None,
    ) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self.rank = rank
        self.world_size = world_size
        self.owns_group = owns_group  # created by this Comm (informational)
        self.backend = backend
        self.mode: Mode = collective_mode(backend) if world_size > 1 else "local"
        self._checkpoint_group: Any | None = None
        self.in_flight = 0
        # Ranks are grouped into nodes of LOCAL_WORLD_SIZE consecutive ranks (torchrun's order).
        lws = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world_size
        self.local_world_size = max(1, min(lws, world_size))
        node = rank // self.local_world_size
        self._node_of = [r // self.local_world_size for r in range(world_size)]
        self._remote = sum(1 for n in self._node_of if n != node)  # ranks on other nodes
        # kind -> [calls, bytes, bytes crossing a node boundary]
        self._counts: dict[str, list[int]] = {k: [0, 0, 0] for k in KINDS}

    @classmethod
    def from_env(cls, cfg: DistConfig, device: torch.device) -> Comm:
        """Join the existing default group, or create it from the environment, or run alone."""
        if dist.is_available() and dist.is_initialized():
            return cls(
                None,
                dist.get_rank(),
                dist.get_world_size(),
                owns_group=False,
                timeout_s=cfg.timeout_s,
                backend=str(dist.get_backend()),
            )
        if "WORLD_SIZE" not in os.environ:
            return cls(None, 0, 1, owns_group=False)
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
            **kwargs,
        )
        log.info(
            "joined process group: rank %d of %d (%s)",
            dist.get_rank(),
            dist.get_world_size(),
            backend,
        )
        return cls(
            None,
            dist.get_rank(),
            dist.get_world_size(),
            owns_group=True,
            timeout_s=cfg.timeout_s,
            backend=str(dist.get_backend()),
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def reduce_scatter_in_place(self) -> bool:
        """Whether :meth:`reduce_scatter` may write into this rank's chunk of its input (mode
        ``allreduce``: no output buffer needed)."""
        return self.mode != "native"

    def describe(self) -> str:
        """One line for the start-up log: which collective implements what, and why."""
        if self.mode == "local":
            return "collectives: none (one process)"
        how = (
            "reduce-scatter = all_reduce + own chunk, all-gather = all_reduce of a zero-filled "
            "buffer (this backend's reduce_scatter/all_gather are slower than all_reduce)"
            if self.mode == "allreduce"
            else "reduce-scatter = reduce_scatter_single / reduce to owners, all-gather = "
            "all_gather_single"
        )
        forced = f"; {MODE_ENV} set" if os.environ.get(MODE_ENV, "auto") != "auto" else ""
        return f"collectives on {self.backend}: mode {self.mode}: {how}{forced}"

    # -- accounting ----------------------------------------------------------------------------

    def _count(self, kind: str, nbytes: int, cross: int) -> None:
        c = self._counts[kind]
        c[0] += 1
        c[1] += nbytes
        c[2] += cross

    def _spread(self, nbytes: int) -> int:
        """Bytes of a buffer split evenly over the ranks that belong to other nodes' ranks."""
        return nbytes * self._remote // self.world_size

    def counters(self) -> dict[str, dict[str, int]]:
        """Totals since start: per kind, ``calls``, ``bytes`` (the buffer handed to
        torch.distributed: the tensor of an all-reduce, reduce or broadcast; the full N-chunk
        buffer of a reduce-scatter or all-gather) and ``cross_node_bytes`` (of those bytes, the
        share whose source and destination ranks are on different nodes, counted at the sender
        for reduce and reduce-scatter, at the receiver for broadcast and all-gather, both halves
        for all-reduce; 0 on one node). Every rank passes the same sizes, so the counts are the
        same on every rank except the broadcast/reduce cross-node shares."""
        return {
            k: {"calls": c[0], "bytes": c[1], "cross_node_bytes": c[2]}
            for k, c in self._counts.items()
        }

    # -- collectives ----------------------------------------------------------------------------

    def _finish(self, kind: str, works: list[Any], async_op: bool) -> Handle:
        h = Handle(self, kind, works)
        if not async_op:
            h.wait()
        return h

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Synchronous all-reduce (sum or max) of ``t`` in place; returns ``t``."""
        if self.distributed:
            self._count("all_reduce", _nbytes(t), 2 * self._spread(_nbytes(t)))
            dist.all_reduce(
                t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group
            )
        return t

    def start_all_reduce(self, t: torch.Tensor, *, async_op: bool = True) -> Handle:
        """Sum ``t`` over ranks in place."""
        if not self.distributed:
            return _done("all_reduce")
        self._count("all_reduce", _nbytes(t), 2 * self._spread(_nbytes(t)))
        work = dist.all_reduce(t, group=self.group, async_op=async_op)
        return self._finish("all_reduce", [work], async_op)

    def reduce(self, t: torch.Tensor, dst: int) -> None:
        """Sum ``t`` over ranks into ``dst``'s ``t``; other ranks' ``t`` is left undefined."""
        if self.distributed:
            self._count_reduce(t, dst)
            dist.reduce(t, dst=dst, group=self.group)

    def _count_reduce(self, t: torch.Tensor, dst: int) -> None:
        remote = dst != self.rank and self._node_of[dst] != self._node_of[self.rank]
        self._count("reduce", _nbytes(t), _nbytes(t) if remote else 0)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.distributed:
            self._count_broadcast(t, src)
            dist.broadcast(t, src=src, group=self.group)
        return t

    def _count_broadcast(self, t: torch.Tensor, src: int) -> None:
        remote = self._node_of[src] != self._node_of[self.rank]
        self._count("broadcast", _nbytes(t), _nbytes(t) if remote else 0)

    def all_gather(
        self, out: torch.Tensor, part: torch.Tensor, *, async_op: bool = False
    ) -> Handle:
        """``out`` (world_size * part.numel(),) <- every rank's ``part``, in rank order.

        ``part`` must not alias ``out``. Mode ``allreduce``: ``out`` is zeroed except this rank's
        chunk, then summed over ranks.
        """
        if not self.distributed:
            out.copy_(part)
            return _done("all_gather")
        if self.mode == "allreduce":
            n = part.numel()
            out.zero_()
            out[self.rank * n : (self.rank + 1) * n].copy_(part)
            return self.start_all_reduce(out, async_op=async_op)
        self._count("all_gather", _nbytes(out), self._spread(_nbytes(out)))
        work = _all_gather_single(out, part, group=self.group, async_op=async_op)
        return self._finish("all_gather", [work], async_op)

    def reduce_scatter(
        self, out: torch.Tensor, full: torch.Tensor, *, async_op: bool = False
    ) -> Handle:
        """``out`` (n,) <- sum over ranks of ``full[rank * n:(rank + 1) * n]``.

        ``full``'s contents are undefined afterwards. Mode ``allreduce`` sums ``full`` in place
        and copies this rank's chunk into ``out`` on completion, unless ``out`` *is* that chunk
        (see :attr:`reduce_scatter_in_place`); otherwise ``out`` must not alias ``full``.
        """
        if not self.distributed:
            out.copy_(full)
            return _done("reduce_scatter")
        if self.mode == "allreduce":
            n = out.numel()
            lo = self.rank * n
            h = self.start_all_reduce(full, async_op=True)
            if out.data_ptr() != full[lo:].data_ptr():
                h.then(lambda: out.copy_(full[lo : lo + n]))
            if not async_op:
                h.wait()
            return h
        self._count("reduce_scatter", _nbytes(full), self._spread(_nbytes(full)))
        work = _reduce_scatter_single(out, full, group=self.group, async_op=async_op)
        return self._finish("reduce_scatter", [work], async_op)

    def reduce_to_owners(
        self, buf: torch.Tensor, start: int, partition: int, *, async_op: bool = False
    ) -> Handle:
        """``buf`` holds elements [start, start + len) of a flat buffer split into chunks of
        ``partition`` elements, chunk r owned by rank r. Afterwards the elements this rank owns
        hold their sum over ranks; the others are undefined. Mode ``allreduce``: one all-reduce of
        ``buf``; ``native``: one ``reduce`` to each owner of a piece (each element moves once, as
        in a reduce-scatter, for ranges that do not cover whole partitions)."""
        if not self.distributed:
            return _done("reduce")
        if self.mode == "allreduce":
            return self.start_all_reduce(buf, async_op=async_op)
        works = []
        stop = start + buf.numel()
        for owner in range(start // partition, (stop - 1) // partition + 1):
            lo, hi = max(start, owner * partition), min(stop, (owner + 1) * partition)
            piece = buf[lo - start : hi - start]
            self._count_reduce(piece, owner)
            works.append(dist.reduce(piece, dst=owner, group=self.group, async_op=async_op))
        return self._finish("reduce", works, async_op)

    def gather_from_owners(
        self, buf: torch.Tensor, start: int, partition: int, *, async_op: bool = False
    ) -> Handle:
        """The converse of :meth:`reduce_to_owners`: ``buf`` holds elements [start, start + len)
        whose owned elements are valid on their owner; afterwards every element holds its owner's
        value. Mode ``allreduce``: zero what this rank does not own, all-reduce ``buf``;
        ``native``: one ``broadcast`` from each owner of a piece."""
        if not self.distributed:
            return _done("broadcast")
        stop = start + buf.numel()
        owners = range(start // partition, (stop - 1) // partition + 1)
        if self.mode == "allreduce":
            lo, hi = self.rank * partition, (self.rank + 1) * partition
            if lo > start:
                buf[: min(lo, stop) - start].zero_()
            if hi < stop:
                buf[max(hi, start) - start :].zero_()
            return self.start_all_reduce(buf, async_op=async_op)
        works = []
        for owner in owners:
            lo, hi = max(start, owner * partition), min(stop, (owner + 1) * partition)
            piece = buf[lo - start : hi - start]
            self._count_broadcast(piece, owner)
            works.append(dist.broadcast(piece, src=owner, group=self.group, async_op=async_op))
        return self._finish("broadcast", works, async_op)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, *, async_op: bool = False) -> Handle:
        """``out`` (N*k,) <- chunk ``rank`` of every rank's ``inp`` (N*k,), in rank order (ZeRO++'s
        qgZ). Native on every backend (gloo included). Counted at the sender: ``bytes`` is
        ``inp``, ``cross_node_bytes`` its chunks for ranks on other nodes."""
        if not self.distributed:
            out.copy_(inp)
            return _done("all_to_all")
        self._count("all_to_all", _nbytes(inp), self._spread(_nbytes(inp)))
        work = dist.all_to_all_single(out, inp, group=self.group, async_op=async_op)
        return self._finish("all_to_all", [work], async_op)

    def subgroup(self, ranks: Sequence[int]) -> Comm | None:
        """A Comm over the global ``ranks`` of this (default) group, or None on a rank outside
        them. Collective: every rank calls it with the same ranks, in the same order. It shares
        this Comm's counters, and its cross-node shares follow this Comm's nodes."""
        members = list(ranks)
        group = None
        if self.distributed and len(members) > 1:
            timeout = datetime.timedelta(seconds=self.timeout_s)
            group = dist.new_group(members, timeout=timeout)
        if self.rank not in members:
            return None
        sub = Comm(
            group,
            members.index(self.rank),
            len(members),
            owns_group=False,
            timeout_s=self.timeout_s,
            backend=self.backend,
            local_world_size=len(members),
        )
        sub._node_of = [self._node_of[r] for r in members]
        sub._remote = sum(1 for n in sub._node_of if n != self._node_of[self.rank])
        sub._counts = self._counts
        return sub

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    # -- checkpoint side channel ---------------------------------------------------------------

    def ensure_checkpoint_group(self) -> None:
        """Create the checkpoint side-channel group (collective: call on every rank, main thread).

        Async saves synchronise while the main thread runs training collectives; on one group
        the two streams could interleave differently on different ranks and deadlock. A separate
        gloo group also works with CPU tensors whatever the training backend.
        """
        if self.distributed and self._checkpoint_group is None:
            # Ranks wait here for the slowest writer (shards to object storage can take minutes),
            # which is not a hang: give it at least an hour.
            timeout = datetime.timedelta(seconds=max(self.timeout_s, 3600.0))
            self._checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)

    def checkpoint_any(self, flag: bool) -> bool:
        """On the checkpoint group (safe from a background thread): True everywhere if ``flag``
        is true on any rank. Doubles as a barrier, and lets one rank's failure stop all ranks
        instead of leaving them waiting for it. Not counted: it is not training traffic."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._checkpoint_group)
        return bool(t.item())

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False
