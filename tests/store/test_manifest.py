"""The manifest: round trip, the pinned on-disk framing (format 2, and format 1 as still read),
checksum and lie detection."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import json_paths
from zshard.errors import FormatVersionError, ManifestError, ZshardError
from zshard.store.layout import Layout, pack
from zshard.store.manifest import FORMAT_VERSION, ArrayEntry, Manifest, TensorEntry


def small_manifest(format_version: int = FORMAT_VERSION) -> Manifest:
    g, fr = pack("g0", [("w", 6), ("b", 2)], 3)
    return Manifest(
        step=7,
        layout=Layout(3, 1, (g,)),
        arrays=[ArrayEntry("g0", "param", "float32")],
        tensors=[
            TensorEntry("w", "param", (2, 3), "float32", tuple(fr["w"])),
            TensorEntry("b", "param", (2,), "float32", tuple(fr["b"])),
        ],
        ties={"head": "w"},
        state={"lr": 0.5},
        created="2024-01-01T00:00:00+00:00",
        zshard_version="0.1.0",
        format_version=format_version,
    )


def packed_manifest() -> Manifest:
    """Stage 3 style: two groups (modules), both packed into the one param array."""
    g0, f0 = pack("g0", [("a.w", 6), ("a.b", 2)], 2)
    g1, f1 = pack("g1", [("c.w", 5)], 2)
    return Manifest(
        step=9,
        layout=Layout(2, 3, (g0, g1)),
        arrays=[ArrayEntry("g0", "param", "float32"), ArrayEntry("g1", "param", "float32")],
        tensors=[
            TensorEntry("a.w", "param", (2, 3), "float32", tuple(f0["a.w"])),
            TensorEntry("a.b", "param", (2,), "float32", tuple(f0["a.b"])),
            TensorEntry("c.w", "param", (5,), "float32", tuple(f1["c.w"])),
        ],
        created="2024-01-01T00:00:00+00:00",
        zshard_version="0.1.0",
    )


def richer_manifest() -> Manifest:
    """Two groups, several kinds (any optimizer's), a bf16 array, rank state, nested state."""
    g0, f0 = pack("g0000", [("a.w", 91), ("a.b", 7), ("s", 1)], 4)
    g1, f1 = pack("g0001", [("emb", 12)], 4)
    tensors = []
    for kind in ("param", "master", "exp_avg", "momentum_buffer"):
        dt = "bfloat16" if kind == "param" else "float32"
        tensors += [
            TensorEntry("a.w", kind, (7, 13), dt, tuple(f0["a.w"])),
            TensorEntry("a.b", kind, (7,), dt, tuple(f0["a.b"])),
            TensorEntry("s", kind, (), dt, tuple(f0["s"])),
        ]
    tensors.append(TensorEntry("emb", "buffer", (3, 4), "int64", tuple(f1["emb"])))
    tensors.append(TensorEntry("empty", "param", (0, 5), "bfloat16", ()))
    arrays = [
        ArrayEntry("g0000", k, "bfloat16" if k == "param" else "float32")
        for k in ("param", "master", "exp_avg", "momentum_buffer")
    ] + [ArrayEntry("g0001", "buffer", "int64")]
    return Manifest(
        step=123456,
        layout=Layout(4, 2, (g0, g1)),
        arrays=arrays,
        tensors=tensors,
        ties={"lm_head": "emb"},
        state={"optimizer": {"lr": 1e-3, "betas": [0.9, 0.95]}, "rng": "AAEC", "unicode": "ß→λ"},
        rank_state=4,
        created="2025-06-01T12:00:00+00:00",
        zshard_version="0.1.0",
    )


def frame(obj: Any) -> bytes:
    """Frame a (possibly lying) manifest body with a correct checksum."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    return b'{"crc32c":"' + f"{crc32c.crc32c(body):08x}".encode() + b'","manifest":' + body + b"}"


@pytest.mark.parametrize("make", [small_manifest, richer_manifest, packed_manifest])
def test_round_trip(make):
    m = make()
    raw = m.to_bytes()
    back = Manifest.from_bytes(raw, "test")
    assert back == m
    assert back.to_bytes() == raw
    assert back.tensor("c.w" if make is packed_manifest else "w" if make is small_manifest
                       else "a.w", "param").numel > 0  # fmt: skip


# Format 1, as zshard 0.1 wrote it: still read, field for field.
GOLDEN_V1 = (
    b'{"crc32c":"bfa95fe3","manifest":{"format":"zshard.checkpoint","format_version":1,'
    b'"zshard_version":"0.1.0","created":"2024-01-01T00:00:00+00:00","step":7,"layout":'
    b'{"world_size":3,"stage":1,"groups":[{"name":"g0","partition_numel":3,"chunk_numel":3}]},'
    b'"arrays":[{"group":"g0","kind":"param","dtype":"float32"}],"tensors":[{"name":"w",'
    b'"kind":"param","shape":[2,3],"dtype":"float32","fragments":[["g0",0,0,0,3],'
    b'["g0",1,3,3,3]]},{"name":"b","kind":"param","shape":[2],"dtype":"float32","fragments":'
    b'[["g0",2,6,0,2]]}],"ties":{"head":"w"},"state":{"lr":0.5},"rank_state":0}}'
)

# Format 2: groups packed into one array per (kind, dtype), each at its base in the shard.
GOLDEN_V2 = (
    b'{"crc32c":"cecfba94","manifest":{"format":"zshard.checkpoint","format_version":2,'
    b'"zshard_version":"0.1.0","created":"2024-01-01T00:00:00+00:00","step":9,"layout":'
    b'{"world_size":2,"stage":3,"groups":[{"name":"g0","partition_numel":4},{"name":"g1",'
    b'"partition_numel":3}]},"arrays":[{"kind":"param","dtype":"float32","shard_numel":8,'
    b'"chunk_numel":4,"groups":[["g0",0],["g1",4]]}],"tensors":[{"name":"a.w","kind":"param",'
    b'"shape":[2,3],"dtype":"float32","fragments":[["g0",0,0,0,4],["g0",1,4,4,2]]},{"name":'
    b'"a.b","kind":"param","shape":[2],"dtype":"float32","fragments":[["g0",1,6,0,2]]},'
    b'{"name":"c.w","kind":"param","shape":[5],"dtype":"float32","fragments":[["g1",0,0,0,3],'
    b'["g1",1,3,3,2]]}],"ties":{},"state":{},"rank_state":0}}'
)


def test_golden_bytes_pin_the_format():
    raw = packed_manifest().to_bytes()
    assert raw == GOLDEN_V2
    # The framing: {"crc32c":"<8 lowercase hex>","manifest":<body>} with crc32c over the body.
    prefix, middle = b'{"crc32c":"', b'","manifest":'
    assert raw.startswith(prefix) and raw[19:32] == middle and raw.endswith(b"}")
    digest, body = raw[11:19], raw[32:-1]
    assert digest == f"{crc32c.crc32c(body):08x}".encode()
    assert json.loads(body)["format_version"] == FORMAT_VERSION == 2
    m = Manifest.from_bytes(GOLDEN_V2, "golden")
    assert m == packed_manifest()
    (s,) = m.stored
    assert (s.path, s.shard_key(1), s.segments) == (
        "data/param.float32",
        "data/param.float32/c.1",
        (("g0", 0), ("g1", 4)),
    )
    assert m.locate("g1", "param") == (s, 4)


def test_format_1_is_still_read():
    m = Manifest.from_bytes(GOLDEN_V1, "golden v1")
    assert m == small_manifest(format_version=1)
    assert m.format_version == 1
    (s,) = m.stored
    assert (s.path, s.shard_key(2), s.chunk_numel, s.shard_numel) == (
        "data/g0/param",
        "data/g0/param/c/2",
        3,
        3,
    )
    assert m.to_bytes() == GOLDEN_V1  # field for field, as version 1 wrote it


def test_every_single_bit_flip_is_rejected():
    raw = small_manifest().to_bytes()
    rejected = 0
    for pos in range(len(raw)):
        for bit in range(8):
            bad = bytearray(raw)
            bad[pos] ^= 1 << bit
            with pytest.raises(ManifestError):
                Manifest.from_bytes(bytes(bad), "flipped")
            rejected += 1
    assert rejected == 8 * len(raw)


@pytest.mark.parametrize("cut", [0, 1, 10, 31, 32, 33, -2, -1])
def test_truncated_or_padded_manifest_is_rejected(cut):
    raw = small_manifest().to_bytes()
    with pytest.raises(ManifestError):
        Manifest.from_bytes(raw[:cut], "truncated")
    with pytest.raises(ManifestError):
        Manifest.from_bytes(raw + b" ", "padded")


def _tensor(obj: dict, name: str) -> dict:
    return next(t for t in obj["tensors"] if t["name"] == name)


def _set(path: list, value: Any) -> Callable[[dict], None]:
    def mutate(obj: dict) -> None:
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


LIES: dict[str, tuple[Callable[[dict], None], type[ZshardError], str]] = {
    "shape changed": (lambda o: _tensor(o, "w").update(shape=[2, 4]), ManifestError, "not stored"),
    "shape shrunk": (lambda o: _tensor(o, "w").update(shape=[5]), ManifestError, "past"),
    "fragment out of partition": (
        lambda o: _tensor(o, "b")["fragments"].__setitem__(0, ["g0", 1, 6, 0, 2]),
        ManifestError,
        "outside rank 1",
    ),
    "fragment past the buffer": (
        lambda o: _tensor(o, "b")["fragments"].__setitem__(0, ["g0", 2, 8, 0, 2]),
        ManifestError,
        "outside",
    ),
    "fragment rank outside world": (
        lambda o: _tensor(o, "b")["fragments"].__setitem__(0, ["g0", 3, 9, 0, 2]),
        ManifestError,
        "world size",
    ),
    "overlapping fragments": (
        lambda o: _tensor(o, "b")["fragments"].__setitem__(0, ["g0", 1, 4, 0, 2]),
        ManifestError,
        "overlap",
    ),
    "fragments of unknown group": (
        lambda o: _tensor(o, "b")["fragments"].__setitem__(0, ["zz", 2, 6, 0, 2]),
        ManifestError,
        "no array",
    ),
    "unknown tensor dtype": (lambda o: _tensor(o, "w").update(dtype="float128"), ManifestError, ""),
    "unknown array dtype": (_set(["arrays", 0, "dtype"], "complex64"), ManifestError, "dtype"),
    "dtype mismatch with array": (
        lambda o: _tensor(o, "w").update(dtype="bfloat16"),
        ManifestError,
        "differs",
    ),
    "negative step": (_set(["step"], -1), ManifestError, "step"),
    "boolean step": (_set(["step"], True), ManifestError, "step"),
    "float step": (_set(["step"], 7.0), ManifestError, "step"),
    "negative partition": (_set(["layout", "groups", 0, "partition_numel"], -3), ManifestError, ""),
    "zero chunk": (_set(["arrays", 0, "chunk_numel"], 0), ManifestError, "divide"),
    "chunk not dividing": (_set(["arrays", 0, "chunk_numel"], 2), ManifestError, "divide"),
    "shard too small": (
        lambda o: o["arrays"][0].update(shard_numel=2, chunk_numel=2),
        ManifestError,
        "outside",
    ),
    "base past the shard": (_set(["arrays", 0, "groups", 0, 1], 1), ManifestError, "outside"),
    "negative base": (_set(["arrays", 0, "groups", 0, 1], -1), ManifestError, "non-negative"),
    "array holds no group": (_set(["arrays", 0, "groups"], []), ManifestError, "no group"),
    "malformed array group": (_set(["arrays", 0, "groups", 0], ["g0"]), ManifestError, "group"),
    "shard_numel string": (_set(["arrays", 0, "shard_numel"], "3"), ManifestError, "shard_numel"),
    "boolean world size": (_set(["layout", "world_size"], True), ManifestError, "world_size"),
    "zero world size": (_set(["layout", "world_size"], 0), ManifestError, "world_size"),
    "negative world size": (_set(["layout", "world_size"], -2), ManifestError, "world_size"),
    "stage 7": (_set(["layout", "stage"], 7), ManifestError, "stage"),
    "negative fragment offset": (
        lambda o: _tensor(o, "b")["fragments"].__setitem__(0, ["g0", 2, -6, 0, 2]),
        ManifestError,
        "non-negative",
    ),
    "boolean fragment length": (
        lambda o: _tensor(o, "b")["fragments"].__setitem__(0, ["g0", 2, 6, 0, True]),
        ManifestError,
        "non-negative",
    ),
    "negative shape": (lambda o: _tensor(o, "b").update(shape=[-2]), ManifestError, "shape"),
    "boolean shape": (lambda o: _tensor(o, "b").update(shape=[True, 2]), ManifestError, "shape"),
    "huge shape": (lambda o: _tensor(o, "b").update(shape=[2**62]), ManifestError, ""),
    "implausible shape": (
        lambda o: _tensor(o, "b").update(shape=[2**40, 2**40]),
        ManifestError,
        "implausible",
    ),
    "short fragment": (
        lambda o: _tensor(o, "b").update(fragments=[["g0", 2, 6]]),
        ManifestError,
        "",
    ),
    "fragment not a list": (lambda o: _tensor(o, "b").update(fragments=[{}]), ManifestError, ""),
    "group name ../x": (_set(["layout", "groups", 0, "name"], "../x"), ManifestError, "identifier"),
    "group name a/b": (_set(["layout", "groups", 0, "name"], "a/b"), ManifestError, "identifier"),
    "group name empty": (_set(["layout", "groups", 0, "name"], ""), ManifestError, "identifier"),
    "array group ../x": (_set(["arrays", 0, "groups", 0, 0], "../x"), ManifestError, "identifier"),
    "state kind a/b": (_set(["arrays", 0, "kind"], "a/b"), ManifestError, "identifier"),
    "tensor kind ..": (lambda o: _tensor(o, "w").update(kind=".."), ManifestError, "identifier"),
    "array of unknown group": (_set(["arrays", 0, "groups", 0, 0], "g9"), ManifestError, ""),
    "duplicate array": (lambda o: o["arrays"].append(dict(o["arrays"][0])), ManifestError, "twice"),
    "duplicate tensor": (
        lambda o: o["tensors"].append(copy.deepcopy(o["tensors"][1])),
        ManifestError,
        "",
    ),
    "tie to nothing": (_set(["ties"], {"head": "nope"}), ManifestError, "tie"),
    "tie alias stored": (_set(["ties"], {"b": "w"}), ManifestError, "tie"),
    "ties not strings": (_set(["ties"], {"head": 3}), ManifestError, "ties"),
    "rank_state not world": (_set(["rank_state"], 2), ManifestError, "rank_state"),
    "newer format_version": (
        _set(["format_version"], FORMAT_VERSION + 1),
        FormatVersionError,
        "upgrade",
    ),
    "format_version string": (_set(["format_version"], "2"), ManifestError, "format_version"),
    "other format": (_set(["format"], "something.else"), ManifestError, "not a zshard"),
    "missing layout": (lambda o: o.pop("layout"), ManifestError, "layout"),
    "layout is a list": (_set(["layout"], []), ManifestError, "layout"),
    "tensors is a dict": (_set(["tensors"], {}), ManifestError, "tensors"),
    "state is a list": (_set(["state"], []), ManifestError, "state"),
    "body is a list": (lambda o: None, ManifestError, "object"),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_lying_manifests_are_rejected_cleanly(case):
    mutate, error, words = LIES[case]
    obj = small_manifest().to_json()
    mutate(obj)
    if case == "body is a list":
        obj = [obj]
    with pytest.raises(error) as info:
        Manifest.from_bytes(frame(obj), "lie.json")
    assert isinstance(info.value, ZshardError)
    assert words in str(info.value)
    assert str(info.value).startswith("lie.json")
    assert "\n" not in str(info.value)


PACKED_LIES: dict[str, tuple[Callable[[dict], None], str]] = {
    "groups overlap": (_set(["arrays", 0, "groups", 1, 1], 3), "overlap"),
    "group stored twice": (
        lambda o: o["arrays"][0]["groups"].__setitem__(1, ["g0", 4]),
        "twice",
    ),
    "group missing from its array": (lambda o: o["arrays"][0]["groups"].pop(), "no array"),
    "array split in two": (
        lambda o: o["arrays"].append({**o["arrays"][0], "groups": [["g1", 0]]}),
        "twice",
    ),
    "second group past the end": (_set(["arrays", 0, "groups", 1, 1], 6), "outside"),
}


@pytest.mark.parametrize("case", sorted(PACKED_LIES))
def test_lying_packed_arrays_are_rejected_cleanly(case):
    mutate, words = PACKED_LIES[case]
    obj = packed_manifest().to_json()
    mutate(obj)
    with pytest.raises(ManifestError) as info:
        Manifest.from_bytes(frame(obj), "lie.json")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_not_json_inside_valid_framing():
    body = b"{not json"
    raw = b'{"crc32c":"' + f"{crc32c.crc32c(body):08x}".encode() + b'","manifest":' + body + b"}"
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_bytes(raw, "x")
    deep = b"[" * 100_000 + b"]" * 100_000
    raw = b'{"crc32c":"' + f"{crc32c.crc32c(deep):08x}".encode() + b'","manifest":' + deep + b"}"
    with pytest.raises(ManifestError):
        Manifest.from_bytes(raw, "x")


def test_writer_side_validation_refuses_unserialisable_state():
    m = small_manifest()
    m.state = {"x": object()}
    with pytest.raises(ManifestError, match="JSON"):
        m.to_bytes()
    m.state = {"x": float("nan")}
    with pytest.raises(ManifestError):
        m.to_bytes()


# Random lies: replace any leaf or container of a valid manifest with any JSON value. Parsing
# must either succeed (the lie was harmless, e.g. a different `created`) or raise a ZshardError.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(["../x", "a/b", "g0", "float32", "bfloat16", "param"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_lies_raise_only_zshard_errors(data):
    obj = richer_manifest().to_json()
    paths = [p for p in json_paths(obj) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        target = obj
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement removed this path
    try:
        m = Manifest.from_bytes(frame(obj), "fuzz")
    except ZshardError:
        return
    # Whatever parsed is self-consistent and serialises again.
    assert m.errors() == []
    assert Manifest.from_bytes(m.to_bytes(), "again") == m
