"""Layout arithmetic: where every element of every logical tensor lives. Pure; no I/O.

Vocabulary (see docs/design.md): a *flat group* is a 1-D buffer of
``world_size * partition_numel`` elements; rank ``r`` owns the *partition*
``[r * partition_numel, (r + 1) * partition_numel)`` and writes it as one *shard*. A shard is cut
into equal *chunks* of ``chunk_numel`` elements, the unit that is checksummed and read. A logical
tensor is stored as *fragments*: ranges of its flattened elements placed in one partition of one
group. Fragments carry their true offsets (docs/design.md, invariant 3), so readers never
re-derive placement from a sharding rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

# Target elements per chunk. Chunks are at least half of this when a partition is larger than it,
# so 2-byte dtypes get >= 1 MiB chunks and a reader's window never exceeds 8 MiB (float64).
TARGET_CHUNK_NUMEL = 1 << 20


class Fragment(NamedTuple):
    """The part of one logical tensor stored in one partition.

    ``offset`` is the position in the flat group's buffer, ``start`` the position in the tensor's
    flattened elements; both count elements.
    """

    group: str
    rank: int
    offset: int
    start: int
    length: int


class ReadPiece(NamedTuple):
    """Copy ``length`` elements of ``group``'s buffer at ``offset`` to a window's ``out_offset``."""

    group: str
    rank: int
    offset: int
    out_offset: int
    length: int


@dataclass(frozen=True)
class FlatGroup:
    """One flat buffer split evenly across ranks.

    Attributes:
        name: path-safe identifier, unique in its layout.
        partition_numel: elements per rank (one shard); the buffer holds ``world_size`` of them.
        chunk_numel: elements per chunk; divides ``partition_numel``.
    """

    name: str
    partition_numel: int
    chunk_numel: int

    def __post_init__(self) -> None:
        if self.partition_numel < 1 or self.chunk_numel < 1:
            raise ValueError(f"group {self.name!r}: partition and chunk sizes must be >= 1")
        if self.partition_numel % self.chunk_numel:
            raise ValueError(
                f"group {self.name!r}: chunk_numel={self.chunk_numel} does not divide "
                f"partition_numel={self.partition_numel}"
            )

    @property
    def chunks_per_shard(self) -> int:
        return self.partition_numel // self.chunk_numel

    def partition_range(self, rank: int) -> tuple[int, int]:
        start = rank * self.partition_numel
        return start, start + self.partition_numel


@dataclass(frozen=True)
class Layout:
    """World size + stage + flat groups: with the fragments, every element's place."""

    world_size: int
    stage: int
    groups: tuple[FlatGroup, ...]

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.stage <= 3:
            raise ValueError(f"stage must be 0-3, got {self.stage}")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate flat group names in {names}")

    def group(self, name: str) -> FlatGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def group_numel(self, name: str) -> int:
        return self.group(name).partition_numel * self.world_size


def plan_partition(numel: int, world_size: int, target_chunk: int | None = None) -> tuple[int, int]:
    """Partition and chunk sizes for a flat group of ``numel`` used elements.

    Returns ``(partition_numel, chunk_numel)`` with chunk dividing partition. Padding is less than
    one element per chunk per rank: a partition over ``target_chunk`` is cut into
    ``ceil(per_rank / target_chunk)`` equal chunks rather than rounded up to whole target chunks.
    ``target_chunk`` defaults to ``TARGET_CHUNK_NUMEL`` as it is at call time, so tests and tools
    can shrink chunks for every caller (``pack``) by setting the module constant.
    """
    if target_chunk is None:
        target_chunk = TARGET_CHUNK_NUMEL
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    per_rank = max(1, math.ceil(numel / world_size))
    if per_rank <= target_chunk:
        return per_rank, per_rank
    n_chunks = math.ceil(per_rank / target_chunk)
    chunk = math.ceil(per_rank / n_chunks)
    return n_chunks * chunk, chunk


