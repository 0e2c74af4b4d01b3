"""Write tests/fixtures/zshard_v1/: a small format-version-1 checkpoint, kept to prove that newer
zshard still reads version 1 bitwise (tests/store/test_format_v1.py).

It was written once, by the version 1 writer (zshard at commit e7d6e4d), and committed; this
script documents how. It refuses to run against a writer of another format version, since the
point of the fixture is to hold bytes that an old zshard wrote::

    python -m tests.store._make_v1_fixture tests/fixtures/zshard_v1

Content: world size 2, stage 3, four flat groups (one per "module", as stage 3 lays them out),
state kinds param/master/exp_avg/exp_avg_sq/buffer, dtypes float32, bfloat16, int64 and bool,
a 0-d and an empty tensor, a tie, per-rank state, and chunks of 16 elements so that shards hold
several chunks and tensors cross chunk and partition boundaries. ``expected.json`` holds every
(kind, name)'s storage bytes (base64), its dtype and shape.
"""

from __future__ import annotations

import base64
import json
import os
import sys

import numpy as np

from zshard.store import layout
from zshard.store.layout import Layout, pack
from zshard.store.manifest import FORMAT_VERSION, ArrayEntry, TensorEntry
from zshard.store.writer import CheckpointWriter

WORLD = 2
STEP = 7


def values() -> dict[tuple[str, str], tuple[str, np.ndarray]]:
    """(kind, name) -> (logical dtype, storage-dtype array)."""
    rng = np.random.default_rng(20261203)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    out: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
    # Module "attn" (fp32 params): w, b, s (0-d)
    attn = {"attn.w": f32(7, 13), "attn.b": f32(5), "attn.s": np.float32(0.25).reshape(())}
    for n, a in attn.items():
        out[("param", n)] = ("float32", a)
        out[("exp_avg", n)] = ("float32", a * np.float32(0.5))
        out[("exp_avg_sq", n)] = ("float32", np.abs(a) * np.float32(0.125))
    # Module "mlp" (bf16 params, fp32 master): e, and an empty tensor
    e = f32(41)
    out[("master", "mlp.e")] = ("float32", e)
    out[("param", "mlp.e")] = ("bfloat16", (e.view(np.uint32) >> 16).astype(np.uint16))
    out[("exp_avg", "mlp.e")] = ("float32", e * np.float32(-1.5))
    out[("exp_avg_sq", "mlp.e")] = ("float32", e * e)
    out[("param", "mlp.empty")] = ("bfloat16", np.zeros((2, 0), dtype=np.uint16))
    for kind in ("master", "exp_avg", "exp_avg_sq"):
        out[(kind, "mlp.empty")] = ("float32", np.zeros((2, 0), dtype=np.float32))
    # Buffers: int64 counts and a bool mask, each dtype in a group of its own
    out[("buffer", "norm.count")] = ("int64", np.array([-(2**40), 7, 3], dtype=np.int64))
    out[("buffer", "norm.mask")] = ("bool", rng.random(17) > 0.5)
    return out


def main(dest: str) -> None:
    if FORMAT_VERSION != 1:
        raise SystemExit(f"this writer writes format {FORMAT_VERSION}; the fixture must be v1")
    layout.TARGET_CHUNK_NUMEL = 16
    vals = values()
    members = {
        "g0000": ["attn.w", "attn.b", "attn.s"],
        "g0001": ["mlp.e", "mlp.empty"],
        "g0002": ["norm.count"],
        "g0003": ["norm.mask"],
    }
    kinds = {
        "g0000": ["param", "exp_avg", "exp_avg_sq"],
        "g0001": ["param", "master", "exp_avg", "exp_avg_sq"],
        "g0002": ["buffer"],
        "g0003": ["buffer"],
    }
    groups, arrays, tensors, flats = [], [], [], {}
    for gname, names in members.items():
        first = kinds[gname][0]
        g, frags = pack(gname, [(n, vals[(first, n)][1].size) for n in names], WORLD)
        groups.append(g)
        for kind in kinds[gname]:
            dt = vals[(kind, names[0])][0]
            arrays.append(ArrayEntry(gname, kind, dt))
            flat = np.zeros(g.partition_numel * WORLD, dtype=vals[(kind, names[0])][1].dtype)
            for n in names:
                a = vals[(kind, n)][1].reshape(-1)
                tensors.append(TensorEntry(n, kind, vals[(kind, n)][1].shape, dt, tuple(frags[n])))
                for f in frags[n]:
                    flat[f.offset : f.offset + f.length] = a[f.start : f.start + f.length]
            flats[(gname, kind)] = (g, flat)
    w = CheckpointWriter(
        dest, STEP, Layout(WORLD, 3, tuple(groups)), arrays, tensors, ties={"head.w": "attn.w"}
    )
    w.prepare()
    for (gname, kind), (g, flat) in flats.items():
        for rank in range(WORLD):
            lo, hi = g.partition_range(rank)
            w.write_shard(gname, kind, flat[lo:hi], rank)
    for rank in range(WORLD):
        w.write_rank_state(
            {"rank": rank, "rng": base64.b64encode(bytes([rank] * 8)).decode()}, rank
        )
    w.commit({"train": {"global_step": STEP}, "extra": {"data": {"epoch": 1, "offset": 96}}})
    expected = {
        f"{kind}/{name}": {
            "dtype": dt,
            "shape": list(a.shape),
            "bytes": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode(),
        }
        for (kind, name), (dt, a) in sorted(vals.items())
    }
    with open(os.path.join(dest, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
