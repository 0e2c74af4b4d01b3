"""Shards: zarr reads what zshard writes, ranged reads are exact, and every corruption is caught
by both ``verify`` and the reader, naming the tensor and the file."""

from __future__ import annotations

import os
from types import SimpleNamespace

import crc32c
import numpy as np
import pytest
import torch
import zarr

from tests.conftest import read_all, write_checkpoint
from zshard.errors import CorruptDataError, ManifestError, StorageError, ZshardError
from zshard.store import dtypes, layout
from zshard.store.layout import FlatGroup, Layout
from zshard.store.manifest import ArrayEntry, Manifest, StoredArray, TensorEntry
from zshard.store.reader import CheckpointReader, to_numpy
from zshard.store.shard import Geometry, chunk_nbytes, index_nbytes, shard_nbytes
from zshard.store.verify import verify
from zshard.store.writer import CheckpointWriter


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 elements: every shard below holds several."""
    monkeypatch.setattr(layout, "TARGET_CHUNK_NUMEL", 16)


def _tensors(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "param": {
            "a": torch.randn(7, 13, generator=g),
            "b": torch.randn(5, generator=g),
            "c": torch.randn(3, 3, 3, generator=g),
            "d": torch.tensor(1.5),
            "e": torch.randn(41, generator=g),
        },
        "exp_avg_sq": {
            "a": torch.rand(7, 13, generator=g),
            "c": torch.rand(3, 3, 3, generator=g),
        },
        "step_count": {"a": torch.arange(91, dtype=torch.int64).reshape(7, 13)},
        "bf16": {"e": torch.randn(41, generator=g).to(torch.bfloat16)},
    }


def geo(s: StoredArray) -> Geometry:
    return Geometry(s.shard_numel, s.chunk_numel, dtypes.dtype(s.dtype).itemsize)


def zarr_position(m: Manifest, kind: str, f: layout.Fragment) -> int:
    """Where fragment ``f``'s first element lies in its stored array as zarr sees it: rank
    ``f.rank``'s shard, at its group's base."""
    s, base = m.locate(f.group, kind)
    p = m.layout.group(f.group).partition_numel
    return f.rank * s.shard_numel + base + f.offset - f.rank * p


def _flat(reader: CheckpointReader, s: StoredArray) -> np.ndarray:
    """The flat buffer of one stored array as zshard's reader sees it (padding zero)."""
    m = reader.manifest
    flat = np.zeros(s.shard_numel * m.layout.world_size, dtype=dtypes.dtype(s.dtype).numpy)
    groups = {g for g, _ in s.segments}
    for t in reader.iter_tensors({s.kind}):
        for f in t.fragments:
            if f.group in groups:
                at = zarr_position(m, s.kind, f)
                flat[at : at + f.length] = reader.read(t.name, t.kind, f.start, f.start + f.length)
    return flat


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_zarr_reads_the_flat_buffers(tmp_path, small_chunks, world):
    tensors = _tensors()
    write_checkpoint(str(tmp_path), 3, tensors, world)
    reader = CheckpointReader.open(str(tmp_path))
    m = reader.manifest
    assert {s.kind for s in m.stored} == set(tensors)
    for s in m.stored:
        assert s.chunks_per_shard > 1
        z = zarr.open_array(str(tmp_path / reader.ref.name / s.path), mode="r")
        assert z.shape == (s.shard_numel * world,)
        assert z.shards == (s.shard_numel,)
        assert z.chunks == (s.chunk_numel,)
        assert z.dtype == dtypes.dtype(s.dtype).numpy
        assert z.attrs["zshard_logical_dtype"] == s.dtype
        np.testing.assert_array_equal(z[:], _flat(reader, s))
        # And against the source tensors, through the fragments.
        for name, t in tensors[s.kind].items():
            want = to_numpy(t).reshape(-1)
            for f in m.tensor(name, s.kind).fragments:
                at = zarr_position(m, s.kind, f)
                np.testing.assert_array_equal(
                    z[at : at + f.length], want[f.start : f.start + f.length]
                )
    # zarr also opens the whole checkpoint as a group.
    root = zarr.open_group(str(tmp_path / reader.ref.name), mode="r")
    assert "data" in root


