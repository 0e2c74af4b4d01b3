"""Mixed precision: module dtypes and the fp16 loss scaler.

:class:`LossScaler` is DeepSpeed's ``DynamicLossScaler`` (``deepspeed/runtime/fp16/
loss_scaler.py``) step for step, written from its documented behaviour: the same scale after
every sequence of overflowing and clean steps (``tests/train/test_loss_scaler.py`` replays
sequences recorded from DeepSpeed's own class).
"""

from __future__ import annotations

from typing import Any

import torch

from zshard.errors import ZshardError
from zshard.train.config import LossScaleConfig, Precision

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def module_dtype(precision: Precision) -> torch.dtype:
    return DTYPES[precision]


class LossScaleError(ZshardError):
    """An fp16 overflow at the minimum loss scale (``raise_error_at_min_scale``)."""


class LossScaler:
    """The fp16 loss scale; 1 and never changing for fp32/bf16 (``enabled=False``).

    Dynamic (``static_scale`` 0): ``update(overflow)`` after every accumulation window.

    - Overflow: if the hysteresis allowance is down to 1 (or ``hysteresis`` is 1), halve the
      scale, not below ``min_scale`` (already there and ``raise_error_at_min_scale``:
      :class:`LossScaleError`); otherwise use up one allowance. Remember the step.
    - Clean step: with ``consecutive_hysteresis`` refill the allowance. When the clean steps
      since the last overflow (this one excluded) are a positive multiple of ``window``, double
      the scale and, without ``consecutive_hysteresis``, refill the allowance.

    Static (``static_scale`` > 0): the scale never changes; overflowing steps are still skipped.
    """

    def __init__(self, cfg: LossScaleConfig, *, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.dynamic = enabled and cfg.static_scale == 0
        if not enabled:
            self.scale = 1.0
        elif self.dynamic:
            self.scale = float(2**cfg.initial_scale_power)
        else:
            self.scale = float(cfg.static_scale)
        self.cur_iter = 0  # windows seen, overflowing ones included
        self.last_overflow_iter = -1
        self.cur_hysteresis = cfg.hysteresis

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        cfg = self.cfg
        if overflow:
            if cfg.hysteresis == 1 or self.cur_hysteresis == 1:
                if self.scale == cfg.min_scale and cfg.raise_error_at_min_scale:
                    raise LossScaleError(
                        f"fp16 gradients overflowed at the minimum loss scale {cfg.min_scale:g} "
                        "(precision.loss_scale.min_scale); the run cannot continue in fp16. "
                        "Lower optimizer.lr, use bf16, or set "
                        "precision.loss_scale.raise_error_at_min_scale: false to keep skipping"
                    )
                self.scale = max(self.scale / 2.0, cfg.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if cfg.consecutive_hysteresis:
                self.cur_hysteresis = cfg.hysteresis
            stable = self.cur_iter - self.last_overflow_iter - 1
            if stable > 0 and stable % cfg.window == 0:
                if not cfg.consecutive_hysteresis:
                    self.cur_hysteresis = cfg.hysteresis
                self.scale *= 2.0
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
            "cur_hysteresis": self.cur_hysteresis,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.dynamic:
            return
        self.scale = float(state.get("scale", self.scale))
        if "cur_iter" in state:
            self.cur_iter = int(state["cur_iter"])
            self.last_overflow_iter = int(state.get("last_overflow_iter", -1))
            self.cur_hysteresis = int(state.get("cur_hysteresis", self.cfg.hysteresis))
            return
        # Checkpoints of zshard < 0.2 counted overflows in a row and clean steps since either.
        good = int(state.get("good_steps", 0))
        self.cur_iter = good
        self.last_overflow_iter = -1
        self.cur_hysteresis = max(1, self.cfg.hysteresis - int(state.get("overflows_in_row", 0)))
