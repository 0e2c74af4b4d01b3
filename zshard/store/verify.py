"""Verifying a checkpoint: every chunk's crc32c, every shard's index and size, the metadata.

Reads shard by shard in bounded windows. Each fault names the file and the logical tensors whose
elements it affects, so a user knows what is lost.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from zshard.errors import ZshardError
from zshard.store import dtypes
from zshard.store.manifest import Manifest, StoredArray, rank_state_key, unframe_json
from zshard.store.reader import CheckpointReader
from zshard.store.shard import CRC_NBYTES, Geometry, array_metadata, check_index, crc

_WINDOW_BYTES = 32 << 20


@dataclass
class VerifyReport:
    url: str
    faults: list[str] = field(default_factory=list)
    chunks: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.faults


class _Stop(Exception):
    pass


def _tensors_in(m: Manifest, a: StoredArray, rank: int, lo: int, hi: int) -> list[str]:
    """Names of tensors of ``a``'s kind with elements in rank ``rank``'s shard range
    ``[lo, hi)`` (shard elements: each group's partition at its base)."""
    spans: dict[str, tuple[int, int]] = {}  # group -> its buffer range that [lo, hi) covers
    for g, base in a.segments:
        p = m.layout.group(g).partition_numel
        a_lo, a_hi = max(lo, base), min(hi, base + p)
        if a_lo < a_hi:
            spans[g] = (rank * p + a_lo - base, rank * p + a_hi - base)
    names = []
    for t in m.tensors:
        if t.kind != a.kind:
            continue
        for f in t.fragments:
            span = spans.get(f.group)
            if span is not None and f.offset < span[1] and span[0] < f.offset + f.length:
                names.append(t.name)
                break
    return names


def verify(
    url: str, all_faults: bool = False, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Check everything a reader relies on. Stops at the first fault unless ``all_faults``."""
    reader = CheckpointReader.open(url)
    m, d = reader.manifest, reader.dir
    report = VerifyReport(reader.url)

    def fault(msg: str) -> None:
        report.faults.append(msg)
        if not all_faults:
            raise _Stop

    try:
        for a in m.stored:
            dt = dtypes.dtype(a.dtype)
            geo = Geometry(a.shard_numel, a.chunk_numel, dt.itemsize)
            meta_key = f"{a.path}/zarr.json"
            try:
                meta = json.loads(d.read(meta_key))
            except (ZshardError, ValueError) as e:
                fault(f"{d.url}/{meta_key}: unreadable array metadata ({e})")
                meta = None
            want = array_metadata(geo, m.layout.world_size, dt, a.key_separator)
            if meta is not None and meta != want:
                fault(f"{d.url}/{meta_key}: array metadata does not match the manifest")
            for rank in range(m.layout.world_size):
                _verify_shard(reader, a, geo, dt, rank, fault, report, progress)
        for rank in range(m.rank_state):
            key = rank_state_key(rank)
            try:
                unframe_json(d.read(key), f"{d.url}/{key}")
            except ZshardError as e:
                fault(str(e))
    except _Stop:
        pass
    return report


def _verify_shard(
    reader: CheckpointReader,
    a: StoredArray,
    geo: Geometry,
    dt: dtypes.DType,
    rank: int,
    fault: Callable[[str], None],
    report: VerifyReport,
    progress: Callable[[int], None] | None,
) -> None:
    m, d = reader.manifest, reader.dir
    key = a.shard_key(rank)
    where = f"{d.url}/{key}"

    def affected(lo: int, hi: int) -> str:
        names = _tensors_in(m, a, rank, lo, hi)
        shown = ", ".join(repr(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
        return f"tensors {shown} ({a.kind})" if names else f"padding of {a.path}"

    try:
        size = d.size(key)
    except ZshardError:
        fault(f"{where}: shard missing; affects {affected(0, geo.shard_numel)}")
        return
    if size != geo.nbytes:
        fault(
            f"{where}: shard has {size} bytes, expected {geo.nbytes} (truncated or "
            f"padded); affects {affected(0, geo.shard_numel)}"
        )
        return
    n = geo.n_chunks
    try:
        check_index(d.read_range(key, 0, geo.index_nbytes), geo, dt, where)
    except ZshardError as e:
        fault(f"{e}; affects {affected(0, geo.shard_numel)}")
    step = geo.chunk_nbytes
    per_read = max(1, _WINDOW_BYTES // step)
    for first in range(0, n, per_read):
        count = min(per_read, n - first)
        raw = np.frombuffer(
            d.read_range(key, geo.chunk_offset(first), geo.chunk_offset(first + count)),
            dtype=np.uint8,
        )
        for i in range(count):
            chunk = raw[i * step : (i + 1) * step]
            body, stored = chunk[:-CRC_NBYTES], chunk[-CRC_NBYTES:]
            report.chunks += 1
            if np.uint32(crc(body)).tobytes() != stored.tobytes():
                c = first + i
                lo, hi = c * geo.chunk_numel, (c + 1) * geo.chunk_numel
                fault(f"{where}: chunk {c} fails its crc32c checksum; affects {affected(lo, hi)}")
        report.bytes_read += raw.nbytes
        if progress:
            progress(raw.nbytes)
