"""Optimizers on flat fp32 partitions, with state kept by key.

Each update touches one flat partition: ``param`` (fp32 master, or the fp32 module partition),
its gradient, and one state tensor per key (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``), all
of the same shape. The checkpoint store saves state kinds by key (DESIGN invariant 5), so any
optimizer whose state is elementwise fits. The arithmetic follows the single-tensor paths of
``torch.optim.AdamW``/``Adam``/``SGD`` so results match them elementwise. The step counter is one
scalar per optimizer (every flat group steps together) and lives in the checkpoint's JSON state.

Optimizers whose update is elementwise (``elementwise = True``: Adam, AdamW, SGD) may be called on
any window of a partition; the engine calls them window by window (``zero.UPDATE_WINDOW`` elements)
and passes a reused fp32 ``scratch`` buffer, so a step allocates nothing partition-sized. Their
own temporaries go through that buffer (or one they keep), or are done in place on ``grad``.
LAMB (``_lamb``) shares Adam's moments and the window; ``build_optimizer`` (``_build``) picks one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch


class FlatOptimizer(Protocol):
    """An elementwise optimizer over flat partitions."""

    @property
    def name(self) -> str: ...

    @property
    def state_keys(self) -> tuple[str, ...]:
        """State kinds this optimizer keeps per element (zero-initialised)."""
        ...

    def update(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        *,
        step: int,
        lr: float,
    ) -> None:
        """Update ``param`` in place. ``step`` counts updates including this one (1-based).

        ``grad`` may be modified.
        """
        ...

    def hyperparams(self) -> dict[str, Any]: ...


# Elements per window of an update over a longer range (the engine's own windows are
# zero.UPDATE_WINDOW, and it passes a scratch buffer of that size).
UPDATE_WINDOW = 1 << 20
ADAM_STATE = ("exp_avg", "exp_avg_sq")  # Adam's and LAMB's state kinds


def windows(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` windows of at most ``size`` elements, in order, covering ``[start, stop)``."""
    for lo in range(start, stop, size):
        yield lo, min(lo + size, stop)


def adam_moments(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, betas: tuple[float, float]
) -> None:
    """Adam's moments in place: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, with
    torch's own ops (so torch's bits)."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _scratch(cache: dict[Any, torch.Tensor], like: torch.Tensor, numel: int) -> torch.Tensor:
    """A buffer of at least ``numel`` elements like ``like``, kept in ``cache`` for reuse."""
    key = (like.dtype, like.device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf


@dataclass(frozen=True)
class Adam:
    """Adam; ``decoupled=True`` is AdamW (decay applied to the weights, not the gradient)."""

    betas: tuple[float, float]
    eps: float
    weight_decay: float
    decoupled: bool
    elementwise: ClassVar[bool] = True
    _cache: dict[Any, torch.Tensor] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )

    @property
    def name(self) -> str:
        return "adamw" if self.decoupled else "adam"

    @property
    def state_keys(self) -> tuple[str, ...]:
        return ADAM_STATE

    def update(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        *,
        step: int,
        lr: float,
        scratch: torch.Tensor | None = None,
    ) -> None:
        """``scratch``: an fp32 buffer for the denominator (any size; one is kept otherwise)."""
        beta1, beta2 = self.betas
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if self.weight_decay:
            if self.decoupled:
                param.mul_(1 - lr * self.weight_decay)
            else:
                grad = grad.add_(param, alpha=self.weight_decay)  # in place: same bits
        adam_moments(exp_avg, exp_avg_sq, grad, self.betas)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        # The denominator goes through one window-sized scratch buffer: a whole-partition
        # temporary would cost another partition of memory every step (same ops, same bits).
        p, m, v = param.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1)
        n = v.numel()
        if scratch is None or scratch.dtype != v.dtype or scratch.device != v.device:
            scratch = _scratch(self._cache, v, min(n, UPDATE_WINDOW))
        window = min(scratch.numel(), UPDATE_WINDOW) or 1
        for lo, hi in windows(0, n, window):
            denom = torch.sqrt(v[lo:hi], out=scratch[: hi - lo])
            denom.div_(bias_correction2_sqrt).add_(self.eps)
            p[lo:hi].addcdiv_(m[lo:hi], denom, value=-lr / bias_correction1)

    def hyperparams(self) -> dict[str, Any]:
        return {"betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class SGD:
    """SGD with optional momentum (no dampening) and Nesterov; L2 weight decay on the gradient."""

    momentum: float
    nesterov: bool
    weight_decay: float
    name: str = "sgd"
    elementwise: ClassVar[bool] = True

    @property
    def state_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def update(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        *,
        step: int,
        lr: float,
        scratch: torch.Tensor | None = None,
    ) -> None:
        # In place on ``grad`` (the protocol allows it): no temporary, the same bits.
        if self.weight_decay:
            grad = grad.add_(param, alpha=self.weight_decay)
        if self.momentum:
            buf = state["momentum_buffer"]
            # torch starts the buffer as a copy of the first gradient; with no dampening,
            # 0 * momentum + grad is the same thing, so a zero-initialised buffer matches.
            buf.mul_(self.momentum).add_(grad)
            grad = grad.add_(buf, alpha=self.momentum) if self.nesterov else buf
        param.add_(grad, alpha=-lr)

    def hyperparams(self) -> dict[str, Any]:
        return {
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }
