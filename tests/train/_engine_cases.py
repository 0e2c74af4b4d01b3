"""Shared pieces of the engine tests: a tiny model, its data, plain single-process references,
and the per-rank check functions that ``tests.harness.run_ranks`` runs in spawned processes.

The model has a tied weight (embedding = LM head), a LayerNorm, a persistent buffer, and a
2-element parameter (smaller than world size 3), so partitions cut tensors and some ranks own
only padding of a group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import zshard.train as zt
from tests.harness import COLLECTIVE_TIMEOUT_S

VOCAB, SEQ, GLOBAL_BATCH, GRAD_ACCUM, SEED = 13, 5, 12, 2, 1234


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.ln = nn.LayerNorm(2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.tanh(self.ln(self.up(h))))


class TinyNet(nn.Module):
    def __init__(self, d: int = 8, *, recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        self.scale = nn.Parameter(torch.ones(2))  # smaller than the world size
        self.register_buffer("shift", torch.full((d,), 0.25))
        self.emb = nn.Embedding(VOCAB, d)
        self.block = Block(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied

    def reset_parameters(self) -> None:  # the root's own tensors, for meta materialisation
        nn.init.ones_(self.scale)
        self.shift.fill_(0.25)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.shift
        h = checkpoint(self.block, h, use_reentrant=False) if self.recompute else self.block(h)
        h = h * self.scale[0] + self.scale[1]
        logits = self.head(h)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))


def make_model(d: int = 8, recompute: bool = False) -> TinyNet:
    torch.manual_seed(SEED)
    return TinyNet(d, recompute=recompute)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return x, y


def micro_batch(
    step: int, micro: int, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s ``micro``-th micro batch of window ``step``: equal slices of the global
    batch, so the mean of per-micro-batch means is the global mean."""
    x, y = global_batch(step)
    rows = GLOBAL_BATCH // (world_size * GRAD_ACCUM)
    lo = (micro * world_size + rank) * rows
    return x[lo : lo + rows], y[lo : lo + rows]


