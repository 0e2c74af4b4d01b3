"""Engine checkpoints in the zshard store: every rank writes its own partitions, any layout loads.

Saving needs no gathering: each (flat group, state kind) partition a rank holds *is* its shard
(``plan_partition`` sized both). State kinds: ``param`` (module dtype), ``master`` (fp32, mixed
precision only), one per optimizer state key, and ``buffer`` (module buffers, packed into their
own flat groups). Non-tensor state (step counters, optimizer hyperparameters and step, loss
scaler, scheduler, config, the caller's ``extra`` such as the data position) goes in the
manifest; each rank's RNG state in its rank state file.

Loading reads, for each flat group, exactly the logical-tensor ranges this rank's layout needs
(``CheckpointReader.read_torch``), so a checkpoint saved at any world size and stage loads at any
other. A checkpoint without ``master`` seeds the master from ``param``; one without optimizer
state (imported weights) starts the optimizer fresh.

Async saves copy the partitions to host memory, then write from a background thread; the next
save (or ``Engine.wait_for_save``/``close``) waits for it. The time a save blocks training is
logged and kept in ``Engine.last_save_stall_s``.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from zshard.errors import (
    CheckpointNotFoundError,
    ConfigError,
    InvalidArgumentError,
    NotACheckpointError,
    ZshardError,
)
from zshard.store import (
    ArrayEntry,
    CheckpointReader,
    CheckpointWriter,
    Layout,
    TensorEntry,
    encode_bytes,
    step_dir_name,
    to_numpy,
)
from zshard.store.dtypes import from_torch
from zshard.store.root import join_url
from zshard.store.shard import shard_key
from zshard.train._flat import FlatParamGroup
from zshard.train.offload import OffloadError

if TYPE_CHECKING:
    from zshard.train.engine import Engine

log = logging.getLogger("zshard.train")


class CheckpointMismatchError(ZshardError, ValueError):
    """The checkpoint holds a different model (names or shapes differ)."""


# -- the plan: which arrays and logical tensors a save writes -----------------------------------


def _kinds(engine: Engine, g: FlatParamGroup) -> list[str]:
    kinds = ["param"]
    if g.trainable:
        if not g.master_is_param:
            kinds.append("master")
        kinds += list(engine.optimizer.state_keys)
    return kinds


def plan(engine: Engine) -> tuple[Layout, list[ArrayEntry], list[TensorEntry]]:
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


# -- saving -------------------------------------------------------------------------------------


class AsyncSaver:
    """One background writer thread; a new save first waits for the previous one."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, job: Callable[[], None]) -> None:
        def run() -> None:
            try:
                job()
            except BaseException as e:  # re-raised on the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="zshard-checkpoint", daemon=True)
        self._thread.start()


