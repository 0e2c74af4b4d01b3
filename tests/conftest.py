"""Shared fixtures and helpers for the store, conversion and CLI tests.

S3 tests run against one moto server on 127.0.0.1 per session; each test gets a fresh bucket and
reaches it through fsspec's standard configuration only (``FSSPEC_S3_ENDPOINT_URL``, AWS
variables), exactly as a user reaches MinIO, Ceph or R2. Nothing here contacts another address.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pytest
import torch

from tests.harness import AWS_DUMMY, moto_server, new_bucket, s3_fast_fail, use_bytecode_cache
from tests.harness import subprocess_env as subprocess_env  # tests/convert/test_deepspeed.py
from zshard.store import dtypes
from zshard.store.layout import Layout, pack
from zshard.store.manifest import ArrayEntry, TensorEntry
from zshard.store.reader import to_numpy
from zshard.store.writer import CheckpointWriter

# Child interpreters that inherit this process's environment (most `zshard train` runs of the
# tests, spawned ranks) share the bytecode cache too: see harness.use_bytecode_cache.
use_bytecode_cache(os.environ)

# ---------------------------------------------------------------------------------------------
# Data helpers


def awkward_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every dtype the round trips cover, in shapes that stress the layout arithmetic."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w.prime": torch.randn(7, 13, generator=g),  # fp32, prime sizes
        "w.half": torch.randn(3, 5, generator=g).to(torch.float16),
        "w.bf16": torch.randn(11, 3, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(0.25),  # 0-d
        "one": torch.tensor([3.5], dtype=torch.float32),  # one element
        "empty": torch.zeros(0),  # (0,)
        "tiny.i64": torch.tensor([-(2**40), 7], dtype=torch.int64),  # smaller than the world
        "i64.scalar": torch.tensor(123456789012, dtype=torch.int64),
        "i32": torch.randint(-(2**31), 2**31 - 1, (2, 3, 5), generator=g, dtype=torch.int32),
        "mask": torch.rand(17, generator=g) > 0.5,
        "bytes": torch.randint(0, 256, (3, 7), generator=g, dtype=torch.uint8),
        "empty.bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
    }


def assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        g = got[name]
        assert g.dtype == t.dtype, name
        assert tuple(g.shape) == tuple(t.shape), name
        assert torch.equal(g, t), name


def read_all(reader, kind: str = "param") -> dict[str, torch.Tensor]:
    """Every tensor of ``kind`` in a checkpoint as shaped torch tensors of the logical dtype."""
    return {
        t.name: reader.read_torch(t.name, kind).reshape(t.shape)
        for t in reader.iter_tensors({kind})
    }


def write_checkpoint(
    root: str,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    world_size: int,
    *,
    stage: int = 1,
    state: dict | None = None,
    rank_state: Sequence[dict] | None = None,
    ties: dict[str, str] | None = None,
    keep_last: int = 0,
    overwrite: bool = False,
) -> CheckpointWriter:
    """Write a committed checkpoint directly with ``CheckpointWriter``.

    ``tensors`` maps state kind -> name -> tensor. Like the engine, a name's kinds share one
    placement in group ``g0000`` (a kind may omit names); a kind whose sizes differ from that
    placement (e.g. a per-parameter scalar ``step``) gets a flat group of its own.
    """
    names: dict[str, int] = {}
    for by_name in tensors.values():
        for name, t in by_name.items():
            names.setdefault(name, t.numel())
    g, frags = pack("g0000", list(names.items()), world_size)
    groups = [g]
    placement = {}  # kind -> (group, fragments by name)
    for kind, by_name in tensors.items():
        if all(t.numel() == names[name] for name, t in by_name.items()):
            placement[kind] = (g, frags)
        else:
            own = pack(
                f"g{len(groups):04d}", [(n, t.numel()) for n, t in by_name.items()], world_size
            )
            groups.append(own[0])
            placement[kind] = own
    arrays: dict[str, ArrayEntry] = {}
    entries = []
    for kind, by_name in tensors.items():
        kind_dtypes = {dtypes.from_torch(t.dtype).name for t in by_name.values()}
        assert len(kind_dtypes) == 1, "one dtype per kind in this helper"
        kg, kfrags = placement[kind]
        arrays[kind] = ArrayEntry(kg.name, kind, kind_dtypes.pop())
        for name, t in by_name.items():
            entries.append(
                TensorEntry(name, kind, tuple(t.shape), arrays[kind].dtype, tuple(kfrags[name]))
            )
    layout = Layout(world_size, stage, tuple(groups))
    w = CheckpointWriter(
        root, step, layout, arrays.values(), entries, ties=ties, overwrite=overwrite
    )
    w.prepare()
    for kind, by_name in tensors.items():
        kg, kfrags = placement[kind]
        dt = dtypes.dtype(arrays[kind].dtype)
        flat = np.zeros(kg.partition_numel * world_size, dtype=dt.numpy)
        for name, t in by_name.items():
            data = to_numpy(t).reshape(-1)
            for f in kfrags[name]:
                flat[f.offset : f.offset + f.length] = data[f.start : f.start + f.length]
        for rank in range(world_size):
            lo, hi = kg.partition_range(rank)
            w.write_shard(kg.name, kind, flat[lo:hi], rank)
    for rank, rs in enumerate(rank_state or []):
        w.write_rank_state(rs, rank)
    w.commit(state, keep_last=keep_last)
    return w


def snapshot(path: str) -> dict[str, bytes | None]:
    """Every directory (None) and file (its bytes) under ``path``: to prove nothing changed."""
    tree: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, d), path)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                tree[os.path.relpath(full, path)] = fh.read()
    return tree


def temp_names(path: str) -> list[str]:
    """Leftover temporary files or directories (``*.tmp-*``, ``*.old-*``) under ``path``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            if ".tmp-" in n or ".old-" in n:
                found.append(os.path.join(dirpath, n))
    return found


# ---------------------------------------------------------------------------------------------
# Network guard: the store, conversion and CLI tests may only reach 127.0.0.0/8.

_GUARDED = ("tests/store/", "tests/convert/", "tests/test_cli.py")


def _loopback(address: object) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths
    host = str(address[0])
    return host.startswith("127.") or host in ("::1", "localhost")


@pytest.fixture(autouse=True)
def _loopback_only(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any in-process connection to an address outside 127.0.0.0/8 (e.g. real AWS)."""
    path = request.node.path.as_posix()
    if not any(g in path for g in _GUARDED):
        return
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: object) -> None:
        if not _loopback(address):
            raise AssertionError(f"test tried to reach {address!r}; only 127.0.0.0/8 is allowed")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if not _loopback(address):
            raise AssertionError(f"test tried to reach {address!r}; only 127.0.0.0/8 is allowed")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


# ---------------------------------------------------------------------------------------------
# Storage fixtures


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh ``memory://`` prefix, removed afterwards."""
    import fsspec

    name = f"zshard-test-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    with contextlib.suppress(FileNotFoundError):
        fs.rm(f"/{name}", recursive=True)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto S3 server on 127.0.0.1 for the whole session."""
    with moto_server() as endpoint:
        yield endpoint


def _point_fsspec_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    import fsspec.config
    import s3fs

    for key, value in AWS_DUMMY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", endpoint)
    # fsspec read FSSPEC_* at import time; apply the same configuration to the live process.
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint, **s3_fast_fail()})
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``s3://<fresh bucket>`` reachable through fsspec's standard configuration only."""
    import s3fs

    _point_fsspec_at(monkeypatch, moto_endpoint)
    yield new_bucket(moto_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
