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
logged and kept in ``Checkpointer.last_stall_s`` (``Engine.last_save_stall_s``).

The engine is reached only through :class:`Checkpointable`; :func:`resume_source` and
:func:`check_model_matches` are also what the launcher uses before any worker starts.
They, the save plan and the RNG state live in ``_state``, loading in ``_load``; saving and
:class:`Checkpointer` here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from zshard.errors import (
    ConfigError,
    InvalidArgumentError,
    ZshardError,
)
from zshard.store import (
    ArrayEntry,
    CheckpointWriter,
    Layout,
    TensorEntry,
    step_dir_name,
    to_numpy,
)
from zshard.store.root import join_url
from zshard.train.config import CheckpointConfig
from zshard.train.engine._load import _load
from zshard.train.engine._state import (
    Checkpointable,
    CheckpointMismatchError,
    _rng_state,
    check_model_matches,
    holds_checkpoints,
    plan,
    resume_source,
)
from zshard.train.offload import OffloadError, SwapArray
from zshard.train.zero import Comm

__all__ = [
    "CheckpointMismatchError",
    "Checkpointable",
    "Checkpointer",
    "check_model_matches",
    "holds_checkpoints",
    "plan",
    "resume_source",
]

log = logging.getLogger("zshard.train")


# -- saving -------------------------------------------------------------------------------------


