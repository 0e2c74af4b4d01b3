"""The optimizer update of an accumulation window, on this rank's partitions of the flat groups.

The :class:`~.Engine` decides whether and how much to step (overflow skip, clipping, schedule)
and hands the :class:`Updater` the gradient scale, the learning rate and the step. The update
then runs one of three ways:

- elementwise optimizers (Adam, AdamW, SGD), window by window (``UPDATE_WINDOW`` elements)
  through one fp32 scratch buffer allocated once, so a step allocates nothing partition-sized;
- LAMB, tensorwise: per-tensor norms over pieces cut across ranks, one all-reduce of their sums;
- offloaded state (``zero.offload_optimizer``), streamed in sub-groups by :mod:`~.offload`.
"""

from __future__ import annotations

from typing import Any

import torch

from zshard.errors import ZshardError
from zshard.train.offload import Offload, OffloadError, any_rank
from zshard.train.optim import FlatOptimizer, TensorwiseItem, tensorwise_step
from zshard.train.zero import UPDATE_WINDOW, Comm, FlatParamGroup


class Updater:
    """Applies the update to ``groups``' partitions (master, state, module-dtype copy)."""

    def __init__(
        self,
        groups: list[FlatParamGroup],
        comm: Comm,
        optimizer: FlatOptimizer,
        offload: Offload | None,
        *,
        stage: int,
        grad_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.groups = groups
        self.comm = comm
        self.offload = offload
        self.stage = stage
        self.grad_dtype = grad_dtype
        self.device = device
        self.scratch = self._allocate_scratch(optimizer)

    def _allocate_scratch(self, optimizer: FlatOptimizer) -> torch.Tensor | None:
        """One fp32 buffer for the windowed update, allocated once: the optimizer's temporaries
        (first half) and, when gradients are not fp32, the window's fp32 gradient (second; the
        gradient norm converts through the first)."""
        windowed = getattr(optimizer, "elementwise", False) and self.offload is None
        trainable = [g for g in self.groups if g.trainable]
        if not trainable or not (windowed or self.grad_dtype != torch.float32):
            return None
        span = max(g.update_range[1] - g.update_range[0] for g in trainable)
        n = min(UPDATE_WINDOW, span)
        halves = 1 if self.grad_dtype == torch.float32 else 2
        return torch.empty(halves * n, dtype=torch.float32, device=self.device)

    def sum_of_squares(self, trainable: list[FlatParamGroup]) -> torch.Tensor:
        """Σ grad² over this rank's gradients of ``trainable``, in fp32 (a non-fp32 gradient is
        converted one window at a time)."""
        sumsq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in trainable:
            sumsq += self._sum_of_squares(g.grad_for_norm())
        return sumsq

    def _sum_of_squares(self, grad: torch.Tensor) -> torch.Tensor:
        scratch = self.scratch
        if grad.dtype == torch.float32 or scratch is None:
            return torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2
        window = min(UPDATE_WINDOW, scratch.numel())
        total = torch.zeros((), dtype=torch.float32, device=grad.device)
        for a in range(0, grad.numel(), window):
            b = min(grad.numel(), a + window)
            total += torch.linalg.vector_norm(scratch[: b - a].copy_(grad[a:b])) ** 2
        return total

    def apply(
        self,
        trainable: list[FlatParamGroup],
        optimizer: FlatOptimizer,
        *,
        scale: float,
        lr: float,
        step: int,
    ) -> None:
        """Update ``trainable`` with gradients times ``scale``; ``step`` counts this update."""
        if self.offload is not None:
            self._offloaded_update(trainable, scale, lr, optimizer, step)
        elif getattr(optimizer, "tensorwise", False):
            self._tensorwise_update(trainable, scale, lr, optimizer, step)
        else:
            for g in trainable:
                if self.scratch is not None and getattr(optimizer, "elementwise", False):
                    self._windowed_update(g, optimizer, scale, lr, step)
                    continue
                grad = g.grad_for_update()
                grad = grad.mul_(scale) if grad.dtype == torch.float32 else grad.float().mul_(scale)
                assert g.master is not None
                optimizer.update(g.master, grad, g.state, step=step, lr=lr)
                self._copy_master(g)

    def _tensorwise_update(
        self, trainable: list[FlatParamGroup], scale: float, lr: float, optimizer: Any, step: int
    ) -> None:
        """LAMB: per-tensor norms over pieces cut across ranks, one all-reduce of their sums."""
        items = []
        for g in trainable:
            grad = g.grad_for_update()
            grad = grad.mul_(scale) if grad.dtype == torch.float32 else grad.float().mul_(scale)
            lo, hi = g.update_range
            segments = [
                (min(max(m.offset, lo), hi) - lo, min(max(m.offset + m.numel, lo), hi) - lo)
                for m in g.members
            ]
            assert g.master is not None
            items.append(TensorwiseItem(g.master, grad, g.state, segments))
        whole = self.stage == 0 or not self.comm.distributed
        tensorwise_step(optimizer, items, None if whole else self.comm.all_reduce, step=step, lr=lr)
        for g in trainable:
            self._copy_master(g)

    def _offloaded_update(
        self,
        trainable: list[FlatParamGroup],
        scale: float,
        lr: float,
        optimizer: FlatOptimizer,
        step: int,
    ) -> None:
        """The step streamed through offloaded state (offload.py); every rank learns whether any
        failed before the all-gathers, so none is left waiting for a peer that gave up."""
        assert self.offload is not None
        error: BaseException | None = None
        try:
            self.offload.update(
                trainable,
                {g.name: g.grad_for_update() for g in trainable},
                scale,
                optimizer,
                step=step,
                lr=lr,
            )
        except ZshardError as e:
            error = e
        if any_rank(self.comm, self.device, error is not None):
            if error is not None:
                raise error
            raise OffloadError(
                f"rank {self.comm.rank}: optimizer step {step}: another rank's "
                "offloaded state I/O failed; restart from the last checkpoint"
            )

    def _copy_master(self, g: FlatParamGroup) -> None:
        """Module dtype partition <- master (a no-op when the master is the parameters)."""
        assert g.master is not None and g.param_part is not None
        if not g.master_is_param:
            (g.flat if self.stage == 0 else g.param_part).copy_(g.master)  # type: ignore[union-attr]

    def _windowed_update(
        self, g: FlatParamGroup, optimizer: FlatOptimizer, scale: float, lr: float, step: int
    ) -> None:
        """An elementwise optimizer's update of ``g``, window by window through the scratch
        buffer: the same arithmetic as one call on the whole range, no partition-sized
        temporary (a non-fp32 gradient is converted one window at a time)."""
        scratch = self.scratch
        assert scratch is not None and g.master is not None
        grad, master = g.grad_for_update(), g.master
        window = min(UPDATE_WINDOW, scratch.numel() // (1 if grad.dtype == torch.float32 else 2))
        opt_scratch = scratch[:window]
        param = None if g.master_is_param else (g.flat if self.stage == 0 else g.param_part)
        for a in range(0, master.numel(), window):
            b = min(master.numel(), a + window)
            gw = grad[a:b]
            if gw.dtype == torch.float32:
                gw = gw.mul_(scale)
            else:
                gw = scratch[window : window + b - a].copy_(gw).mul_(scale)
            state = {k: t[a:b] for k, t in g.state.items()}
            optimizer.update(  # type: ignore[call-arg]
                master[a:b], gw, state, step=step, lr=lr, scratch=opt_scratch
            )
            if param is not None:
                param[a:b].copy_(master[a:b])
