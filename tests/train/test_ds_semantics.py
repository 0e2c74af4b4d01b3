"""DeepSpeed's optimizers and schedules with DeepSpeed's semantics.

- Schedules: every sequence recorded from DeepSpeed's own ``lr_schedules`` classes
  (tests/fixtures/ds_lr_schedules.json, tools/make_ds_semantics_fixtures.py) replays through
  ``lr_at``/``momentum_at``, edge cases included (warm-up of 1 step, total below warm-up, past
  the end, stairs, decay, SGD without momentum cycling).
- LAMB: per-tensor trust ratios, clamped to [min_coeff, max_coeff], equal to a plain
  single-process reference at every stage; partitions cut tensors across ranks, so the per-tensor
  norms are reduced across ranks (simulated here, real processes in the slow tests).
- OneCycle in the engine cycles Adam's beta1 as DeepSpeed does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import zshard.train as zt
from tests.harness import run_ranks
from zshard.train.config import OptimizerConfig, SchedulerConfig, load_config
from zshard.train.optim import (
    Lamb,
    TensorwiseItem,
    build_optimizer,
    lr_at,
    momentum_at,
    tensorwise_step,
)

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ds_lr_schedules.json"
SCHEDULES: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["cases"]
BY_TYPE = {
    "WarmupLR": "warmup_lr",
    "WarmupDecayLR": "warmup_decay_lr",
    "WarmupCosineLR": "warmup_cosine_lr",
    "OneCycle": "one_cycle",
    "LRRangeTest": "lr_range_test",
}


@pytest.mark.parametrize("case", SCHEDULES, ids=[c["name"] for c in SCHEDULES])
def test_schedule_replays_deepspeed(case: dict[str, Any]) -> None:
    cfg = SchedulerConfig(name=BY_TYPE[case["type"]], params=case["params"])
    got = [lr_at(t, case["optimizer_lr"], cfg, 10**6) for t in range(len(case["lr"]))]
    assert got == pytest.approx(case["lr"], rel=1e-12, abs=1e-15)
    moms = [momentum_at(t, cfg) for t in range(len(case["lr"]))]
    if case["optimizer"] == "adam":
        cycled = cfg.name == "one_cycle" and case["params"].get("cycle_momentum", True)
        want = case["beta1"] if cycled else [None] * len(moms)
        if not cycled:
            assert set(case["beta1"]) == {0.9}  # DeepSpeed left Adam's beta1 alone
        assert moms == pytest.approx(want, rel=1e-12) if cycled else moms == want
    else:
        # DeepSpeed cycles only optimizers with betas: SGD's momentum stays (optimizer_at).
        opt = build_optimizer(OptimizerConfig(name="sgd", momentum=0.9))
        from zshard.train.optim import optimizer_at

        assert optimizer_at(opt, 3, cfg) is opt


def test_schedule_total_defaults_to_the_run() -> None:
    sched = {"name": "warmup_decay_lr", "params": {"warmup_num_steps": 4}}
    cfg = load_config({"train": {"steps": 20}, "scheduler": sched})
    s = cfg.scheduler
    # total_num_steps absent: the run's total; past it DeepSpeed's rate stays at warmup_min_lr.
    assert lr_at(10, 1.0, s, cfg.total_steps) == pytest.approx(0.001 * (20 - 9) / (20 - 4))
    assert lr_at(cfg.total_steps + 5, 1.0, s, cfg.total_steps) == 0.0


# -- LAMB ----------------------------------------------------------------------------------------


class LambRef(torch.optim.Optimizer):
    """DeepSpeed's FusedLamb arithmetic on whole tensors, written plainly (fp32, eps outside the
    square root, bias correction in the step size)."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, max_coeff: float, min_coeff: float) -> None:  # fmt: skip
        super().__init__(
            params,
            dict(lr=lr, betas=betas, eps=eps, wd=weight_decay, max_coeff=max_coeff,
                 min_coeff=min_coeff),
        )  # fmt: skip
        self.ratios: list[float] = []
        self.clamped = {"max": 0, "min": 0}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                t, m, v, g = st["t"], st["m"], st["v"], p.grad
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = m / (v.sqrt() + group["eps"]) + group["wd"] * p
                w_norm, u_norm = p.norm().item(), u.norm().item()
                ratio = 1.0
                if w_norm and u_norm:
                    ratio = min(max(w_norm / u_norm, group["min_coeff"]), group["max_coeff"])
                    self.clamped["max"] += ratio == group["max_coeff"]
                    self.clamped["min"] += ratio == group["min_coeff"]
                self.ratios.append(ratio)
                step_size = group["lr"] * (1 - b2**t) ** 0.5 / (1 - b1**t)
                p.sub_(u, alpha=step_size * ratio)


LAMB = {
    "name": "lamb",
    "lr": 0.02,
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
    "max_coeff": 1.5,
    "min_coeff": 0.2,
}


def lamb_ref(params: list[torch.nn.Parameter]) -> LambRef:
    return LambRef(params, 0.02, (0.9, 0.95), 1e-8, 0.1, 1.5, 0.2)