def config(stage: int, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "zero": {
            "stage": stage,
            "reduce_bucket_size": 50,
            "allgather_bucket_size": 20,
            "param_persistence_threshold": 20,
        },
        "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "train": {"global_batch_size": GLOBAL_BATCH, "grad_accum": GRAD_ACCUM, "seed": SEED},
        "dist": {"timeout_s": COLLECTIVE_TIMEOUT_S},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    return cfg


# -- running ----------------------------------------------------------------------------------


def train(engine: zt.Engine, steps: range, *, poison_rank: int | None = None) -> list[bool]:
    """Run windows ``steps``; ``poison_rank`` turns that rank's loss into inf (fp16 overflow)."""
    stepped = []
    for step in steps:
        for micro in range(engine.grad_accum):
            x, y = micro_batch(step, micro, engine.rank, engine.world_size)
            loss = engine(x, y)
            if poison_rank == engine.rank:
                loss = loss * math.inf
            engine.backward(loss)
            result = engine.step()
        stepped.append(result)
    return stepped


def full_params(engine: zt.Engine) -> dict[str, torch.Tensor]:
    with engine.gathered_parameters():
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def reference(
    steps: int,
    make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    *,
    clip: float = 0.0,
    model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Plain torch: the whole global batch per step in one process, fp32."""
    model = model if model is not None else make_model()
    opt = make_opt(list(model.parameters()))
    for step in range(steps):
        opt.zero_grad()
        model(*global_batch(step)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def reference_mixed(steps: int, dtype: torch.dtype, lr: float) -> dict[str, torch.Tensor]:
    """Mixed precision by hand: module in ``dtype``, fp32 master weights and AdamW on them."""
    model = make_model().to(dtype)
    master = [p.detach().float().clone().requires_grad_(True) for p in make_model().parameters()]
    opt = torch.optim.AdamW(master, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    for step in range(steps):
        model.zero_grad()
        model(*global_batch(step)).backward()
        for m, p in zip(master, model.parameters()):
            m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for m, p in zip(master, model.parameters()):
                p.copy_(m)
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    return max(
        ((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-12)).item() for n in want
    )


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))


# -- checks run on every rank -------------------------------------------------------------------


def _parity(stage: int, steps: int = 5, **over: Any) -> dict[str, torch.Tensor]:
    engine = zt.initialize(
        make_model(recompute=over.pop("recompute", False)), config(stage, **over)
    )
    train(engine, range(steps))
    out = full_params(engine)
    engine.close()
    return out


def check_parity(rank: int, world_size: int) -> dict[str, float]:
    """fp32 AdamW parity for stages 0-3 (plus activation checkpointing at stage 3)."""
    want = reference(5, adamw)
    out = {f"adamw_stage{s}": rel_err(_parity(s), want) for s in range(4)}
    out["adamw_stage3_recompute"] = rel_err(_parity(3, recompute=True), want)
    return out


def check_optimizers(rank: int, world_size: int) -> dict[str, float]:
    """SGD (Nesterov momentum), Adam (L2) and clipping parity."""
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}
    want = reference(
        5, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    )
    out = {"sgd_stage2": rel_err(_parity(2, optimizer=sgd), want)}
    adam = {"name": "adam", "lr": 1e-2, "weight_decay": 0.1}
    want = reference(5, lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1))
    out["adam_stage3"] = rel_err(_parity(3, optimizer=adam), want)
    want = reference(5, adamw, clip=0.05)
    for stage in (1, 3):
        out[f"clip_stage{stage}"] = rel_err(_parity(stage, grad_clip=0.05), want)
    # Frozen parameters get flat groups of their own, with no gradient or optimizer state.
    want = reference(5, adamw, model=freeze(make_model()))
    for stage in (2, 3):
        engine = zt.initialize(freeze(make_model()), config(stage))
        train(engine, range(5))
        out[f"frozen_stage{stage}"] = rel_err(full_params(engine), want)
        engine.close()
    return out


def freeze(model: TinyNet) -> TinyNet:
    model.block.ln.weight.requires_grad_(False)  # half of a module's parameters
    model.scale.requires_grad_(False)
    return model


def check_mixed(rank: int, world_size: int) -> dict[str, Any]:
    """bf16 and fp16 against a hand-written mixed-precision reference; fp16 overflow skip."""
    out: dict[str, Any] = {}
    # fp16 starts at scale 2**8: at the default 2**16 this model's first steps overflow (and are
    # rightly skipped), which would make the comparison meaningless.
    fp16 = {"dtype": "fp16", "loss_scale": {"initial_scale_power": 8}}
    for prec, dtype, cfg, stages in (
        ("bf16", torch.bfloat16, "bf16", (0, 1, 2, 3)),
        ("fp16", torch.float16, fp16, (0, 3)),
    ):
        want = reference_mixed(5, dtype, 1e-2)
        for stage in stages:
            out[f"{prec}_stage{stage}"] = rel_err(_parity(stage, precision=cfg), want)
    # fp16 overflow on one rank only: every rank skips and the scale halves (hysteresis 1).
    cfg = config(
        2, precision={"dtype": "fp16", "loss_scale": {"hysteresis": 1, "initial_scale_power": 8}}
    )
    engine = zt.initialize(make_model(), cfg)
    train(engine, range(1))
    before = full_params(engine)
    scale = engine.scaler.scale
    stepped = train(engine, range(1, 2), poison_rank=0)
    out["overflow_stepped"] = stepped[0]
    out["overflow_params_unchanged"] = rel_err(full_params(engine), before) == 0.0
    out["overflow_scale_ratio"] = engine.scaler.scale / scale
    out["overflow_skipped"] = engine.skipped_steps
    out["after_overflow_stepped"] = train(engine, range(2, 3))[0]
    engine.close()
    return out


def expected_bytes(stage: int, psi: int, n: int) -> int:
    """The ZeRO paper's per-rank model-state bytes for mixed-precision Adam (K = 12)."""
    return {0: 16 * psi, 1: 4 * psi + 12 * psi // n, 2: 2 * psi + 14 * psi // n, 3: 16 * psi // n}[
        stage
    ]


def check_memory(rank: int, world_size: int) -> dict[int, dict[str, int]]:
    out = {}
    for stage in range(4):
        cfg = config(
            stage, precision="bf16", zero={"stage": stage, "param_persistence_threshold": 0}
        )
        engine = zt.initialize(make_model(d=32), cfg)
        report = engine.memory_report()
        psi = sum(p.numel() for p in make_model(d=32).parameters())
        padded = sum(g.padded_numel for g in engine.groups)
        out[stage] = {
            **report,
            "psi": psi,
            "padding": padded - psi,
            "expected": expected_bytes(stage, psi, world_size),
        }
        engine.close()
    return out


def check_gathered_and_meta(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Stage 3 from a model_factory: built on meta, materialised per module = seeded reference.
    engine = zt.initialize(None, config(3), model_factory=lambda: TinyNet())
    want = {n: p.detach().clone() for n, p in make_model().named_parameters()}
    out["meta_init"] = rel_err(full_params(engine), want)
    out["meta_tied"] = engine.module.head.weight is engine.module.emb.weight
    out["meta_buffer"] = engine.module.shift.tolist()
    engine.close()
    # Edits inside gathered_parameters persist, reach the master (bf16), survive a step.
    for stage in (1, 3):
        sgd = {"name": "sgd", "lr": 1e-9}
        engine = zt.initialize(make_model(), config(stage, precision="bf16", optimizer=sgd))
        with engine.gathered_parameters(), torch.no_grad():
            if rank == 0:
                engine.module.block.up.weight.fill_(0.5)
        train(engine, range(1))
        got = full_params(engine)["block.up.weight"]
        out[f"edit_stage{stage}"] = bool((got == 0.5).all())
        engine.close()
    return out


def check_checkpoint_save(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Stage 1 fp32: 3 steps, save, 2 more (the uninterrupted run)."""
    engine = zt.initialize(make_model(), config(1))
    train(engine, range(3))
    url = engine.save(root, extra={"data_position": 3})
    train(engine, range(3, 5))
    out = {"url": url, "uninterrupted": rel_err(full_params(engine), reference(5, adamw))}
    engine.close()
    return out


def check_checkpoint_resume(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Load the stage-1 checkpoint at another world size and stage 3, finish the run."""
    engine = zt.initialize(None, config(3), model_factory=lambda: TinyNet())
    extra = engine.load(root)
    steps_done = engine.global_step
    train(engine, range(steps_done, 5))
    out = {
        "extra": extra,
        "steps_done": steps_done,
        "resumed": rel_err(full_params(engine), reference(5, adamw)),
    }
    engine.close()
    return out


def check_async_save(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Async saves overlap training; each commits the state of its own step."""
    engine = zt.initialize(make_model(), config(2, checkpoint={"async": True}))
    train(engine, range(2))
    first = engine.save(root + "/async")
    train(engine, range(2, 3))  # runs while the first save writes
    engine.save(root + "/async")  # waits for the first, then starts the second
    stall = engine.last_save_stall_s
    engine.wait_for_save()
    engine.close()
    fresh = zt.initialize(make_model(), config(0))
    fresh.load(first)  # snapshot taken before step 3 ran: must hold step 2's state
    out: dict[str, Any] = {"first": rel_err(full_params(fresh), reference(2, adamw))}
    fresh.load(root + "/async")  # newest: step 3
    out |= {
        "latest_step": fresh.global_step,
        "latest": rel_err(full_params(fresh), reference(3, adamw)),
        "stall_s": stall,
    }
    fresh.close()
    return out


def run_all(
    rank: int, world_size: int, checks: list[str], root: str | None = None
) -> dict[str, Any]:
    """Run several checks in one process group (start-up is the expensive part)."""
    out: dict[str, Any] = {}
    for name in checks:
        fn = globals()[name]
        needs_root = name.startswith(("check_checkpoint", "check_async"))
        out[name] = fn(rank, world_size, root) if needs_root else fn(rank, world_size)
    return out
