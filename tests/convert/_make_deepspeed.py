"""Make real DeepSpeed ZeRO checkpoints on CPU (gloo) for the interop tests and benchmarks.

    python tests/convert/_make_deepspeed.py OUT --world-size 2 --stage 2 --dtype fp32

Each world size is one group of spawned processes (``DS_ACCELERATOR=cpu``, gloo on 127.0.0.1);
inside it several :class:`Job` s run one after another (a fresh DeepSpeed engine each), so a
test session pays DeepSpeed's start-up once per world size. A job trains ``steps`` steps, saves
``OUT/<job.name>`` (tag ``global_step<steps>``; also after each step count in ``saves``, so the
save directory can hold several tags), then trains ``more`` steps and records those losses: the
curve a resumed run must continue. Batches come from :func:`batch`, so another trainer can
replay them.

With ``reference_dir``, every save also asks the live engine for DeepSpeed's own view of each
trainable parameter (``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``) and writes
it to ``reference_dir/<job>/<tag>.optim.safetensors``; ``job.json`` then records, per tag, the
optimizer's step counter and loss scale. ``tools/make_deepspeed_fixtures.py`` builds the
committed test fixtures this way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, SEQ, MICRO = 61, 30, 7, 3  # odd sizes: partitions cut tensors unevenly
MINI = {"vocab": 37, "dim": 17, "hidden": 23}  # the committed fixtures' model: 1774 parameters
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-2, 0.01, 1.0


class TinyTied(nn.Module):
    """A tied embedding/head, a frozen projection, a buffer, and an odd-sized MLP."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, hidden: int = 37) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.frozen = nn.Linear(dim, dim, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("gain", torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.frozen(h)
        h = h + self.down(torch.tanh(self.up(h))) * self.gain.to(h.dtype)
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


