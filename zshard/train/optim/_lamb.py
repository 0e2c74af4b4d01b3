"""LAMB with DeepSpeed's (apex's ``FusedLamb``) arithmetic, per tensor, on flat partitions.

For each parameter tensor, with ``g`` its (unscaled, clipped) gradient::

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    u = m / (sqrt(v) + eps) + weight_decay * w      (eps_inside_sqrt: m / sqrt(v + eps) + ...)
    ratio = clamp(||w|| / ||u||, min_coeff, max_coeff)   (1 when either norm is 0)
    w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * ratio * u     (bias_correction; else lr * ratio * u)

The norms are over each whole tensor. A flat partition holds pieces of several tensors and a
tensor may be cut across ranks, so the step runs in two passes (:func:`tensorwise_step`): the
moments and each piece's partial sums of ``w^2`` and ``u^2``, one all-reduce of every piece's
sums (summing the pieces of a tensor held by different ranks), then the update with each
tensor's ratio. DeepSpeed's own ZeRO path hands ``FusedLamb`` one flat tensor per partition, so
its ratio there is per partition; zshard's is per tensor, as LAMB defines it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zshard.train.optim._optimizers import ADAM_STATE, UPDATE_WINDOW, adam_moments, windows

# (start, stop) of each tensor's piece in a flat partition, in the partition's coordinates.
Segments = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Lamb:
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_coeff: float = 10.0
    min_coeff: float = 0.01
    bias_correction: bool = True
    eps_inside_sqrt: bool = False
    name: str = "lamb"
    tensorwise: bool = True  # needs the step's per-tensor two-pass protocol

    @property
    def state_keys(self) -> tuple[str, ...]:
        return ADAM_STATE

    def hyperparams(self) -> dict[str, Any]:
        return {
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "max_coeff": self.max_coeff,
            "min_coeff": self.min_coeff,
            "bias_correction": self.bias_correction,
            "eps_inside_sqrt": self.eps_inside_sqrt,
        }

    def _direction(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        denom = (v + self.eps).sqrt_() if self.eps_inside_sqrt else v.sqrt().add_(self.eps)
        u = m / denom
        if self.weight_decay:
            u.add_(p, alpha=self.weight_decay)
        return u

    def moments(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        segments: Segments,
    ) -> torch.Tensor:
        """Pass 1: update the moments; return ``(len(segments), 2)`` partial sums of ``w^2`` and
        ``u^2`` over each segment (fp32)."""
        m, v = state["exp_avg"], state["exp_avg_sq"]
        adam_moments(m, v, grad, self.betas)
        sums = torch.zeros(len(segments), 2, dtype=torch.float32, device=param.device)
        for i, (a, b) in enumerate(segments):
            for lo, hi in windows(a, b, UPDATE_WINDOW):
                p = param[lo:hi]
                u = self._direction(p, m[lo:hi], v[lo:hi])
                sums[i, 0] += p.float().square().sum()
                sums[i, 1] += u.float().square().sum()
        return sums

    def ratios(self, sums: torch.Tensor) -> torch.Tensor:
        """Each tensor's clamped trust ratio from its whole sums ``(n, 2)``."""
        w, u = sums[:, 0].sqrt(), sums[:, 1].sqrt()
        ratio = (w / u).clamp(self.min_coeff, self.max_coeff)
        return torch.where((w != 0) & (u != 0), ratio, torch.ones_like(ratio))

    def apply(
        self,
        param: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        segments: Segments,
        ratios: torch.Tensor,
        *,
        step: int,
        lr: float,
    ) -> None:
        """Pass 2: ``w -= step_size * ratio * u`` over each segment."""
        beta1, beta2 = self.betas
        if self.bias_correction:
            step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        else:
            step_size = lr
        m, v = state["exp_avg"], state["exp_avg_sq"]
        coeffs = ratios.tolist()
        for (a, b), coeff in zip(segments, coeffs):
            for lo, hi in windows(a, b, UPDATE_WINDOW):
                p = param[lo:hi]
                p.sub_(self._direction(p, m[lo:hi], v[lo:hi]), alpha=step_size * coeff)

    def update(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        *,
        step: int,
        lr: float,
    ) -> None:
        """One whole tensor (the FlatOptimizer protocol): both passes, no reduction."""
        segments = [(0, param.numel())]
        sums = self.moments(param, grad, state, segments)
        self.apply(param, state, segments, self.ratios(sums), step=step, lr=lr)


@dataclass
class TensorwiseItem:
    """One flat partition's update: fp32 master, its gradient, its state, and the pieces of
    tensors it holds (one segment per member of the flat group, empty where it holds none, so
    every rank lists the same segments)."""

    param: torch.Tensor
    grad: torch.Tensor
    state: Mapping[str, torch.Tensor]
    segments: Segments


def tensorwise_step(
    opt: Lamb,
    items: Sequence[TensorwiseItem],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    step: int,
    lr: float,
) -> None:
    """Both passes over every partition with one all-reduce of the partial sums between them
    (``all_reduce`` None: each rank holds whole tensors, as at stage 0)."""
    sums = [opt.moments(it.param, it.grad, it.state, it.segments) for it in items]
    if not sums:
        return
    flat = torch.cat(sums)
    if all_reduce is not None:
        flat = all_reduce(flat)
    ratios = opt.ratios(flat)
    start = 0
    for it in items:
        n = len(it.segments)
        opt.apply(it.param, it.state, it.segments, ratios[start : start + n], step=step, lr=lr)
        start += n
