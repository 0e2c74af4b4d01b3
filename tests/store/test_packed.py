"""Format 2's packed shards: a rank writes one shard per (state kind, dtype) however many flat
groups (modules) there are; any tensor range still reads without reading whole shards, each
shard's index once; the write path (crc32c on its own thread, positional writes, batched
fsyncs) produces exactly the canonical bytes; S3 uploads are concurrent multipart uploads and
reads concurrent ranged GETs."""

from __future__ import annotations

import os
import threading
from collections import Counter

import numpy as np
import pytest
import zarr

from zshard.errors import StorageError, ZshardError
from zshard.store import dtypes, layout, shard, storage
from zshard.store import writer as writer_mod
from zshard.store.layout import Layout, pack
from zshard.store.manifest import ArrayEntry, TensorEntry
from zshard.store.reader import CheckpointReader
from zshard.store.storage import LocalStorage
from zshard.store.verify import verify
from zshard.store.writer import CheckpointWriter

KINDS = ("param", "exp_avg", "exp_avg_sq")


def modules(n: int, seed: int = 0, scale: int = 1) -> dict[str, dict[str, np.ndarray]]:
    """``n`` modules of a weight and a bias each (module -> name -> fp32 values)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        rows = 3 + (7 * i) % 11
        out[f"m{i}"] = {
            f"m{i}.w": rng.standard_normal((rows * scale, 5), dtype=np.float32),
            f"m{i}.b": rng.standard_normal(rows, dtype=np.float32),
        }
    return out


def values(name: str, kind: str, a: np.ndarray) -> np.ndarray:
    return a * np.float32(1.0 + KINDS.index(kind))


def save_stage3(
    root: str,
    mods: dict[str, dict[str, np.ndarray]],
    world: int,
    *,
    step: int = 1,
    bf16_param: bool = False,
    rank_state: bool = True,
) -> CheckpointWriter:
    """Stage 3 as the engine lays it out: one flat group per module, every kind of a module in
    its group; each rank's partitions written in stored order (what the engine does)."""
    groups, arrays, tensors, flats = [], [], [], {}
    for i, (_, params) in enumerate(mods.items()):
        g, frags = pack(f"g{i:04d}", [(n, a.size) for n, a in params.items()], world)
        groups.append(g)
        for kind in KINDS:
            dt = "bfloat16" if (bf16_param and kind == "param" and i % 2) else "float32"
            arrays.append(ArrayEntry(g.name, kind, dt))
            flat = np.zeros(g.partition_numel * world, dtype=dtypes.dtype(dt).numpy)
            for n, a in params.items():
                v = values(n, kind, a).reshape(-1)
                if dt == "bfloat16":
                    v = (v.view(np.uint32) >> 16).astype(np.uint16)
                tensors.append(TensorEntry(n, kind, a.shape, dt, tuple(frags[n])))
                for f in frags[n]:
                    flat[f.offset : f.offset + f.length] = v[f.start : f.start + f.length]
            flats[(g.name, kind)] = (g, flat)
    w = CheckpointWriter(root, step, Layout(world, 3, tuple(groups)), arrays, tensors)
    w.prepare()
    for rank in range(world):
        if rank_state:
            w.write_rank_state({"rank": rank}, rank)
        for s in w.stored:
            for gname, _ in s.segments:
                g, flat = flats[(gname, s.kind)]
                lo, hi = g.partition_range(rank)
                w.write_shard(gname, s.kind, flat[lo:hi], rank)
    w.commit({"step": step})
    return w


def files_by_rank(step_dir: str, world: int) -> dict[int, list[str]]:
    """The files each rank wrote (its shards and its rank state); rank 0's metadata aside."""
    out: dict[int, list[str]] = {r: [] for r in range(world)}
    for dirpath, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), step_dir)
            if n.startswith("c."):
                out[int(n[2:])].append(rel)
            elif n.startswith("rank-"):
                out[int(n[5:10])].append(rel)
    return out


def assert_reads(reader: CheckpointReader, mods: dict[str, dict[str, np.ndarray]]) -> None:
    for params in mods.values():
        for n, a in params.items():
            for kind in KINDS:
                got = reader.read_tensor(n, kind)
                t = reader.tensor(n, kind)
                want = values(n, kind, a)
                if t.dtype == "bfloat16":
                    want = (want.view(np.uint32) >> 16).astype(np.uint16)
                assert got.tobytes() == want.tobytes(), (n, kind)


