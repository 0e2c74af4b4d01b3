"""What an engine checkpoint holds and whether it fits: the :class:`Checkpointable` view of the
engine, the checks the launcher also runs before any worker starts (:func:`resume_source`,
:func:`check_model_matches`), the save plan and the RNG state."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from zshard.errors import (
    ZshardError,
)
from zshard.store import (
    ArrayEntry,
    Layout,
    TensorEntry,
    encode_bytes,
)
from zshard.store.dtypes import from_torch
from zshard.store.root import latest_name
from zshard.store.storage import open_storage
from zshard.train.config import CheckpointConfig, ZshardConfig
from zshard.train.offload import Offload, SwapArray
from zshard.train.optim import FlatOptimizer
from zshard.train.zero import Comm, FlatBufferGroup, FlatParamGroup

log = logging.getLogger("zshard.train")


class CheckpointMismatchError(ZshardError, ValueError):
    """The checkpoint holds a different model (names or shapes differ)."""


class Checkpointable(Protocol):
    """What checkpointing reads and restores of an engine (:class:`~.Engine` is one)."""

    config: ZshardConfig
    comm: Comm
    rank: int
    world_size: int
    groups: list[FlatParamGroup]
    buffer_groups: list[FlatBufferGroup]
    optimizer: FlatOptimizer
    ties: dict[str, str]

    @property
    def stage(self) -> int: ...

    @property
    def global_step(self) -> int: ...

    @property
    def offload(self) -> Offload | None: ...

    @property
    def pending_micro_batches(self) -> int:
        """Micro batches of the current accumulation window not yet stepped."""
        ...

    def train_state(self) -> dict[str, Any]: ...

    def load_train_state(self, state: Mapping[str, Any], *, with_optimizer: bool) -> None: ...

    def state_tensors(self) -> dict[tuple[str, str], torch.Tensor]: ...

    def offloaded_shards(self) -> dict[tuple[str, str], SwapArray]: ...

    def zero_grad(self) -> None: ...


def resume_source(cfg: CheckpointConfig) -> str | None:
    """Where ``checkpoint.resume`` says a run starts from: None (fresh: ``never``, or ``auto``
    with no committed checkpoint in ``checkpoint.dir``), ``checkpoint.dir`` (``auto``), or the
    URL given. The one place this is decided, for the launcher, the loop and the engine."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return cfg.dir if cfg.dir and holds_checkpoints(cfg.dir) else None
    return cfg.resume


def holds_checkpoints(root_url: str) -> bool:
    """True when ``root_url`` has a committed checkpoint (its ``latest`` names one)."""
    return latest_name(open_storage(root_url)) is not None


def check_model_matches(
    url: str,
    manifest: Any,
    shapes: Mapping[str, tuple[int, ...]],
    ties: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`CheckpointMismatchError` unless the checkpoint at ``url`` (its ``manifest``)
    holds a parameter of the same shape for every name in ``shapes`` and none other.

    Args:
        shapes: parameter name -> shape of the model (tied names may be given as well).
        ties: the model's alias -> canonical parameter name, for names not in ``shapes``.
    """
    ties = ties or {}
    saved: dict[str, tuple[int, ...]] = {}
    for t in manifest.tensors:
        if t.kind in ("param", "master"):
            saved.setdefault(t.name, tuple(t.shape))
    known = set(shapes) | set(ties)
    missing, wrong = [], []
    for name, shape in shapes.items():
        target = name if name in saved else manifest.ties.get(name)
        if target is None or target not in saved:
            missing.append(name)
        elif saved[target] != tuple(shape):
            wrong.append(f"{name}: checkpoint {list(saved[target])}, model {list(shape)}")
    unexpected = sorted(n for n in saved if n not in known and manifest.ties.get(n) not in known)
    if not (missing or wrong or unexpected):
        return
    parts = []
    for label, items in (
        ("missing from checkpoint", missing),
        ("shape differs", wrong),
        ("not in model", unexpected),
    ):
        if items:
            shown = ", ".join(items[:8]) + (
                f", ... ({len(items)} in all)" if len(items) > 8 else ""
            )
            parts.append(f"{label}: {shown}")
    raise CheckpointMismatchError(
        f"{url}: checkpoint is from a different model ({'; '.join(parts)}); "
        "load it into the model it was saved from"
    )


# -- the plan: which arrays and logical tensors a save writes -----------------------------------


def _kinds(engine: Checkpointable, g: FlatParamGroup) -> list[str]:
    kinds = ["param"]
    if g.trainable:
        if not g.master_is_param:
            kinds.append("master")
        kinds += list(engine.optimizer.state_keys)
    return kinds


def plan(engine: Checkpointable) -> tuple[Layout, list[ArrayEntry], list[TensorEntry]]:
    """The layout, arrays and tensors of this engine's checkpoint (identical on every rank)."""
    arrays: list[ArrayEntry] = []
    tensors: list[TensorEntry] = []
    for g in engine.groups:
        for kind in _kinds(engine, g):
            dtype = from_torch(g.dtype if kind == "param" else torch.float32).name
            arrays.append(ArrayEntry(g.name, kind, dtype))
            tensors += [
                TensorEntry(m.name, kind, tuple(m.shape), dtype, m.fragments) for m in g.members
            ]
    for bg in engine.buffer_groups:
        dtype = from_torch(bg.dtype).name
        arrays.append(ArrayEntry(bg.name, "buffer", dtype))
        tensors += [
            TensorEntry(name, "buffer", tuple(bg.shapes[name]), dtype, bg.fragments[name])
            for name, _, _ in bg.entries
        ]
    groups = tuple(g.layout for g in engine.groups) + tuple(
        bg.layout for bg in engine.buffer_groups
    )
    return Layout(engine.world_size, engine.stage, groups), arrays, tensors


def _rng_state() -> dict[str, Any]:
    state = {"torch": encode_bytes(torch.get_rng_state().numpy().tobytes())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = encode_bytes(torch.cuda.get_rng_state().numpy().tobytes())
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(
            torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy())
        )
    if "cuda" in state and torch.cuda.is_available():
        raw = np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy()
        torch.cuda.set_rng_state(torch.from_numpy(raw))
