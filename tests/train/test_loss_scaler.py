"""fp16 loss scaling identical to DeepSpeed's ``DynamicLossScaler``: every recorded sequence
(tests/fixtures/ds_loss_scaler.json, made by tools/make_ds_semantics_fixtures.py with DeepSpeed's
own class) replays step for step; the engine drives the scaler the way DeepSpeed's ZeRO does."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import zshard.train as zt
from zshard.train.config import LossScaleConfig
from zshard.train.optim import LossScaleError, LossScaler

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ds_loss_scaler.json"
CASES: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["cases"]


def scaler_for(args: dict[str, Any]) -> LossScaler:
    power = math.log2(args["init_scale"])
    assert power.is_integer()
    cfg = LossScaleConfig(
        initial_scale_power=int(power),
        window=args["scale_window"],
        hysteresis=args["delayed_shift"],
        min_scale=float(args["min_scale"]),
        consecutive_hysteresis=args["consecutive_hysteresis"],
        raise_error_at_min_scale=args["raise_error_at_min_scale"],
    )
    return LossScaler(cfg, enabled=True)


def test_the_fixture_covers_what_matters() -> None:
    names = {c["name"].split("-")[0] for c in CASES}
    assert {"alternating", "bursty", "long_clean", "to_the_floor"} <= names
    assert {c["args"]["consecutive_hysteresis"] for c in CASES} == {False, True}
    assert any(c["raised_at"] is not None for c in CASES)  # raise_error_at_min_scale fired
    grew = [c for c in CASES if c["name"].startswith("long_clean")]
    assert all(any(ch[1] > c["args"]["init_scale"] for ch in c["changes"]) for c in grew)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_replays_deepspeeds_sequence(case: dict[str, Any]) -> None:
    s = scaler_for(case["args"])
    changes = {step: (scale, hyst) for step, scale, hyst in case["changes"]}
    expected = (s.scale, s.cur_hysteresis)
    for i, c in enumerate(case["overflows"]):
        if i == case["raised_at"]:
            with pytest.raises(LossScaleError, match="minimum loss scale"):
                s.update(c == "1")
            return
        s.update(c == "1")
        expected = changes.get(i, expected)
        assert (s.scale, s.cur_hysteresis) == expected, (case["name"], i)
    assert case["raised_at"] is None


def test_state_round_trip_continues_the_same_sequence() -> None:
    case = next(c for c in CASES if c["name"] == "bursty-h2-c0")
    a = scaler_for(case["args"])
    flags = [c == "1" for c in case["overflows"]]
    for f in flags[:100]:
        a.update(f)
    b = scaler_for(case["args"])
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for f in flags[100:]:
        a.update(f)
        b.update(f)
        assert (a.scale, a.cur_hysteresis, a.cur_iter) == (b.scale, b.cur_hysteresis, b.cur_iter)


def test_static_scale_and_disabled() -> None:
    s = LossScaler(LossScaleConfig(static_scale=128.0), enabled=True)
    for f in (True, True, False, True):
        s.update(f)
    assert s.scale == 128.0
    off = LossScaler(LossScaleConfig(), enabled=False)
    off.update(True)
    assert off.scale == 1.0


# -- in the engine ---------------------------------------------------------------------------------


def _engine(**loss_scale: Any) -> zt.Engine:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    cfg = {
        "precision": {"dtype": "fp16", "loss_scale": {"initial_scale_power": 4, **loss_scale}},
        "zero": {"stage": 1},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "train": {"micro_batch_size": 2, "grad_accum": 1},
    }
    return zt.initialize(model, cfg)


def _window(engine: zt.Engine, overflow: bool) -> bool:
    x = torch.ones(2, 4)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss * math.inf if overflow else loss)
    return engine.step()


def test_engine_skips_overflows_and_follows_deepspeeds_scaler() -> None:
    pattern = "1101000110000000"
    engine = _engine(window=3, hysteresis=2, min_scale=1.0)
    ref = LossScaler(engine.config.precision.loss_scale, enabled=True)
    for c in pattern:
        stepped = _window(engine, c == "1")
        ref.update(c == "1")
        assert stepped == (c == "0")
        assert (
            engine.scaler.scale == ref.scale and engine.scaler.cur_hysteresis == ref.cur_hysteresis
        )
    assert engine.skipped_steps == pattern.count("1")
    engine.close()


def test_engine_raises_at_the_minimum_scale() -> None:
    engine = _engine(hysteresis=1, min_scale=4.0)  # 16 -> 8 -> 4, then an error
    assert not _window(engine, True) and engine.scaler.scale == 8.0
    assert not _window(engine, True) and engine.scaler.scale == 4.0
    with pytest.raises(LossScaleError, match="minimum loss scale 4"):
        _window(engine, True)
    engine.close()
    keep_going = _engine(hysteresis=1, min_scale=4.0, raise_error_at_min_scale=False)
    for _ in range(4):
        assert not _window(keep_going, True)
    assert keep_going.scaler.scale == 4.0
    keep_going.close()


def test_bf16_and_fp32_skip_non_finite_steps_too() -> None:
    """DeepSpeed's ZeRO skips a step whose gradient norm is not finite in every precision
    (bf16: check_grad_overflow, true by default)."""
    for dtype in ("bf16", "fp32"):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        engine = zt.initialize(model, {"precision": dtype, "optimizer": {"name": "sgd", "lr": 0.1}})
        before = [p.detach().clone() for p in engine.module.parameters()]
        loss = engine(torch.ones(2, 4)).float().sum() * math.inf
        engine.backward(loss)
        assert engine.step() is False and engine.skipped_steps == 1
        after = list(engine.module.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        engine.close()
