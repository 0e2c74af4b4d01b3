"""Checkpoints of format version 1 stay readable: a small v1 checkpoint written by the v1 writer
(tests/fixtures/zshard_v1, made by tests/store/_make_v1_fixture.py) reads bitwise, verifies,
loads through every reading path (reader, verify, consolidate, reshard to the current format),
and zarr opens its arrays as it always could."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from zshard.store import dtypes
from zshard.store.reader import CheckpointReader
from zshard.store.verify import verify

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "zshard_v1"


def expected() -> dict[tuple[str, str], tuple[str, tuple[int, ...], bytes]]:
    raw = json.loads((FIXTURE / "expected.json").read_text())
    out = {}
    for key, v in raw.items():
        kind, name = key.split("/", 1)
        out[(kind, name)] = (v["dtype"], tuple(v["shape"]), base64.b64decode(v["bytes"]))
    return out


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A private copy: nothing a test does can touch the committed fixture."""
    dest = tmp_path / "v1"
    shutil.copytree(FIXTURE, dest)
    return dest


def test_v1_fixture_reads_bitwise(v1: Path) -> None:
    reader = CheckpointReader.open(str(v1))
    m = reader.manifest
    assert m.format_version == 1
    assert (m.step, m.layout.world_size, m.layout.stage) == (7, 2, 3)
    want = expected()
    assert {(t.kind, t.name) for t in m.tensors} == set(want)
    for (kind, name), (dt, shape, data) in want.items():
        t = reader.tensor(name, kind)
        assert (t.dtype, tuple(t.shape)) == (dt, shape)
        got = reader.read_tensor(name, kind)
        assert got.dtype == dtypes.dtype(dt).numpy and got.shape == shape
        assert got.tobytes() == data, (kind, name)
        # Every range, not only whole tensors: ranged reads cross chunks and partitions.
        flat = np.frombuffer(data, dtype=dtypes.dtype(dt).numpy)
        for lo in range(0, flat.size, 5):
            for hi in (lo, min(flat.size, lo + 1), min(flat.size, lo + 17), flat.size):
                assert reader.read(name, kind, lo, hi).tobytes() == flat[lo:hi].tobytes()
    # The tie, the non-tensor state and the per-rank state.
    assert reader.read_tensor("head.w", "param").tobytes() == want[("param", "attn.w")][2]
    assert m.state["extra"] == {"data": {"epoch": 1, "offset": 96}}
    for rank in range(2):
        assert reader.read_rank_state(rank)["rank"] == rank


def test_v1_fixture_verifies_and_zarr_opens_it(v1: Path) -> None:
    report = verify(str(v1), all_faults=True)
    assert report.ok, report.faults
    assert report.chunks == 44
    reader = CheckpointReader.open(str(v1))
    step = v1 / reader.ref.name
    want = expected()
    for a in reader.manifest.arrays:
        z = zarr.open_array(str(step / "data" / a.group / a.kind), mode="r")
        flat = z[:]
        for t in reader.iter_tensors({a.kind}):
            if not any(f.group == a.group for f in t.fragments):
                continue
            data = np.frombuffer(want[(t.kind, t.name)][2], dtype=flat.dtype)
            for f in t.fragments:
                if f.group == a.group:
                    np.testing.assert_array_equal(
                        flat[f.offset : f.offset + f.length], data[f.start : f.start + f.length]
                    )


def test_v1_fixture_converts(v1: Path, tmp_path: Path) -> None:
    """consolidate reads it; reshard rewrites it in the current format, bitwise."""
    from safetensors.numpy import load_file

    from zshard.convert.consolidate import consolidate
    from zshard.convert.reshard import reshard

    out = tmp_path / "model.safetensors"
    consolidate(str(v1), str(out), dtype="keep")
    got = load_file(str(out))
    want = expected()
    for (kind, name), (dt, _, data) in want.items():
        if kind != "param" or dt == "bfloat16":
            continue
        assert got[name].tobytes() == data, name
    ref = reshard(str(v1), 3, out=str(tmp_path / "resharded"))
    r = CheckpointReader.open(ref.url)
    for (kind, name), (_, _, data) in want.items():
        assert r.read_tensor(name, kind).tobytes() == data, (kind, name)
    assert verify(ref.url).ok