def save(
    engine: Engine,
    root_url: str | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
    async_save: bool | None = None,
    overwrite: bool = False,
) -> str:
    """Save ``engine`` at ``root_url/step-<global_step>``; returns that URL (see module doc)."""
    cfg = engine.config.checkpoint
    root = root_url or cfg.dir
    if not root:
        raise ConfigError(
            "checkpoint.dir: no checkpoint directory configured and none given to save()"
        )
    use_async = cfg.async_save if async_save is None else async_save
    if engine._window_micro:
        raise InvalidArgumentError(
            f"save(): {engine._window_micro} micro batch(es) of an accumulation window are not "
            "stepped yet and their gradients are not saved; save after step()"
        )
    t0 = time.perf_counter()
    if engine._saver is None:
        engine._saver = AsyncSaver()
    engine._saver.wait()  # one save in flight at most; re-raises its failure
    engine.comm.ensure_checkpoint_group()
    step = engine.global_step
    layout, arrays, tensors = plan(engine)
    state = {
        "train": engine.train_state(),
        "config": engine.config.to_dict(),
        "extra": dict(extra or {}),
    }
    rank_state = {"rank": engine.rank, "rng": _rng_state()}
    off = engine._offload
    if off is not None and off.broken:
        raise OffloadError(f"save(): {off.broken}")
    # Async: private host copies, so training may change the partitions meanwhile.
    shards = {
        key: to_numpy(t.detach().to("cpu", copy=use_async))
        for key, t in engine.state_tensors().items()
    }
    # Offloaded files are copied shard to shard, never through memory whole; an async save
    # copies from snapshots (file copies in the swap space) taken now.
    swapped = engine.offloaded_shards()
    drop_snapshots: Callable[[], None] | None = None
    if swapped and use_async:
        assert off is not None
        swapped, drop_snapshots = off.snapshot()
    comm, rank = engine.comm, engine.rank

    def job() -> None:
        try:
            write()
        finally:
            if drop_snapshots is not None:
                drop_snapshots()

    def write() -> None:
        # Each phase ends with an agreement among ranks, so a failure anywhere stops everyone
        # before the commit instead of leaving the others blocked.
        ok = False
        try:
            writer = CheckpointWriter(
                root,
                step,
                layout,
                arrays,
                tensors,
                rank=rank,
                ties=engine.ties,
                overwrite=overwrite,
            )
            if rank == 0:
                writer.prepare()
            ok = True
        finally:
            _agree(comm, ok, "preparing", step)
        ok = False
        try:
            for (group, kind), data in shards.items():
                writer.write_shard(group, kind, data)
            for (group, kind), src in swapped.items():
                src.copy_to(writer.dir, shard_key(writer.array(group, kind).path, rank))
            writer.write_rank_state(rank_state)
            ok = True
        finally:
            _agree(comm, ok, "writing shards", step)
        ok = False
        try:
            if rank == 0:
                writer.commit(state, keep_last=cfg.keep_last)
            ok = True
        finally:
            _agree(comm, ok, "committing", step)

    if use_async:
        engine._saver.submit(job)
    else:
        job()
    engine.last_save_stall_s = time.perf_counter() - t0
    log.info(
        "checkpoint step %d -> %s (%s): training stalled %.3f s",
        step,
        root,
        "async" if use_async else "sync",
        engine.last_save_stall_s,
    )
    return join_url(root, step_dir_name(step))


def _agree(comm: Any, ok: bool, phase: str, step: int) -> None:
    """All ranks learn whether any failed; the failing rank raises its own error (we are in its
    ``finally``), the others this one."""
    if comm.checkpoint_any(not ok) and ok:
        raise ZshardError(
            f"checkpoint step {step}: another rank failed while {phase}; nothing committed"
        )


# -- loading ------------------------------------------------------------------------------------


def _check_model(engine: Engine, reader: CheckpointReader) -> None:
    m = reader.manifest
    saved: dict[str, tuple[int, ...]] = {}
    for t in m.tensors:
        if t.kind in ("param", "master"):
            saved.setdefault(t.name, t.shape)
    mine = {
        name: tuple(p.shape) for g in engine.groups for name, p in ((x.name, x) for x in g.members)
    }
    known = set(mine) | set(engine.ties)
    missing, wrong = [], []
    for name, shape in mine.items():
        target = name if name in saved else m.ties.get(name)
        if target is None or target not in saved:
            missing.append(name)
        elif saved[target] != shape:
            wrong.append(f"{name}: checkpoint {list(saved[target])}, model {list(shape)}")
    unexpected = sorted(n for n in saved if n not in known and m.ties.get(n) not in known)
    if missing or wrong or unexpected:
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
            f"{reader.url}: checkpoint does not match the model ({'; '.join(parts)}); "
            "load it into the model it was saved from"
        )


def _has(reader: CheckpointReader, name: str, kind: str) -> bool:
    return reader.has(name, kind) or reader.has(reader.manifest.ties.get(name, ""), kind)


def _fill_range(
    reader: CheckpointReader, g: FlatParamGroup, kinds: tuple[str, ...], dest: torch.Tensor, lo: int
) -> None:
    """``dest`` covers flat elements [lo, lo + numel): fill each member's overlap from the first
    of ``kinds`` the checkpoint has for it."""
    hi = lo + dest.numel()
    for m in g.members:
        a, b = max(lo, m.offset), min(hi, m.offset + m.numel)
        if a >= b:
            continue
        kind = next(k for k in kinds if _has(reader, m.name, k))
        src = reader.read_torch(m.name, kind, a - m.offset, b - m.offset)
        dest[a - lo : b - lo].copy_(src)


