"""Writing a checkpoint: every rank writes its own shards, rank 0 commits.

Protocol (docs/design.md, invariants 1 and 2)::

    rank 0: prepare()           refuse a committed step, clear a crashed leftover of it, write
                                the zarr metadata (durable with rank 0's shards)
    barrier
    every rank: write_rank_state(...); write_shard(...)/shard_writer(...) for its own
                partitions only, in the order of the groups in each stored array
    barrier
    rank 0: commit(state)      manifest.json (the commit), then `latest` and retention

The writer needs no process group: the caller supplies the barriers (the engine uses
torch.distributed; single-process tools just call the steps in order).

Format 2 (docs/format.md): all flat groups of one (state kind, dtype) share one stored array, so
a rank writes one shard per stored array, whatever the number of groups. ``write_shard(group,
kind, data)`` writes that group's partition into its place in the shard; the shard is published
once its last group is written. On a local disk what a writer writes becomes durable in
batches (``storage.SyncBatch``): their fsyncs are issued at once, then one fsync per directory.
A job's process writes its own rank (no ``rank`` argument): its shards, its rank state and (rank 0)
the zarr metadata become durable together when its last shard is complete. A tool writing several
ranks in one process (reshard, import) names each rank: all of them become durable together in
``finish``/``commit`` (one round of fsyncs, not one per rank), or earlier only when the batch holds
``_MAX_BATCH_FILES`` open files.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zshard import __version__
from zshard.errors import CorruptDataError, ManifestError, OutputExistsError, ZshardError
from zshard.store import dtypes
from zshard.store.layout import Layout
from zshard.store.lock import RootLock
from zshard.store.manifest import (
    MANIFEST_KEY,
    ArrayEntry,
    Manifest,
    StoredArray,
    TensorEntry,
    frame_json,
    rank_state_key,
)
from zshard.store.root import apply_retention, step_dir_name, write_latest
from zshard.store.shard import Geometry, PackedShardWriter, array_metadata_bytes
from zshard.store.storage import (
    LocalStorage,
    Storage,
    SyncBatch,
    concurrent_ok,
    open_storage,
    run_all,
)

# A batch keeps each file open until it is flushed; writing thousands of ranks in one process
# must not run into the descriptor limit.
_MAX_BATCH_FILES = 256

_GROUP_META = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


def encode_bytes(data: bytes) -> str:
    """Binary blobs (RNG states) travel in JSON state as base64 text."""
    return base64.b64encode(data).decode()


def stored_geometry(s: StoredArray) -> Geometry:
    return Geometry(s.shard_numel, s.chunk_numel, dtypes.dtype(s.dtype).itemsize)


@dataclass
class _OpenShard:
    """One rank's shard of one stored array while its groups are being written."""

    stored: StoredArray
    rank: int
    writer: PackedShardWriter
    done: set[str] = field(default_factory=set)  # groups written


class SegmentWriter:
    """Streams one group's partition into its place in a shard: ``write`` 1-D pieces (at most
    the partition's elements in all), then ``close`` (zero-fills the rest of the partition;
    publishes the shard if this was its last group) or ``abort``."""

    def __init__(self, owner: CheckpointWriter, shard: _OpenShard, group: str, base: int) -> None:
        self._owner = owner
        self._shard = shard
        self.group = group
        self._end = base + owner.manifest.layout.group(group).partition_numel
        self.nbytes = (self._end - base) * dtypes.dtype(shard.stored.dtype).itemsize
        shard.writer.skip_to(base)

    def write(self, piece: np.ndarray) -> None:
        if self._shard.writer.position + piece.size > self._end:
            raise ValueError(
                f"{self._shard.writer.where}: group {self.group!r}: more elements than its "
                "partition holds"
            )
        self._shard.writer.write(piece)

    def close(self) -> None:
        try:
            self._shard.writer.skip_to(self._end)
        except BaseException:
            self.abort()
            raise
        self._owner._segment_done(self._shard, self.group)

    def abort(self) -> None:
        self._owner._abort_shard(self._shard)