@pytest.mark.parametrize("world", [1, 3])
def test_files_per_rank_do_not_grow_with_the_number_of_modules(tmp_path, world):
    counts = {}
    for n in (2, 9, 40):
        root = str(tmp_path / f"n{n}")
        mods = modules(n)
        w = save_stage3(root, mods, world)
        assert len(w.manifest.layout.groups) == n  # one flat group per module
        step = os.path.join(root, "step-00000001")
        per_rank = files_by_rank(step, world)
        counts[n] = {r: len(files) for r, files in per_rank.items()}
        # One shard per state kind (all fp32 here) and the rank state.
        assert all(c == len(KINDS) + 1 for c in counts[n].values()), per_rank
        assert w.files_per_rank() == len(KINDS) + 1
        # Rank 0's metadata does not grow either: zarr.json of the root, data/ and each array.
        metadata = [p for p in _all_files(step) if p.endswith("zarr.json")]
        assert len(metadata) == 2 + len(KINDS)
        reader = CheckpointReader.open(root)
        assert_reads(reader, mods)
        assert verify(root).ok
    assert counts[2] == counts[9] == counts[40]


def _all_files(path: str) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]


def test_two_dtypes_of_one_kind_make_two_arrays(tmp_path):
    mods = modules(6, seed=2)
    w = save_stage3(str(tmp_path), mods, 2, bf16_param=True)
    names = sorted(s.path for s in w.stored)
    assert names == [
        "data/exp_avg.float32",
        "data/exp_avg_sq.float32",
        "data/param.bfloat16",
        "data/param.float32",
    ]
    assert_reads(CheckpointReader.open(str(tmp_path)), mods)
    assert verify(str(tmp_path)).ok


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zarr_opens_the_packed_arrays(tmp_path, monkeypatch, world):
    monkeypatch.setattr(layout, "TARGET_CHUNK_NUMEL", 32)  # several chunks per shard
    mods = modules(7, seed=world)
    save_stage3(str(tmp_path), mods, world)
    reader = CheckpointReader.open(str(tmp_path))
    m = reader.manifest
    step = tmp_path / reader.ref.name
    for s in m.stored:
        z = zarr.open_array(str(step / s.path), mode="r")
        assert z.shape == (world * s.shard_numel,) and z.shards == (s.shard_numel,)
        assert z.chunks == (s.chunk_numel,) and s.chunks_per_shard > 1
        flat = z[:]
        for t in reader.iter_tensors({s.kind}):
            want = reader.read(t.name, t.kind)
            for f in t.fragments:
                base = s.base(f.group)
                p = m.layout.group(f.group).partition_numel
                at = f.rank * s.shard_numel + base + f.offset - f.rank * p
                np.testing.assert_array_equal(
                    flat[at : at + f.length], want[f.start : f.start + f.length]
                )
    assert "data" in zarr.open_group(str(step), mode="r")


def test_ranged_reads_touch_only_their_chunks_and_each_index_once(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "TARGET_CHUNK_NUMEL", 64)
    mods = modules(30, seed=5, scale=4)
    save_stage3(str(tmp_path), mods, 2)
    calls: Counter[str] = Counter()
    read_bytes: Counter[str] = Counter()
    real_range, real_into = LocalStorage.read_range, LocalStorage.readinto

    def read_range(self, key, start, stop):
        calls[f"range {key}"] += 1
        read_bytes[key] += stop - start
        return real_range(self, key, start, stop)

    def readinto(self, key, offset, buffers):
        calls[f"into {key}"] += 1
        read_bytes[key] += sum(b.nbytes for b in buffers)
        return real_into(self, key, offset, buffers)

    monkeypatch.setattr(LocalStorage, "read_range", read_range)
    monkeypatch.setattr(LocalStorage, "readinto", readinto)
    reader = CheckpointReader.open(str(tmp_path))
    s, _ = reader.manifest.locate("g0017", "exp_avg")
    geo = shard.Geometry(s.shard_numel, s.chunk_numel, 4)
    assert geo.n_chunks > 20
    # One small tensor from the middle of a packed shard: its chunks only, plus the index.
    got = reader.read_tensor("m17.b", "exp_avg")
    assert got.tobytes() == values("m17.b", "exp_avg", mods["m17"]["m17.b"]).tobytes()
    shard_keys = [k for k in read_bytes if "/c." in k]
    for key in shard_keys:
        assert read_bytes[key] <= geo.index_nbytes + 2 * geo.chunk_nbytes, (key, read_bytes)
    # Every tensor of every kind: each shard's index is read once, whatever the number of reads.
    calls.clear()
    assert_reads(reader, mods)
    index_reads = {k: v for k, v in calls.items() if k.startswith("range ") and "/c." in k}
    assert all(v == 1 for v in index_reads.values()), index_reads


