"""Mixed precision against a hand-written reference that makes the same micro batches.

- fp16 + SGD with gradient clipping that is active every step: the update is linear in the
  unscaled gradient, so a missing unscale (x scale) or a doubled one (/ scale) moves the weights
  by orders of magnitude, and ``engine.grad_norm`` (which clipping uses) is checked against the
  reference's norm of the unscaled gradient.
- bf16 AdamW: every element within a stated number of bf16 ulps of the reference, at every
  stage, at world size 1 as at 2 and 3 (slow); the reference sums the same micro batches in the
  same order, so world size 1 must agree exactly.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import zshard.train as zt
from tests.harness import run_ranks

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]

STEPS = 4
CLIP = 0.05
FP16_POWER = 10
# Allowed differences. World size 1 sums exactly as the reference does: bitwise equal. Across
# ranks the reduction adds the same bf16/fp16 terms in another order, which Adam amplifies.
ULPS = {1: 0, 2: 12, 3: 12}  # bf16 ulps per element (measured: 5 at 2 ranks, 8 at 3)
FP16_REL = {1: 0.0, 2: 2e-3, 3: 2e-3}  # max |error| / max |weight| of the fp16 weights
NORM_REL = {1: 1e-6, 2: 1e-3, 3: 1e-3}  # engine.grad_norm vs the reference's


def reference(
    dtype: torch.dtype, world_size: int, opt: str, *, clip: float = 0.0, scale: float = 1.0
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The module in ``dtype``, gradients accumulated in ``dtype`` over the window's micro batches
    (each backward scaled by ``scale / grad_accum``, every rank's micro batches summed), unscaled
    to fp32 (/ world_size / scale), clipped by torch's rule, and an fp32 master update."""
    model = cases.make_model().to(dtype)
    master = [p.detach().clone() for p in cases.make_model().parameters()]  # fp32, unrounded
    if opt == "sgd":
        optim: Any = torch.optim.SGD(master, lr=0.1, momentum=0.9)
    else:
        optim = torch.optim.AdamW(master, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    norms = []
    for step in range(STEPS):
        model.zero_grad()
        for micro in range(cases.GRAD_ACCUM):
            for rank in range(world_size):
                x, y = cases.micro_batch(step, micro, rank, world_size)
                (model(x, y).float() * (scale / cases.GRAD_ACCUM)).backward()
        grads = [p.grad.float() / (world_size * scale) for p in model.parameters()]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        norms.append(norm)
        coef = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
        for m, g in zip(master, grads):
            m.grad = g * coef
        optim.step()
        with torch.no_grad():
            for m, p in zip(master, model.parameters()):
                p.copy_(m)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def _engine_run(stage: int, precision: Any, optimizer: dict[str, Any], **over: Any) -> Any:
    engine = zt.initialize(
        cases.make_model(), cases.config(stage, precision=precision, optimizer=optimizer, **over)
    )
    norms = []
    for step in range(STEPS):
        assert cases.train(engine, range(step, step + 1)) == [True]
        norms.append(engine.grad_norm)
    with engine.gathered_parameters():
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.close()
    return params, norms


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (adjacent representable values)."""
    a = got.to(torch.bfloat16).view(torch.int16).int()
    b = want.to(torch.bfloat16).view(torch.int16).int()
    # Map sign-magnitude bit patterns onto a line, so neighbours differ by 1 across zero too.
    a = torch.where(a < 0, -(a & 0x7FFF), a)
    b = torch.where(b < 0, -(b & 0x7FFF), b)
    return int((a - b).abs().max())


def check_precision(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    fp16 = {"dtype": "fp16", "loss_scale": {"initial_scale_power": FP16_POWER}}
    want, want_norms = reference(torch.float16, world_size, "sgd", clip=CLIP, scale=2.0**FP16_POWER)
    for stage in (0, 3):
        got, norms = _engine_run(stage, fp16, sgd, grad_clip=CLIP)
        out[f"fp16_sgd_stage{stage}"] = {
            "rel_err": cases.rel_err({n: t.float() for n, t in got.items()}, want),
            "norms": norms,
            "want_norms": want_norms,
        }
    adamw = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]}
    want, _ = reference(torch.bfloat16, world_size, "adamw")
    for stage in range(4):
        got, _ = _engine_run(stage, "bf16", adamw)
        out[f"bf16_stage{stage}"] = max(bf16_ulps(got[n], want[n]) for n in want)
    return out


def _assert(out: dict[str, Any], world_size: int) -> None:
    for stage in (0, 3):
        r = out[f"fp16_sgd_stage{stage}"]
        assert min(r["want_norms"]) > CLIP  # clipping was active at every step
        # A missing or doubled unscale would be off by 2**10.
        assert r["norms"] == pytest.approx(r["want_norms"], rel=NORM_REL[world_size])
        assert r["rel_err"] <= FP16_REL[world_size], r["rel_err"]
    for stage in range(4):
        assert out[f"bf16_stage{stage}"] <= ULPS[world_size], (stage, out)


def test_a_missing_or_doubled_unscale_would_fail() -> None:
    """The reference itself: the weights move by far more than the tolerance when the unscale
    is off by the loss scale either way."""
    _, norms = reference(torch.float16, 1, "sgd", clip=CLIP, scale=2.0**FP16_POWER)
    for wrong in (2.0 ** (2 * FP16_POWER), 1.0):  # unscaled twice, or not at all
        model = cases.make_model().half()
        model.zero_grad()
        for micro in range(cases.GRAD_ACCUM):
            x, y = cases.micro_batch(0, micro, 0, 1)
            (model(x, y).float() * (2.0**FP16_POWER / cases.GRAD_ACCUM)).backward()
        norm = math.sqrt(
            sum(float((p.grad.float() / wrong).pow(2).sum()) for p in model.parameters())
        )
        assert abs(norm - norms[0]) / norms[0] > 0.5


def test_precision_parity_world_size_1() -> None:
    _assert(check_precision(0, 1), 1)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_precision_parity_across_ranks(world_size: int) -> None:
    per_rank = run_ranks(check_precision, world_size, timeout=300)
    assert all(r == per_rank[0] for r in per_rank)
    _assert(per_rank[0], world_size)
