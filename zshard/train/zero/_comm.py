"""Collectives over the data-parallel group, with a world-size-1 path that needs no process group.

The process group comes from the environment (torchrun style: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``). Without ``WORLD_SIZE`` and without an existing
group, the engine runs as one process and every collective is a local copy, so single-process
training and tests pay nothing for distribution.

torch 2.13 deprecates ``all_gather_into_tensor``/``reduce_scatter_tensor`` in favour of
``all_gather_single``/``reduce_scatter_single`` (gloo implements both); older torch has only the
former, so each is looked up once.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Protocol

import torch
import torch.distributed as dist

from zshard.errors import ConfigError
from zshard.train.config import DistConfig

log = logging.getLogger(__name__)

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Work(Protocol):
    def wait(self) -> Any: ...


class _Done:
    """The handle of a collective that completed synchronously."""

    def wait(self) -> bool:
        return True


def resolve_device(cfg: DistConfig) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is asked for or available (``auto``), else CPU."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("dist.device: 'cuda' was asked for but CUDA is not available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class Comm:
    """The data-parallel group: rank, world size and the collectives the engine uses.

    All tensors are flat 1-D buffers. Sums only: gloo has no AVG, so callers divide by the world
    size themselves (once, in fp32, at the optimizer step).
    """

    def __init__(
        self,
        group: Any | None,
        rank: int,
        world_size: int,
        *,
        owns_group: bool,
        timeout_s: float = 300.0,
    ) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self.rank = rank
        self.world_size = world_size
        self.owns_group = owns_group  # created by this Comm (informational)
        self._checkpoint_group: Any | None = None

    @classmethod
    def from_env(cls, cfg: DistConfig, device: torch.device) -> Comm:
        """Join the existing default group, or create it from the environment, or run alone."""
        if dist.is_available() and dist.is_initialized():
            return cls(
                None,
                dist.get_rank(),
                dist.get_world_size(),
                owns_group=False,
                timeout_s=cfg.timeout_s,
            )
        if "WORLD_SIZE" not in os.environ:
            return cls(None, 0, 1, owns_group=False)
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
            **kwargs,
        )
        log.info(
            "joined process group: rank %d of %d (%s)",
            dist.get_rank(),
            dist.get_world_size(),
            backend,
        )
        return cls(
            None, dist.get_rank(), dist.get_world_size(), owns_group=True, timeout_s=cfg.timeout_s
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- collectives (in place unless stated) ----------------------------------------------------

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(
                t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group
            )
        return t

    def reduce(self, t: torch.Tensor, dst: int) -> None:
        """Sum ``t`` over ranks into ``dst``'s ``t``; other ranks' ``t`` is left undefined."""
        if self.distributed:
            dist.reduce(t, dst=dst, group=self.group)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.distributed:
            dist.broadcast(t, src=src, group=self.group)
        return t

    def all_gather(self, out: torch.Tensor, part: torch.Tensor, *, async_op: bool = False) -> Work:
        """``out`` (world_size * part.numel(),) <- every rank's ``part``, in rank order.

        ``part`` must not alias ``out``.
        """
        if not self.distributed:
            out.copy_(part)
            return _Done()
        work = _all_gather_single(out, part, group=self.group, async_op=async_op)
        return work if async_op and work is not None else _Done()

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor) -> None:
        """``out`` (n,) <- sum over ranks of ``full[rank * n:(rank + 1) * n]``."""
        if not self.distributed:
            out.copy_(full)
            return
        _reduce_scatter_single(out, full, group=self.group)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    # -- checkpoint side channel ---------------------------------------------------------------

    def ensure_checkpoint_group(self) -> None:
        """Create the checkpoint side-channel group (collective: call on every rank, main thread).

        Async saves synchronise while the main thread runs training collectives; on one group
        the two streams could interleave differently on different ranks and deadlock. A separate
        gloo group also works with CPU tensors whatever the training backend.
        """
        if self.distributed and self._checkpoint_group is None:
            # Ranks wait here for the slowest writer (shards to object storage can take minutes),
            # which is not a hang: give it at least an hour.
            timeout = datetime.timedelta(seconds=max(self.timeout_s, 3600.0))
            self._checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)

    def checkpoint_any(self, flag: bool) -> bool:
        """On the checkpoint group (safe from a background thread): True everywhere if ``flag``
        is true on any rank. Doubles as a barrier, and lets one rank's failure stop all ranks
        instead of leaving them waiting for it."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._checkpoint_group)
        return bool(t.item())

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False
