"""DeepSpeed's learning-rate schedules as zshard schedules: their names and parameters.

``scheduler: {name: warmup_decay_lr, params: {...}}`` runs DeepSpeed's ``WarmupDecayLR`` with
DeepSpeed's parameter names and defaults (``deepspeed/runtime/lr_schedules.py``, DeepSpeed 0.19);
``zshard.train.optim.lr_at`` computes the same values. A parameter absent here takes DeepSpeed's
default; ``None`` marks a default that depends on the run (see each entry's notes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zshard.errors import ConfigError

# zshard name -> (DeepSpeed type name, {parameter: DeepSpeed's default}).
DS_SCHEDULES: dict[str, tuple[str, dict[str, Any]]] = {
    "warmup_lr": (
        "WarmupLR",
        {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": None,  # None: optimizer.lr (DeepSpeed: the optimizer's lr)
            "warmup_num_steps": 1000,
            "warmup_type": "log",
        },
    ),
    "warmup_decay_lr": (
        "WarmupDecayLR",
        {
            "total_num_steps": None,  # None: the run's total steps (DeepSpeed requires it)
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 0.001,
            "warmup_num_steps": 1000,
            "warmup_type": "log",
        },
    ),
    "warmup_cosine_lr": (
        "WarmupCosineLR",
        {
            "total_num_steps": None,  # None: the run's total steps (DeepSpeed requires it)
            "warmup_min_ratio": 0.0,
            "warmup_num_steps": 1000,
            "cos_min_ratio": 0.0001,
            "warmup_type": "log",
        },
    ),
    "one_cycle": (
        "OneCycle",
        {
            "cycle_min_lr": None,  # required
            "cycle_max_lr": None,  # required
            "decay_lr_rate": 0.0,
            "cycle_first_step_size": 2000,
            "cycle_second_step_size": None,  # None: cycle_first_step_size
            "cycle_first_stair_count": 0,
            "cycle_second_stair_count": None,  # None: cycle_first_stair_count
            "decay_step_size": 0,
            "cycle_momentum": True,
            "cycle_min_mom": 0.8,
            "cycle_max_mom": 0.9,
            "decay_mom_rate": 0.0,
        },
    ),
    "lr_range_test": (
        "LRRangeTest",
        {
            "lr_range_test_min_lr": 0.001,
            "lr_range_test_step_size": 2000,
            "lr_range_test_step_rate": 1.0,
            "lr_range_test_staircase": False,
        },
    ),
}
BY_DS_TYPE = {ds: name for name, (ds, _) in DS_SCHEDULES.items()}
_REQUIRED = {"one_cycle": ("cycle_min_lr", "cycle_max_lr")}
_FLAGS = {"cycle_momentum", "lr_range_test_staircase"}
_INTS = {
    "warmup_num_steps",
    "total_num_steps",
    "cycle_first_stair_count",
    "cycle_second_stair_count",
    "lr_range_test_step_size",
}


def schedule_params(name: str, given: Mapping[str, Any], key: str = "scheduler.params") -> dict:
    """``given`` checked against DeepSpeed's parameters of schedule ``name``, defaults filled in
    (``None`` where the default depends on the run). Raises ConfigError naming the key."""
    _, defaults = DS_SCHEDULES[name]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}: not a parameter of DeepSpeed's {DS_SCHEDULES[name][0]}; "
            f"expected one of {', '.join(defaults)}"
        )
    out = {**defaults, **given}
    for p in _REQUIRED.get(name, ()):
        if out[p] is None:
            raise ConfigError(f"{key}.{p}: DeepSpeed's {DS_SCHEDULES[name][0]} requires it")
    for p, value in out.items():
        if value is None:
            continue
        where = f"{key}.{p}"
        if p == "warmup_type":
            if value not in ("log", "linear"):
                raise ConfigError(f"{where}: expected log or linear, got {value!r}")
        elif p in _FLAGS:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        elif p in _INTS and (not float(value).is_integer() or value < 0):
            raise ConfigError(f"{where}: expected a whole number >= 0, got {value!r}")
        elif value < 0:
            raise ConfigError(f"{where}: expected a number >= 0, got {value!r}")
    # DeepSpeed's own constructor checks (0.19): refused here rather than at the first step.
    if out.get("warmup_num_steps") is not None and "warmup_num_steps" in defaults:
        if out["warmup_num_steps"] <= 0:
            raise ConfigError(f"{key}.warmup_num_steps: expected a number > 0 (DeepSpeed's rule)")
        out["warmup_num_steps"] = int(out["warmup_num_steps"])
    if name == "one_cycle" and out["cycle_first_step_size"] <= 0:
        raise ConfigError(f"{key}.cycle_first_step_size: expected a number > 0")
    if name == "lr_range_test" and out["lr_range_test_step_size"] <= 0:
        raise ConfigError(f"{key}.lr_range_test_step_size: expected a number > 0")
    for p in _INTS:
        if out.get(p) is not None:
            out[p] = int(out[p])
    return out