@pytest.mark.parametrize("world", [1, 3, 4])
def test_partial_reads_equal_numpy_slices(tmp_path, small_chunks, world):
    tensors = _tensors(1)
    write_checkpoint(str(tmp_path), 1, tensors, world)
    reader = CheckpointReader.open(str(tmp_path))
    rng = np.random.default_rng(world)
    for kind, by_name in tensors.items():
        for name, t in by_name.items():
            want = to_numpy(t).reshape(-1)
            n = want.size
            ranges = [(0, n), (0, 0), (n, n), (n - 1, n)]
            for _ in range(40):
                lo = int(rng.integers(0, n + 1))
                ranges.append((lo, int(rng.integers(lo, n + 1))))
            for lo, hi in ranges:
                got = reader.read(name, kind, lo, hi)
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want[lo:hi])
            got_t = reader.read_torch(name, kind).reshape(t.shape)
            assert got_t.dtype == t.dtype and torch.equal(got_t, t)
    with pytest.raises(ZshardError):
        reader.read("a", "param", 5, 4)
    with pytest.raises(ZshardError):
        reader.read("a", "param", 0, 92)
    with pytest.raises(ZshardError):
        reader.read("nope", "param")


# -- corruption ---------------------------------------------------------------------------------


def _setup(tmp_path):
    write_checkpoint(str(tmp_path), 5, {"param": _tensors()["param"]}, 3)
    reader = CheckpointReader.open(str(tmp_path))
    m = reader.manifest
    (a,) = m.stored
    # Rank 1's shard holds elements of tensor "a" (91 of ~181 elements are "a"'s).
    frag = next(f for f in m.tensor("a", "param").fragments if f.rank == 1)
    path = tmp_path / reader.ref.name / a.shard_key(1)
    return SimpleNamespace(
        reader=reader, a=a, g=geo(a), m=m, frag=frag, path=path, dt=dtypes.dtype(a.dtype)
    )


def _chunk_of(s, frag) -> int:
    return (zarr_position(s.m, "param", frag) - frag.rank * s.a.shard_numel) // s.a.chunk_numel


