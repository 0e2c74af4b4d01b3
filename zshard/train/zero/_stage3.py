"""Stage 3: gather each module's parameters just before use and release them after.

Each rank keeps only its partition of every flat group (one group per module owning parameters).

- Forward: a forward pre-hook gathers the module's groups (its own and any tied group it uses);
  the forward hook releases them and registers a hook on each output that requires grad.
- Backward: the first output hook to fire (the gradient w.r.t. the module's output exists, so the
  module's backward is next) gathers the groups again and *holds* them; gradients arrive through
  the parameters' post-accumulate hooks into a full-size staging buffer, and once every
  parameter of a group has its gradient the buffer is reduce-scattered into the group's (P,)
  gradient partition and the group is released. A held group is not released by a forward hook,
  which matters for activation checkpointing: the recomputed forward runs inside backward.
- Prefetch: the first training iteration records the order groups are used in forward and in
  backward; later, using a group starts asynchronous all-gathers of the next ``prefetch``.
- Groups smaller than the persistence threshold stay whole on every rank (``persistent``).
- Parameter offload (``params``, see offload.py): a group's partition is not resident; it is
  fetched for each all-gather and dropped once the gather is done. Reads run ahead of use by the
  source's ``read_ahead`` groups in the recorded order (further than the gathers' prefetch, so
  a prefetched gather finds its partition read), and the next step's first groups are read as
  soon as the optimizer has written them (``after_step``).

Invariant: every rank issues the same gathers and reduce-scatters in the same order. That holds
when every rank runs the same modules (as with any ZeRO-3 implementation); leftovers are flushed
in group order at the end of backward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from zshard.train.zero._comm import Comm, Work
from zshard.train.zero._flat import FlatParamGroup, Member

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
    ) -> None:
        self.groups = list(groups)
        self.params = params
        self.offloaded = {g.name for g in groups if params is not None and params.holds(g, "param")}
        self.comm = comm
        self.device = device
        self.prefetch = prefetch
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
        # name -> (full buffer, its all-gather, the partition it reads)
        self._inflight: dict[str, tuple[torch.Tensor, Work, torch.Tensor]] = {}
        self._staging: dict[str, torch.Tensor] = {}
        self._pending: dict[str, int] = {}
        self._reduced: set[str] = set()
        self._trace: dict[str, list[FlatParamGroup]] | None = {_FWD: [], _BWD: []}
        self._order: dict[str, list[FlatParamGroup]] = {_FWD: [], _BWD: []}
        self._position: dict[str, dict[str, int]] = {_FWD: {}, _BWD: {}}
        self._handles: list[RemovableHandle] = []
        self._reset_pending()

    def install(self) -> None:
        for module in self.module_groups:
            self._handles.append(module.register_forward_pre_hook(self._pre_forward))
            self._handles.append(module.register_forward_hook(self._post_forward))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- gather / release ----------------------------------------------------------------------

    def _start_gather(self, g: FlatParamGroup) -> torch.Tensor:
        if g.name in self.offloaded:
            assert self.params is not None
            part = self.params.fetch(g)
        else:
            assert g.param_part is not None
            part = g.param_part
        buf = torch.empty(g.padded_numel, dtype=g.dtype, device=self.device)
        self._inflight[g.name] = (buf, self.comm.all_gather(buf, part, async_op=True), part)
        return buf

    def _gathered(self, g: FlatParamGroup, part: torch.Tensor) -> None:
        if g.name in self.offloaded:
            assert self.params is not None
            self.params.done(g, part)

    def gather(self, g: FlatParamGroup) -> None:
        """Make ``g``'s parameters whole (waiting for a prefetch if one is in flight)."""
        if g.flat is not None:
            return
        if g.name not in self._inflight:
            self._start_gather(g)
        buf, work, part = self._inflight.pop(g.name)
        work.wait()
        self._gathered(g, part)
        g.attach(buf)

    def maybe_release(self, g: FlatParamGroup) -> None:
        if g.persistent or self.hold_all or g.fwd_active > 0 or g.bwd_hold or g.flat is None:
            return
        g.detach()

    def release_all(self) -> None:
        """Wait for prefetches and release every group nothing holds (after an eval forward)."""
        for name, (_, work, part) in self._inflight.items():
            work.wait()
            self._gathered(self._by_name[name], part)
        self._inflight.clear()
        for g in self.groups:
            g.fwd_active, g.bwd_hold = 0, False
            self.maybe_release(g)

    def _use(self, g: FlatParamGroup, phase: str) -> None:
        if self._trace is not None and g not in self._trace[phase]:
            self._trace[phase].append(g)
        self.gather(g)
        i = self._position[phase].get(g.name)
        if i is None:
            return
        order = self._order[phase]
        if self.params is not None:
            for nxt in order[i + 1 : i + 1 + self.prefetch + self.params.read_ahead]:
                if nxt.flat is None and nxt.name not in self._inflight:
                    self.params.prefetch(nxt)
        for nxt in order[i + 1 : i + 1 + self.prefetch]:
            if nxt.flat is None and nxt.name not in self._inflight:
                self._start_gather(nxt)

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

    def on_grad(self, group: FlatParamGroup, member: Member, grad: torch.Tensor) -> None:
        buf = self._staging.get(group.name)
        if buf is None:
            buf = torch.zeros(group.padded_numel, dtype=grad.dtype, device=grad.device)
            self._staging[group.name] = buf
        buf[member.offset : member.offset + member.numel].add_(grad.reshape(-1))
        self._pending[group.name] -= 1
        if self._pending[group.name] == 0:
            self._reduce(group)

    def _reduce(self, g: FlatParamGroup) -> None:
        assert g.grad is not None
        full = self._staging.pop(g.name, None)
        if full is None:  # no gradient reached this group: its contribution is zero
            full = torch.zeros(g.padded_numel, dtype=g.dtype, device=self.device)
        part = torch.empty(g.partition_numel, dtype=full.dtype, device=self.device)
        self.comm.reduce_scatter(part, full)
        g.grad.add_(part)
        self._reduced.add(g.name)
        g.bwd_hold = False
        self.maybe_release(g)

    def finish_backward(self, boundary: bool) -> None:
        for g in self.groups:
            if g.trainable and g.name not in self._reduced:
                self._reduce(g)
        self.release_all()
        self._reset_pending()
        if self._trace is not None:
            # The first iteration's order drives prefetch from now on.
            self._order = self._trace
            self._position = {
                ph: {g.name: i for i, g in enumerate(gs)} for ph, gs in self._order.items()
            }
            self._trace = None

    def refresh_persistent(self) -> None:
        """After the optimizer step: persistent groups take their partitions' new values."""
        for g in self.groups:
            if g.persistent and g.flat is not None:
                assert g.param_part is not None
                self.comm.all_gather(g.flat, g.param_part)