def test_lamb_reference_exercises_both_clamps() -> None:
    model = cases.make_model()
    opt = lamb_ref(list(model.parameters()))
    for step in range(5):
        opt.zero_grad()
        model(*cases.global_batch(step)).backward()
        opt.step()
    assert opt.clamped["max"] > 0 and opt.clamped["min"] > 0


def test_lamb_pieces_reduced_across_ranks_equal_whole_tensors() -> None:
    """Three 'ranks' each hold a piece of a flat partition that cuts tensors anywhere: the
    all-reduced sums give each tensor's own ratio, so the update equals the whole-tensor one."""
    torch.manual_seed(3)
    shapes = [(7,), (3, 5), (2,), (11,)]
    tensors = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    opt = Lamb((0.9, 0.99), 1e-8, 0.05, max_coeff=2.0, min_coeff=0.1)
    whole = []
    for t, g in zip(tensors, grads):
        p = t.flatten().clone()
        state = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for step in (1, 2):
            opt.update(p, g.flatten().clone(), state, step=step, lr=0.1)
        whole.append(p)
    flat = torch.cat([t.flatten() for t in tensors])
    gflat = torch.cat([g.flatten() for g in grads])
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + t.numel())
    n, ranks = flat.numel(), 3
    per = -(-n // ranks)
    parts = [(r * per, min(n, (r + 1) * per)) for r in range(ranks)]
    params = [flat[a:b].clone() for a, b in parts]
    states = [{"exp_avg": torch.zeros(b - a), "exp_avg_sq": torch.zeros(b - a)} for a, b in parts]
    for step in (1, 2):
        items = []
        for (a, b), p, st in zip(parts, params, states):
            segs = [
                (min(max(lo, a), b) - a, min(max(hi, a), b) - a)
                for lo, hi in zip(offsets, offsets[1:])
            ]
            items.append(TensorwiseItem(p, gflat[a:b].clone(), st, segs))
        # One process plays every rank: the "all-reduce" sums every rank's pieces.
        sums = [opt.moments(it.param, it.grad, it.state, it.segments) for it in items]
        total = torch.stack(sums).sum(0)
        ratios = opt.ratios(total)
        for it in items:
            opt.apply(it.param, it.state, it.segments, ratios, step=step, lr=0.1)
    got = torch.cat(params)
    assert torch.allclose(got, torch.cat(whole), rtol=1e-6, atol=1e-7)
    # tensorwise_step with no reduction is the whole-tensor update too.
    p = flat.clone()
    st = {"exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n)}
    segs = list(zip(offsets, offsets[1:]))
    for step in (1, 2):
        tensorwise_step(opt, [TensorwiseItem(p, gflat.clone(), st, segs)], None, step=step, lr=0.1)
    assert torch.allclose(p, torch.cat(whole), rtol=1e-6, atol=1e-7)


def check_lamb(rank: int, world_size: int) -> dict[str, float]:
    want = cases.reference(5, lamb_ref)
    out = {}
    for stage in range(4):
        engine = zt.initialize(cases.make_model(), cases.config(stage, optimizer=LAMB))
        cases.train(engine, range(5))
        out[f"lamb_stage{stage}"] = cases.rel_err(cases.full_params(engine), want)
        engine.close()
    return out


def test_lamb_parity_world_size_1() -> None:
    out = check_lamb(0, 1)
    assert all(err < 1e-5 for err in out.values()), out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_lamb_parity_across_ranks(world_size: int) -> None:
    per_rank = run_ranks(check_lamb, world_size, timeout=240)
    assert all(r == per_rank[0] for r in per_rank)
    assert all(err < 1e-5 for err in per_rank[0].values()), per_rank[0]


def test_lamb_with_optimizer_offload_is_refused() -> None:
    with pytest.raises(Exception, match="lamb needs each tensor's whole update"):
        load_config(
            {"optimizer": {"name": "lamb"}, "zero": {"stage": 2, "offload_optimizer": "cpu"}}
        )


# -- OneCycle cycles Adam's beta1 in the engine -----------------------------------------------


def test_one_cycle_drives_lr_and_beta1_in_the_engine() -> None:
    sched = {
        "name": "one_cycle",
        "params": {"cycle_min_lr": 0.002, "cycle_max_lr": 0.02, "cycle_first_step_size": 2,
                   "cycle_min_mom": 0.8, "cycle_max_mom": 0.95},
    }  # fmt: skip
    adam = {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999]}
    engine = zt.initialize(cases.make_model(), cases.config(0, optimizer=adam, scheduler=sched))
    cfg = engine.config.scheduler
    model = cases.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(6):
        opt.zero_grad()
        model(*cases.global_batch(step)).backward()
        for group in opt.param_groups:  # what DeepSpeed's OneCycle sets before update `step`
            group["lr"] = lr_at(step, 0.01, cfg, 6)
            group["betas"] = (momentum_at(step, cfg), 0.99)
        opt.step()
    cases.train(engine, range(6))
    want = {n: p.detach() for n, p in model.named_parameters()}
    assert cases.rel_err(cases.full_params(engine), want) < 1e-5
    engine.close()
