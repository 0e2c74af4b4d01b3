"""The engine in one process (world size 1, no process group) and its pure parts: optimizers on
flat partitions vs torch.optim, LR schedules, the loss scaler, checkpoints in-process."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zshard.train as zt
from tests.harness import run_python_json
from zshard.errors import InvalidArgumentError
from zshard.train.config import LossScaleConfig, OptimizerConfig, SchedulerConfig
from zshard.train.engine import CheckpointMismatchError
from zshard.train.optim import LossScaler, build_optimizer, lr_at

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]


# -- optimizers on flat tensors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "make"),
    [
        (
            {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.9)},
            lambda p: torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9)),
        ),
        (
            {"name": "adam", "lr": 1e-2, "weight_decay": 0.1},
            lambda p: torch.optim.Adam([p], lr=1e-2, weight_decay=0.1),
        ),
        (
            {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        ),
        ({"name": "sgd", "lr": 0.1}, lambda p: torch.optim.SGD([p], lr=0.1)),
    ],
)
def test_flat_optimizers_match_torch(cfg: dict, make) -> None:
    g = torch.Generator().manual_seed(0)
    ours = torch.randn(257, generator=g)
    ref = nn.Parameter(ours.clone())
    opt = make(ref)
    flat = build_optimizer(OptimizerConfig(**cfg))
    state = {k: torch.zeros_like(ours) for k in flat.state_keys}
    for step in range(1, 6):
        grad = torch.randn(257, generator=g)
        ref.grad = grad.clone()
        opt.step()
        flat.update(ours, grad.clone(), state, step=step, lr=cfg["lr"])
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-6, atol=1e-7)
    for key, t in state.items():
        torch.testing.assert_close(t, opt.state[ref][key], rtol=1e-6, atol=1e-7)


def test_lr_schedules() -> None:
    warm = SchedulerConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(t, 1.0, warm, 14) for t in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # the first update already moves
    assert lrs[4] == 1.0 and lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)
    assert lrs[15] == pytest.approx(0.1)  # flat after total_steps
    lin = SchedulerConfig(name="linear", min_lr_ratio=0.0)
    assert [lr_at(t, 2.0, lin, 4) for t in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    assert lr_at(7, 3.0, SchedulerConfig(), 4) == 3.0


def test_loss_scaler_hysteresis_window_min() -> None:
    s = LossScaler(
        LossScaleConfig(initial_scale_power=4, window=3, hysteresis=2, min_scale=4), enabled=True
    )
    assert s.scale == 16
    s.update(overflow=True)
    assert s.scale == 16  # first overflow tolerated
    s.update(overflow=True)
    assert s.scale == 8
    s.update(overflow=True)
    assert s.scale == 4  # min_scale (another overflow here raises, as DeepSpeed's does)
    for _ in range(3):
        s.update(overflow=False)
    assert s.scale == 4  # DeepSpeed counts the window from the step after the last overflow
    s.update(overflow=False)
    assert s.scale == 8  # window of good steps doubles
    restored = LossScaler(LossScaleConfig(), enabled=True)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()
    assert LossScaler(LossScaleConfig(), enabled=False).scale == 1.0


# -- the engine at world size 1 ------------------------------------------------------------------


def test_parity_world_size_1() -> None:
    results = cases.check_parity(0, 1)
    assert all(err < 1e-5 for err in results.values()), results
    results = cases.check_optimizers(0, 1)
    assert all(err < 1e-5 for err in results.values()), results


def test_both_calling_patterns_agree() -> None:
    """DeepSpeed style (step after every micro batch) and window style (step once)."""
    finals = []
    for every_micro in (True, False):
        engine = zt.initialize(cases.make_model(), cases.config(2))
        for step in range(3):
            for micro in range(engine.grad_accum):
                engine.backward(engine(*cases.micro_batch(step, micro, 0, 1)))
                if every_micro:
                    assert engine.step() == (micro == engine.grad_accum - 1)
            if not every_micro:
                assert engine.step()
        assert engine.global_step == 3 and engine.micro_steps == 6
        finals.append(cases.full_params(engine))
    assert cases.rel_err(finals[0], finals[1]) == 0.0


def test_backward_past_window_is_an_error() -> None:
    engine = zt.initialize(cases.make_model(), cases.config(1))
    x, y = cases.micro_batch(0, 0, 0, 1)
    engine.backward(engine(x, y))
    engine.backward(engine(x, y))
    with pytest.raises(InvalidArgumentError, match="call step"):
        engine.backward(engine(x, y))


def test_lr_follows_schedule_and_skips() -> None:
    cfg = cases.config(0, scheduler={"name": "linear", "warmup_steps": 2, "total_steps": 4})
    engine = zt.initialize(cases.make_model(), cfg)
    seen = []
    for step in range(4):
        seen.append(engine.lr)
        cases.train(engine, range(step, step + 1))
    assert seen == pytest.approx([0.005, 0.01, 0.01, 0.005])


def test_memory_report_world_size_1() -> None:
    for stage, report in cases.check_memory(0, 1).items():
        assert report["total"] == report["expected"], (stage, report)


def test_gathered_parameters_and_meta_world_size_1() -> None:
    out = cases.check_gathered_and_meta(0, 1)
    assert out["meta_init"] == 0.0 and out["meta_tied"] and out["meta_buffer"] == [0.25] * 8
    assert out["edit_stage1"] and out["edit_stage3"]


def test_meta_module_without_init_is_an_error() -> None:
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

    with pytest.raises(InvalidArgumentError, match="no reset_parameters"):
        zt.initialize(None, cases.config(3), model_factory=Bare)


def test_gpt_stage3_from_meta_matches_stage0() -> None:
    """The built-in GPT (init_weights, tied head, activation checkpointing) at stage 3 from a
    meta factory trains exactly like stage 0 from a materialised model."""
    from zshard.train.models.gpt import GPT, GPTConfig

    gcfg = GPTConfig(vocab_size=32, seq_len=8, n_layer=2, n_head=2, d_model=16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g)
    losses = []
    for stage, recompute in ((0, False), (3, True)):
        cfg = {
            "zero": {"stage": stage, "param_persistence_threshold": 40},
            "train": {"seed": 7, "micro_batch_size": 2},
        }
        engine = zt.initialize(
            None, cfg, model_factory=lambda r=recompute: GPT(gcfg, activation_checkpointing=r)
        )
        run = []
        for _ in range(3):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]


# -- checkpoints in one process ------------------------------------------------------------------


def test_save_load_across_precision_and_stage(tmp_path) -> None:
    """bf16 stage 2 saves param + master; an fp32 stage 0 load takes the master's bits."""
    root = str(tmp_path)
    engine = zt.initialize(cases.make_model(), cases.config(2, precision="bf16"))
    cases.train(engine, range(2))
    engine.save(root, extra={"pos": 7})
    master = {k: v.clone() for k, v in engine.state_tensors().items() if k[1] == "master"}
    fp32 = zt.initialize(cases.make_model(), cases.config(0))
    assert fp32.load(root) == {"pos": 7}
    assert fp32.global_step == 2 and fp32.optimizer_steps == 2
    (group,) = fp32.groups
    (master_part,) = master.values()
    assert torch.equal(group.flat[: group.numel], master_part[: group.numel])
    for k, v in engine.state_tensors().items():
        if k[1] == "exp_avg":
            assert torch.equal(
                fp32.state_tensors()[("params", "exp_avg")][: group.numel], v[: group.numel]
            )


