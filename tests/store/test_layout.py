"""Layout arithmetic properties (pure; hypothesis): every element owned exactly once, exact
intersections, padding bounds, and the error detectors that guard manifests."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from zshard.store import layout
from zshard.store.layout import (
    FlatGroup,
    Fragment,
    coverage_errors,
    intersect,
    pack,
    placement_errors,
    plan_partition,
    recut,
)

SETTINGS = settings(max_examples=150, deadline=None)

# Sizes include 0 and sizes smaller than any world size; targets are tiny so that partitions
# hold many chunks.
sizes_st = st.lists(st.integers(0, 60), min_size=0, max_size=8)
world_st = st.integers(1, 9)
target_st = st.integers(1, 40)


def _members(sizes: list[int]) -> list[tuple[str, int]]:
    return [(f"t{i}", n) for i, n in enumerate(sizes)]


def _pack(sizes: list[int], world: int, target: int):
    with mock.patch.object(layout, "TARGET_CHUNK_NUMEL", target):
        return pack("g", _members(sizes), world)


def _buffer(g: FlatGroup, world: int, frags: dict[str, list[Fragment]], sizes: list[int]):
    """Simulate the flat buffer: element e of tensor i holds the id (i << 20) + e; padding -1."""
    buf = np.full(g.partition_numel * world, -1, dtype=np.int64)
    for i, n in enumerate(sizes):
        values = (i << 20) + np.arange(n, dtype=np.int64)
        for f in frags[f"t{i}"]:
            assert (buf[f.offset : f.offset + f.length] == -1).all(), "element placed twice"
            buf[f.offset : f.offset + f.length] = values[f.start : f.start + f.length]
    return buf


@SETTINGS
@given(sizes=sizes_st, world=world_st, target=target_st)
def test_pack_owns_every_element_exactly_once(sizes, world, target):
    g, frags = _pack(sizes, world, target)
    total = sum(sizes)
    assert sorted(frags) == sorted(f"t{i}" for i in range(len(sizes)))
    # Partitions tile the padded buffer, which holds every element.
    assert g.partition_numel * world >= total
    assert [g.partition_range(r) for r in range(world)] == [
        (r * g.partition_numel, (r + 1) * g.partition_numel) for r in range(world)
    ]
    assert g.partition_numel % g.chunk_numel == 0
    owners = np.zeros(g.partition_numel * world, dtype=np.int64)
    for i, n in enumerate(sizes):
        fs = frags[f"t{i}"]
        if n == 0:
            assert fs == []
        assert coverage_errors(fs, n) == []
        covered = np.zeros(n, dtype=np.int64)
        for f in fs:
            assert f.group == "g" and f.length > 0
            assert placement_errors(f, g, world) == []
            lo, hi = g.partition_range(f.rank)
            assert lo <= f.offset and f.offset + f.length <= hi
            covered[f.start : f.start + f.length] += 1
            owners[f.offset : f.offset + f.length] += 1
        assert (covered == 1).all()
    # No buffer element is claimed by two tensors; members lie end to end from offset 0.
    assert (owners <= 1).all()
    assert owners[:total].sum() == total and owners[total:].sum() == 0
    buf = _buffer(g, world, frags, sizes)
    assert (buf[total:] == -1).all()


@SETTINGS
@given(
    numel=st.one_of(st.integers(0, 200), st.integers(0, 10**7)),
    world=world_st,
    target=st.one_of(target_st, st.integers(1, 1 << 16)),
)
def test_plan_partition_padding_and_chunk_bounds(numel, world, target):
    partition, chunk = plan_partition(numel, world, target)
    per_rank = max(1, math.ceil(numel / world))
    n_chunks = partition // chunk
    assert partition % chunk == 0
    assert partition >= per_rank and partition * world >= numel
    # Padding is less than one element per chunk per rank.
    assert partition - per_rank < n_chunks
    if per_rank > target:
        assert 2 * chunk >= target
        assert chunk <= target
    else:
        assert (partition, chunk) == (per_rank, per_rank)


def test_plan_partition_default_target_is_read_at_call_time():
    # pack() plans with the module constant; shrinking it must reach every caller.
    assert plan_partition(10_000, 2) == (5_000, 5_000)
    with mock.patch.object(layout, "TARGET_CHUNK_NUMEL", 1000):
        assert plan_partition(10_000, 2) == (5_000, 1_000)
        g, _ = pack("g", [("a", 10_000)], 2)
        assert g.chunks_per_shard == 5


def test_plan_partition_rejects_bad_world_size():
    with pytest.raises(ValueError):
        plan_partition(10, 0)


@SETTINGS
@given(data=st.data(), sizes=sizes_st, world=world_st, target=target_st)
def test_intersect_returns_exactly_the_requested_elements(data, sizes, world, target):
    assume(any(sizes))
    g, frags = _pack(sizes, world, target)
    buf = _buffer(g, world, frags, sizes)
    i = data.draw(st.sampled_from([i for i, n in enumerate(sizes) if n]))
    n = sizes[i]
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    pieces = intersect(frags[f"t{i}"], start, stop)
    window = np.full(stop - start, -2, dtype=np.int64)
    written = np.zeros(stop - start, dtype=np.int64)
    for p in pieces:
        assert p.length > 0
        lo, hi = g.partition_range(p.rank)
        assert lo <= p.offset and p.offset + p.length <= hi
        window[p.out_offset : p.out_offset + p.length] = buf[p.offset : p.offset + p.length]
        written[p.out_offset : p.out_offset + p.length] += 1
    assert (written == 1).all()
    np.testing.assert_array_equal(window, (i << 20) + np.arange(start, stop))
    assert [p.out_offset for p in pieces] == sorted(p.out_offset for p in pieces)


def test_intersect_skips_fragments_outside_the_range():
    frags = [Fragment("g", 0, 0, 0, 4), Fragment("g", 1, 4, 4, 4), Fragment("g", 2, 8, 8, 4)]
    assert intersect(frags, 5, 7) == [layout.ReadPiece("g", 1, 5, 0, 2)]
    assert intersect(frags, 3, 9) == [
        layout.ReadPiece("g", 0, 3, 0, 1),
        layout.ReadPiece("g", 1, 4, 1, 4),
        layout.ReadPiece("g", 2, 8, 5, 1),
    ]
    assert intersect(frags, 6, 6) == []


@SETTINGS
@given(sizes=sizes_st, world=world_st, world2=world_st, target=target_st)
def test_recut_preserves_coverage_and_buffer_positions(sizes, world, world2, target):
    _, frags = _pack(sizes, world, target)
    total = sum(sizes)
    with mock.patch.object(layout, "TARGET_CHUNK_NUMEL", target):
        partition, chunk = plan_partition(total, world2)
    g2 = FlatGroup("g", partition, chunk)
    for i, n in enumerate(sizes):
        old = frags[f"t{i}"]
        new = recut(old, g2)
        assert coverage_errors(new, n) == []
        assert sum(f.length for f in new) == n
        for f in new:
            assert placement_errors(f, g2, world2) == []
            # Same buffer: every element keeps its buffer offset.
            (src,) = [o for o in old if o.start <= f.start < o.start + o.length]
            assert f.offset - f.start == src.offset - src.start
    frags2 = {f"t{i}": recut(frags[f"t{i}"], g2) for i in range(len(sizes))}
    buf = _buffer(g2, world2, frags2, sizes)
    assert (buf[:total] >= 0).all()


# -- the detectors ----------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), n=st.integers(1, 80), world=world_st, target=target_st)
def test_coverage_errors_detect_gaps_and_overlaps(data, n, world, target):
    _, frags = _pack([n], world, target)
    fs = frags["t0"]
    assert coverage_errors(fs, n) == []
    k = data.draw(st.integers(0, len(fs) - 1))
    # A gap: drop one fragment.
    dropped = fs[:k] + fs[k + 1 :]
    assert any("not stored" in e for e in coverage_errors(dropped, n))
    # An overlap: store one fragment twice.
    assert any("stored twice" in e for e in coverage_errors([*fs, fs[k]], n))
    # A fragment that grows by one element overlaps its neighbour or runs past the tensor.
    f = fs[k]
    grown = [*fs[:k], f._replace(length=f.length + 1), *fs[k + 1 :]]
    assert coverage_errors(grown, n) != []
    # A shorter fragment leaves a gap.
    if f.length > 1:
        shrunk = [*fs[:k], f._replace(length=f.length - 1), *fs[k + 1 :]]
        assert any("not stored" in e for e in coverage_errors(shrunk, n))
    # Non-positive lengths and a wrong tensor size.
    assert coverage_errors([*fs, f._replace(length=0)], n) != []
    assert any("past the tensor" in e for e in coverage_errors(fs, n - 1))
    assert any("not stored" in e for e in coverage_errors(fs, n + 1))


def test_coverage_errors_of_an_empty_tensor():
    assert coverage_errors([], 0) == []
    assert coverage_errors([], 3) == ["elements [0, 3) are not stored"]


@SETTINGS
@given(data=st.data(), sizes=sizes_st, world=world_st, target=target_st)
def test_placement_errors_detect_out_of_partition_fragments(data, sizes, world, target):
    assume(any(sizes))
    g, frags = _pack(sizes, world, target)
    f = data.draw(st.sampled_from([f for fs in frags.values() for f in fs]))
    assert placement_errors(f, g, world) == []
    lo, hi = g.partition_range(f.rank)
    # Spill past the partition's end, or start before it.
    assert placement_errors(f._replace(length=hi - f.offset + 1), g, world) != []
    if f.rank > 0:
        assert placement_errors(f._replace(offset=lo - 1), g, world) != []
    # A rank outside the world, or the same offset claimed by another rank.
    assert placement_errors(f._replace(rank=world), g, world) != []
    assert placement_errors(f._replace(rank=-1), g, world) != []
    other = data.draw(st.integers(0, world - 1))
    if other != f.rank:
        assert placement_errors(f._replace(rank=other), g, world) != []


def test_flat_group_and_layout_validation():
    with pytest.raises(ValueError):
        FlatGroup("g", 10, 3)
    with pytest.raises(ValueError):
        FlatGroup("g", 0, 1)
    with pytest.raises(ValueError):
        layout.Layout(0, 1, ())
    with pytest.raises(ValueError):
        layout.Layout(2, 4, ())
    g = FlatGroup("g", 4, 2)
    with pytest.raises(ValueError):
        layout.Layout(2, 1, (g, g))