def _fill_kind(
    engine: Engine,
    reader: CheckpointReader,
    g: FlatParamGroup,
    kind: str,
    sources: tuple[str, ...],
    resident: torch.Tensor | None,
    lo: int,
) -> None:
    """Fill ``g``'s ``kind`` (flat elements from ``lo``) from the first of ``sources`` the
    checkpoint has, or with zeros if ``sources`` is empty: in place when resident, else as a
    new version of the offloaded array, streamed window by window."""
    off = engine._offload
    if off is not None and off.holds(g, kind):
        dtype = g.dtype if kind == "param" else torch.float32

        def produce(a: int, b: int) -> torch.Tensor:
            buf = torch.zeros(b - a, dtype=dtype)
            if sources:
                _fill_range(reader, g, sources, buf, lo + a)
            return buf

        off.fill(g, kind, produce)
        return
    assert resident is not None, (g.name, kind)
    if sources:
        _fill_range(reader, g, sources, resident, lo)
    else:
        resident.zero_()


def load(engine: Engine, url: str | None = None) -> dict[str, Any]:
    """Load a checkpoint (a step directory, or a root's newest) into ``engine``.

    Returns the ``extra`` mapping given to :func:`save` (e.g. the data position).
    """
    url = url or engine.config.checkpoint.dir
    if not url:
        raise ConfigError(
            "checkpoint.dir: no checkpoint directory configured and none given to load()"
        )
    engine.wait_for_save()
    reader = CheckpointReader.open(url)
    _check_model(engine, reader)
    keys = engine.optimizer.state_keys
    with_optimizer = all(
        _has(reader, m.name, k)
        for g in engine.groups
        if g.trainable
        for m in g.members
        for k in keys
    )
    if not with_optimizer and keys:
        log.info(
            "checkpoint %s has no %s state: starting the optimizer fresh",
            reader.url,
            "/".join(keys),
        )
    # The master (fp32) is the better source of parameter values when both exist.
    value_kinds = ("master", "param")
    for g in engine.groups:
        if engine.stage < 3:
            assert g.flat is not None
            _fill_range(reader, g, value_kinds, g.flat, 0)
        else:
            _fill_kind(engine, reader, g, "param", value_kinds, g.param_part, g.partition_range[0])
            if g.persistent and g.flat is not None:
                assert g.param_part is not None
                engine.comm.all_gather(g.flat, g.param_part)
        if not g.trainable:
            continue
        lo = g.update_range[0]
        if not g.master_is_param:
            _fill_kind(engine, reader, g, "master", value_kinds, g.master, lo)
        for key in engine.optimizer.state_keys:
            sources = (key,) if with_optimizer else ()
            _fill_kind(engine, reader, g, key, sources, g.state.get(key), lo)
    for bg in engine.buffer_groups:
        for name, t in bg.tensors():
            if _has(reader, name, "buffer"):
                t.copy_(reader.read_torch(name, "buffer").view(t.shape))
            else:
                log.warning(
                    "checkpoint %s has no buffer %r: keeping its current value", reader.url, name
                )
    if engine._offload is not None:
        engine._offload.broken = None  # every offloaded array was just rewritten whole
    state = reader.manifest.state
    engine.load_train_state(state.get("train", {}), with_optimizer=with_optimizer)
    engine.zero_grad()
    if reader.manifest.layout.world_size == engine.world_size:
        # Same world size: each rank continues its own random stream (dropout masks...).
        _set_rng_state(reader.read_rank_state(engine.rank).get("rng", {}))
    log.info("loaded checkpoint %s (step %d)", reader.url, engine.global_step)
    extra = state.get("extra", {})
    return dict(extra) if isinstance(extra, dict) else {}


def resume(engine: Engine) -> dict[str, Any] | None:
    """Apply ``checkpoint.resume``: ``never``; ``auto`` loads the newest checkpoint under
    ``checkpoint.dir`` if there is one; anything else is a checkpoint URL that must exist.
    Returns the loaded ``extra``, or None when nothing was loaded."""
    cfg = engine.config.checkpoint
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        if not cfg.dir:
            return None
        try:
            return load(engine, cfg.dir)
        except (CheckpointNotFoundError, NotACheckpointError):
            return None
    return load(engine, cfg.resume)