def test_master_from_param_when_checkpoint_has_none(tmp_path) -> None:
    """fp32 saves no master; a bf16 stage-3 load builds its fp32 master from the fp32 params."""
    engine = zt.initialize(cases.make_model(), cases.config(1))
    cases.train(engine, range(1))
    engine.save(str(tmp_path))
    bf16 = zt.initialize(cases.make_model(), cases.config(3, precision="bf16"))
    bf16.load(str(tmp_path))
    (fp32_group,) = engine.groups
    saved = {m.name: fp32_group.flat[m.offset : m.offset + m.numel] for m in fp32_group.members}
    for g in bf16.groups:  # world size 1: the partition is the whole group
        for m in g.members:
            values = saved[m.name]
            assert torch.equal(g.master[m.offset : m.offset + m.numel], values), m.name
            assert torch.equal(g.param_part[m.offset : m.offset + m.numel], values.bfloat16()), (
                m.name
            )


def test_stage3_prefetches_in_recorded_order() -> None:
    engine = zt.initialize(cases.make_model(), cases.config(3, zero__prefetch=2))
    s3 = engine._stage3
    assert s3 is not None
    prefetched: list[str] = []  # groups whose gather was already in flight when needed
    real_gather = s3.gather

    def spy(g, **kwargs):  # type: ignore[no-untyped-def]
        if g.name in s3._inflight:
            prefetched.append(g.name)
        return real_gather(g, **kwargs)

    s3.gather = spy  # type: ignore[method-assign]
    engine.backward(engine(*cases.micro_batch(0, 0, 0, 1)))
    assert prefetched == []  # the first forward + backward records the order
    engine.backward(engine(*cases.micro_batch(0, 1, 0, 1)))
    assert engine.step()
    assert [g.name for g in s3._order["fwd"]] == [
        "_root",
        "emb",
        "block.up",
        "block.ln",
        "block.down",
    ]
    cases.train(engine, range(1, 3))
    # _root (2 elements < 20) is persistent: never gathered, never prefetched.
    assert set(prefetched) == {"emb", "block.up", "block.ln", "block.down"}
    assert cases.rel_err(cases.full_params(engine), cases.reference(3, cases.adamw)) < 1e-5


