"""The shard byte format: chunk geometry, the canonical index, crc32c and the zarr array
metadata, shared by the shard writers (shard.py) and readers (shard_read.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np

from zshard.store.dtypes import DType
from zshard.store.layout import FlatGroup

CRC_NBYTES = 4
INDEX_ENTRY_NBYTES = 16


@dataclass(frozen=True)
class Geometry:
    """The byte layout of one shard: ``shard_numel`` elements of ``itemsize`` bytes in chunks
    of ``chunk_numel``, each followed by its crc32c, after the index."""

    shard_numel: int
    chunk_numel: int
    itemsize: int

    @property
    def n_chunks(self) -> int:
        return self.shard_numel // self.chunk_numel

    @property
    def chunk_data_nbytes(self) -> int:
        return self.chunk_numel * self.itemsize

    @property
    def chunk_nbytes(self) -> int:
        """A chunk's bytes and its crc32c: the stride of chunks in the shard."""
        return self.chunk_numel * self.itemsize + CRC_NBYTES

    @property
    def index_nbytes(self) -> int:
        return index_nbytes(self.n_chunks)

    @property
    def nbytes(self) -> int:
        return self.index_nbytes + self.n_chunks * self.chunk_nbytes

    def chunk_offset(self, i: int) -> int:
        return self.index_nbytes + i * self.chunk_nbytes


def geometry(group: FlatGroup | Geometry, dt: DType) -> Geometry:
    """A format-1 partition's geometry (a group's own chunking), or ``group`` itself."""
    if isinstance(group, Geometry):
        return group
    return Geometry(group.partition_numel, group.chunk_numel, dt.itemsize)


def as_bytes(a: np.ndarray) -> memoryview:
    """A contiguous array's memory as a flat byte view (no copy)."""
    return np.ascontiguousarray(a).reshape(-1).data.cast("B")


def crc(data: memoryview | bytes | bytearray | np.ndarray, value: int = 0) -> int:
    """crc32c of ``data``, continuing from ``value`` (the crc of the bytes before it)."""
    return int(crc32c.crc32c(as_bytes(data) if isinstance(data, np.ndarray) else data, value))


def index_nbytes(n_chunks: int) -> int:
    return n_chunks * INDEX_ENTRY_NBYTES + CRC_NBYTES


def chunk_nbytes(group: FlatGroup | Geometry, dt: DType) -> int:
    return geometry(group, dt).chunk_nbytes


def shard_nbytes(group: FlatGroup | Geometry, dt: DType) -> int:
    return geometry(group, dt).nbytes


def encode_index(group: FlatGroup | Geometry, dt: DType) -> bytes:
    geo = geometry(group, dt)
    n = geo.n_chunks
    entries = np.empty((n, 2), dtype="<u8")
    entries[:, 0] = index_nbytes(n) + np.arange(n, dtype=np.uint64) * geo.chunk_nbytes
    entries[:, 1] = geo.chunk_nbytes
    body = entries.tobytes()
    return body + np.uint32(crc(body)).tobytes()


def array_metadata(
    group: FlatGroup | Geometry, world_size: int, dt: DType, separator: str = "/"
) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` of one stored array: ``world_size`` shards of ``group``'s
    geometry (format 1: one (flat group, kind) partition per shard, keys ``c/<rank>``; format 2:
    a stored array's packed shards, keys ``c.<rank>``)."""
    geo = geometry(group, dt)
    fill: bool | float | int = False if dt.storage == "bool" else 0
    checked = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [geo.shard_numel * world_size],
        "data_type": dt.storage,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [geo.shard_numel]},
        },
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": fill,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [geo.chunk_numel],
                    "codecs": checked,
                    "index_codecs": checked,
                    "index_location": "start",
                },
            }
        ],
        "attributes": {"zshard_logical_dtype": dt.name},
        "storage_transformers": [],
    }


def array_metadata_bytes(
    group: FlatGroup | Geometry, world_size: int, dt: DType, separator: str = "/"
) -> bytes:
    return json.dumps(array_metadata(group, world_size, dt, separator), indent=2).encode()


def shard_key(array_path: str, rank: int) -> str:
    return f"{array_path}/c/{rank}"
