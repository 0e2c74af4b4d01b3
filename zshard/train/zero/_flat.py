"""Flat groups: parameters laid end to end in one padded 1-D buffer, split evenly across ranks.

Placement comes from ``zshard.store.layout.pack``, so rank ``r``'s partition of every flat group
is exactly the shard it writes to a checkpoint: saving needs no communication, and the fragments
recorded in the manifest are the true offsets used here (DESIGN invariant 3).

Names: N = world size, P = ``partition_numel`` (from ``plan_partition``), the buffer holds N * P
elements, the last ``N * P - numel`` of them zero padding. The *update range* is the part of the
buffer whose optimizer update this rank computes: all of it at stage 0, its partition otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zshard.store.layout import Fragment, pack

_EMPTY_SHAPE = (0,)


@dataclass(frozen=True)
class Member:
    """One parameter (a logical tensor) in a flat group."""

    name: str  # the logical tensor's name (first name of a tied Parameter)
    param: nn.Parameter
    shape: torch.Size
    offset: int  # element offset in the flat buffer
    fragments: tuple[Fragment, ...]

    @property
    def numel(self) -> int:
        return self.shape.numel()


class FlatParamGroup:
    """One flat group of parameters and this rank's tensors of every state kind.

    Tensors (None where the stage or precision has none)::

        flat        (N*P,) module dtype; the module's parameters are views into it. Always at
                    stages 0-2; at stage 3 only while gathered (always when ``persistent``).
        param_part  (P,)   module dtype; this rank's partition. A view of ``flat`` at stages 0-2,
                    its own tensor at stage 3.
        master      fp32 over the update range ((N*P,) at stage 0, (P,) otherwise). With fp32
                    precision it *is* the module's storage over that range (no copy).
        state       {key: tensor like master} optimizer state by key.
        grad        gradient storage: (N*P,) at stages 0-1 (reduced at the window's end),
                    (P,) at stages 2-3 (reduced during backward).
    """

    def __init__(
        self,
        name: str,
        params: Sequence[tuple[str, nn.Parameter]],
        *,
        world_size: int,
        rank: int,
        stage: int,
        dtype: torch.dtype,
        trainable: bool,
    ) -> None:
        self.name = name
        self.world_size = world_size
        self.rank = rank
        self.stage = stage
        self.dtype = dtype
        self.trainable = trainable
        self.layout, frags = pack(name, [(n, p.numel()) for n, p in params], world_size)
        offset = 0
        members = []
        for n, p in params:
            members.append(Member(n, p, p.shape, offset, tuple(frags[n])))
            offset += p.numel()
        self.members: tuple[Member, ...] = tuple(members)
        self.numel = offset  # used elements; the rest of the buffer is padding
        self.flat: torch.Tensor | None = None
        self.param_part: torch.Tensor | None = None
        self.master: torch.Tensor | None = None
        self.master_is_param = False  # fp32: master aliases the module storage
        self.state: dict[str, torch.Tensor] = {}
        self.grad: torch.Tensor | None = None
        # Stage 3 bookkeeping (see _stage3.py).
        self.persistent = False
        self.fwd_active = 0
        self.bwd_hold = False

    # -- geometry ------------------------------------------------------------------------------

    @property
    def partition_numel(self) -> int:
        return self.layout.partition_numel

    @property
    def padded_numel(self) -> int:
        return self.world_size * self.partition_numel

    @property
    def partition_range(self) -> tuple[int, int]:
        return self.layout.partition_range(self.rank)

    @property
    def update_range(self) -> tuple[int, int]:
        return (0, self.padded_numel) if self.stage == 0 else self.partition_range

    # -- views ---------------------------------------------------------------------------------

    def attach(self, flat: torch.Tensor) -> None:
        """Point every parameter at its slice of ``flat`` (N*P,)."""
        self.flat = flat
        for m in self.members:
            m.param.data = flat[m.offset : m.offset + m.numel].view(m.shape)

    def detach(self) -> None:
        """Drop the full buffer; parameters become empty until gathered again (stage 3)."""
        self.flat = None
        for m in self.members:
            m.param.data = torch.empty(_EMPTY_SHAPE, dtype=self.dtype, device=m.param.device)

    def gather_source(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new (N*P,) buffer holding the parameters' current values (zero padding)."""
        buf = torch.zeros(self.padded_numel, dtype=dtype, device=device)
        for m in self.members:
            buf[m.offset : m.offset + m.numel].copy_(m.param.data.reshape(-1))
        return buf

    def grad_for_update(self) -> torch.Tensor:
        """The reduced gradient over the update range."""
        assert self.grad is not None
        if self.stage == 1:
            lo, hi = self.partition_range
            return self.grad[lo:hi]
        return self.grad

    def grad_for_norm(self) -> torch.Tensor:
        """The gradient elements this rank counts in the global norm: its partition only, so that
        replicated gradients (stage 0) are summed once across ranks."""
        assert self.grad is not None
        if self.stage in (0, 1):
            lo, hi = self.partition_range
            return self.grad[lo:hi]
        return self.grad


class FlatBufferGroup:
    """Module buffers of one dtype packed into a flat group, for checkpoints only.

    Buffers are replicated on every rank; each rank writes its partition of the packed values.
    Entries are ``(name, module, attr)`` and are looked up when used, so a module that replaces a
    buffer tensor (rather than updating it in place) is still saved correctly.
    """

    def __init__(
        self, name: str, entries: Sequence[tuple[str, nn.Module, str]], world_size: int, rank: int
    ) -> None:
        self.name = name
        self.entries = tuple(entries)
        self.rank = rank
        self.world_size = world_size
        tensors = self.tensors()
        self.layout, frags = pack(name, [(n, t.numel()) for n, t in tensors], world_size)
        self.fragments = {n: tuple(f) for n, f in frags.items()}
        self.dtype = tensors[0][1].dtype
        self.shapes = {n: t.shape for n, t in tensors}

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for name, module, attr in self.entries:
            t = module._buffers[attr]
            assert t is not None, name
            out.append((name, t))
        return out

    def partition(self) -> torch.Tensor:
        """This rank's partition (P,) of the packed buffer values (a new tensor)."""
        tensors = self.tensors()
        flat = torch.zeros(
            self.world_size * self.layout.partition_numel,
            dtype=self.dtype,
            device=tensors[0][1].device,
        )
        offset = 0
        for _, t in tensors:
            flat[offset : offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        lo, hi = self.layout.partition_range(self.rank)
        return flat[lo:hi].clone()


def numel_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
