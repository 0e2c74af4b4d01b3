"""Learning-rate schedules: a pure function of how many optimizer updates were applied.

Linear warmup ``lr * (t + 1) / warmup_steps`` for update ``t < warmup_steps`` (the first update
already moves; nanoGPT's rule), then constant, or cosine / linear decay from ``lr`` to
``min_lr_ratio * lr`` at ``total_steps``, flat after it.
"""

from __future__ import annotations

import math

from zshard.train.config import SchedulerConfig


def lr_at(t: int, base_lr: float, cfg: SchedulerConfig, total_steps: int) -> float:
    """The learning rate of update number ``t`` (0-based)."""
    if t < cfg.warmup_steps:
        return base_lr * (t + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return base_lr
    min_lr = cfg.min_lr_ratio * base_lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (t - cfg.warmup_steps) / span)
    if cfg.name == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)
    return base_lr - (base_lr - min_lr) * progress