def plan_shard(
    partitions: Sequence[tuple[str, int]], target_chunk: int | None = None
) -> tuple[int, int, list[tuple[str, int]]]:
    """Lay the partitions of several flat groups end to end in one shard (format 2).

    ``partitions`` are ``(group, partition_numel)`` in shard order. Returns ``(shard_numel,
    chunk_numel, [(group, base)])``: the shard is chunked like one partition of the summed size
    (``plan_partition``), so padding stays below one element per chunk, whatever the number of
    groups.
    """
    bases: list[tuple[str, int]] = []
    pos = 0
    for name, numel in partitions:
        bases.append((name, pos))
        pos += numel
    shard, chunk = plan_partition(pos, 1, target_chunk)
    return shard, chunk, bases


def cut(group: FlatGroup, offset: int, start: int, length: int) -> list[Fragment]:
    """Cut the group range ``[offset, offset + length)`` holding tensor elements from ``start``
    at partition boundaries."""
    out: list[Fragment] = []
    p = group.partition_numel
    while length > 0:
        rank = offset // p
        n = min(length, (rank + 1) * p - offset)
        out.append(Fragment(group.name, rank, offset, start, n))
        offset, start, length = offset + n, start + n, length - n
    return out


def pack(
    name: str, members: Sequence[tuple[str, int]], world_size: int
) -> tuple[FlatGroup, dict[str, list[Fragment]]]:
    """Lay ``(tensor, numel)`` members end to end in one flat group split across ``world_size``.

    Returns the group and each member's fragments (empty tensors get none).
    """
    total = sum(n for _, n in members)
    partition, chunk = plan_partition(total, world_size)
    group = FlatGroup(name, partition, chunk)
    frags: dict[str, list[Fragment]] = {}
    offset = 0
    for tensor, numel in members:
        frags[tensor] = cut(group, offset, 0, numel)
        offset += numel
    return group, frags


def recut(fragments: Iterable[Fragment], group: FlatGroup) -> list[Fragment]:
    """Re-cut fragments at the partition boundaries of ``group`` (same buffer, new world size)."""
    out: list[Fragment] = []
    for f in fragments:
        out.extend(cut(group, f.offset, f.start, f.length))
    return out


def intersect(fragments: Iterable[Fragment], start: int, stop: int) -> list[ReadPiece]:
    """Which stored ranges make up tensor elements ``[start, stop)``, and where each goes in a
    window that begins at ``start``. Fragments outside the range are skipped."""
    pieces: list[ReadPiece] = []
    for f in fragments:
        lo = max(start, f.start)
        hi = min(stop, f.start + f.length)
        if lo < hi:
            pieces.append(
                ReadPiece(f.group, f.rank, f.offset + (lo - f.start), lo - start, hi - lo)
            )
    pieces.sort(key=lambda p: p.out_offset)
    return pieces


def coverage_errors(fragments: Sequence[Fragment], numel: int) -> list[str]:
    """Describe how ``fragments`` fail to tile ``[0, numel)`` exactly once (empty list: they do)."""
    errors: list[str] = []
    pos = 0
    for f in sorted(fragments, key=lambda f: f.start):
        if f.length <= 0:
            errors.append(f"fragment {tuple(f)} has non-positive length")
            continue
        if f.start > pos:
            errors.append(f"elements [{pos}, {f.start}) are not stored")
        elif f.start < pos:
            errors.append(f"elements [{f.start}, {min(pos, f.start + f.length)}) are stored twice")
        pos = max(pos, f.start + f.length)
    if pos < numel:
        errors.append(f"elements [{pos}, {numel}) are not stored")
    elif pos > numel:
        errors.append(f"fragments reach element {pos} past the tensor's {numel}")
    return errors


def placement_errors(fragment: Fragment, group: FlatGroup, world_size: int) -> list[str]:
    """Describe how one fragment falls outside its recorded partition (empty list: it does not)."""
    if not 0 <= fragment.rank < world_size:
        return [f"fragment rank {fragment.rank} outside world size {world_size}"]
    lo, hi = group.partition_range(fragment.rank)
    if fragment.offset < lo or fragment.offset + fragment.length > hi:
        return [
            f"fragment [{fragment.offset}, {fragment.offset + fragment.length}) of group "
            f"{group.name!r} lies outside rank {fragment.rank}'s partition [{lo}, {hi})"
        ]
    return []