class AsyncSaver:
    """One background writer thread; a new save first waits for the previous one.

    The thread is started by the first save and kept, waiting for the next: starting a thread
    makes the caller wait for it to run (up to the interpreter's 5 ms switch interval, as the new
    thread goes straight into Python work), which would be stall on the training thread at every
    save. It ends when the saver is garbage-collected.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self._done.set()
        self._errors: list[BaseException] = []
        weakref.finalize(self, self._jobs.put, None)  # the thread ends with its saver

    @property
    def busy(self) -> bool:
        """A save is being written."""
        return not self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self._errors:
            raise self._errors.pop()

    def submit(self, job: Callable[[], None]) -> None:
        self._done.clear()
        if self._thread is None or not self._thread.is_alive():  # first save, or after fork
            self._thread = threading.Thread(
                target=_serve,
                args=(self._jobs, self._done, self._errors),
                name="zshard-checkpoint",
                daemon=True,
            )
            self._thread.start()
        self._jobs.put(job)


def _serve(
    jobs: queue.SimpleQueue[Callable[[], None] | None],
    done: threading.Event,
    errors: list[BaseException],
) -> None:
    """The writer thread: run saves one after the other until told to stop (``None``)."""
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            job()
        except BaseException as e:  # re-raised on the training thread by wait()
            errors.append(e)
        finally:
            del job
            done.set()


@dataclass
class _Snapshot:
    """Everything one save writes, taken on the training thread; writing needs nothing else."""

    root: str
    step: int
    layout: Layout
    arrays: list[ArrayEntry]
    tensors: list[TensorEntry]
    ties: dict[str, str]
    state: dict[str, Any]  # the manifest's non-tensor state
    rank_state: dict[str, Any]
    shards: dict[tuple[str, str], np.ndarray]  # (group, kind) -> this rank's partition
    swapped: dict[tuple[str, str], SwapArray]  # offloaded partitions, copied file to file
    release: list[Callable[[], None]] = field(default_factory=list)  # after writing


class HostCopies:
    """The host buffers async saves copy the partitions into, kept from one save to the next.

    A save waits for the previous one before it copies, so the buffers are free by then; reusing
    them makes the copy a plain memory copy instead of first faulting in fresh pages (on a VM
    that returns free memory to its host, fresh pages cost more than the copy itself). The memory
    is what an async save needs anyway, held from the first async save on; ``release`` frees it.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, str], torch.Tensor] = {}

    def copy(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._bufs[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        buf.copy_(t.detach())
        return buf

    def keep_only(self, keys: set[tuple[str, str]]) -> None:
        for key in set(self._bufs) - keys:
            del self._bufs[key]

    def release(self) -> None:
        self._bufs.clear()


def _snapshot(
    engine: Checkpointable,
    root: str,
    extra: Mapping[str, Any] | None,
    copy: bool,
    copies: HostCopies | None = None,
) -> _Snapshot:
    """This rank's part of the checkpoint at the current step. ``copy``: private host copies
    (an async save writes them while training changes the partitions), into ``copies``' buffers
    when given."""
    off = engine.offload
    if off is not None and off.broken:
        raise OffloadError(f"save(): {off.broken}")
    layout, arrays, tensors = plan(engine)
    snap = _Snapshot(
        root=root,
        step=engine.global_step,
        layout=layout,
        arrays=arrays,
        tensors=tensors,
        ties=dict(engine.ties),
        state={
            "train": engine.train_state(),
            "config": engine.config.to_dict(),
            "extra": dict(extra or {}),
        },
        rank_state={"rank": engine.rank, "rng": _rng_state()},
        shards=_partitions(engine.state_tensors(), copy, copies),
        # Offloaded files are copied shard to shard, never through memory whole; an async save
        # copies from snapshots (file copies in the swap space) taken now.
        swapped=engine.offloaded_shards(),
    )
    if snap.swapped and copy:
        assert off is not None
        snap.swapped, drop = off.snapshot()
        snap.release.append(drop)
    return snap


def _partitions(
    tensors: dict[tuple[str, str], torch.Tensor], copy: bool, copies: HostCopies | None
) -> dict[tuple[str, str], np.ndarray]:
    if copy and copies is not None:
        copies.keep_only(set(tensors))
        return {key: to_numpy(copies.copy(key, t)) for key, t in tensors.items()}
    return {key: to_numpy(t.detach().to("cpu", copy=copy)) for key, t in tensors.items()}


class _Write:
    """Write one snapshot in three phases: prepare (rank 0), shards (every rank), commit (rank 0).
    Each phase ends with an agreement among ranks, so a failure anywhere stops everyone before the
    commit instead of leaving the others blocked in a collective."""

    def __init__(
        self, snap: _Snapshot, comm: Comm, rank: int, cfg: CheckpointConfig, overwrite: bool
    ):
        self.snap, self.comm, self.rank, self.cfg = snap, comm, rank, cfg
        self.overwrite = overwrite
        # checkpoint.save_16bit: rank 0 exports the committed step directory (engine._export).
        self.export: Callable[[str], Any] | None = None

    def __call__(self) -> None:
        try:
            writer = self._phase("preparing", self._prepare)
            self._phase("writing shards", lambda: self._shards(writer))
            self._phase("committing", lambda: self._commit(writer))
            if self.export is not None:
                self._export()
        finally:
            for release in self.snap.release:
                release()

    def _export(self) -> None:
        """After the commit: the 16-bit weights next to it (their own all-or-nothing write)."""
        assert self.export is not None
        url = join_url(self.snap.root, step_dir_name(self.snap.step))
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.export(url)
            except BaseException as e:
                error = e
        if self.comm.checkpoint_any(error is not None):
            if error is not None:
                raise ZshardError(
                    f"checkpoint step {self.snap.step} is committed, but writing its 16-bit "
                    f"weights (checkpoint.save_16bit) failed: {error}"
                ) from error
            raise ZshardError(
                f"checkpoint step {self.snap.step} is committed, but rank 0 failed to write its "
                "16-bit weights (checkpoint.save_16bit)"
            )

    def _phase(self, name: str, work: Callable[[], Any]) -> Any:
        ok = False
        try:
            out = work()
            ok = True
            return out
        finally:
            # All ranks learn whether any failed; the failing rank raises its own error (we are
            # in its ``finally``), the others this one.
            if self.comm.checkpoint_any(not ok) and ok:
                raise ZshardError(
                    f"checkpoint step {self.snap.step}: another rank failed while {name}; "
                    "nothing committed"
                )

    def _prepare(self) -> CheckpointWriter:
        s = self.snap
        writer = CheckpointWriter(
            s.root,
            s.step,
            s.layout,
            s.arrays,
            s.tensors,
            rank=self.rank,
            ties=s.ties,
            overwrite=self.overwrite,
        )
        if self.rank == 0:
            writer.prepare()
        return writer

    def _shards(self, writer: CheckpointWriter) -> None:
        # The rank state first: it then becomes durable with the shards, in one batch.
        writer.write_rank_state(self.snap.rank_state)
        # One shard per stored array, its groups in order (format 2 packs them end to end).
        for s in writer.stored:
            for group, _ in s.segments:
                key = (group, s.kind)
                if key in self.snap.shards:
                    writer.write_shard(group, s.kind, self.snap.shards[key])
                elif key in self.snap.swapped:
                    _copy_swapped(self.snap.swapped[key], writer, group, s.kind)
                else:
                    raise ZshardError(f"save(): no {s.kind} partition of group {group!r}")
        writer.finish()

    def _commit(self, writer: CheckpointWriter) -> None:
        if self.rank == 0:
            writer.commit(self.snap.state, keep_last=self.cfg.keep_last)


_SWAP_COPY_BYTES = 8 << 20


def _copy_swapped(src: SwapArray, writer: CheckpointWriter, group: str, kind: str) -> None:
    """An offloaded partition into its place in this rank's shard, a window at a time, every
    chunk of the swap file verified on the way."""
    w = writer.shard_writer(group, kind)
    try:
        window = max(1, _SWAP_COPY_BYTES // src.dt.itemsize)
        buf = np.empty(min(window, src.numel), dtype=src.dt.numpy)
        for lo in range(0, src.numel, window):
            n = min(window, src.numel - lo)
            src.read(lo, buf[:n])
            w.write(buf[:n])  # returns only once nothing refers to buf any more
    except BaseException:
        w.abort()
        raise
    w.close()


class Checkpointer:
    """An engine's saves and loads (see the module docstring): at most one async save in flight."""

    def __init__(self, engine: Checkpointable) -> None:
        self.engine = engine
        self._saver = AsyncSaver()
        self._copies = HostCopies()  # async saves' snapshot buffers, reused save after save
        self.last_stall_s = 0.0  # how long the last save blocked the training thread
        # The last save: step, async, stall_s (training blocked), snapshot_s (part of the stall:
        # the plan and, for an async save, the host copies), wait_s (part of the stall: waiting
        # for the save before it). zshard train writes it to metrics.jsonl.
        self.last_save: dict[str, Any] = {}

    def save(
        self,
        root_url: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        async_save: bool | None = None,
        overwrite: bool = False,
    ) -> str:
        """Save at ``root_url/step-<global_step>`` (default: ``checkpoint.dir``); returns it."""
        engine, cfg = self.engine, self.engine.config.checkpoint
        root = root_url or cfg.dir
        if not root:
            raise ConfigError(
                "checkpoint.dir: no checkpoint directory configured and none given to save()"
            )
        if engine.pending_micro_batches:
            raise InvalidArgumentError(
                f"save(): {engine.pending_micro_batches} micro batch(es) of an accumulation "
                "window are not stepped yet and their gradients are not saved; save after step()"
            )
        use_async = cfg.async_save if async_save is None else async_save
        t0 = time.perf_counter()
        self._saver.wait()  # one save in flight at most; re-raises its failure
        t_wait = time.perf_counter()
        engine.comm.ensure_checkpoint_group()
        snap = _snapshot(engine, root, extra, copy=use_async, copies=self._copies)
        t_snap = time.perf_counter()
        write = _Write(snap, engine.comm, engine.rank, cfg, overwrite)
        if cfg.save_16bit:
            from zshard.train.engine._export import export_checkpoint, hf_config_json

            module = getattr(engine, "module", None)
            dtype, config_json = engine.config.precision.dtype, hf_config_json(module)
            write.export = lambda url: export_checkpoint(url, dtype, config_json)
        if use_async:
            self._saver.submit(write)
        else:
            write()
        self.last_stall_s = time.perf_counter() - t0
        self.last_save = {
            "step": snap.step,
            "async": use_async,
            "stall_s": self.last_stall_s,
            "snapshot_s": t_snap - t_wait,
            "wait_s": t_wait - t0,
        }
        log.info(
            "checkpoint step %d -> %s (%s): training stalled %.3f s",
            snap.step,
            root,
            "async" if use_async else "sync",
            self.last_stall_s,
        )
        return join_url(root, step_dir_name(snap.step))

    def wait(self) -> None:
        """Block until a pending async save has committed (re-raising its error)."""
        self._saver.wait()

    def load(self, url: str | None = None) -> dict[str, Any]:
        """Load a checkpoint (a step directory, or a root's newest) saved at any world size and
        stage; returns the saved ``extra``."""
        url = url or self.engine.config.checkpoint.dir
        if not url:
            raise ConfigError(
                "checkpoint.dir: no checkpoint directory configured and none given to load()"
            )
        self.wait()
        return _load(self.engine, url)

    def resume(self) -> dict[str, Any] | None:
        """Apply ``checkpoint.resume`` (:func:`resume_source`); the saved ``extra`` or None."""
        source = resume_source(self.engine.config.checkpoint)
        return None if source is None else self.load(source)
