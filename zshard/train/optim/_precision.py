"""Mixed precision: module dtypes and the dynamic loss scaler for fp16."""

from __future__ import annotations

from typing import Any

import torch

from zshard.train.config import LossScaleConfig, Precision

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def module_dtype(precision: Precision) -> torch.dtype:
    return DTYPES[precision]


class LossScaler:
    """Dynamic loss scale (fp16). Static scale 1 for fp32/bf16 (``enabled=False``).

    An overflow (inf/nan in any rank's gradients) skips the step. The scale halves from the
    ``hysteresis``-th consecutive overflow on (so one stray inf does not cost precision), doubles
    after ``window`` consecutive good steps, and never drops below ``min_scale``.
    """

    def __init__(self, cfg: LossScaleConfig, *, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.scale = float(2**cfg.initial_scale_power) if enabled else 1.0
        self.overflows_in_row = 0
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.good_steps = 0
            self.overflows_in_row += 1
            if self.overflows_in_row >= self.cfg.hysteresis:
                self.scale = max(self.scale / 2.0, self.cfg.min_scale)
            return
        self.overflows_in_row = 0
        self.good_steps += 1
        if self.good_steps >= self.cfg.window:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "overflows_in_row": self.overflows_in_row,
            "good_steps": self.good_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.scale = float(state.get("scale", self.scale))
        self.overflows_in_row = int(state.get("overflows_in_row", 0))
        self.good_steps = int(state.get("good_steps", 0))