def test_missing_optimizer_state_starts_fresh(tmp_path) -> None:
    root = str(tmp_path)
    plain_sgd = cases.config(1, optimizer={"name": "sgd", "lr": 0.1})  # keeps no state
    engine = zt.initialize(cases.make_model(), plain_sgd)
    cases.train(engine, range(1))
    engine.save(root)
    adam = zt.initialize(cases.make_model(), cases.config(3))
    adam.load(root)
    assert adam.optimizer_steps == 0 and adam.global_step == 1
    assert all(not t.any() for k, t in adam.state_tensors().items() if k[1].startswith("exp_avg"))
    assert cases.rel_err(cases.full_params(adam), cases.full_params(engine)) == 0.0


def test_other_model_is_refused(tmp_path) -> None:
    root = str(tmp_path)
    engine = zt.initialize(cases.make_model(d=8), cases.config(1))
    engine.save(root)
    other = zt.initialize(cases.make_model(d=16), cases.config(1))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"shape differs: .*block.up.weight: checkpoint \[16, 8\], model \[32, 16\]",
    ):
        other.load(root)


def test_resume_auto_never_and_async(tmp_path) -> None:
    root = str(tmp_path / "run")
    cfg = cases.config(1, checkpoint={"dir": root, "every": 2, "async": True, "keep_last": 1})
    engine = zt.initialize(cases.make_model(), cfg)
    assert engine.resume() is None  # nothing saved yet
    saved = []
    for step in range(4):
        cases.train(engine, range(step, step + 1))
        saved.append(engine.maybe_save(extra={"next": step + 1}))
    engine.close()
    assert (
        saved[0] is None
        and saved[1].endswith("step-00000002")
        and saved[3].endswith("step-00000004")
    )
    again = zt.initialize(cases.make_model(), cfg)
    assert again.resume() == {"next": 4} and again.global_step == 4
    assert cases.rel_err(cases.full_params(again), cases.reference(4, cases.adamw)) < 1e-5
    never = zt.initialize(
        cases.make_model(), cases.config(1, checkpoint={"dir": root, "resume": "never"})
    )
    assert never.resume() is None and never.global_step == 0


def test_save_mid_window_is_an_error(tmp_path) -> None:
    engine = zt.initialize(cases.make_model(), cases.config(0))
    engine.backward(engine(*cases.micro_batch(0, 0, 0, 1)))
    with pytest.raises(InvalidArgumentError, match="save after step"):
        engine.save(str(tmp_path))


def test_fp16_overflow_world_size_1() -> None:
    out = cases.check_mixed(0, 1)
    assert out["bf16_stage0"] < 2e-2 and out["fp16_stage3"] < 5e-3, out
    assert out["overflow_stepped"] is False and out["overflow_params_unchanged"]
    assert out["overflow_scale_ratio"] == 0.5 and out["after_overflow_stepped"]
    assert math.isfinite(out["fp16_stage0"])


def test_a_meta_build_runs_no_initialiser_and_imports_no_compiler():
    """``on_meta`` (stage 3, the launcher's checks) gives the same shapes as a real build without
    filling values that do not exist, so it never pays for ``torch._dynamo``'s import (the
    Python meta kernels of ``normal_`` and friends import it): checked in a fresh interpreter."""
    code = """
import json, sys, torch
from zshard.train.models import make_model, on_meta
with on_meta():
    meta = make_model("gpt").model
    t = torch.empty(1, 4)
    t.squeeze_(0)  # shape-changing in-place operations still run
real = make_model("gpt").model
print(json.dumps({
    "dynamo": "torch._dynamo" in sys.modules,
    "meta": all(p.is_meta for p in meta.parameters()),
    "same": [(n, list(p.shape)) for n, p in meta.named_parameters()]
            == [(n, list(p.shape)) for n, p in real.named_parameters()],
    "squeezed": list(t.shape),
}))
"""
    got = run_python_json(code)
    assert got == {"dynamo": False, "meta": True, "same": True, "squeezed": [4]}