class Wide(nn.Module):
    """A plain MLP stack of about ``params`` parameters (benchmarks), tied head included."""

    def __init__(self, params: int = 100_000_000, dim: int = 1024, vocab: int = 32000) -> None:
        super().__init__()
        layers = max(1, (params - vocab * dim) // (2 * 4 * dim * dim))
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for b in self.blocks:
            h = h + b(h)
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@dataclass(frozen=True)
class Job:
    name: str
    stage: int
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    steps: int = 2
    more: int = 0
    model: str = "tiny"  # tiny | mini | wide
    params: int = 100_000_000
    saves: tuple[int, ...] = ()  # earlier step counts to save at too (tag global_step<n>)

    @property
    def save_steps(self) -> list[int]:
        return sorted({*self.saves, self.steps})


def batch(step: int, rank: int, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro batch of ``rank`` at optimizer step ``step`` (the same for every trainer)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, vocab, (MICRO, SEQ), generator=g)
    y = torch.randint(0, vocab, (MICRO, SEQ), generator=g)
    return x, y


def build(job: Job) -> nn.Module:
    torch.manual_seed(0)
    if job.model == "tiny":
        return TinyTied()
    if job.model == "mini":
        return TinyTied(**MINI)
    return Wide(job.params)


def ds_config(job: Job) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": job.stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "gradient_clipping": GRAD_CLIP,
    }
    if job.stage == 3:
        # Small modules stay partitioned too, so stage 3's fragments are exercised.
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if job.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif job.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def _reference_state(engine: Any, path: str | None) -> dict[str, Any]:
    """DeepSpeed's own full fp32 view of every trainable parameter after a save, through its
    public accessors (collective: every rank calls, rank 0 writes ``path``), and the counters
    that resuming must restore."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    tensors: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        tensors[f"master.{name}"] = safe_get_full_fp32_param(p).detach().float().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            t = safe_get_full_optimizer_state(p, key)
            tensors[f"{key}.{name}"] = t.detach().float().clone()
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    steps = {int(st["step"]) for st in base.state.values() if "step" in st}
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    scale = getattr(scaler, "cur_scale", None)
    if path is not None and torch.distributed.get_rank() == 0:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return {
        "step": int(engine.global_steps),
        "optimizer_step": steps.pop() if len(steps) == 1 else sorted(steps),
        "skipped_steps": int(engine.skipped_steps),
        "loss_scale": float(scale) if scale is not None else None,
    }


def _save(
    engine: Any,
    job: Job,
    step: int,
    out: str,
    reference_dir: str | None,
    tags: dict[str, Any],
) -> None:
    """Save tag ``global_step<step>`` to ``OUT/<job>``; with ``reference_dir``, also DeepSpeed's
    own full optimizer state and the counters (in ``tags``)."""
    tag = f"global_step{step}"
    engine.save_checkpoint(os.path.join(out, job.name), tag=tag)
    if reference_dir is not None:
        path = os.path.join(reference_dir, job.name, f"{tag}.optim.safetensors")
        tags[tag] = _reference_state(engine, path)


def _worker(
    rank: int, world: int, port: int, jobs: list[Job], out: str, q: Any, reference_dir: str | None
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    try:
        import logging

        torch.set_num_threads(1)
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        if any(job.dtype == "fp16" for job in jobs):
            # DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels; torch runs
            # fp16 on CPU anyway (slowly), which is all a tiny checkpoint needs.
            from deepspeed.accelerator import get_accelerator

            get_accelerator().is_fp16_supported = lambda: True  # type: ignore[method-assign]
        deepspeed.init_distributed(dist_backend="gloo")
        results = {}
        for job in jobs:
            model = build(job)
            vocab = model.emb.num_embeddings
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(job))
            save_steps = job.save_steps
            tags: dict[str, Any] = {}
            losses = []
            for step in range(job.steps + job.more):
                if step in save_steps:
                    _save(engine, job, step, out, reference_dir, tags)
                x, y = batch(step, rank, vocab)
                loss = engine(x, y)
                engine.backward(loss)
                engine.step()
                t = loss.detach().float().reshape(1)
                torch.distributed.all_reduce(t)
                losses.append(float(t.item()) / world)
            if job.steps + job.more in save_steps:
                _save(engine, job, job.steps + job.more, out, reference_dir, tags)
            results[job.name] = {"losses": losses, "tags": tags}
            engine.destroy()
            del engine, opt, model
        q.put((rank, True, results))
    except BaseException:
        import traceback

        q.put((rank, False, traceback.format_exc()))


def make(
    out: str,
    world_size: int,
    jobs: list[Job],
    timeout: float = 600.0,
    reference_dir: str | None = None,
) -> dict[str, Any]:
    """Run ``jobs`` on ``world_size`` fresh processes; returns ``{job: losses after the last
    save}`` and writes ``OUT/<job>/job.json`` (``losses``: after the last save; ``losses_by_step``:
    every step's, so a run resumed from any tag ``global_step<n>`` must follow
    ``losses_by_step[n:]``)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker, args=(r, world_size, port, jobs, out, q, reference_dir), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = q.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"DeepSpeed rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    done = {}
    for job in jobs:
        got = results[0][job.name]
        done[job.name] = got["losses"][job.steps :]
        record = {
            **asdict(job),
            "world_size": world_size,
            "losses": done[job.name],
            "losses_by_step": got["losses"],
        }
        if got["tags"]:
            record["tags"] = got["tags"]
        with open(os.path.join(out, job.name, "job.json"), "w") as f:
            json.dump(record, f, indent=1)
    return done


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--model", default="tiny")
    p.add_argument("--params", type=int, default=100_000_000)
    p.add_argument("--name", default="ds")
    a = p.parse_args(argv)
    job = Job(a.name, a.stage, a.dtype, a.steps, 0, a.model, a.params)
    print(make(a.out, a.world_size, [job]), file=sys.stderr)


if __name__ == "__main__":
    main()
