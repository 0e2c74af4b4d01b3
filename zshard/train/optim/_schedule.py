"""Learning-rate schedules: a pure function of how many optimizer updates were applied.

zshard's own (``constant``, ``cosine``, ``linear``): linear warmup ``lr * (t + 1) / warmup_steps``
for update ``t < warmup_steps`` (the first update already moves; nanoGPT's rule), then constant,
or cosine / linear decay from ``lr`` to ``min_lr_ratio * lr`` at ``total_steps``, flat after it.

DeepSpeed's (``warmup_lr``, ``warmup_decay_lr``, ``warmup_cosine_lr``, ``one_cycle``,
``lr_range_test``, parameters in ``scheduler.params``): DeepSpeed's formulas from
``deepspeed/runtime/lr_schedules.py``, with DeepSpeed's clock. A DeepSpeed scheduler is stepped
after each applied update (never after an overflow-skipped one) and the update after ``t``
applied ones runs with the rate it computed for ``last_batch_iteration = t - 1``; update 0 runs
with the rate set at construction (``warmup_min_lr``, 0 for ``warmup_cosine_lr``,
``cycle_min_lr``, ``lr_range_test_min_lr``). ``one_cycle`` also cycles beta1 of Adam and LAMB
(beta2 becomes 0.99, as DeepSpeed sets it); SGD keeps its momentum (DeepSpeed cycles only
optimizers with ``betas``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from zshard.train.config import DS_SCHEDULES, SchedulerConfig, schedule_params
from zshard.train.optim._optimizers import FlatOptimizer


def lr_at(t: int, base_lr: float, cfg: SchedulerConfig, total_steps: int) -> float:
    """The learning rate of update number ``t`` (0-based; updates applied before it)."""
    if cfg.name in DS_SCHEDULES:
        return _deepspeed_lr(t - 1, base_lr, cfg, total_steps)
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


def momentum_at(t: int, cfg: SchedulerConfig) -> float | None:
    """``one_cycle``'s beta1 for update ``t`` when it cycles momentum, else None."""
    if cfg.name != "one_cycle":
        return None
    p = _params(cfg, 0)
    if not p["cycle_momentum"]:
        return None
    it = t - 1  # DeepSpeed's last_batch_iteration
    if it < 0:
        return float(p["cycle_min_mom"])  # set at construction
    total, _ = _cycle(p)
    if it < total:
        return float(p["cycle_max_mom"] - (p["cycle_max_mom"] - p["cycle_min_mom"]) * _scale(p, it))
    if p["decay_step_size"] == 0 or p["decay_mom_rate"] == 0:
        return float(p["cycle_max_mom"])
    interval = (it - total + 1) / p["decay_step_size"]
    return float(p["cycle_max_mom"] * (1 + p["decay_mom_rate"] * interval))


ONE_CYCLE_BETA2 = 0.99  # DeepSpeed's OneCycle sets betas to (momentum, 0.99)


def optimizer_at(opt: FlatOptimizer, t: int, cfg: SchedulerConfig) -> FlatOptimizer:
    """``opt`` as update ``t`` runs it: with ``one_cycle``'s betas when it cycles momentum."""
    mom = momentum_at(t, cfg)
    if mom is None or not hasattr(opt, "betas") or not dataclasses.is_dataclass(opt):
        return opt
    out: FlatOptimizer = dataclasses.replace(opt, betas=(mom, ONE_CYCLE_BETA2))
    return out


def _params(cfg: SchedulerConfig, total_steps: int) -> dict[str, Any]:
    p = schedule_params(cfg.name, cfg.params)
    if p.get("total_num_steps", 0) is None:
        p["total_num_steps"] = total_steps
    return p


def _deepspeed_lr(it: int, base_lr: float, cfg: SchedulerConfig, total_steps: int) -> float:
    """DeepSpeed's rate at ``last_batch_iteration = it`` (``-1``: as constructed)."""
    p = _params(cfg, total_steps)
    name = cfg.name
    if name == "one_cycle":
        if it < 0:
            return float(p["cycle_min_lr"])
        total, _ = _cycle(p)
        if it < total:
            lo, hi = p["cycle_min_lr"], p["cycle_max_lr"]
            return float(lo + (hi - lo) * _scale(p, it))
        if p["decay_step_size"] == 0 or p["decay_lr_rate"] == 0:
            return float(p["cycle_min_lr"])
        interval = (it - total + 1) / p["decay_step_size"]
        return float(p["cycle_min_lr"] / (1 + p["decay_lr_rate"] * interval))
    if name == "lr_range_test":
        interval = (it + 1) / p["lr_range_test_step_size"]
        if p["lr_range_test_staircase"]:
            interval = math.floor(interval)
        return float(p["lr_range_test_min_lr"] * (1 + p["lr_range_test_step_rate"] * interval))
    warmup = max(2, p["warmup_num_steps"])
    if name == "warmup_cosine_lr":
        return base_lr * _cosine_ratio(it, p, warmup)
    min_lr = p["warmup_min_lr"]
    max_lr = p["warmup_max_lr"] if p["warmup_max_lr"] is not None else base_lr
    if it < 0:
        return float(min_lr)
    if it < warmup:
        gamma = _warmup_gamma(it, p["warmup_type"], warmup)
    elif name == "warmup_lr":
        gamma = 1.0
    else:
        total = p["total_num_steps"]
        gamma = max(0.0, float(total - it) / float(max(1.0, total - warmup)))
    return float(min_lr + (max_lr - min_lr) * gamma)


def _warmup_gamma(it: int, kind: str, warmup: int) -> float:
    if kind == "log":
        return (1.0 / math.log(warmup)) * math.log(it + 1)
    return it / warmup


def _cosine_ratio(it: int, p: dict[str, Any], warmup: int) -> float:
    if it < 0:
        return 0.0
    if it < warmup:
        ratio = _warmup_gamma(it, p["warmup_type"], warmup)
        return float(p["warmup_min_ratio"] + ratio * (1.0 - p["warmup_min_ratio"]))
    real_last = it - warmup + 1
    real_total = max(1, p["total_num_steps"] - warmup)
    progress = min(1.0, real_last / real_total)
    ratio = (1 + math.cos(math.pi * progress)) / 2
    return float(max(0.0, p["cos_min_ratio"] + (1.0 - p["cos_min_ratio"]) * ratio))


def _cycle(p: dict[str, Any]) -> tuple[float, float]:
    first = float(p["cycle_first_step_size"])
    second = first if p["cycle_second_step_size"] is None else float(p["cycle_second_step_size"])
    return first + second, first


def _scale(p: dict[str, Any], it: int) -> float:
    """OneCycle's position in the cycle, 0 at the bottom and 1 at the peak."""
    total, first = _cycle(p)
    second = total - first
    step_ratio = first / total
    batch = it + 1
    cycle = math.floor(1 + batch / total)
    x = 1.0 + batch / total - cycle
    if x <= step_ratio:
        scale = x / step_ratio
        stairs = p["cycle_first_stair_count"]
    else:
        scale = (x - 1) / (step_ratio - 1)
        stairs = p["cycle_second_stair_count"]
        if stairs is None:
            stairs = p["cycle_first_stair_count"]
    if stairs > 0:
        pos_in_cycle = batch % total
        if pos_in_cycle <= first:
            position = pos_in_cycle * stairs / first
        else:
            position = (total - pos_in_cycle) * stairs / second
        scale = math.floor(position) / stairs
    return float(scale)
