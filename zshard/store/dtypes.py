"""Logical dtypes and how they are stored.

The manifest records each logical tensor's *logical* dtype (``bfloat16``); zarr stores a numpy
dtype. bfloat16 and float8 have no numpy dtype, so their bytes are stored as a same-width unsigned
integer view and reinterpreted on read. Names follow torch (``torch.bfloat16`` -> ``"bfloat16"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from zshard.errors import InvalidArgumentError


@dataclass(frozen=True)
class DType:
    """A logical dtype: its name, the numpy dtype its bytes are stored as, and its width."""

    name: str
    storage: str  # numpy / zarr v3 data_type name, little-endian
    itemsize: int
    is_float: bool
    safetensors: str  # the safetensors header code

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.storage).newbyteorder("<")


_ALL = [
    DType("float64", "float64", 8, True, "F64"),
    DType("float32", "float32", 4, True, "F32"),
    DType("float16", "float16", 2, True, "F16"),
    DType("bfloat16", "uint16", 2, True, "BF16"),
    DType("float8_e4m3fn", "uint8", 1, True, "F8_E4M3"),
    DType("float8_e5m2", "uint8", 1, True, "F8_E5M2"),
    DType("int64", "int64", 8, False, "I64"),
    DType("int32", "int32", 4, False, "I32"),
    DType("int16", "int16", 2, False, "I16"),
    DType("int8", "int8", 1, False, "I8"),
    DType("uint64", "uint64", 8, False, "U64"),
    DType("uint32", "uint32", 4, False, "U32"),
    DType("uint16", "uint16", 2, False, "U16"),
    DType("uint8", "uint8", 1, False, "U8"),
    DType("bool", "bool", 1, False, "BOOL"),
]
DTYPES: dict[str, DType] = {d.name: d for d in _ALL}
_BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _ALL}
# Aliases users type on the command line.
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def dtype(name: str) -> DType:
    """Look up a logical dtype by name or alias (``bf16``); a clear error names the choices."""
    key = _ALIASES.get(name, name)
    try:
        return DTYPES[key]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown dtype {name!r}; expected one of {', '.join(sorted(DTYPES))}"
        ) from None


class Shaped:
    """``numel`` and ``nbytes`` of a tensor record with a ``shape`` and a logical ``dtype`` name
    (the manifest's entries, the converters' source tensors)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype(self.dtype).itemsize


def from_safetensors(code: str) -> DType:
    try:
        return _BY_SAFETENSORS[code]
    except KeyError:
        raise InvalidArgumentError(f"unsupported safetensors dtype {code!r}") from None


def from_torch(t: object) -> DType:
    """The logical dtype of a ``torch.dtype`` (``torch.bfloat16`` -> bfloat16)."""
    return dtype(str(t).removeprefix("torch."))


def to_torch(d: DType) -> object:
    import torch  # why: heavy; only the torch-facing paths call this

    return getattr(torch, d.name)