def test_groups_out_of_order_are_refused(tmp_path):
    mods = modules(3)
    groups, arrays, tensors = [], [], []
    for i, (_, params) in enumerate(mods.items()):
        g, frags = pack(f"g{i:04d}", [(n, a.size) for n, a in params.items()], 1)
        groups.append(g)
        arrays.append(ArrayEntry(g.name, "param", "float32"))
        tensors += [
            TensorEntry(n, "param", a.shape, "float32", tuple(frags[n])) for n, a in params.items()
        ]
    w = CheckpointWriter(str(tmp_path), 1, Layout(1, 3, tuple(groups)), arrays, tensors)
    w.prepare()
    w.write_shard("g0001", "param", np.zeros(groups[1].partition_numel, np.float32))
    with pytest.raises(ValueError, match="in their order"):
        w.write_shard("g0000", "param", np.zeros(groups[0].partition_numel, np.float32))
    with pytest.raises(ZshardError, match="failed"):
        w.write_shard("g0002", "param", np.zeros(groups[2].partition_numel, np.float32))
    w.abort()
    assert not (tmp_path / "step-00000001").exists()


def test_large_pieces_checksum_on_the_crc_thread(tmp_path, monkeypatch):
    """Pieces over CRC_THREAD_MIN_BYTES: checksums on the crc thread, bytes identical to the
    inline path, chunk boundaries anywhere inside pieces."""
    threads: set[str] = set()
    real = shard._Running.update

    def update(self, data, last):
        threads.add(threading.current_thread().name)
        return real(self, data, last)

    monkeypatch.setattr(shard._Running, "update", update)
    monkeypatch.setattr(layout, "TARGET_CHUNK_NUMEL", 100_003)  # chunks cut pieces anywhere
    rng = np.random.default_rng(9)
    big = {
        "big.w": rng.standard_normal((700, 1001), dtype=np.float32),
        "big.b": np.ones(3, np.float32),
    }
    mods = {"big": big, **modules(3, seed=9)}
    save_stage3(str(tmp_path / "threaded"), mods, 2)
    assert any(t.startswith("zshard-crc") for t in threads), threads
    monkeypatch.setattr(shard, "CRC_THREAD_MIN_BYTES", 1 << 60)  # everything inline
    threads.clear()
    save_stage3(str(tmp_path / "inline"), mods, 2)
    assert not any(t.startswith("zshard-crc") for t in threads), threads
    a, b = tmp_path / "threaded" / "step-00000001", tmp_path / "inline" / "step-00000001"
    for rel in sorted(os.path.relpath(p, a) for p in _all_files(str(a))):
        if rel.endswith("manifest.json"):
            continue  # holds the creation time
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert verify(str(tmp_path / "threaded")).ok
    assert_reads(CheckpointReader.open(str(tmp_path / "threaded")), mods)


def test_one_batched_sync_per_writer(tmp_path, monkeypatch):
    """Everything one writer wrote (the shards and rank state of every rank it wrote, rank 0's
    metadata) becomes durable together (one fsync each, concurrently), then one fsync per
    directory; the manifest after them, on its own."""
    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("dir" if os.path.isdir(path) else "file", path))
        return real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    save_stage3(str(tmp_path), modules(12), 2)
    files = [os.path.basename(p).split(".tmp-")[0] for k, p in events if k == "file"]
    # 3 shards and a rank state per rank + 2 + 3 zarr.json, then the manifest; `latest` is not
    # fsynced.
    assert sorted(files[:-1]) == sorted(
        ["c.0", "c.1"] * 3 + ["rank-00000.json", "rank-00001.json"] + ["zarr.json"] * 5
    )
    assert files[-1] == "manifest.json"
    dirs = [p for k, p in events if k == "dir"]
    assert len(dirs) == len(set(dirs[:-1])) + 1  # each directory once, + the commit's


def test_a_jobs_rank_publishes_its_shards_when_its_last_one_is_complete(tmp_path):
    """A job's process writes its own rank (no rank argument) and reaches the barrier without
    calling finish(): its shards and rank state are published once its last shard is done."""
    g, frags = pack("g", [("w", 10)], 2)
    arrays = [ArrayEntry("g", "param", "float32")]
    tensors = [TensorEntry("w", "param", (10,), "float32", tuple(frags["w"]))]
    lay = Layout(2, 1, (g,))
    w0 = CheckpointWriter(str(tmp_path), 1, lay, arrays, tensors, rank=0)
    w0.prepare()
    w1 = CheckpointWriter(str(tmp_path), 1, lay, arrays, tensors, rank=1)
    w1.write_rank_state({"rank": 1})
    w1.write_shard("g", "param", np.arange(5, 10, dtype=np.float32))
    step = tmp_path / "step-00000001"
    shards = [n for n in os.listdir(step / "data" / "param.float32") if n.startswith("c.")]
    assert shards == ["c.1"]  # published: no temporary name
    assert os.path.exists(step / "ranks" / "rank-00001.json")
    w0.write_rank_state({"rank": 0})
    w0.write_shard("g", "param", np.arange(5, dtype=np.float32))
    w0.commit()
    got = CheckpointReader.open(str(tmp_path)).read("w", "param")
    assert np.array_equal(got, np.arange(10, dtype=np.float32))


