"""The I/O side of offload: where an offloaded partition lives (:class:`HostArray` in host memory,
or a :class:`SwapArray` file), rewriting one front to back, and the pipeline of slots that
streams the optimizer step's sub-groups between a reader thread, the training thread and a
writer thread (see ``_runtime.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from zshard.errors import StorageError
from zshard.store.layout import FlatGroup
from zshard.store.reader import to_numpy
from zshard.train.offload._swap import ArrayWriter, SwapArray
from zshard.train.zero import FlatParamGroup


class OffloadError(StorageError):
    """Offloaded state could not be read or written; the engine must restart from a checkpoint."""


class HostArray:
    """Device ``cpu``: one partition in host memory."""

    def __init__(self, group: FlatGroup, kind: str, dtype: torch.dtype, pin: bool) -> None:
        self.group = group
        self.kind = kind
        self.numel = group.partition_numel
        self.tensor = torch.empty(self.numel, dtype=dtype, pin_memory=pin)
        self.nbytes = self.numel * self.tensor.element_size()


Array = Union[SwapArray, HostArray]
Source = Union[torch.Tensor, SwapArray, HostArray]  # where a step reads or writes one kind


def torch_dtype(arr: Array) -> torch.dtype:
    if isinstance(arr, HostArray):
        return arr.tensor.dtype
    dtype: torch.dtype = getattr(torch, arr.dt.name)
    return dtype


def read_into(arr: SwapArray, start: int, out: torch.Tensor) -> None:
    arr.read(start, to_numpy(out))


class Rewrite:
    """Writes the next version of an array front to back (host memory: in place)."""

    def __init__(self, arr: Array) -> None:
        self.arr = arr
        self._pos = 0
        self._w: ArrayWriter | None = arr.writer() if isinstance(arr, SwapArray) else None

    def write(self, t: torch.Tensor) -> None:
        n = t.numel()
        if self._w is not None:
            self._w.write(to_numpy(t.detach().reshape(-1)))
        else:
            assert isinstance(self.arr, HostArray)
            dest = self.arr.tensor[self._pos : self._pos + n]
            if dest.data_ptr() != t.data_ptr():
                dest.copy_(t.reshape(-1))
        self._pos += n

    def close(self) -> None:
        if self._w is not None:
            self._w.close()

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()


@dataclass
class Plan:
    """Where one flat group's step reads and writes each role (value, state keys, param)."""

    group: FlatParamGroup
    value: Source  # fp32 values updated: the master, or the parameters themselves (fp32)
    states: dict[str, Source]
    param_out: Source | None  # the module-dtype copy of the new values (mixed precision)
    grad: torch.Tensor
    sub: int  # sub-group size in elements

    def roles(self) -> list[tuple[str, Source]]:
        out: list[tuple[str, Source]] = [("value", self.value)]
        out += [(f"state:{k}", s) for k, s in self.states.items()]
        return out

    def reads(self) -> list[tuple[str, SwapArray]]:
        return [(r, s) for r, s in self.roles() if isinstance(s, SwapArray)]

    def writes(self) -> list[tuple[str, SwapArray]]:
        out = self.reads()
        if isinstance(self.param_out, SwapArray):
            out.append(("param", self.param_out))
        return out


class Aborted(Exception):
    pass


class Pipeline:
    """The I/O side of one streamed optimizer step: ``buffer_count`` slots cycle between the
    reader thread (fills a free slot with a sub-group's stored values), the training thread
    (updates it) and the writer thread (writes it back, then frees the slot). The first failure
    sets ``abort``, which every thread checks, so none waits forever for a slot."""

    def __init__(self, slots: list[dict[str, torch.Tensor]], plans: Sequence[Plan]) -> None:
        self.slots = slots
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(len(slots)):
            self.free.put(i)
        self.abort = threading.Event()
        self._plan_index = {id(p): k for k, p in enumerate(plans)}
        self._writers: dict[tuple[int, str], Rewrite] = {}  # (plan, role) -> its open rewrite

    def check(self) -> None:
        if self.abort.is_set():
            raise Aborted

    def _acquire(self) -> int:
        while not self.abort.is_set():
            with contextlib.suppress(queue.Empty):
                return self.free.get(timeout=0.05)
        raise Aborted

    def read(self, p: Plan, a: int, b: int) -> int:
        """Reader thread: a free slot filled with elements [a, b) of every stored role."""
        slot_id = self._acquire()
        try:
            for role, arr in p.reads():
                read_into(arr, a, self.slots[slot_id][role][: b - a])
        except BaseException:
            self.free.put(slot_id)
            self.abort.set()
            raise
        return slot_id

    def write(self, p: Plan, a: int, b: int, slot_id: int) -> None:
        """Writer thread: elements [a, b) of every written role appended to its rewrite, which
        is published when the partition's last sub-group is written."""
        k = self._plan_index[id(p)]
        try:
            for role, arr in p.writes():
                w = self._writers.get((k, role))
                if w is None:
                    w = self._writers[(k, role)] = Rewrite(arr)
                w.write(self.slots[slot_id][role][: b - a])
            if b == p.group.partition_numel:
                for role, _ in p.writes():
                    self._writers.pop((k, role)).close()
        except BaseException:
            self.abort.set()
            raise
        finally:
            self.free.put(slot_id)

    def abort_writers(self) -> None:
        for w in self._writers.values():
            w.abort()


def first_error(futures: Sequence[cf.Future[Any]]) -> BaseException | None:
    for f in futures:
        if f.done() and not f.cancelled():
            e = f.exception()
            if e is not None and not isinstance(e, Aborted):
                return e
    return None
