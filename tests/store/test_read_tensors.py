"""``CheckpointReader.read_tensors``: whole tensors in any order, the same bytes ``read`` gives,
the next range fetched on a read-ahead thread while the current one is verified, a corrupt
chunk caught with the reader left as good as new, and the thread gone when the iteration ends."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.conftest import write_checkpoint
from zshard.errors import CorruptDataError
from zshard.store import layout
from zshard.store.reader import CheckpointReader
from zshard.store.shard_format import index_nbytes
from zshard.store.shard_read import RangeRead


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 elements: tensors share edge chunks and span several."""
    monkeypatch.setattr(layout, "TARGET_CHUNK_NUMEL", 16)


def _tensors() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return {
        "param": {
            "a": torch.randn(7, 13, generator=g),
            "b": torch.randn(5, generator=g),
            "empty": torch.randn(0, generator=g),
            "c": torch.randn(3, 3, 3, generator=g),
            "d": torch.tensor(1.5),
            "e": torch.randn(41, generator=g),
        },
        "exp_avg": {"a": torch.randn(7, 13, generator=g), "e": torch.randn(41, generator=g)},
        "bf16": {"e": torch.randn(41, generator=g).to(torch.bfloat16)},
    }


def _outcome(reader: CheckpointReader, name: str, kind: str) -> object:
    try:
        return reader.read(name, kind).tobytes()
    except CorruptDataError:
        return CorruptDataError


@pytest.mark.parametrize("world", [1, 2, 3])
def test_read_tensors_gives_what_read_gives_in_any_order(tmp_path, small_chunks, world):
    write_checkpoint(str(tmp_path), 2, _tensors(), world)
    entries = list(CheckpointReader.open(str(tmp_path)).iter_tensors())
    for order in (entries, entries[::-1]):
        reader = CheckpointReader.open(str(tmp_path))
        got = list(reader.read_tensors(order))
        assert [t for t, _ in got] == order
        fresh = CheckpointReader.open(str(tmp_path))
        for t, a in got:
            want = fresh.read(t.name, t.kind)
            assert a.dtype == want.dtype and a.shape == (t.numel,)
            np.testing.assert_array_equal(a, want)


def test_next_range_is_fetched_on_a_thread_while_this_one_is_verified(
    tmp_path, small_chunks, monkeypatch
):
    write_checkpoint(str(tmp_path), 2, {"param": _tensors()["param"]}, 1)
    fetched: list[RangeRead] = []
    verified: list[RangeRead] = []
    threads: dict[str, set[str]] = {"fetch": set(), "verify": set()}
    overlapped: list[bool] = []
    cond = threading.Condition()
    real_fetch, real_verify = RangeRead.fetch, RangeRead.verify

    def fetch(self):
        # A range after the first waits (up to 5 s) for the range before it to be verified:
        # that happens only if verifying does not wait for this fetch to end.
        threads["fetch"].add(threading.current_thread().name)
        with cond:
            fetched.append(self)
            if len(fetched) > 1:
                prev = fetched[-2]
                overlapped.append(cond.wait_for(lambda: any(v is prev for v in verified), 5))
        real_fetch(self)

    def verify(self):
        threads["verify"].add(threading.current_thread().name)
        with cond:
            verified.append(self)
            cond.notify_all()
        real_verify(self)

    monkeypatch.setattr(RangeRead, "fetch", fetch)
    monkeypatch.setattr(RangeRead, "verify", verify)
    reader = CheckpointReader.open(str(tmp_path))
    assert len(list(reader.read_tensors(reader.iter_tensors()))) == 6
    assert len(fetched) == len(verified) == 5  # the empty tensor reads nothing
    assert overlapped == [True] * 4
    assert threads["fetch"] == {"zshard-read-ahead"}
    assert threads["verify"] == {threading.current_thread().name}


def test_a_corrupt_chunk_stops_the_iteration_and_leaves_no_unverified_chunk_cached(
    tmp_path, small_chunks
):
    tensors = {"param": _tensors()["param"]}
    write_checkpoint(str(tmp_path), 2, tensors, 1)
    reader = CheckpointReader.open(str(tmp_path))
    m = reader.manifest
    (s,) = m.stored
    order = [t.name for t in reader.iter_tensors()]

    def chunks(name: str) -> tuple[int, int]:
        (f,) = m.tensor(name, "param").fragments
        _, base = m.locate(f.group, "param")
        return (base + f.offset) // s.chunk_numel, (base + f.offset + f.length - 1) // s.chunk_numel

    # Corrupt a chunk that ends one tensor and starts the next in reading order: the first
    # one's read keeps it as an edge, and the next one is planned from it.
    nonempty = [n for n in order if n != "empty"]
    x, y = next((x, y) for x, y in zip(nonempty, nonempty[1:]) if chunks(x)[1] == chunks(y)[0])
    chunk = chunks(x)[1]
    path = tmp_path / reader.ref.name / s.shard_key(0)
    raw = bytearray(path.read_bytes())
    raw[index_nbytes(s.shard_numel // s.chunk_numel) + chunk * (s.chunk_numel * 4 + 4)] ^= 0x10
    path.write_bytes(bytes(raw))

    yielded = []
    with pytest.raises(CorruptDataError, match=repr(x)):
        for t, _ in reader.read_tensors(reader.iter_tensors()):
            yielded.append(t.name)
    assert yielded == order[: order.index(x)]
    # The reader that failed answers every read as a fresh one does: the corrupt chunk was
    # not left in its cache for the next tensor (or any) to be served from.
    fresh = CheckpointReader.open(str(tmp_path))
    assert _outcome(fresh, y, "param") is CorruptDataError
    for name in order:
        assert _outcome(reader, name, "param") == _outcome(fresh, name, "param"), name


def test_closing_the_iterator_early_leaves_the_reader_usable(tmp_path, small_chunks):
    write_checkpoint(str(tmp_path), 2, _tensors(), 2)
    reader = CheckpointReader.open(str(tmp_path))
    it = reader.read_tensors(reader.iter_tensors())
    first, _ = next(it)
    it.close()  # the read-ahead thread may be mid-fetch: close stops and joins it
    fresh = CheckpointReader.open(str(tmp_path))
    for t in reader.iter_tensors():
        np.testing.assert_array_equal(reader.read(t.name, t.kind), fresh.read(t.name, t.kind))
    assert first.name == "a"
    assert not [t for t in threading.enumerate() if t.name == "zshard-read-ahead"]


def test_remote_store_reads_the_same(tmp_path, small_chunks):
    url = f"memory://read-tensors-{tmp_path.name}"
    write_checkpoint(url, 2, _tensors(), 2)
    write_checkpoint(str(tmp_path), 2, _tensors(), 2)
    remote, local = CheckpointReader.open(url), CheckpointReader.open(str(tmp_path))
    want = {(t.name, t.kind): a for t, a in local.read_tensors(local.iter_tensors())}
    got = {(t.name, t.kind): a for t, a in remote.read_tensors(remote.iter_tensors())}
    assert got.keys() == want.keys() and len(got) == 9
    for k, a in got.items():
        np.testing.assert_array_equal(a, want[k])
