"""The strict safetensors parser and streaming writer, and HF-style directory import."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

from tests.conftest import assert_same_tensors, awkward_state_dict, read_all, snapshot
from zshard.convert.importer import import_safetensors
from zshard.convert.safetensors_io import (
    INDEX_NAME,
    SafetensorsWriter,
    find_sources,
    read_header,
    read_tensor,
)
from zshard.errors import SafetensorsFormatError, ZshardError
from zshard.store.reader import CheckpointReader, to_numpy
from zshard.store.storage import open_storage


def _file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_header_and_ranged_reads_match_the_reference(tmp_path):
    sd = awkward_state_dict(3)
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"k": "v"})
    storage = open_storage(str(tmp_path))
    header = read_header(storage, "m.safetensors")
    assert header.metadata == {"k": "v"}
    assert {e.name for e in header.entries} == set(sd)
    for e in header.entries:
        t = sd[e.name]
        assert e.shape == tuple(t.shape)
        want = to_numpy(t).reshape(-1)
        np.testing.assert_array_equal(read_tensor(storage, "m.safetensors", e), want)
        if e.numel > 2:
            np.testing.assert_array_equal(read_tensor(storage, "m.safetensors", e, 1, 3), want[1:3])


def test_writer_output_loads_with_the_reference(tmp_path):
    sd = awkward_state_dict(4)
    storage = open_storage(str(tmp_path))
    from zshard.store import dtypes

    w = SafetensorsWriter(
        storage,
        "out.safetensors",
        [(n, dtypes.from_torch(t.dtype).name, tuple(t.shape)) for n, t in sd.items()],
        {"format": "pt"},
    )
    for t in sd.values():
        flat = to_numpy(t).reshape(-1)
        for lo in range(0, max(flat.size, 1), 5):  # in pieces
            w.write(flat[lo : lo + 5])
    w.close()
    raw = (tmp_path / "out.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0  # the data section is 8-byte aligned, as safetensors writes it
    assert_same_tensors(load_file(str(tmp_path / "out.safetensors")), sd)


def test_writer_refuses_incomplete_or_excess_data(tmp_path):
    storage = open_storage(str(tmp_path))
    w = SafetensorsWriter(storage, "x.safetensors", [("a", "float32", (4,))])
    w.write(np.zeros(3, dtype=np.float32))
    with pytest.raises(ZshardError, match="incomplete"):
        w.close()
    w = SafetensorsWriter(storage, "y.safetensors", [("a", "float32", (2,))])
    with pytest.raises(ZshardError, match="too much"):
        w.write(np.zeros(3, dtype=np.float32))
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
BAD_HEADERS = {
    "overlap": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        },
        8,
        "overlaps",
    ),
    "hole": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "hole"),
    "trailing garbage": (GOOD, 12, "trailing"),
    "truncated": (GOOD, 4, "truncated"),
    "size disagrees with shape": (
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        8,
        "do not hold",
    ),
    "unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, 16, "dtype"),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "shape"),
    "bool shape": ({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1, "shape"),
    "offsets reversed": (
        {"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}},
        4,
        "data_offsets",
    ),
    "extra key": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}},
        8,
        "entry",
    ),
    "entry not an object": ({"a": [1, 2]}, 0, "entry"),
    "metadata not strings": ({"__metadata__": {"k": 1}, **GOOD}, 8, "__metadata__"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_headers_are_rejected(tmp_path, case):
    header, nbytes, words = BAD_HEADERS[case]
    (tmp_path / "f.safetensors").write_bytes(_file(header, b"\0" * nbytes))
    with pytest.raises(SafetensorsFormatError, match=words) as info:
        read_header(open_storage(str(tmp_path)), "f.safetensors")
    assert "f.safetensors" in str(info.value)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_corruption_raises_only_zshard_errors(data):
    import tempfile

    g = torch.Generator().manual_seed(0)
    raw = bytearray(save({"a": torch.randn(3, 2, generator=g), "b": torch.arange(4)}))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "append"]))
        if op == "flip" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[data.draw(st.integers(0, len(raw))) :]
        else:
            raw += data.draw(st.binary(max_size=16))
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/f.safetensors", "wb") as f:
            f.write(raw)
        storage = open_storage(d)
        try:
            header = read_header(storage, "f.safetensors")
        except ZshardError:
            return
        for e in header.entries:
            assert read_tensor(storage, "f.safetensors", e).size == e.numel


def _hf_dir(tmp_path, sd: dict[str, torch.Tensor]) -> str:
    d = tmp_path / "hf"
    d.mkdir()
    names = list(sd)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(d)


def test_import_hf_directory(tmp_path):
    sd = awkward_state_dict(5)
    src = _hf_dir(tmp_path, sd)
    ref = import_safetensors(src, str(tmp_path / "ckpt"), 3)
    assert_same_tensors(read_all(CheckpointReader.open(ref.url)), sd)
    # A directory with a single model.safetensors works too.
    (tmp_path / "single").mkdir()
    save_file(sd, str(tmp_path / "single" / "model.safetensors"))
    ref = import_safetensors(str(tmp_path / "single"), str(tmp_path / "ckpt2"), 2)
    assert_same_tensors(read_all(CheckpointReader.open(ref.url)), sd)


@pytest.mark.parametrize(
    "index",
    [
        "{not json",
        json.dumps({"weight_map": {"a": "../outside.safetensors"}}),
        json.dumps({"weight_map": {"a": "sub/dir.safetensors"}}),
        json.dumps({"weight_map": ["a"]}),
        json.dumps({"no_weight_map": {}}),
    ],
)
def test_bad_index_is_rejected_before_writing(tmp_path, index):
    src = _hf_dir(tmp_path, {"a": torch.ones(2), "b": torch.zeros(3)})
    (tmp_path / "hf" / INDEX_NAME).write_text(index)
    before = snapshot(str(tmp_path))
    with pytest.raises(ZshardError):
        import_safetensors(src, str(tmp_path / "ckpt"), 2)
    assert snapshot(str(tmp_path)) == before


def test_tensor_in_two_files_is_rejected(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(d / "y.safetensors"))
    (d / INDEX_NAME).write_text(
        json.dumps({"weight_map": {"a": "x.safetensors", "b": "y.safetensors"}})
    )
    with pytest.raises(ZshardError, match="two files"):
        find_sources(str(d))
