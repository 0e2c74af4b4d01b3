"""Offload before anything runs: the bytes each ``nvme`` path will hold, and a probe of every
path (reachable, writable, with room) so a bad one fails at start-up in one line."""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Sequence

from zshard.errors import StorageError, ZshardError
from zshard.store.storage import open_storage
from zshard.train.config import ZeroConfig, ZshardConfig, stats_of
from zshard.train.offload._swap import local_path
from zshard.train.optim import build_optimizer


def offload_bytes(
    zero: ZeroConfig,
    *,
    numel: int,
    trainable: int,
    world_size: int,
    mixed: bool,
    state_keys: Sequence[str],
    param_itemsize: int,
    async_save: bool = False,
) -> dict[str, int]:
    """Bytes one rank keeps under each ``nvme`` path (an estimate before the groups exist);
    doubled with asynchronous saves, which snapshot every swap file while they write."""
    out: dict[str, int] = {}
    opt, par = zero.offload_optimizer, zero.offload_param
    if opt is not None and opt.device == "nvme" and opt.path:
        kinds = len(state_keys) + (1 if mixed else 0)
        out[opt.path] = out.get(opt.path, 0) + 4 * kinds * math.ceil(trainable / world_size)
    if par is not None and par.device == "nvme" and par.path:
        out[par.path] = out.get(par.path, 0) + param_itemsize * math.ceil(numel / world_size)
    return {url: n * (2 if async_save else 1) for url, n in out.items()}


def local_ranks() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_path(key: str, url: str, need_bytes: int) -> None:
    """One offload path: reachable and writable, and (local) with room for ``need_bytes``."""
    path = local_path(url)
    probe = f".zshard-probe-{uuid.uuid4().hex[:12]}"
    try:
        if path is not None:
            os.makedirs(path, exist_ok=True)
        storage = open_storage(url)
        storage.write_atomic(probe, b"zshard offload probe\n")
        if storage.read(probe) != b"zshard offload probe\n":
            raise StorageError(f"{url}: a probe file read back different bytes")
        storage.remove_tree(probe)
    except (ZshardError, OSError) as e:
        raise StorageError(f"{key} {url}: not usable as swap space: {e}") from None
    if path is not None and need_bytes:
        free = shutil.disk_usage(path).free
        if free < need_bytes:
            raise StorageError(
                f"{key} {url}: not enough space: offload needs about {need_bytes / 1e9:.2f} GB "
                f"here, {free / 1e9:.2f} GB free; free space or choose another path"
            )


def nvme_paths(zero: ZeroConfig) -> dict[str, str]:
    """nvme path -> the config key naming it (first one)."""
    out: dict[str, str] = {}
    for name in ("offload_param", "offload_optimizer"):
        block = getattr(zero, name)
        if block is not None and block.device == "nvme" and block.path:
            out.setdefault(block.path, f"zero.{name}.path")
    return out


def preflight(cfg: ZshardConfig, world_size: int) -> None:
    """Before launch: every ``nvme`` offload path is writable and has room for all ranks of this
    node (the model is counted on the meta device)."""
    paths = nvme_paths(cfg.zero)
    if not paths:
        return
    stats = stats_of(cfg)
    need = offload_bytes(
        cfg.zero,
        numel=stats.params,
        trainable=stats.trainable,
        world_size=world_size,
        mixed=cfg.precision.dtype != "fp32",
        state_keys=build_optimizer(cfg.optimizer).state_keys,
        param_itemsize=4 if cfg.precision.dtype == "fp32" else 2,
        async_save=cfg.checkpoint.async_save,
    )
    for url, key in paths.items():
        check_path(key, url, need.get(url, 0) * world_size)
