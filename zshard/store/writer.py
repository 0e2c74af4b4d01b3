"""Writing a checkpoint: every rank writes its own shards, rank 0 commits.

Protocol (docs/design.md, invariants 1 and 2)::

    rank 0: prepare()           refuse a committed step, clear a crashed leftover of it
    barrier
    every rank: write_shard(...) for its own partitions only; write_rank_state(...)
    barrier
    rank 0: commit(state)      zarr metadata, then manifest.json (the commit), then `latest`
                               and retention

The writer needs no process group: the caller supplies the barriers (the engine uses
torch.distributed; single-process tools just call the steps in order).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import json
from collections.abc import Iterable
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
    TensorEntry,
    frame_json,
    rank_state_key,
)
from zshard.store.root import apply_retention, step_dir_name, write_latest
from zshard.store.shard import ShardWriter, array_metadata_bytes, shard_key, shard_nbytes
from zshard.store.storage import Storage, open_storage

_GROUP_META = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


def encode_bytes(data: bytes) -> str:
    """Binary blobs (RNG states) travel in JSON state as base64 text."""
    return base64.b64encode(data).decode()


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

    # -- rank 0, before the first barrier --------------------------------------------------------

    def prepare(self) -> None:
        """Refuse to replace a committed checkpoint (unless overwrite) and clear a leftover.

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
        except BaseException:
            self._release_lock()
            raise

    def abort(self) -> None:
        """Give up an uncommitted save: remove its step directory and release the root lock."""
        try:
            with contextlib.suppress(ZshardError):
                self.dir.remove_tree("")
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    # -- every rank --------------------------------------------------------------------------

    def array(self, group: str, kind: str) -> ArrayEntry:
        return self.manifest.array(group, kind)

    def shard_writer(self, group: str, kind: str, rank: int | None = None) -> ShardWriter:
        """A streaming writer for one shard (default: this rank's partition)."""
        a = self.manifest.array(group, kind)
        g = self.manifest.layout.group(group)
        r = self.rank if rank is None else rank
        return ShardWriter(self.dir, shard_key(a.path, r), g, dtypes.dtype(a.dtype))

    def write_shard(self, group: str, kind: str, data: np.ndarray, rank: int | None = None) -> int:
        """Write a whole partition (storage dtype, 1-D, zero-padded); returns bytes written."""
        w = self.shard_writer(group, kind, rank)
        try:
            w.write(data.reshape(-1))
        except BaseException:
            w.abort()
            raise
        w.close()
        return w.nbytes

    def write_rank_state(self, state: dict[str, Any], rank: int | None = None) -> None:
        r = self.rank if rank is None else rank
        self.dir.write_atomic(rank_state_key(r), frame_json(state))
        self._has_rank_state = True

    # -- rank 0, after the data barrier ------------------------------------------------------

    def commit(
        self,
        state: dict[str, Any] | None = None,
        *,
        keep_last: int = 0,
        rank_state: bool | None = None,
        update_latest: bool = True,
    ) -> Manifest:
        """Check every shard is present, then write metadata, the manifest and ``latest``."""
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
        m.state = dict(state or {})
        m.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        m.zshard_version = __version__
        if rank_state is None:
            rank_state = self._has_rank_state or self.dir.exists(rank_state_key(0))
        m.rank_state = world if rank_state else 0
        for a in m.arrays:
            present = set(self.dir.listdir(f"{a.path}/c"))
            missing = [r for r in range(world) if str(r) not in present]
            if missing:
                raise CorruptDataError(
                    f"{self.dir.url}/{a.path}: shards of ranks {missing} were not written; "
                    "not committing"
                )
        if rank_state:
            missing = [r for r in range(world) if not self.dir.exists(rank_state_key(r))]
            if missing:
                raise CorruptDataError(f"{self.dir.url}: rank state of ranks {missing} missing")
        body = m.to_bytes()
        self.dir.write_atomic("zarr.json", _GROUP_META)
        self.dir.write_atomic("data/zarr.json", _GROUP_META)
        for g in m.layout.groups:
            self.dir.write_atomic(f"data/{g.name}/zarr.json", _GROUP_META)
        for a in m.arrays:
            g = m.layout.group(a.group)
            meta = array_metadata_bytes(g, world, dtypes.dtype(a.dtype))
            self.dir.write_atomic(f"{a.path}/zarr.json", meta)
        self.dir.write_atomic(MANIFEST_KEY, body)  # the commit point
        if update_latest:
            write_latest(self.root, self.name)
        if keep_last:
            apply_retention(self.root, keep_last)
        return m

    def total_bytes(self) -> int:
        m = self.manifest
        return sum(
            shard_nbytes(m.layout.group(a.group), dtypes.dtype(a.dtype)) * m.layout.world_size
            for a in m.arrays
        )
