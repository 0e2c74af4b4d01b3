"""``zshard inspect``: what a checkpoint holds, as one JSON-ready dict."""

from __future__ import annotations

from typing import Any

from zshard.store.reader import CheckpointReader


def summarize(ckpt: str) -> dict[str, Any]:
    reader = CheckpointReader.open(ckpt)
    m = reader.manifest
    tensors = [
        {
            "name": t.name,
            "kind": t.kind,
            "shape": list(t.shape),
            "dtype": t.dtype,
            "bytes": t.nbytes,
        }
        for t in m.tensors
    ]
    by_kind: dict[str, dict[str, int]] = {}
    for t in m.tensors:
        k = by_kind.setdefault(t.kind, {"tensors": 0, "bytes": 0, "elements": 0})
        k["tensors"] += 1
        k["bytes"] += t.nbytes
        k["elements"] += t.numel
    return {
        "url": reader.url,
        "step": m.step,
        "format_version": m.format_version,
        "zshard_version": m.zshard_version,
        "created": m.created,
        "world_size": m.layout.world_size,
        "stage": m.layout.stage,
        "groups": [
            {"name": g.name, "partition_numel": g.partition_numel}
            | ({"chunk_numel": g.chunk_numel} if m.format_version == 1 else {})
            for g in m.layout.groups
        ],
        "arrays": [
            {
                "path": s.path,
                "kind": s.kind,
                "dtype": s.dtype,
                "shard_numel": s.shard_numel,
                "chunk_numel": s.chunk_numel,
                "groups": len(s.segments),
            }
            for s in m.stored
        ],
        "tensors": tensors,
        "ties": dict(m.ties),
        "totals": {
            "tensors": len(tensors),
            "bytes": sum(t["bytes"] for t in tensors),
            "by_kind": by_kind,
        },
        "state_keys": sorted(m.state),
    }