class CheckpointWriter:
    """Writes one checkpoint ``step`` under ``root_url`` from one rank.

    Every rank constructs it with the same layout, arrays and tensors; each then writes only its
    own shards. ``tensors`` give the fragments (true offsets) of every logical tensor.
    """

    def __init__(
        self,
        root_url: str,
        step: int,
        layout: Layout,
        arrays: Iterable[ArrayEntry],
        tensors: Iterable[TensorEntry],
        *,
        rank: int = 0,
        ties: dict[str, str] | None = None,
        overwrite: bool = False,
        name: str | None = None,
    ) -> None:
        self.root: Storage = open_storage(root_url)
        self.root_url = root_url
        self.name = name or step_dir_name(step)
        self.dir: Storage = self.root.child(self.name)
        self.rank = rank
        self.overwrite = overwrite
        self.manifest = Manifest(
            step=step,
            layout=layout,
            arrays=list(arrays),
            tensors=list(tensors),
            ties=dict(ties or {}),
        )
        # Validate up front so a bad plan fails before any byte is written.
        errs = self.manifest.errors()
        if errs:
            raise ManifestError(f"checkpoint plan for step {step}: {errs[0]}")
        self._has_rank_state = False
        self._lock: RootLock | None = None  # held from prepare() to commit()/abort() (rank 0)
        self._open: dict[tuple[str, int], _OpenShard] = {}
        self._closed: set[tuple[str, int]] = set()  # shards published (or handed to a batch)
        self._failed: set[tuple[str, int]] = set()
        # Local disks only: what this writer wrote and has not yet made durable.
        self._sync = SyncBatch() if isinstance(self.dir, LocalStorage) else None
        self._many_ranks = False  # ranks named explicitly: durable together at finish()
        self._meta_written = False

    @property
    def stored(self) -> list[StoredArray]:
        return self.manifest.stored

    # -- rank 0, before the first barrier --------------------------------------------------------

    def prepare(self) -> None:
        """Refuse to replace a committed checkpoint (unless overwrite) and clear a leftover;
        write the zarr metadata (made durable with rank 0's shards).

        Also takes the root's lock (lock.py) until ``commit`` or ``abort``, so two runs never
        write into one root at once; a root already locked by this run (the ``zshard train``
        launcher's lock, inherited through ``ZSHARD_RUN_ID``) is written without a new lock.
        """
        if self.dir.exists(MANIFEST_KEY) and not self.overwrite:
            raise OutputExistsError(
                f"{self.dir.url}: a committed checkpoint already exists; choose another "
                "step or pass overwrite"
            )
        self._lock = RootLock(self.root_url, purpose=f"writing {self.name}").acquire()
        try:
            if self.dir.exists(MANIFEST_KEY):
                # Un-commit first: from here on the old checkpoint is invisible, never
                # half-replaced.
                self.dir.remove_tree(MANIFEST_KEY)
            self.dir.remove_tree("")
            self._write_metadata(self._sync)
        except BaseException:
            # Leave nothing behind (a full disk, say): the directory was being cleared anyway.
            if self._sync is not None:
                self._sync.discard()
            with contextlib.suppress(ZshardError):
                self.dir.remove_tree("")
            self._release_lock()
            raise

    def abort(self) -> None:
        """Give up an uncommitted save: remove its step directory and release the root lock."""
        try:
            for shard in list(self._open.values()):
                self._abort_shard(shard)
            if self._sync is not None:
                self._sync.discard()
            with contextlib.suppress(ZshardError):
                self.dir.remove_tree("")
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _write_metadata(self, batch: SyncBatch | None) -> None:
        """The zarr hierarchy: the step directory and ``data/`` as groups, one array each."""
        m = self.manifest
        world = m.layout.world_size
        files = {"zarr.json": _GROUP_META, "data/zarr.json": _GROUP_META}
        for s in m.stored:
            meta = array_metadata_bytes(
                stored_geometry(s), world, dtypes.dtype(s.dtype), s.key_separator
            )
            files[f"{s.path}/zarr.json"] = meta
        if batch is not None:
            for key, data in files.items():
                self.dir.write_atomic(key, data, batch=batch)
        else:
            jobs = [functools.partial(self.dir.write_atomic, k, d) for k, d in files.items()]
            run_all(jobs, concurrent_ok(self.dir))
        self._meta_written = True

    # -- every rank --------------------------------------------------------------------------

    def array(self, group: str, kind: str) -> ArrayEntry:
        return self.manifest.array(group, kind)

    def shard_writer(self, group: str, kind: str, rank: int | None = None) -> SegmentWriter:
        """A streaming writer for one group's partition (default: this rank's) of ``kind``.

        The groups of one stored array must be written in their order (``stored[..].segments``,
        the layout's order); a group left out would leave its shard incomplete."""
        r = self._rank(rank)
        try:
            s, base = self.manifest.locate(group, kind)
        except KeyError:
            raise ZshardError(f"no array for group {group!r} and kind {kind!r}") from None
        key = (s.path, r)
        if key in self._failed:
            raise ZshardError(f"{self.dir.url}/{s.shard_key(r)}: this shard's write failed")
        if key in self._closed:
            raise ZshardError(f"{self.dir.url}/{s.shard_key(r)}: group {group!r} written twice")
        shard = self._open.get(key)
        if shard is None:
            geo = stored_geometry(s)
            sink = self.dir.open_positional(s.shard_key(r), geo.nbytes, self._sync)
            where = f"shard {s.shard_key(r)}"
            shard = _OpenShard(s, r, PackedShardWriter(sink, geo, dtypes.dtype(s.dtype), where))
            self._open[key] = shard
        if group in shard.done:
            raise ZshardError(f"{self.dir.url}/{s.shard_key(r)}: group {group!r} written twice")
        try:
            return SegmentWriter(self, shard, group, base)
        except BaseException:
            self._abort_shard(shard)
            raise

    def write_shard(self, group: str, kind: str, data: np.ndarray, rank: int | None = None) -> int:
        """Write a whole partition (storage dtype, 1-D, zero-padded); returns its bytes."""
        w = self.shard_writer(group, kind, rank)
        try:
            w.write(data.reshape(-1))
        except BaseException:
            w.abort()
            raise
        w.close()
        return w.nbytes

    def _segment_done(self, shard: _OpenShard, group: str) -> None:
        shard.done.add(group)
        if len(shard.done) < len(shard.stored.segments):
            return
        key = (shard.stored.path, shard.rank)
        del self._open[key]
        try:
            shard.writer.close()
        except BaseException:
            self._failed.add(key)
            raise
        self._closed.add(key)
        if self._sync is None:
            return
        if len(self._sync) >= _MAX_BATCH_FILES or (
            not self._many_ranks and self._rank_complete(self.rank)
        ):
            self._sync.flush()

    def _abort_shard(self, shard: _OpenShard) -> None:
        key = (shard.stored.path, shard.rank)
        self._open.pop(key, None)
        self._failed.add(key)
        shard.writer.abort()

    def _rank(self, rank: int | None) -> int:
        """The rank a call writes; a rank named explicitly marks this writer as a tool writing
        several ranks (durable together at ``finish``)."""
        if rank is not None:
            self._many_ranks = True
            return rank
        return self.rank

    def _rank_complete(self, rank: int) -> bool:
        return all((s.path, rank) in self._closed for s in self.manifest.stored)

    def write_rank_state(self, state: dict[str, Any], rank: int | None = None) -> None:
        """This rank's state (RNG). Written before the rank's shards (or by a writer of several
        ranks), it is made durable with them; after them, on its own."""
        r = self._rank(rank)
        own_done = not self._many_ranks and self._rank_complete(r)
        batch = None if own_done else self._sync
        self.dir.write_atomic(rank_state_key(r), frame_json(state), batch=batch)
        self._has_rank_state = True

    def finish(self) -> None:
        """Make everything this writer wrote durable (the engine calls it before the barrier
        that precedes rank 0's commit; ``commit`` calls it). Raises if a shard was left
        incomplete."""
        if self._open:
            left = sorted(f"{s.stored.shard_key(s.rank)}" for s in self._open.values())
            raise CorruptDataError(f"{self.dir.url}: shards left incomplete: {', '.join(left)}")
        if self._sync is not None:
            self._sync.flush()

    # -- rank 0, after the data barrier ------------------------------------------------------

    def commit(
        self,
        state: dict[str, Any] | None = None,
        *,
        keep_last: int = 0,
        rank_state: bool | None = None,
        update_latest: bool = True,
    ) -> Manifest:
        """Check every shard is present, then write the manifest and ``latest``."""
        try:
            return self._commit(state, keep_last, rank_state, update_latest)
        finally:
            self._release_lock()

    def _commit(
        self,
        state: dict[str, Any] | None,
        keep_last: int,
        rank_state: bool | None,
        update_latest: bool,
    ) -> Manifest:
        m = self.manifest
        world = m.layout.world_size
        self.finish()  # raises on incomplete shards of this process: never publish them
        m.state = dict(state or {})
        m.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        m.zshard_version = __version__
        if rank_state is None:
            rank_state = self._has_rank_state or self.dir.exists(rank_state_key(0))
        m.rank_state = world if rank_state else 0
        listings = run_all(
            [functools.partial(self.dir.listdir, s.path) for s in m.stored],
            concurrent_ok(self.dir),
        )
        for s, listed in zip(m.stored, listings):
            present = set(listed)
            names = {s.shard_key(r).rpartition("/")[2]: r for r in range(world)}
            missing = sorted(r for name, r in names.items() if name not in present)
            if missing:
                raise CorruptDataError(
                    f"{self.dir.url}/{s.path}: shards of ranks {missing} were not written; "
                    "not committing"
                )
        if rank_state:
            missing = [r for r in range(world) if not self.dir.exists(rank_state_key(r))]
            if missing:
                raise CorruptDataError(f"{self.dir.url}: rank state of ranks {missing} missing")
        body = m.to_bytes()
        if not self._meta_written:
            self._write_metadata(self._sync)
            self.finish()
        self.dir.write_atomic(MANIFEST_KEY, body)  # the commit point
        if update_latest:
            write_latest(self.root, self.name)
        if keep_last:
            apply_retention(self.root, keep_last)
        return m

    def total_bytes(self) -> int:
        m = self.manifest
        return sum(stored_geometry(s).nbytes for s in m.stored) * m.layout.world_size

    def files_per_rank(self) -> int:
        """Objects each rank writes: one shard per stored array, and its rank state if any."""
        return len(self.manifest.stored) + (1 if self._has_rank_state else 0)