def _flip(path, pos: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x40
    path.write_bytes(bytes(raw))


def _assert_detected(tmp_path, path, name, errors):
    report = verify(str(tmp_path), all_faults=True)
    assert not report.ok
    assert any(str(path) in f and repr(name) in f for f in report.faults), report.faults
    # The first fault alone is reported without --all.
    assert len(verify(str(tmp_path)).faults) == 1
    fresh = CheckpointReader.open(str(tmp_path))
    with pytest.raises(errors) as info:
        fresh.read(name, "param")
    assert isinstance(info.value, ZshardError)
    assert repr(name) in str(info.value) and str(path) in str(info.value)
    return report


def test_clean_checkpoint_verifies(tmp_path, small_chunks):
    s = _setup(tmp_path)
    report = verify(str(tmp_path))
    assert report.ok and report.faults == []
    assert report.chunks == 3 * s.g.n_chunks
    assert report.bytes_read == 3 * s.g.n_chunks * chunk_nbytes(s.g, s.dt)


@pytest.mark.parametrize("where", ["data", "crc"])
def test_flipped_byte_in_a_chunk(tmp_path, small_chunks, where):
    s = _setup(tmp_path)
    c = _chunk_of(s, s.frag)
    start = index_nbytes(s.g.n_chunks) + c * chunk_nbytes(s.g, s.dt)
    _flip(s.path, start + (1 if where == "data" else chunk_nbytes(s.g, s.dt) - 2))
    report = _assert_detected(tmp_path, s.path, "a", CorruptDataError)
    assert any(f"chunk {c} fails its crc32c" in f for f in report.faults)
    # Tensors in other chunks stay readable: the damage is contained.
    fresh = CheckpointReader.open(str(tmp_path))
    for t in fresh.iter_tensors():
        if not [f for f in t.fragments if f.rank == 1 and _chunk_of(s, f) == c]:
            np.testing.assert_array_equal(
                fresh.read(t.name, "param"), s.reader.read(t.name, "param")
            )


def test_flipped_byte_in_the_index(tmp_path, small_chunks):
    s = _setup(tmp_path)
    _flip(s.path, 3)
    report = _assert_detected(tmp_path, s.path, "a", CorruptDataError)
    assert any("index" in f for f in report.faults)


def test_index_with_valid_crc_but_wrong_layout(tmp_path, small_chunks):
    # A well-formed but foreign index (say, from a zarr writer with another chunk order) is
    # refused: zshard reads chunks at canonical offsets.
    s = _setup(tmp_path)
    raw = bytearray(s.path.read_bytes())
    n = s.g.n_chunks
    body = bytearray(raw[: n * 16])
    body[0:8], body[16:24] = body[16:24], body[0:8]
    raw[: n * 16] = body
    raw[n * 16 : n * 16 + 4] = np.uint32(crc32c.crc32c(bytes(body))).tobytes()
    s.path.write_bytes(bytes(raw))
    report = _assert_detected(tmp_path, s.path, "a", CorruptDataError)
    assert any("does not match" in f for f in report.faults)


def test_truncated_shard(tmp_path, small_chunks):
    s = _setup(tmp_path)
    raw = s.path.read_bytes()
    assert len(raw) == shard_nbytes(s.g, s.dt)
    # Cut inside the chunk that holds rank 1's part of "a"; every later chunk is gone too.
    chunk = _chunk_of(s, s.frag)
    s.path.write_bytes(raw[: index_nbytes(s.g.n_chunks) + chunk * chunk_nbytes(s.g, s.dt) + 5])
    report = _assert_detected(tmp_path, s.path, "a", (CorruptDataError, StorageError))
    assert any("truncated" in f for f in report.faults)


def test_missing_shard(tmp_path, small_chunks):
    s = _setup(tmp_path)
    os.remove(s.path)
    report = _assert_detected(tmp_path, s.path, "a", StorageError)
    assert any("missing" in f for f in report.faults)


def test_corrupt_array_metadata_and_rank_state(tmp_path, small_chunks):
    write_checkpoint(
        str(tmp_path), 2, {"param": _tensors()["param"]}, 2, rank_state=[{"r": 0}, {"r": 1}]
    )
    reader = CheckpointReader.open(str(tmp_path))
    assert reader.read_rank_state(1) == {"r": 1}
    step = tmp_path / reader.ref.name
    (step / "ranks" / "rank-00001.json").write_bytes(b'{"crc32c":"00000000","state":{"r":1}}')
    (a,) = reader.manifest.stored
    meta = step / a.path / "zarr.json"
    meta.write_text(meta.read_text().replace('"float32"', '"float64"'))
    report = verify(str(tmp_path), all_faults=True)
    assert any("array metadata does not match" in f for f in report.faults)
    assert any("rank-00001.json" in f and "crc32c" in f for f in report.faults)
    with pytest.raises(CorruptDataError):
        CheckpointReader.open(str(tmp_path)).read_rank_state(1)


def test_writer_refuses_path_like_names_before_writing(tmp_path):
    g = FlatGroup("../escape", 4, 4)
    t = TensorEntry("x", "param", (4,), "float32", (layout.Fragment("../escape", 0, 0, 0, 4),))
    with pytest.raises(ManifestError, match="identifier"):
        CheckpointWriter(
            str(tmp_path / "root"),
            1,
            Layout(1, 0, (g,)),
            [ArrayEntry("../escape", "param", "float32")],
            [t],
        )
    assert not (tmp_path / "root").exists()
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_missing_shards(tmp_path):
    from zshard.store.layout import pack

    g, fr = pack("g0", [("x", 10)], 2)
    w = CheckpointWriter(
        str(tmp_path),
        1,
        Layout(2, 1, (g,)),
        [ArrayEntry("g0", "param", "float32")],
        [TensorEntry("x", "param", (10,), "float32", tuple(fr["x"]))],
    )
    w.prepare()
    w.write_shard("g0", "param", np.zeros(5, dtype=np.float32), rank=0)
    with pytest.raises(CorruptDataError, match=r"ranks \[1\]"):
        w.commit()
    assert not (tmp_path / "step-00000001" / "manifest.json").exists()
    with pytest.raises(ZshardError):
        CheckpointReader.open(str(tmp_path))


def test_bf16_and_bool_survive_the_store(tmp_path, small_chunks):
    g = torch.Generator().manual_seed(3)
    tensors = {
        "bf": {"x": torch.randn(50, generator=g).to(torch.bfloat16)},
        "mask": {"x": torch.rand(50, generator=g) > 0.5},
    }
    write_checkpoint(str(tmp_path), 1, tensors, 3)
    reader = CheckpointReader.open(str(tmp_path))
    assert torch.equal(read_all(reader, "bf")["x"], tensors["bf"]["x"])
    assert torch.equal(read_all(reader, "mask")["x"], tensors["mask"]["x"])
    assert verify(str(tmp_path)).ok


def test_chunk_cache_serves_only_bytes_outside_a_hole():
    from zshard.store.shard import ChunkCache

    cache = ChunkCache(capacity=2)
    chunk = np.arange(64, dtype=np.uint8)
    cache.put("k", 3, chunk, hole=(16, 32))  # bytes 16-31 went to the first reader's output
    assert cache.held("k", 3)
    assert cache.get("k", 3, 0, 16) is chunk and cache.get("k", 3, 32, 64) is chunk
    assert cache.get("k", 3, 8, 20) is None and cache.get("k", 3) is None
    cache.put("k", 3, chunk)  # read again whole: no hole left
    assert cache.get("k", 3, 16, 32) is chunk
    cache.put("k", 4, chunk, hole=(0, 8))
    cache.put("k", 5, chunk)  # over capacity: the oldest goes, with its hole
    assert not cache.held("k", 3) and cache.get("k", 4, 0, 8) is None
