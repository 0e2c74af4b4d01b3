"""The partitioned-tensor store: layout arithmetic, manifest, shards, commit, read.

Public API; the modules behind it are implementation detail.
"""

from zshard.store.dtypes import DType, dtype
from zshard.store.layout import (
    FlatGroup,
    Fragment,
    Layout,
    ReadPiece,
    intersect,
    pack,
    plan_partition,
)
from zshard.store.manifest import FORMAT_VERSION, ArrayEntry, Manifest, StoredArray, TensorEntry
from zshard.store.reader import CheckpointReader, to_numpy, to_torch
from zshard.store.root import (
    CheckpointRef,
    apply_retention,
    committed_steps,
    latest_name,
    resolve,
    step_dir_name,
)
from zshard.store.storage import Storage, open_storage
from zshard.store.writer import CheckpointWriter, encode_bytes

__all__ = [
    "FORMAT_VERSION",
    "ArrayEntry",
    "CheckpointReader",
    "CheckpointRef",
    "CheckpointWriter",
    "DType",
    "FlatGroup",
    "Fragment",
    "Layout",
    "Manifest",
    "ReadPiece",
    "Storage",
    "StoredArray",
    "TensorEntry",
    "apply_retention",
    "committed_steps",
    "dtype",
    "encode_bytes",
    "intersect",
    "latest_name",
    "open_storage",
    "pack",
    "plan_partition",
    "resolve",
    "step_dir_name",
    "to_numpy",
    "to_torch",
]
