"""Reading a committed checkpoint: any range of any logical tensor, for any target layout.

A read intersects the wanted element range with the tensor's recorded fragments
(``layout.intersect``), finds each fragment's place in its stored array's shard
(``Manifest.locate``: format 2 packs several groups per shard, format 1 had one each) and reads
only the chunks that overlap, verifying each chunk's crc32c. Each shard's index is checked once
per reader, on first use. On remote stores each request also reads ahead (``READAHEAD_BYTES``)
into the reader's chunk cache, so reading tensor after tensor costs a few large concurrent
ranged GETs rather than one small GET per tensor.
Opening a checkpoint parses JSON only: nothing is ever unpickled (docs/design.md, invariant 6).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from zshard.errors import (
    CheckpointNotFoundError,
    CorruptDataError,
    InvalidArgumentError,
    ZshardError,
)
from zshard.store import dtypes
from zshard.store.layout import intersect
from zshard.store.manifest import (
    MANIFEST_KEY,
    Manifest,
    StoredArray,
    TensorEntry,
    rank_state_key,
    unframe_json,
)
from zshard.store.root import CheckpointRef, resolve
from zshard.store.shard import ChunkCache, Geometry, array_metadata, read_shard_range
from zshard.store.storage import LocalStorage, Storage, open_storage

# Remote stores: bytes read ahead per request, in concurrent ranged GETs of
# ``storage.READ_PART_BYTES``, and kept in the chunk cache until used. Readers that go through a
# shard front to back (consolidate, reshard, the engine's load, kind by kind) read each byte
# once, in a few large requests (s3fs reads one large object in 50 MiB GETs, 10 at a time). The
# cache holds one window and the partly used chunks at its edges.
READAHEAD_BYTES = 128 << 20
_REMOTE_CACHE_BYTES = READAHEAD_BYTES + (16 << 20)


class CheckpointReader:
    def __init__(self, ref: CheckpointRef, manifest: Manifest, storage: Storage) -> None:
        self.ref = ref
        self.manifest = manifest
        self.dir = storage
        self._index_checked: set[str] = set()
        self._remote = not isinstance(storage, LocalStorage)
        self._chunks = ChunkCache(
            capacity=4 if not self._remote else 1 << 30,
            max_bytes=None if not self._remote else _REMOTE_CACHE_BYTES,
        )
        self._arrays_checked: set[str] = set()
        self._by_key = {(t.name, t.kind): t for t in manifest.tensors}

    @classmethod
    def open(cls, url: str) -> CheckpointReader:
        """Open a step directory, or the newest committed checkpoint of a root."""
        ref = resolve(url)
        storage = open_storage(ref.url)
        if not storage.exists(MANIFEST_KEY):
            raise CheckpointNotFoundError(f"{ref.url}: checkpoint vanished while opening")
        raw = storage.read(MANIFEST_KEY)
        return cls(ref, Manifest.from_bytes(raw, f"{ref.url}/{MANIFEST_KEY}"), storage)

    @property
    def url(self) -> str:
        return self.ref.url

    def has(self, name: str, kind: str) -> bool:
        return (name, kind) in self._by_key

    def tensor(self, name: str, kind: str) -> TensorEntry:
        try:
            return self._by_key[(name, kind)]
        except KeyError:
            target = self.manifest.ties.get(name)
            if target is not None and (target, kind) in self._by_key:
                return self._by_key[(target, kind)]
            raise InvalidArgumentError(f"{self.url}: no tensor {name!r} of kind {kind!r}") from None

    def read(self, name: str, kind: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flattened elements ``[start, stop)`` of a logical tensor, in its storage dtype."""
        t = self.tensor(name, kind)
        stop = t.numel if stop is None else stop
        if not 0 <= start <= stop <= t.numel:
            raise InvalidArgumentError(
                f"range [{start}, {stop}) outside tensor {name!r} of {t.numel} elements"
            )
        dt = dtypes.dtype(t.dtype)
        out = np.empty(stop - start, dtype=dt.numpy)
        self.read_into(t, start, out)
        return out

    def read_into(self, t: TensorEntry, start: int, out: np.ndarray) -> None:
        """Fill ``out`` (storage dtype) with elements ``[start, start + out.size)`` of ``t``."""
        m = self.manifest
        dt = dtypes.dtype(t.dtype)
        for piece in intersect(t.fragments, start, start + out.size):
            g = m.layout.group(piece.group)
            s, base = m.locate(piece.group, t.kind)
            self._check_array(t, s)
            key = s.shard_key(piece.rank)
            geo = Geometry(s.shard_numel, s.chunk_numel, dt.itemsize)
            lo = base + piece.offset - piece.rank * g.partition_numel
            readahead = READAHEAD_BYTES // geo.chunk_nbytes if self._remote else 0
            read_shard_range(
                self.dir,
                key,
                geo,
                dt,
                lo,
                out[piece.out_offset : piece.out_offset + piece.length],
                where=f"tensor {t.name!r} ({t.kind}) in {self.dir.url}/{key}",
                check_index_bytes=key not in self._index_checked,
                cache=self._chunks,
                readahead=readahead,
            )
            self._index_checked.add(key)

    def _check_array(self, t: TensorEntry, a: StoredArray) -> None:
        """The array's zarr.json must be what the manifest implies, once per array and reader.

        The manifest is checksummed, but a manifest edited to lie consistently (say, float32
        relabelled int32 in both the tensor and its array, which keeps every size and offset
        valid) would otherwise read as a wrong tensor. zarr.json is a second, independent record
        of each array's dtype, shape and chunking: one small read per array catches that.
        """
        if a.path in self._arrays_checked:
            return
        key = f"{a.path}/zarr.json"
        where = f"tensor {t.name!r} ({t.kind}) in {self.dir.url}/{key}"
        dt = dtypes.dtype(a.dtype)
        geo = Geometry(a.shard_numel, a.chunk_numel, dt.itemsize)
        want = array_metadata(geo, self.manifest.layout.world_size, dt, a.key_separator)
        try:
            got = json.loads(self.dir.read(key))
        except (ZshardError, ValueError, RecursionError) as e:
            raise CorruptDataError(f"{where}: unreadable array metadata ({e})") from None
        if got != want:
            fields = sorted(k for k in want if not isinstance(got, dict) or got.get(k) != want[k])
            raise CorruptDataError(
                f"{where}: array metadata does not match the manifest ({', '.join(fields)}); the "
                "checkpoint was edited or damaged: run zshard verify"
            )
        self._arrays_checked.add(a.path)

    def read_tensor(self, name: str, kind: str) -> np.ndarray:
        """A whole logical tensor, shaped, in its storage dtype (bfloat16 as uint16)."""
        t = self.tensor(name, kind)
        return self.read(name, kind).reshape(t.shape)

    def read_torch(self, name: str, kind: str, start: int = 0, stop: int | None = None) -> Any:
        """Like ``read`` but as a 1-D torch tensor of the logical dtype."""
        t = self.tensor(name, kind)
        return to_torch(self.read(name, kind, start, stop), t.dtype)

    def iter_tensors(self, kinds: set[str] | None = None) -> Iterator[TensorEntry]:
        for t in self.manifest.tensors:
            if kinds is None or t.kind in kinds:
                yield t

    def read_rank_state(self, rank: int) -> dict[str, Any]:
        if not 0 <= rank < self.manifest.rank_state:
            return {}
        key = rank_state_key(rank)
        state = unframe_json(self.dir.read(key), f"{self.dir.url}/{key}")
        if not isinstance(state, dict):
            raise CorruptDataError(f"{self.dir.url}/{key}: rank state is not a JSON object")
        return state


