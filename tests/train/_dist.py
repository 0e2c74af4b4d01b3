"""Run a function in N real processes joined by a gloo process group on 127.0.0.1.

    results = run_ranks(fn, world_size=3, args=(...), timeout=120)  # [rank 0's return, ...]

Each process is spawned fresh (``torch.multiprocessing`` spawn context), gets torchrun-style
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
and calls ``fn(rank, world_size, *args)``; ``fn`` must be importable (module level) and return
something picklable. The first failure, or the deadline, kills every process and fails the test
with the rank's traceback: a hung collective never stalls the suite. Start-up costs ~2 s (importing
torch), so run several checks inside one call.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

# Collectives inside the children time out well before the harness deadline, so a deadlock
# surfaces as an error with a traceback rather than as a kill.
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, args: Sequence[Any], results: Any
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    # A few processes share 2 cores: more intra-op threads only oversubscribe them.
    torch.set_num_threads(1)
    try:
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(AssertionError):
    """A rank raised, or the group missed its deadline."""


def run_ranks(
    fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *, timeout: float = 120.0
) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry, args=(fn, r, world_size, port, tuple(args), results), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailed(
                    f"{fn.__name__} at world size {world_size}: no result from ranks "
                    f"{sorted(set(range(world_size)) - set(out))} within {timeout:.0f} s"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out
                ]
                if dead:
                    raise RankFailed(
                        f"{fn.__name__}: rank(s) {dead} died (exit codes "
                        f"{[procs[r].exitcode for r in dead]})"
                    ) from None
                continue
            if not ok:
                raise RankFailed(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    return [out[r] for r in range(world_size)]
