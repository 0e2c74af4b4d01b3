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
from zshard.store.layout import FlatGroup
from zshard.store.manifest import ArrayEntry, Manifest, rank_state_key, unframe_json
from zshard.store.reader import CheckpointReader
from zshard.store.shard import (
    CRC_NBYTES,
    array_metadata,
    check_index,
    chunk_nbytes,
    crc,
    index_nbytes,
    shard_key,
    shard_nbytes,
)

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


def _tensors_in(m: Manifest, a: ArrayEntry, lo: int, hi: int) -> list[str]:
    """Names of tensors of ``a``'s kind with elements in group range ``[lo, hi)``."""
    names = []
    for t in m.tensors:
        if t.kind != a.kind:
            continue
        for f in t.fragments:
            if f.group == a.group and f.offset < hi and lo < f.offset + f.length:
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
        for a in m.arrays:
            g = m.layout.group(a.group)
            dt = dtypes.dtype(a.dtype)
            meta_key = f"{a.path}/zarr.json"
            try:
                meta = json.loads(d.read(meta_key))
            except (ZshardError, ValueError) as e:
                fault(f"{d.url}/{meta_key}: unreadable array metadata ({e})")
                meta = None
            if meta is not None and meta != array_metadata(g, m.layout.world_size, dt):
                fault(f"{d.url}/{meta_key}: array metadata does not match the manifest")
            for rank in range(m.layout.world_size):
                _verify_shard(reader, a, g, dt, rank, fault, report, progress)
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
    a: ArrayEntry,
    g: FlatGroup,
    dt: dtypes.DType,
    rank: int,
    fault: Callable[[str], None],
    report: VerifyReport,
    progress: Callable[[int], None] | None,
) -> None:
    m, d = reader.manifest, reader.dir
    key = shard_key(a.path, rank)
    where = f"{d.url}/{key}"
    base = rank * g.partition_numel

    def affected(lo: int, hi: int) -> str:
        names = _tensors_in(m, a, base + lo, base + hi)
        shown = ", ".join(repr(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
        return f"tensors {shown} ({a.kind})" if names else f"padding of {a.path}"

    try:
        size = d.size(key)
    except ZshardError:
        fault(f"{where}: shard missing; affects {affected(0, g.partition_numel)}")
        return
    if size != shard_nbytes(g, dt):
        fault(
            f"{where}: shard has {size} bytes, expected {shard_nbytes(g, dt)} (truncated or "
            f"padded); affects {affected(0, g.partition_numel)}"
        )
        return
    n = g.chunks_per_shard
    try:
        check_index(d.read_range(key, 0, index_nbytes(n)), g, dt, where)
    except ZshardError as e:
        fault(f"{e}; affects {affected(0, g.partition_numel)}")
    step = chunk_nbytes(g, dt)
    per_read = max(1, _WINDOW_BYTES // step)
    for first in range(0, n, per_read):
        count = min(per_read, n - first)
        raw = np.frombuffer(
            d.read_range(
                key, index_nbytes(n) + first * step, index_nbytes(n) + (first + count) * step
            ),
            dtype=np.uint8,
        )
        for i in range(count):
            chunk = raw[i * step : (i + 1) * step]
            body, stored = chunk[:-CRC_NBYTES], chunk[-CRC_NBYTES:]
            report.chunks += 1
            if np.uint32(crc(body)).tobytes() != stored.tobytes():
                c = first + i
                lo, hi = c * g.chunk_numel, (c + 1) * g.chunk_numel
                fault(f"{where}: chunk {c} fails its crc32c checksum; affects {affected(lo, hi)}")
        report.bytes_read += raw.nbytes
        if progress:
            progress(raw.nbytes)
