"""Make a real torch.distributed.checkpoint (DCP) directory from an FSDP2 run on CPU (gloo).

    python tests/convert/_make_dcp.py OUT --world-size 2 [--model wide --params 100000000]

Every rank shards the model with ``fully_shard`` (the MLP layers, then the root, which keeps the
tied embedding/head together), trains ``steps`` AdamW steps on :func:`_make_deepspeed.batch`,
then saves ``get_state_dict(model, optimizer)`` as ``{"model": ..., "optim": ...}`` with
``dcp.save`` and trains ``more`` steps. ``OUT/job.json`` records the losses after the save.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.convert._make_deepspeed import LR, WEIGHT_DECAY, Job, batch, build


def _worker(rank: int, world: int, port: int, job: Job, out: str, q: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.fsdp import fully_shard

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = build(job)
        vocab = model.emb.num_embeddings
        blocks = list(model.blocks) if job.model == "wide" else [model.up, model.down]
        for m in blocks:
            fully_shard(m)
        fully_shard(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
        losses = []

        def save() -> None:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=out)

        for step in range(job.steps + job.more):
            if step == job.steps:
                save()
            x, y = batch(step, rank, vocab)
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            t = loss.detach().reshape(1)
            dist.all_reduce(t)
            losses.append(float(t.item()) / world)
        if job.more == 0:
            save()
        losses = losses[job.steps :]
        dist.barrier()
        dist.destroy_process_group()
        q.put((rank, True, losses))
    except BaseException:
        import traceback

        q.put((rank, False, traceback.format_exc()))


def make(out: str, world_size: int, job: Job, timeout: float = 600.0) -> list[float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, job, out, q), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    losses: list[float] = []
    try:
        for _ in range(world_size):
            rank, ok, value = q.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"FSDP2 rank {rank} failed:\n{value}")
            if rank == 0:
                losses = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    with open(os.path.join(out, "job.json"), "w") as f:
        json.dump({"world_size": world_size, "model": job.model, "losses": losses}, f)
    return losses


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--model", default="tiny")
    p.add_argument("--params", type=int, default=100_000_000)
    a = p.parse_args(argv)
    print(make(a.out, a.world_size, Job("dcp", 0, "fp32", a.steps, 0, a.model, a.params)))


if __name__ == "__main__":
    main()
