"""Stage 3: gather each module's parameters just before use and release them after.

Each rank keeps only its partition of every flat group (one group per module owning parameters).

- Forward: a forward pre-hook gathers the module's groups (its own and any tied group it uses);
  the forward hook releases them and registers a hook on each output that requires grad.
- Release frees the gathered parameters in place, as FSDP does: every group has one full-size
  tensor for the whole run whose storage is resized to 0 bytes on release
  (``untyped_storage().resize_(0)``) and back to full size for the next gather. Autograd's saved
  tensors (views such as ``weight.t()``) point at that same storage, so the memory is really
  returned between forward and backward, and the re-gather before backward refills exactly what
  they see.
- Backward: the first output hook to fire (the gradient w.r.t. the module's output exists, so the
  module's backward is next) gathers the groups again and *holds* them. Gradients arrive through
  the parameters' post-accumulate hooks. With collectives built on all-reduce (gloo), each
  parameter's gradient (autograd's own tensor) is all-reduced in place as it arrives and the
  part inside this rank's partition is added to the group's (P,) gradient partition when that
  completes: no staging copy and no staging buffer, so nothing beyond the formula stays
  allocated between backwards. With native collectives (and qgZ) a reduce-scatter needs the
  group's gradients contiguous: they are kept until every parameter of the group has one, then
  copied into one of ``STAGE3_SLOTS`` staging slots (allocated once) and reduce-scattered into
  the partition. Either way the bytes in flight are bounded (``STAGE3_SLOTS`` times the largest
  group): past that the hook waits for the oldest; the engine waits for the rest at the
  optimizer step. The group is released once all its gradients are handed off. A held group is
  not released by a forward hook, which matters for activation checkpointing: the recomputed
  forward runs inside backward.
- Host memory (CPU): backward frees each module's activations, which glibc keeps resident in
  its heap; each time modules worth the in-flight bound are done, ``release_memory`` (the
  engine's ``release_free_heap``) returns the heap's free pages to the system.
- Prefetch: the first training iteration records the order groups are used in forward and in
  backward; later, using a group starts asynchronous all-gathers of the next ``prefetch``.
- Groups smaller than the persistence threshold stay whole on every rank (``persistent``).
- Parameter offload (``params``, see offload.py): a group's partition is not resident; it is
  fetched for each all-gather and dropped once the gather is done. Reads run ahead of use by the
  source's ``read_ahead`` groups in the recorded order (further than the gathers' prefetch, so
  a prefetched gather finds its partition read), and the next step's first groups are read as
  soon as the optimizer has written them (``after_step``).

``zero.overlap_comm: false`` waits for each reduce-scatter inside the hook (the blocking path).

ZeRO++ (``zero.quantized_weights``, ``hpz_partition_size``, ``quantized_gradients``; _zeropp.py):
the hooks' gathers (``training=True``) go through :class:`ZeroPP`, which may quantize them (qwZ)
or serve them from the node's secondary partitions (hpZ, valid until ``release_all`` at the end
of each backward), and each group's reduce-scatter becomes qgZ's two-hop all-to-all. Any other
gather (``gathered_parameters``, ``save_16bit_model``, persistent groups) stays exact.

Invariant: every rank issues the same gathers and reduce-scatters in the same order. That holds
when every rank runs the same modules (as with any ZeRO-3 implementation); leftovers are flushed
in group order at the end of backward.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from zshard.train.zero._comm import Comm, Handle, Work
from zshard.train.zero._flat import FlatParamGroup, Member
from zshard.train.zero._slots import STAGE3_SLOTS, SlotPool
from zshard.train.zero._zeropp import ZeroPP, ZeroPPOptions

_FWD, _BWD = "fwd", "bwd"


class ParamSource(Protocol):
    """Where offloaded parameter partitions come from (``offload.Offload``)."""

    read_ahead: int  # partitions read ahead of use

    def holds(self, g: FlatParamGroup, kind: str) -> bool: ...
    def fetch(self, g: FlatParamGroup) -> torch.Tensor: ...
    def prefetch(self, g: FlatParamGroup) -> None: ...
    def done(self, g: FlatParamGroup, part: torch.Tensor) -> None: ...


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x)]
    return []


def _nbytes(numel: int, dtype: torch.dtype) -> int:
    return numel * torch.empty((), dtype=dtype).element_size()


class Stage3:
    """Owns the stage-3 hooks; also the gradient sink for stage 3."""

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[FlatParamGroup],
        comm: Comm,
        device: torch.device,
        prefetch: int,
        params: ParamSource | None = None,
        *,
        overlap: bool = True,
        zeropp: ZeroPPOptions | None = None,
        release_memory: Callable[[], None] | None = None,
    ) -> None:
        self.groups = list(groups)
        self._release_memory = release_memory
        self._done_bytes = 0  # of groups reduced since the last release_memory()
        self.params = params
        self.offloaded = {g.name for g in groups if params is not None and params.holds(g, "param")}
        self.comm = comm
        self.device = device
        self.prefetch = prefetch
        self.overlap = overlap
        self.hold_all = False  # inside gathered_parameters()
        self._by_name = {g.name: g for g in self.groups}
        by_param = {id(m.param): g for g in self.groups for m in g.members}
        self.module_groups: dict[nn.Module, list[FlatParamGroup]] = {}
        for module in model.modules():
            used: list[FlatParamGroup] = []
            for p in module._parameters.values():
                if p is not None and by_param[id(p)] not in used:
                    used.append(by_param[id(p)])
            if used:
                self.module_groups[module] = used
        # name -> the group's full-size tensor, kept for the run; storage 0 bytes when released
        self._full: dict[str, torch.Tensor] = {}
        # name -> (full buffer, its all-gather, the partition it reads)
        self._inflight: dict[str, tuple[torch.Tensor, Work, torch.Tensor]] = {}
        self._held: dict[str, dict[int, torch.Tensor]] = {}  # name -> id(member) -> gradient
        self._reductions: deque[Handle] = deque()
        self._in_flight_bytes = 0  # gradients handed to collectives not yet complete
        self._pending: dict[str, int] = {}
        self._reduced: set[str] = set()
        # The first iteration's uses per phase, in order (a tied group used twice is there
        # twice), and each group's first use: the order prefetch follows.
        self._trace: dict[str, list[FlatParamGroup]] | None = {_FWD: [], _BWD: []}
        self._uses: dict[str, list[FlatParamGroup]] = {_FWD: [], _BWD: []}
        self._order: dict[str, list[FlatParamGroup]] = {_FWD: [], _BWD: []}
        self._cursor: dict[str, int] = {_FWD: 0, _BWD: 0}
        self._handles: list[RemovableHandle] = []
        trainable = [g for g in self.groups if g.trainable]
        # ZeRO++ (qwZ, hpZ, qgZ): training gathers and gradient reductions go through it.
        self.zeropp: ZeroPP | None = None
        if zeropp is not None and zeropp.enabled and comm.distributed:
            self.zeropp = ZeroPP(
                comm, self.groups, zeropp, device, prefetch=prefetch, slots=STAGE3_SLOTS
            )
        self._slots: SlotPool | None = None
        self._parts: SlotPool | None = None
        # Gradients all-reduced where autograd left them (see the module doc), or staged.
        qgz = self.zeropp is not None and self.zeropp.reduces
        self.direct = comm.distributed and comm.reduce_scatter_in_place and not qgz
        full = max((_nbytes(g.padded_numel, g.dtype) for g in trainable), default=0)
        # Gradient bytes in flight at most (direct), and between two release_memory() calls.
        self._max_in_flight = STAGE3_SLOTS * full
        if comm.distributed and trainable and not self.direct:
            part = max(_nbytes(g.partition_numel, g.dtype) for g in trainable)
            self._slots = SlotPool(STAGE3_SLOTS, full, device)
            if not comm.reduce_scatter_in_place:  # slot i of both is used together
                self._parts = SlotPool(STAGE3_SLOTS, part, device)
        self._reset_pending()

    def install(self) -> None:
        for module in self.module_groups:
            self._handles.append(module.register_forward_pre_hook(self._pre_forward))
            self._handles.append(module.register_forward_hook(self._post_forward))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def buffer_bytes(self) -> int:
        own = sum(p.nbytes for p in (self._slots, self._parts) if p is not None)
        return own + (self.zeropp.buffer_bytes() if self.zeropp is not None else 0)

    def secondary_bytes(self) -> int:
        """ZeRO++ hpZ's secondary partitions (0 without hpZ)."""
        return self.zeropp.secondary_bytes() if self.zeropp is not None else 0

    @property
    def pending(self) -> int:
        return sum(1 for h in self._reductions if not h.done)

    @property
    def in_flight_bytes(self) -> int:
        """Gradient bytes handed to collectives that have not completed (direct path)."""
        return self._in_flight_bytes

    @property
    def max_in_flight_bytes(self) -> int:
        """The bound on :attr:`in_flight_bytes`: ``STAGE3_SLOTS`` times the largest group."""
        return self._max_in_flight

    # -- gather / release ----------------------------------------------------------------------

    def _full_buffer(self, g: FlatParamGroup) -> torch.Tensor:
        """``g``'s full-size tensor with its storage allocated (again)."""
        full = self._full.get(g.name)
        if full is None:
            full = torch.empty(g.padded_numel, dtype=g.dtype, device=self.device)
            self._full[g.name] = full
        else:
            storage = full.untyped_storage()
            need = _nbytes(g.padded_numel, g.dtype)
            if storage.nbytes() < need:
                storage.resize_(need)
        return full

    def _start_gather(self, g: FlatParamGroup, *, training: bool = False) -> torch.Tensor:
        """Start gathering ``g``. ``training`` (the hooks' gathers) lets ZeRO++ quantize it or
        gather it inside the node; any other gather is exact."""
        if g.name in self.offloaded:
            assert self.params is not None
            part = self.params.fetch(g)
        else:
            assert g.param_part is not None
            part = g.param_part
        buf = self._full_buffer(g)
        if training and self.zeropp is not None:
            work: Work = self.zeropp.start_gather(g, part, buf)
        else:
            work = self.comm.all_gather(buf, part, async_op=True)
        self._inflight[g.name] = (buf, work, part)
        return buf

    def _gathered(self, g: FlatParamGroup, part: torch.Tensor) -> None:
        if g.name in self.offloaded:
            assert self.params is not None
            self.params.done(g, part)

    def gather(self, g: FlatParamGroup, *, training: bool = False) -> None:
        """Make ``g``'s parameters whole (waiting for a prefetch if one is in flight)."""
        if g.flat is not None:
            return
        if g.name not in self._inflight:
            self._start_gather(g, training=training)
        buf, work, part = self._inflight.pop(g.name)
        work.wait()
        self._gathered(g, part)
        g.attach(buf)

    def maybe_release(self, g: FlatParamGroup) -> None:
        if g.persistent or self.hold_all or g.fwd_active > 0 or g.bwd_hold or g.flat is None:
            return
        g.detach()
        self._free(g.name)

    def _free(self, name: str) -> None:
        """Release a group's full storage in place (saved views of it are refilled by the next
        gather). A storage shared with numpy (an export of the values) cannot be resized: it is
        dropped instead, and the next gather allocates a new one."""
        full = self._full.get(name)
        if full is None:
            return
        storage = full.untyped_storage()
        if storage.resizable():
            storage.resize_(0)
        else:
            del self._full[name]

    def release_all(self) -> None:
        """Wait for prefetches and release every group nothing holds (after an eval forward)."""
        for name, (_buf, work, part) in self._inflight.items():
            work.wait()
            self._gathered(self._by_name[name], part)
            if self._by_name[name].flat is None:
                self._free(name)
        self._inflight.clear()
        for g in self.groups:
            g.fwd_active, g.bwd_hold = 0, False
            self.maybe_release(g)
        self._cursor = {_FWD: 0, _BWD: 0}
        if self.zeropp is not None:
            self.zeropp.invalidate()  # hpZ's secondary partitions last one micro step

    def _use(self, g: FlatParamGroup, phase: str) -> None:
        if self._trace is not None:
            self._trace[phase].append(g)
        self.gather(g, training=True)
        # Where this use is in the recorded sequence: the next occurrence of g from the cursor
        # (so the second use of a tied group prefetches what follows *it*, not its first use).
        order, c = self._uses[phase], self._cursor[phase]
        i = next((j for j in range(c, len(order)) if order[j] is g), None)
        if i is None:
            return
        self._cursor[phase] = i + 1
        if self.params is not None:
            for nxt in order[i + 1 : i + 1 + self.prefetch + self.params.read_ahead]:
                if nxt.flat is None and nxt.name not in self._inflight:
                    self.params.prefetch(nxt)
        for nxt in order[i + 1 : i + 1 + self.prefetch]:
            if nxt.flat is None and nxt.name not in self._inflight:
                self._start_gather(nxt, training=True)

    def after_step(self) -> None:
        """The optimizer wrote new partitions: start reading the next forward's first groups."""
        if self.params is None:
            return
        for g in self._order[_FWD][: self.params.read_ahead]:
            if g.flat is None:
                self.params.prefetch(g)

    # -- hooks ---------------------------------------------------------------------------------

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        for g in self.module_groups[module]:
            g.fwd_active += 1
            self._use(g, _FWD)

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        groups = self.module_groups[module]
        for g in groups:
            g.fwd_active = max(0, g.fwd_active - 1)
            self.maybe_release(g)
        if torch.is_grad_enabled():
            hook = functools.partial(self._pre_backward, groups)
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(hook)

    def _pre_backward(self, groups: list[FlatParamGroup], grad: torch.Tensor) -> None:
        for g in groups:
            if g.name in self._reduced:
                continue  # its gradients are done this backward; nothing left to compute
            g.bwd_hold = True
            self._use(g, _BWD)

    # -- gradients (GradSink) -----------------------------------------------------------------

    def _reset_pending(self) -> None:
        self._pending = {g.name: len(g.members) for g in self.groups if g.trainable}
        self._reduced.clear()
        self._held.clear()

    def begin_backward(self, boundary: bool) -> None:
        pass

    def on_grad(self, group: FlatParamGroup, member: Member, grad: torch.Tensor) -> None:
        flat = grad.reshape(-1)
        if self.direct:
            self._reduce_member(group, member, flat)
        elif self._slots is None:  # one rank: the partition is the whole group
            assert group.grad is not None
            group.grad[member.offset : member.offset + member.numel].add_(flat)
        else:
            self._held.setdefault(group.name, {})[id(member)] = flat
        self._pending[group.name] -= 1
        if self._pending[group.name] == 0:
            self._reduce(group)

    def _reduce_member(self, g: FlatParamGroup, m: Member, flat: torch.Tensor) -> None:
        """All-reduce one parameter's gradient in place; on completion add the elements inside
        this rank's partition to ``g.grad``. Every rank sends the same gradients in the same
        order (the module doc's invariant), so the all-reduces pair up."""
        assert g.grad is not None
        nbytes = flat.numel() * flat.element_size()
        while self._reductions and self._in_flight_bytes + nbytes > self._max_in_flight:
            self._reductions.popleft().wait()
        lo, hi = g.partition_range
        a, b = max(lo, m.offset), min(hi, m.offset + m.numel)
        grad_part = g.grad

        def finish() -> None:
            if a < b:
                grad_part[a - lo : b - lo].add_(flat[a - m.offset : b - m.offset])
            self._in_flight_bytes -= nbytes

        self._in_flight_bytes += nbytes
        self._reductions.append(self.comm.start_all_reduce(flat).then(finish))
        if not self.overlap:
            self.wait()

    def _take_slot(self) -> int:
        assert self._slots is not None
        while (i := self._slots.take()) is None:
            self._reductions.popleft().wait()  # its completion gives its slot back
        return i

    def _reduce(self, g: FlatParamGroup) -> None:
        """Start reduce-scattering ``g``'s gradients (zero where none arrived); release it.
        Direct: each gradient went on its own as it arrived (none sent for those that did not
        arrive: their sum is zero)."""
        assert g.grad is not None
        held = self._held.pop(g.name, {})
        if self._slots is not None:
            slots, parts = self._slots, self._parts
            i = self._take_slot()
            full = slots.view(i, g.dtype, g.padded_numel)
            for m in g.members:
                grad = held.get(id(m))
                dest = full[m.offset : m.offset + m.numel]
                if grad is None:
                    dest.zero_()
                else:
                    dest.copy_(grad)
            full[g.numel :].zero_()
            del held
            if parts is None:  # the result lands in this rank's chunk of the slot
                lo, hi = g.partition_range
                part = full[lo:hi]
            else:
                part = parts.view(i, g.dtype, g.partition_numel)
            grad_part = g.grad

            def finish() -> None:
                grad_part.add_(part)
                slots.give(i)

            if self.zeropp is not None and self.zeropp.reduces:  # qgZ: straight into grad
                self._reductions.append(
                    self.zeropp.start_reduce(full, grad_part).then(lambda: slots.give(i))
                )
            else:
                self._reductions.append(
                    self.comm.reduce_scatter(part, full, async_op=True).then(finish)
                )
            if not self.overlap:
                self.wait()
        self._reduced.add(g.name)
        g.bwd_hold = False
        self.maybe_release(g)
        if self._release_memory is not None:
            # Backward has freed these modules' activations, which on the CPU stay resident in
            # the host heap: hand them back each time modules worth the in-flight bound are done
            # (on the bench model about once per transformer block: -20 MiB of peak, ~2% CPU).
            self._done_bytes += _nbytes(g.padded_numel, g.dtype)
            if self._done_bytes >= self._max_in_flight:
                self._done_bytes = 0
                self._release_memory()

    def finish_backward(self, boundary: bool) -> None:
        for g in self.groups:
            if g.trainable and g.name not in self._reduced:
                self._reduce(g)
        self.release_all()
        self._reset_pending()
        if self._trace is not None:
            # The first iteration's order drives prefetch from now on.
            self._uses = self._trace
            self._order = {ph: list(dict.fromkeys(uses)) for ph, uses in self._trace.items()}
            self._trace = None

    def wait(self) -> None:
        while self._reductions:
            self._reductions.popleft().wait()

    def refresh_persistent(self) -> None:
        """After the optimizer step: persistent groups take their partitions' new values."""
        for g in self.groups:
            if g.persistent and g.flat is not None:
                assert g.param_part is not None
                self.comm.all_gather(g.flat, g.param_part)
