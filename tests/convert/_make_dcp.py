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
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.convert._make_deepspeed import LR, WEIGHT_DECAY, Job, batch, build
from tests.harness import mean_over_ranks, run_ranks


def _worker(rank: int, world: int, job: Job, out: str) -> list[float]:
    """One FSDP2 rank (under :func:`tests.harness.run_ranks`): its losses after the save."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

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
        losses.append(mean_over_ranks(loss))
    if job.more == 0:
        save()
    dist.barrier()
    return losses[job.steps :]


def make(out: str, world_size: int, job: Job, timeout: float = 600.0) -> list[float]:
    losses: list[float] = run_ranks(_worker, world_size, (job, out), timeout=timeout)[0]
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