def to_torch(array: np.ndarray, logical: str) -> Any:
    """View a storage-dtype numpy array as a torch tensor of its logical dtype (no copy)."""
    import torch  # why: heavy; reading and verifying checkpoints never needs it

    dt = dtypes.dtype(logical)
    t = torch.from_numpy(array)
    if dt.storage != dt.name:  # bfloat16 / float8 travel as same-width unsigned ints
        t = t.view(getattr(torch, dt.name))
    return t


def to_numpy(tensor: Any) -> np.ndarray:
    """A CPU torch tensor as a numpy array of its storage dtype (bfloat16 -> uint16 view)."""
    import torch  # why: heavy; reading and verifying checkpoints never needs it

    dt = dtypes.from_torch(tensor.dtype)
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if dt.storage != dt.name:
        t = t.view(getattr(torch, dt.storage))
    return t.contiguous().numpy()


def cast(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Storage-dtype elements of logical dtype ``src`` as logical dtype ``dst`` (a new array in
    ``dst``'s storage dtype; ``array`` itself when the two are the same).

    torch casts round to nearest even, including to bfloat16 (which numpy lacks), as DeepSpeed
    does when it casts its fp32 masters.
    """
    if src == dst:
        return array
    return to_numpy(to_torch(array, src).to(dtypes.to_torch(dtypes.dtype(dst))))