def test_a_writer_of_many_ranks_flushes_before_its_batch_grows_too_large(tmp_path, monkeypatch):
    """A process writing many ranks keeps at most about ``_MAX_BATCH_FILES`` files open."""
    monkeypatch.setattr(writer_mod, "_MAX_BATCH_FILES", 4)
    sizes: list[int] = []
    real_flush = storage.SyncBatch.flush

    def flush(self):
        sizes.append(len(self))
        return real_flush(self)

    monkeypatch.setattr(storage.SyncBatch, "flush", flush)
    mods = modules(5)
    save_stage3(str(tmp_path), mods, 4)
    flushed = [n for n in sizes if n]
    # 5 metadata files, the first rank state and shard, then 4 files per flush at most; every
    # rank's 3 shards and rank state made durable once.
    assert flushed[0] == 7 and max(flushed[1:]) <= 4 and sum(flushed) == 5 + 4 * (3 + 1)
    assert verify(str(tmp_path)).ok
    assert_reads(CheckpointReader.open(str(tmp_path)), mods)


# -- S3 (moto): multipart uploads and concurrent ranged GETs ---------------------------------------


@pytest.mark.s3
def test_s3_multipart_upload_and_concurrent_reads(s3_bucket, monkeypatch):
    import s3fs

    monkeypatch.setattr(storage, "PART_BYTES", 5 << 20)
    monkeypatch.setattr(storage, "READ_PART_BYTES", 1 << 20)
    calls: Counter[str] = Counter()
    real = s3fs.S3FileSystem._call_s3

    async def spy(self, method, *args, **kw):
        calls[method] += 1
        return await real(self, method, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    mods = {
        "emb": {"emb.w": np.random.default_rng(1).standard_normal((1 << 20, 4), dtype=np.float32)}
    }
    mods |= modules(5, seed=1)
    root = f"{s3_bucket}/root"
    save_stage3(root, mods, 1)
    # 16 MiB per kind: 4 parts of 5 MiB (the last smaller), uploaded as one multipart each.
    assert calls["create_multipart_upload"] == len(KINDS)
    assert calls["upload_part"] == 4 * len(KINDS)
    assert calls["complete_multipart_upload"] == len(KINDS)
    calls.clear()
    reader = CheckpointReader.open(root)
    assert (
        reader.read_tensor("emb.w", "exp_avg").tobytes()
        == values("emb.w", "exp_avg", mods["emb"]["emb.w"]).tobytes()
    )
    assert calls["get_object"] >= 16  # 1 MiB ranged GETs
    assert_reads(reader, mods)
    assert verify(root).ok


@pytest.mark.s3
def test_s3_part_failures_are_retried_then_nothing_is_published(s3_bucket, monkeypatch):
    import s3fs

    monkeypatch.setenv("ZSHARD_RETRY_BASE_S", "0.001")
    monkeypatch.setattr(storage, "PART_BYTES", 5 << 20)
    real = s3fs.S3FileSystem._call_s3
    failures = {"left": 2}

    async def flaky(self, method, *args, **kw):
        if method == "upload_part" and kw.get("PartNumber") == 2 and failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return await real(self, method, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", flaky)
    big = np.random.default_rng(3).standard_normal((3 << 18, 4), dtype=np.float32)  # 12 MiB
    fs = storage.open_storage(f"{s3_bucket}/objects")
    up = fs.open_positional("one", big.nbytes)
    up.pwrite(0, big.data.cast("B"))
    up.commit()
    assert failures["left"] == 0  # part 2 failed twice, and was retried
    assert fs.read("one") == big.tobytes()

    # A part that keeps failing: one StorageError naming the object; nothing published, and the
    # multipart upload aborted.
    failures["left"] = 10**9
    up = fs.open_positional("two", big.nbytes)
    with pytest.raises(StorageError) as info:
        up.pwrite(0, big.data.cast("B"))
        up.commit()
    assert "objects/two" in str(info.value) and "\n" not in str(info.value)
    assert not fs.exists("two")
    s3 = s3fs.S3FileSystem()
    bucket = s3_bucket.removeprefix("s3://")
    pending = s3.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert [u for u in pending if u["Key"].endswith("two")] == []
