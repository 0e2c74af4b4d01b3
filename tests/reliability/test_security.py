"""A checkpoint from a stranger is safe to open: nothing unpickles, manifest and safetensors
header parsing survive fuzzing with clean ZshardErrors only, and paths in a manifest cannot
leave the checkpoint root.

Fuzzing: ~200 cases per target by default; ``ZSHARD_FUZZ=long`` runs 10,000 per target.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from typing import Any

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

import zshard.train as zt
from tests.harness import json_paths
from tests.reliability._workload import Workload, read_bytes
from zshard.convert.consolidate import consolidate
from zshard.convert.importer import import_safetensors
from zshard.convert.inspect import summarize
from zshard.convert.listing import list_checkpoints
from zshard.convert.reshard import reshard
from zshard.convert.safetensors_io import decode_header, parse_header_length
from zshard.errors import ManifestError, ZshardError
from zshard.store.manifest import Manifest
from zshard.store.reader import CheckpointReader
from zshard.store.root import resolve
from zshard.store.storage import LocalStorage
from zshard.store.verify import verify

LONG = os.environ.get("ZSHARD_FUZZ") == "long"
FUZZ = settings(
    max_examples=10_000 if LONG else 200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# -- no pickle -------------------------------------------------------------------------------------


def _forbidden(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("something tried to unpickle while loading zshard data")


class _NoUnpickler:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _forbidden()


def test_no_loading_path_unpickles(tmp_path, monkeypatch):
    import tests.train._engine_cases as cases

    # Inputs written before the trap is set: a checkpoint with optimizer state and rank state
    # from the engine, a store checkpoint, and a safetensors file.
    engine = zt.initialize(cases.make_model(), cases.config(1))
    cases.train(engine, range(2))
    engine.save(str(tmp_path / "engine"))
    wl = Workload(2)
    wl.save(str(tmp_path / "root"), 3)
    save_file({"w": torch.randn(4, 5), "b": torch.zeros(3)}, str(tmp_path / "w.safetensors"))

    monkeypatch.setattr(pickle, "loads", _forbidden)
    monkeypatch.setattr(pickle, "load", _forbidden)
    monkeypatch.setattr(pickle, "Unpickler", _NoUnpickler)
    monkeypatch.setattr(torch, "load", _forbidden)
    real_np_load = np.load

    def np_load(*args: Any, allow_pickle: bool = False, **kwargs: Any) -> Any:
        if allow_pickle:
            _forbidden()
        return real_np_load(*args, allow_pickle=False, **kwargs)

    monkeypatch.setattr(np, "load", np_load)

    for root in (str(tmp_path / "engine"), str(tmp_path / "root")):
        r = CheckpointReader.open(root)
        for t in r.manifest.tensors:
            r.read_tensor(t.name, t.kind)
        for rank in range(r.manifest.rank_state):
            r.read_rank_state(rank)
        assert verify(root, all_faults=True).ok
        summarize(root)
        list_checkpoints(root)
        reshard(root, 3, out=f"{root}-w3")
        consolidate(root, f"{root}.safetensors", include_optimizer=True)
    import_safetensors(str(tmp_path / "w.safetensors"), str(tmp_path / "imported"), 2)
    again = zt.initialize(cases.make_model(), cases.config(2))
    again.load(str(tmp_path / "engine"))
    assert again.global_step == 2


# -- paths cannot escape

HOSTILE = [
    "..", ".", "../x", "../../etc", "/etc/passwd", "/abs", "s3://bucket/x", "file:///etc",
    "memory://x", "a/b", "a\\b", "C:\\x", "C:x", ".hidden", "-rf", "~root", "x\x00y", "x\ny",
    "ｇ0000", "g0000/../../x", "", " ", "g" * 201, "%2e%2e",
]  # fmt: skip


def _reframe(path: str, obj: dict) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(b'{"crc32c":"' + f"{crc32c.crc32c(body):08x}".encode() + b'","manifest":')
        f.write(body + b"}")


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("field", ["group", "kind"])
def test_manifest_paths_cannot_escape_the_root(tmp_path, monkeypatch, name, field):
    root = str(tmp_path / "inside" / "root")
    Workload(2).save(root, 1)
    manifest = os.path.join(root, "step-00000001", "manifest.json")
    obj = json.loads(read_bytes(manifest)[32:-1])
    if field == "group":
        obj["layout"]["groups"][0]["name"] = name
        for a in obj["arrays"]:
            a["group"] = name
        for t in obj["tensors"]:
            for f in t["fragments"]:
                f[0] = name
    else:
        for a in obj["arrays"]:
            if a["kind"] == "param":
                a["kind"] = name
        for t in obj["tensors"]:
            if t["kind"] == "param":
                t["kind"] = name
    _reframe(manifest, obj)
    touched: list[str] = []
    for method in ("read", "read_range", "readinto", "exists", "size", "isdir", "listdir"):
        real = getattr(LocalStorage, method)

        def spy(self, key, *a, _real=real, **k):
            touched.append(os.path.normpath(self._p(key)))
            return _real(self, key, *a, **k)

        monkeypatch.setattr(LocalStorage, method, spy)
    with pytest.raises(ManifestError, match="identifier"):
        CheckpointReader.open(root)
    with pytest.raises(ManifestError):
        verify(root)
    inside = os.path.normpath(str(tmp_path / "inside" / "root"))
    assert touched and all(p == inside or p.startswith(inside + os.sep) for p in touched), touched


def test_latest_pointer_cannot_escape(tmp_path):
    (tmp_path / "elsewhere" / "step-00000009").mkdir(parents=True)
    root = tmp_path / "root"
    Workload(2).save(str(root), 1)
    for pointer in ("../elsewhere/step-00000009", "/etc", "s3://b/step-00000009", "step-00000009"):
        (root / "latest").write_text(pointer + "\n")
        assert resolve(str(root)).name == "step-00000001"


# -- fuzzing the parsers


def _manifest_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Workload(3, chunk=1024, rows=5).save(d, 4)
        return read_bytes(os.path.join(d, "step-00000004", "manifest.json"))


MANIFEST = _manifest_bytes()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
    | st.sampled_from(["../x", "/", "s3://b", "g0000", "param", "float32", "bfloat16"]),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)  # fmt: skip


def _frame(body: bytes) -> bytes:
    return b'{"crc32c":"' + f"{crc32c.crc32c(body):08x}".encode() + b'","manifest":' + body + b"}"


def _parse_manifest(raw: bytes) -> None:
    try:
        m = Manifest.from_bytes(raw, "fuzz")
    except ZshardError as e:
        assert "\n" not in str(e) or "JSON" in str(e)
        return
    assert m.errors() == []
    assert Manifest.from_bytes(m.to_bytes(), "again") == m


@FUZZ
@given(data=st.data())
def test_fuzz_manifest(data):
    mode = data.draw(st.sampled_from(["json", "body bytes", "raw bytes", "random body"]))
    if mode == "json":  # structure-aware lies with a correct checksum
        obj = json.loads(MANIFEST[32:-1])
        paths = [p for p in json_paths(obj) if p]
        for _ in range(data.draw(st.integers(1, 4))):
            path = data.draw(st.sampled_from(paths))
            target = obj
            try:
                for k in path[:-1]:
                    target = target[k]
                target[path[-1]] = data.draw(json_values)
            except (KeyError, IndexError, TypeError):
                continue
        raw = _frame(json.dumps(obj).encode())
    elif mode == "body bytes":  # byte-level damage to the body, checksum recomputed
        body = bytearray(MANIFEST[32:-1])
        for _ in range(data.draw(st.integers(1, 6))):
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] = data.draw(st.integers(0, 255))
        raw = _frame(bytes(body))
    elif mode == "raw bytes":  # damage anywhere, checksum left as it was
        raw_b = bytearray(MANIFEST)
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(raw_b) - 1))
        if op == "flip":
            raw_b[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw_b[i:]
        else:
            raw_b[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        raw = bytes(raw_b)
    else:
        raw = _frame(data.draw(st.binary(max_size=64)))
    _parse_manifest(raw)


SAFE = save({"a": torch.randn(3, 2), "b": torch.arange(4), "c": torch.zeros(0)})
(SAFE_N,) = struct.unpack("<Q", SAFE[:8])


def _parse_safetensors(raw: bytes) -> None:
    try:
        n = parse_header_length(raw[:8], len(raw), "fuzz")
        header = decode_header(raw[8 : 8 + n], len(raw), "fuzz")
    except ZshardError as e:
        assert "\n" not in str(e)
        return
    pos = header.data_start
    for e in header.entries:  # what parsed is a complete, in-bounds tiling of the file
        assert e.begin == pos and e.end >= e.begin and e.end <= len(raw)
        pos = e.end
    assert pos == len(raw)


entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", ""])
        | st.integers(),
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3) | json_values,
    }
)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(data):
    mode = data.draw(st.sampled_from(["entries", "header bytes", "raw bytes", "length"]))
    if mode == "entries":
        header = data.draw(st.dictionaries(st.text(max_size=6), entry | json_values, max_size=4))
        if data.draw(st.booleans()):
            header["__metadata__"] = data.draw(json_values)
        body = json.dumps(header).encode()
        tail = data.draw(st.binary(max_size=64))
        raw = struct.pack("<Q", len(body)) + body + tail
    elif mode == "header bytes":
        h = bytearray(SAFE[8 : 8 + SAFE_N])
        for _ in range(data.draw(st.integers(1, 4))):
            h[data.draw(st.integers(0, len(h) - 1))] = data.draw(st.integers(0, 255))
        raw = SAFE[:8] + bytes(h) + SAFE[8 + SAFE_N :]
    elif mode == "raw bytes":
        r = bytearray(SAFE)
        i = data.draw(st.integers(0, len(r) - 1))
        r[i] ^= data.draw(st.integers(1, 255))
        raw = bytes(r[: data.draw(st.integers(0, len(r)))])
    else:
        raw = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + data.draw(
            st.binary(max_size=32)
        )
    _parse_safetensors(raw)
