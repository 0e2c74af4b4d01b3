"""Offload (ZeRO-Offload / ZeRO-Infinity) through the store: no native build, any fsspec path.

What moves off the rank (``zero.offload_optimizer``, stages 1-3; ``zero.offload_param``, stage 3):

    kind      what                                  offloaded by
    master    fp32 master weights (mixed precision) offload_optimizer
    <key>     optimizer state (exp_avg, ...)        offload_optimizer
    param     the module-dtype partition (stage 3)  offload_param (fp32: it is also the master)

Device ``cpu`` keeps an array in host memory (:class:`HostArray`, pinned when CUDA is present and
``pin_memory`` is set). Device ``nvme`` keeps it as a store shard in this rank's swap space under
``path`` (:mod:`zshard.train.offload._swap`): a local NVMe directory, ``memory://``, ``s3://``...

The optimizer step streams sub-groups of ``sub_group_size`` elements of each flat group's
partition through ``buffer_count`` slots: a reader thread fills the next slots (every chunk's
crc32c checked), the training thread updates one, a writer thread writes finished ones back
(chunks overwritten in place on local disks, a whole new object elsewhere: see _swap.py).
Resident optimizer memory is the slots: ``buffer_count x sub_group_size`` elements per offloaded
kind. The update is the same elementwise arithmetic on slices, so results equal the in-memory
path bit for bit.

Stage-3 parameters are fetched before a module's forward and backward (``fetch``), read ahead by
``offload_param.buffer_count`` groups in the order the first step recorded (``prefetch``), and
dropped after the all-gather unless ``max_in_memory`` elements of cache remain (``done``): see
``_fetch.py``. The arrays and the step's slot pipeline are in ``_stream.py``.

Failure policy: any I/O error in a step raises :class:`OffloadError` on every rank (they agree
before the parameter all-gather) and leaves the engine unusable (``step`` and ``save`` refuse)
until a ``load`` rewrites every array; committed checkpoints are never touched, so the run
restarts from the last one. A failed parameter fetch fails the forward or backward on its rank;
the other ranks then fail in their next collective (``dist.timeout_s``). Bad paths, unreachable
object stores and too little space fail at start-up (:func:`preflight`, and again in the engine)
in one line.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from zshard.errors import StorageError, ZshardError
from zshard.store.dtypes import from_torch
from zshard.train.config import (
    OffloadOptimizerConfig,
    OffloadParamConfig,
    ZeroConfig,
)
from zshard.train.offload._fetch import ParamFetcher
from zshard.train.offload._preflight import check_path, local_ranks, nvme_paths
from zshard.train.offload._stream import (
    Array,
    HostArray,
    OffloadError,
    Pipeline,
    Plan,
    Rewrite,
    Source,
    first_error,
    read_into,
    torch_dtype,
)
from zshard.train.offload._swap import SwapArray, SwapSpace, new_run_id, sweep_stale
from zshard.train.optim import FlatOptimizer
from zshard.train.zero import Comm, FlatParamGroup

log = logging.getLogger("zshard.train")

DEFAULT_WINDOW = 1 << 22  # elements per read/write window when no sub_group_size applies


class Offload:
    """Every offloaded array of one rank, the streamed optimizer step and stage-3 fetching."""

    def __init__(
        self,
        zero: ZeroConfig,
        *,
        comm: Comm,
        device: torch.device,
        state_keys: Sequence[str],
        need_bytes: Mapping[str, int],
    ) -> None:
        self.opt: OffloadOptimizerConfig | None = zero.offload_optimizer
        self.par: OffloadParamConfig | None = zero.offload_param
        self.stage = zero.stage
        self.device = device
        self.rank = comm.rank
        self.state_keys = tuple(state_keys)
        self.arrays: dict[tuple[str, str], Array] = {}
        self.spaces: dict[str, SwapSpace] = {}
        self.broken: str | None = None  # why the state is inconsistent, once it is
        cuda = torch.cuda.is_available()
        self._pin_opt = bool(self.opt and self.opt.pin_memory and cuda)
        self._pin_par = bool(self.par and self.par.pin_memory and cuda)
        self.sub_group = self.opt.sub_group_size if self.opt else DEFAULT_WINDOW
        # The step's slots: buffer_count dicts role -> (sub_group,) tensor, allocated on first
        # use (parameter offload alone still streams the step, with its own buffer_count).
        self.buffer_count = self.opt.buffer_count if self.opt else self.par.buffer_count  # type: ignore[union-attr]
        self.read_ahead = self.par.buffer_count if self.par else 0  # stage-3 partitions
        self._slots: list[dict[str, torch.Tensor]] = [{} for _ in range(self.buffer_count)]
        self._io_read = cf.ThreadPoolExecutor(1, thread_name_prefix="zshard-offload-read")
        self._io_write = cf.ThreadPoolExecutor(1, thread_name_prefix="zshard-offload-write")
        self._params = ParamFetcher(
            arrays=self.arrays,
            reader=self._io_read,
            device=device,
            rank=comm.rank,
            pin=self._pin_par,
            read_ahead=self.read_ahead,
            max_in_memory=self.par.max_in_memory if self.par else 0,
        )
        run_id = _agreed_run_id(comm, device)
        try:
            for url, key in nvme_paths(zero).items():
                if int(os.environ.get("LOCAL_RANK", comm.rank)) == 0:
                    with contextlib.suppress(ZshardError, OSError):
                        sweep_stale(url)
                check_path(key, url, need_bytes.get(url, 0) * local_ranks())
                try:
                    self.spaces[url] = SwapSpace(url, run_id, comm.rank)
                except (ZshardError, OSError) as e:
                    raise StorageError(
                        f"{key} {url}: cannot create the swap directory: {e}"
                    ) from None
        except BaseException:
            self.close()
            raise
        log.info(
            "offload on rank %d: optimizer %s, params %s%s",
            comm.rank,
            self.opt.device if self.opt else "none",
            self.par.device if self.par else "none",
            "".join(f"; swap {s.url}" for s in self.spaces.values()),
        )

    @classmethod
    def create(
        cls,
        zero: ZeroConfig,
        *,
        comm: Comm,
        device: torch.device,
        state_keys: Sequence[str],
        need_bytes: Mapping[str, int],
    ) -> Offload:
        """Construct on every rank; if any rank fails, every rank raises (none is left waiting
        in a collective for a peer that gave up)."""
        made: Offload | None = None
        error: BaseException | None = None
        try:
            made = cls(zero, comm=comm, device=device, state_keys=state_keys, need_bytes=need_bytes)
        except ZshardError as e:
            error = e
        if any_rank(comm, device, error is not None):
            if made is not None:
                made.close()
            if error is not None:
                raise error
            raise StorageError("offload: another rank could not prepare its swap space")
        assert made is not None
        return made

    # -- which arrays -------------------------------------------------------------------------

    def holds(self, g: FlatParamGroup, kind: str) -> bool:
        return (g.name, kind) in self.arrays

    def _new(self, g: FlatParamGroup, kind: str, dtype: torch.dtype) -> Array:
        block = self.par if kind == "param" else self.opt
        assert block is not None
        arr: Array
        if block.device == "cpu":
            pin = self._pin_par if kind == "param" else self._pin_opt
            arr = HostArray(g.layout, kind, dtype, pin)
        else:
            assert block.path is not None
            arr = self.spaces[block.path].array(g.layout, kind, from_torch(dtype))
        self.arrays[(g.name, kind)] = arr
        return arr

    def adopt(self, g: FlatParamGroup) -> None:
        """Move a freshly built group's offloaded kinds off the rank (its values, and zero
        optimizer state) and drop the resident tensors."""
        if self.par is not None and self.stage == 3 and not g.persistent:
            part = g.param_part
            assert part is not None
            self._new(g, "param", g.dtype)
            self.fill(g, "param", lambda a, b: part[a:b])
            if g.master is part:
                g.master = None  # fp32: the master is the parameter partition itself
            g.param_part = None
        if self.opt is not None and g.trainable:
            if not g.master_is_param:
                master = g.master
                assert master is not None
                self._new(g, "master", torch.float32)
                self.fill(g, "master", lambda a, b: master[a:b])
                g.master = None
            for key in self.state_keys:
                self._new(g, key, torch.float32)
                self.fill(g, key, lambda a, b: torch.zeros(b - a))
                g.state.pop(key, None)

    # -- whole-array streaming (start-up, load, edits) ------------------------------------------

    def window(self, g: FlatParamGroup) -> int:
        """Sub-group size for ``g``: ``sub_group_size``, cut at chunk boundaries when larger
        than a chunk so that each read covers whole chunks."""
        c = g.layout.chunk_numel
        s = self.sub_group
        return s if s < c else s // c * c

    def fill(
        self, g: FlatParamGroup, kind: str, produce: Callable[[int, int], torch.Tensor]
    ) -> None:
        """Write a new version of ``(g, kind)`` window by window from ``produce(a, b)``."""
        arr = self.arrays[(g.name, kind)]
        if kind == "param":
            self.invalidate()
        dtype, w = torch_dtype(arr), self.window(g)
        out = Rewrite(arr)
        try:
            for a in range(0, arr.numel, w):
                b = min(arr.numel, a + w)
                out.write(produce(a, b).detach().to("cpu", dtype))
            out.close()
        except BaseException:
            out.abort()
            raise

    def modify(
        self, g: FlatParamGroup, kind: str, edit: Callable[[torch.Tensor, int, int], None]
    ) -> None:
        """``edit(window, a, b)`` in place over every window of ``(g, kind)``."""
        arr = self.arrays[(g.name, kind)]
        if isinstance(arr, HostArray):
            w = self.window(g)
            for a in range(0, arr.numel, w):
                b = min(arr.numel, a + w)
                edit(arr.tensor[a:b], a, b)
            return
        buf = torch.empty(min(arr.numel, self.window(g)), dtype=torch_dtype(arr))

        def produce(a: int, b: int) -> torch.Tensor:
            t = buf[: b - a]
            read_into(arr, a, t)
            edit(t, a, b)
            return t

        self.fill(g, kind, produce)

    def read_full(self, g: FlatParamGroup, kind: str) -> torch.Tensor:
        """The whole partition of ``(g, kind)`` as a new host tensor."""
        arr = self.arrays[(g.name, kind)]
        if isinstance(arr, HostArray):
            return arr.tensor.clone()
        t = torch.empty(arr.numel, dtype=torch_dtype(arr))
        read_into(arr, 0, t)
        return t

    # -- the streamed optimizer step -----------------------------------------------------------

    def _plan(self, g: FlatParamGroup, grad: torch.Tensor) -> Plan:
        def held(kind: str, resident: torch.Tensor | None) -> Source:
            arr = self.arrays.get((g.name, kind))
            if arr is not None:
                return arr
            assert resident is not None, (g.name, kind)
            return resident

        value = held("param" if g.master_is_param else "master", g.master)
        states = {k: held(k, g.state.get(k)) for k in self.state_keys}
        param_out = None if g.master_is_param else held("param", g.param_part)
        return Plan(g, value, states, param_out, grad, self.window(g))

    def _slot_buffer(
        self, slot: dict[str, torch.Tensor], role: str, dtype: torch.dtype, size: int
    ) -> None:
        t = slot.get(role)
        if t is None or t.dtype != dtype or t.numel() < size:
            pin = self._pin_par if role == "param" else self._pin_opt
            slot[role] = torch.empty(size, dtype=dtype, pin_memory=pin)

    def update(
        self,
        groups: Sequence[FlatParamGroup],
        grads: Mapping[str, torch.Tensor],
        scale: float,
        optimizer: FlatOptimizer,
        *,
        step: int,
        lr: float,
    ) -> None:
        """One optimizer step over ``groups``, sub-group by sub-group (see module doc).

        ``grads[g.name]`` is the raw reduced gradient over the update range; it is multiplied by
        ``scale`` (unscale and clip) per sub-group, exactly as the in-memory path does at once.
        """
        if self.broken:
            raise OffloadError(self.broken)
        self.invalidate()  # parameter versions are about to change
        plans = [self._plan(g, grads[g.name]) for g in groups]
        size = max((min(p.sub, p.group.partition_numel) for p in plans), default=0)
        for p in plans:
            for role, arr in p.writes():
                for slot in self._slots:
                    self._slot_buffer(slot, role, torch_dtype(arr), size)
        items = [
            (p, a, min(p.group.partition_numel, a + p.sub))
            for p in plans
            for a in range(0, p.group.partition_numel, p.sub)
        ]
        pipe = Pipeline(self._slots, plans)
        reads = [self._io_read.submit(pipe.read, p, a, b) for p, a, b in items]
        writes: list[cf.Future[Any]] = []
        try:
            for i, (p, a, b) in enumerate(items):
                pipe.check()
                slot_id = reads[i].result()
                self._compute(p, a, b, self._slots[slot_id], optimizer, scale, step, lr)
                writes.append(self._io_write.submit(pipe.write, p, a, b, slot_id))
            for f in writes:
                f.result()
            pipe.check()
        except BaseException as e:
            pipe.abort.set()
            for f in reads:
                f.cancel()
            cf.wait([*reads, *writes])
            pipe.abort_writers()
            cause = first_error([*writes, *reads]) or e
            self.broken = (
                f"rank {self.rank}: optimizer step {step}: offloaded state I/O failed: {cause}; "
                "the training state is inconsistent now: restart from the last checkpoint"
            )
            if not isinstance(cause, Exception):  # KeyboardInterrupt and the like stay as they are
                raise
            raise OffloadError(self.broken) from cause

    def _compute(
        self,
        p: Plan,
        a: int,
        b: int,
        slot: dict[str, torch.Tensor],
        optimizer: FlatOptimizer,
        scale: float,
        step: int,
        lr: float,
    ) -> None:
        def window(src: Source, role: str) -> torch.Tensor:
            if isinstance(src, torch.Tensor):
                return src[a:b]
            if isinstance(src, HostArray):
                return src.tensor[a:b]
            return slot[role][: b - a]

        grad = p.grad[a:b]
        grad = grad.mul_(scale) if grad.dtype == torch.float32 else grad.float().mul_(scale)
        dev = grad.device
        value = window(p.value, "value")
        states = {k: window(s, f"state:{k}") for k, s in p.states.items()}
        v = value.to(dev, non_blocking=True)
        st = {k: t.to(dev, non_blocking=True) for k, t in states.items()}
        optimizer.update(v, grad, st, step=step, lr=lr)
        if v is not value:  # the update ran on the accelerator: back to the host copies
            value.copy_(v)
            for k, t in states.items():
                t.copy_(st[k])
        if p.param_out is not None:
            window(p.param_out, "param").copy_(v)

    # -- stage-3 parameters (the zero.ParamSource protocol; see _fetch.py) -----------------------

    def fetch(self, g: FlatParamGroup) -> torch.Tensor:
        return self._params.fetch(g)

    def prefetch(self, g: FlatParamGroup) -> None:
        self._params.prefetch(g)

    def done(self, g: FlatParamGroup, part: torch.Tensor) -> None:
        assert self.par is not None
        self._params.done(g, part)

    def invalidate(self) -> None:
        """Forget fetched and prefetched partitions (their versions are about to change)."""
        self._params.invalidate()

    # -- checkpoints and accounting -------------------------------------------------------------

    def file_arrays(self) -> dict[tuple[str, str], SwapArray]:
        return {k: a for k, a in self.arrays.items() if isinstance(a, SwapArray)}

    def host_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        return {k: a.tensor for k, a in self.arrays.items() if isinstance(a, HostArray)}

    def snapshot(self) -> tuple[dict[tuple[str, str], SwapArray], Callable[[], None]]:
        """Frozen copies of every file array (for an async save) and a function removing them."""
        tag = f"snapshots/{uuid.uuid4().hex[:12]}"
        out = {
            k: a.snapshot(f"{tag}/{a.key}")
            for k, a in self.arrays.items()
            if isinstance(a, SwapArray)
        }

        def remove() -> None:
            for space in self.spaces.values():
                with contextlib.suppress(ZshardError, OSError):
                    space.storage.remove_tree(tag)

        return out, remove

    def memory(self) -> dict[str, int]:
        """``offloaded``: bytes held off the rank's working set (host arrays or files);
        ``offload_buffers``: resident slots and cached parameter partitions."""
        slots = sum(t.numel() * t.element_size() for s in self._slots for t in s.values())
        cached = self._params.cached_bytes()
        return {
            "offloaded": sum(a.nbytes for a in self.arrays.values()),
            "offload_buffers": slots + cached,
        }

    def close(self) -> None:
        self.invalidate()
        self._io_read.shutdown(wait=True, cancel_futures=True)
        self._io_write.shutdown(wait=True, cancel_futures=True)
        for space in self.spaces.values():
            space.close()
        self.spaces.clear()


def _agreed_run_id(comm: Comm, device: torch.device) -> str:
    """Rank 0's new run id, on every rank (one broadcast; every id has the same length)."""
    t = torch.tensor(list(new_run_id().encode()), dtype=torch.uint8, device=device)
    comm.broadcast(t, 0)
    return bytes(t.cpu().tolist()).decode()


def any_rank(comm: Comm, device: torch.device, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (a collective: call it on all ranks)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    comm.all_reduce(t, op="max")
    return bool(t.item())


__all__ = ["Offload", "any_rank"]
