"""Record DeepSpeed's own loss-scaler and learning-rate-schedule sequences as JSON fixtures.

``tests/train/test_loss_scaler.py`` and ``tests/train/test_ds_semantics.py`` replay them against
zshard's ``LossScaler`` and ``lr_at``/``momentum_at``, so CI needs no DeepSpeed. Re-make them to
check a new DeepSpeed release. DeepSpeed goes into a venv of its own, never the project's::

    python3 -m venv /tmp/dsvenv
    /tmp/dsvenv/bin/pip install torch==2.13.0 "deepspeed==0.19.*"
    DS_ACCELERATOR=cpu /tmp/dsvenv/bin/python tools/make_ds_semantics_fixtures.py

Writes ``tests/fixtures/ds_loss_scaler.json``: for each case, ``DynamicLossScaler``'s constructor
arguments, the overflow sequence (``"1"`` = overflow) and, after every ``update_scale``, the
scale and the hysteresis left, or the step at which it raised (an overflow at the minimum scale
with ``raise_error_at_min_scale``). The only thing patched is ``deepspeed.comm.get_rank``, which
the class calls for its log lines (there is no process group here).

And ``tests/fixtures/ds_lr_schedules.json``: for each schedule case, the DeepSpeed type and
parameters, the optimizer (SGD, or Adam for momentum cycling), and the learning rate (and
beta1) in the optimizer after construction and after each ``scheduler.step()``: entry ``t`` is
what update ``t`` runs with.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_SCALER = ROOT / "tests" / "fixtures" / "ds_loss_scaler.json"
OUT_SCHEDULES = ROOT / "tests" / "fixtures" / "ds_lr_schedules.json"


def _patterns() -> dict[str, str]:
    rng = random.Random(13)
    bursty = ""
    while len(bursty) < 400:
        bursty += "1" * rng.randint(1, 5) + "0" * rng.randint(0, 30)
    sparse = "".join("1" if rng.random() < 0.03 else "0" for _ in range(3000))
    return {
        "alternating": "10" * 60,
        "pairs": "1100" * 40,
        "bursty": bursty[:400],
        "long_clean": "0" * 2100 + "1" + "0" * 1100,
        "clean_then_overflows": "0" * 25 + "1" * 12 + "0" * 25,
        "sparse": sparse,
        "to_the_floor": "1" * 40 + "0" * 10 + "1" * 5,
    }


def _scaler_cases() -> list[dict[str, Any]]:
    cases = []
    for pattern, overflows in _patterns().items():
        for hysteresis in (1, 2, 3):
            for consecutive in (False, True):
                long = pattern in ("long_clean", "sparse")
                args = {
                    "init_scale": 2.0**16 if pattern != "to_the_floor" else 2.0**6,
                    "scale_window": 1000 if long else (4 if pattern != "bursty" else 7),
                    "min_scale": 1 if pattern != "bursty" else 0.25,
                    "delayed_shift": hysteresis,
                    "consecutive_hysteresis": consecutive,
                    "raise_error_at_min_scale": pattern == "to_the_floor" and hysteresis != 3,
                }
                cases.append({"name": f"{pattern}-h{hysteresis}-c{int(consecutive)}", "args": args,
                              "overflows": overflows})  # fmt: skip
    return cases


def run_scaler(case: dict[str, Any]) -> dict[str, Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    s = DynamicLossScaler(**case["args"])
    changes: list[list[Any]] = []  # [step, scale, hysteresis left] where either changed
    last = (s.cur_scale, s.cur_hysteresis)
    raised = None
    for i, c in enumerate(case["overflows"]):
        try:
            s.update_scale(c == "1")
        except Exception:
            raised = i
            break
        now = (s.cur_scale, s.cur_hysteresis)
        if now != last:
            changes.append([i, *now])
            last = now
    return {**case, "changes": changes, "raised_at": raised}


SCHEDULES: list[tuple[str, str, dict[str, Any], str, int]] = [
    # (name, DeepSpeed type, params, optimizer, steps)
    ("warmup_log", "WarmupLR", {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01,
                                "warmup_num_steps": 10}, "sgd", 16),
    ("warmup_linear", "WarmupLR", {"warmup_max_lr": 0.01, "warmup_num_steps": 10,
                                   "warmup_type": "linear"}, "sgd", 16),
    ("warmup_default_max", "WarmupLR", {"warmup_num_steps": 5}, "sgd", 8),
    ("warmup_one_step", "WarmupLR", {"warmup_max_lr": 0.02, "warmup_num_steps": 1}, "sgd", 5),
    ("decay_linear", "WarmupDecayLR", {"total_num_steps": 30, "warmup_min_lr": 0.0001,
                                       "warmup_max_lr": 0.01, "warmup_num_steps": 5,
                                       "warmup_type": "linear"}, "sgd", 40),
    ("decay_log", "WarmupDecayLR", {"total_num_steps": 20, "warmup_num_steps": 6}, "sgd", 25),
    ("decay_total_below_warmup", "WarmupDecayLR", {"total_num_steps": 4, "warmup_num_steps": 8,
                                                   "warmup_max_lr": 0.01}, "sgd", 14),
    ("decay_total_equals_warmup", "WarmupDecayLR", {"total_num_steps": 6, "warmup_num_steps": 6,
                                                    "warmup_type": "linear"}, "sgd", 10),
    ("cosine", "WarmupCosineLR", {"total_num_steps": 30, "warmup_num_steps": 5,
                                  "cos_min_ratio": 0.1, "warmup_type": "linear"}, "sgd", 40),
    ("cosine_log_min_ratio", "WarmupCosineLR", {"total_num_steps": 20, "warmup_num_steps": 8,
                                                "warmup_min_ratio": 0.2}, "sgd", 24),
    ("cosine_total_below_warmup", "WarmupCosineLR", {"total_num_steps": 3, "warmup_num_steps": 6,
                                                     "warmup_type": "linear"}, "sgd", 10),
    ("one_cycle", "OneCycle", {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01,
                               "cycle_first_step_size": 5}, "adam", 16),
    ("one_cycle_asymmetric_decay", "OneCycle", {"cycle_min_lr": 0.002, "cycle_max_lr": 0.02,
                                                "cycle_first_step_size": 4,
                                                "cycle_second_step_size": 7,
                                                "decay_step_size": 3, "decay_lr_rate": 0.5,
                                                "decay_mom_rate": 0.1, "cycle_min_mom": 0.85,
                                                "cycle_max_mom": 0.95}, "adam", 24),
    ("one_cycle_stairs", "OneCycle", {"cycle_min_lr": 0.001, "cycle_max_lr": 0.009,
                                      "cycle_first_step_size": 8, "cycle_first_stair_count": 4,
                                      "cycle_second_stair_count": 2}, "adam", 20),
    ("one_cycle_sgd", "OneCycle", {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01,
                                   "cycle_first_step_size": 3}, "sgd", 9),
    ("one_cycle_no_momentum", "OneCycle", {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01,
                                           "cycle_first_step_size": 3,
                                           "cycle_momentum": False}, "adam", 9),
    ("range_test", "LRRangeTest", {"lr_range_test_min_lr": 0.001, "lr_range_test_step_size": 4,
                                   "lr_range_test_step_rate": 0.5}, "sgd", 12),
    ("range_test_staircase", "LRRangeTest", {"lr_range_test_step_size": 3,
                                             "lr_range_test_staircase": True}, "sgd", 12),
]  # fmt: skip


def run_schedule(name: str, kind: str, params: dict[str, Any], opt: str, steps: int) -> dict:
    import torch
    from deepspeed.runtime import lr_schedules

    p = torch.nn.Parameter(torch.zeros(2))
    if opt == "adam":
        optimizer: Any = torch.optim.Adam([p], lr=0.005, betas=(0.9, 0.999))
    else:
        optimizer = torch.optim.SGD([p], lr=0.005, momentum=0.9)
    sched = getattr(lr_schedules, kind)(optimizer, **params)
    lrs, beta1 = [], []
    for t in range(steps):
        group = optimizer.param_groups[0]
        lrs.append(float(group["lr"]))
        beta1.append(float(group["betas"][0]) if "betas" in group else None)
        if t + 1 < steps:
            sched.step()
    return {"name": name, "type": kind, "params": params, "optimizer": opt,
            "optimizer_lr": 0.005, "lr": lrs, "beta1": beta1}  # fmt: skip


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as ds_comm

    ds_comm.get_rank = lambda *a, **k: 0  # the scaler's log lines ask for it; no group here
    from deepspeed.runtime.fp16 import loss_scaler

    loss_scaler.dist.get_rank = lambda *a, **k: 0
    version = deepspeed.__version__
    scaler = {"deepspeed": version, "cases": [run_scaler(c) for c in _scaler_cases()]}
    OUT_SCALER.write_text(json.dumps(scaler, indent=None) + "\n")
    schedules = {"deepspeed": version, "cases": [run_schedule(*c) for c in SCHEDULES]}
    OUT_SCHEDULES.write_text(json.dumps(schedules, indent=1) + "\n")
    for out in (OUT_SCALER, OUT_SCHEDULES):
        print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size} bytes, DeepSpeed {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
