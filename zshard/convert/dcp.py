"""torch.distributed.checkpoint (DCP) directories as a zshard :class:`TensorSource`.

On disk (``FileSystemWriter``)::

    .metadata            pickled ``Metadata``: per flattened key, a TensorStorageMetadata (dtype,
                         global size, the chunks saved: offsets + sizes) or BytesStorageMetadata;
                         ``storage_data`` maps (key, chunk offsets) to (file, byte offset,
                         length); ``planner_data`` maps each flattened key to its path in the
                         saved (nested) state dict, e.g. ("optim", "state", "emb.weight", "exp_avg")
    __<rank>_<n>.distcp  the items: each tensor chunk a ``torch.save`` blob (the default
                         TORCH_SAVE serialization) or raw bytes; each bytes item a torch.save blob

``.metadata`` is read by a restricted unpickler that builds only DCP's metadata classes (torch's
own ``FileSystemReader.read_metadata`` unpickles it without restriction). Each chunk's blob is
opened without its data (``weights_only``, meta device) to find the byte offset of its data, and
a chunk becomes one piece per contiguous run of the tensor's flattened elements.

Naming follows ``get_state_dict``: model tensors under a common top-level key (``"model"``) are
named by their FQN, optimizer state under ``<prefix>.state.<fqn>.<key>`` becomes kind ``<key>``
of that FQN. A model tensor without optimizer state is a frozen ``param``, or a ``buffer`` when
it is saved whole while parameters are sharded. Tied parameters (saved under both names) are
recognised by identical bytes and stored once.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import numpy as np

from zshard.convert.pickles import (
    FileView,
    UnsafePickleError,
    open_binary,
    storage_offset,
    torch_load_meta,
)
from zshard.convert.tensor_source import Piece, PieceSource, SourceTensor, check_pieces
from zshard.errors import ZshardError
from zshard.store import dtypes
from zshard.store.storage import Storage, open_storage

METADATA = ".metadata"
_COMPARE_WINDOW = 4 << 20  # elements per read when comparing tied candidates


class DCPFormatError(ZshardError, ValueError):
    """A DCP checkpoint is incomplete, inconsistent or uses an unsupported feature."""


def is_dcp(storage: Storage) -> bool:
    return storage.exists(METADATA) and not storage.isdir(METADATA)


# -- .metadata, unpickled with an allowlist ------------------------------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"ExtensionRegistry"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses, torch dtypes and paths; refuses anything else."""

    def find_class(self, module: str, name: str) -> Any:
        import torch  # why: heavy; detecting formats (sources imports this module) needs no torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_metadata(storage: Storage, trust_pickle: bool = False) -> Any:
    where = f"{storage.url}/{METADATA}"
    raw = storage.read(METADATA)
    try:
        md = _MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise UnsafePickleError(
                f"{where}: can only be read by full unpickling ({e}), which can run code from "
                "the file; pass --trust-pickle if you trust where it came from"
            ) from None
        md = pickle.loads(raw)
    except Exception as e:
        raise DCPFormatError(f"{where}: not a readable DCP metadata file ({e})") from None
    if not hasattr(md, "state_dict_metadata") or not hasattr(md, "storage_data"):
        raise DCPFormatError(f"{where}: not DCP metadata (no state_dict_metadata/storage_data)")
    if md.storage_data is None:
        raise DCPFormatError(f"{where}: no storage_data; not written by FileSystemWriter")
    return md


# -- the source ---------------------------------------------------------------------------------


class DCPSource(PieceSource):
    """The model and optimizer state of a DCP checkpoint, by FQN and state kind."""

    format = "dcp"

    def __init__(self, src: str, *, trust_pickle: bool = False) -> None:
        storage = open_storage(src)
        super().__init__(storage, src)
        self.trust_pickle = trust_pickle
        md = read_metadata(storage, trust_pickle)
        where = storage.url
        locations: dict[tuple[str, tuple[int, ...]], Any] = {}
        for index, info in md.storage_data.items():
            locations[(index.fqn, tuple(int(o) for o in index.offset or ()))] = info
        planner = md.planner_data if isinstance(md.planner_data, dict) else {}
        paths = {
            key: tuple(str(p) for p in planner.get(key, (key,))) for key in md.state_dict_metadata
        }
        tensor_keys = [k for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")]
        optim: dict[str, dict[str, str]] = {}  # fqn -> kind -> flattened key
        model_keys: list[str] = []
        for key in tensor_keys:
            p = paths[key]
            if len(p) >= 3 and p[-3] == "state":
                optim.setdefault(p[-2], {})[p[-1]] = key
            else:
                model_keys.append(key)
        prefix = _common_prefix([paths[k] for k in model_keys])
        names = {k: ".".join(paths[k][prefix:]) for k in model_keys}
        self._files: dict[str, Any] = {}
        try:
            self._build(md, locations, model_keys, names, optim, where)
            self._find_ties()
            self._state(md, paths, optim, locations)
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()
        for t in self.tensors:
            check_pieces(t, where)

    def _build(
        self,
        md: Any,
        locations: dict[tuple[str, tuple[int, ...]], Any],
        model_keys: list[str],
        names: dict[str, str],
        optim: dict[str, dict[str, str]],
        where: str,
    ) -> None:
        sharded = any(len(md.state_dict_metadata[k].chunks) > 1 for k in model_keys)
        seen: set[str] = set()
        for key in model_keys:
            name = names[key]
            if name in seen:
                raise DCPFormatError(f"{where}: two tensors named {name!r}")
            seen.add(name)
            meta = md.state_dict_metadata[key]
            states = {
                k: v
                for k, v in optim.get(name, {}).items()
                if tuple(md.state_dict_metadata[v].size) == tuple(meta.size)
            }
            if states:
                kind = "param"
            elif sharded and len(meta.chunks) == 1 and _whole(meta.chunks[0], meta.size):
                kind = "buffer"  # replicated, not sharded like the parameters around it
            else:
                kind = "param"
            self.tensors.append(self._tensor(name, kind, key, meta, locations, where))
            for state_kind, skey in sorted(states.items()):
                smeta = md.state_dict_metadata[skey]
                self.tensors.append(self._tensor(name, state_kind, skey, smeta, locations, where))

    def _tensor(
        self,
        name: str,
        kind: str,
        key: str,
        meta: Any,
        locations: dict[tuple[str, tuple[int, ...]], Any],
        where: str,
    ) -> SourceTensor:
        shape = tuple(int(s) for s in meta.size)
        dt = dtypes.from_torch(meta.properties.dtype)
        pieces: list[Piece] = []
        for chunk in meta.chunks:
            offsets = tuple(int(o) for o in chunk.offsets)
            sizes = tuple(int(s) for s in chunk.sizes)
            if math.prod(sizes) == 0:
                continue
            info = locations.get((key, offsets))
            if info is None:
                raise DCPFormatError(
                    f"{where}: chunk {list(offsets)} of {key!r} has no storage entry; the "
                    "checkpoint is incomplete"
                )
            data = self._chunk_data(key, info, sizes, dt, where)
            pieces.extend(_runs(shape, offsets, sizes, info.relative_path, data, dt.itemsize))
        pieces.sort(key=lambda p: p.start)
        return SourceTensor(name, kind, shape, dt.name, tuple(pieces))

    def _chunk_data(
        self, key: str, info: Any, sizes: tuple[int, ...], dt: dtypes.DType, where: str
    ) -> int:
        """Byte offset in ``info.relative_path`` of the chunk's raw data."""
        path = str(info.relative_path)
        if "/" in path or "\\" in path or path in ("", ".", ".."):
            raise DCPFormatError(f"{where}: storage file {path!r} of {key!r} is outside it")
        if getattr(info, "transform_descriptors", None):
            raise DCPFormatError(
                f"{where}/{path}: {key!r} is stored with transforms "
                f"{list(info.transform_descriptors)} (e.g. compression); not supported"
            )
        nbytes = math.prod(sizes) * dt.itemsize
        if int(info.length) == nbytes:
            return int(info.offset)  # raw tensor bytes
        f = self._files.get(path)
        if f is None:
            if not self.storage.exists(path):
                raise DCPFormatError(f"{where}/{path}: data file missing (holds {key!r})")
            f = self._files[path] = open_binary(self.storage, path)
        view = FileView(f, int(info.offset), int(info.length))
        t = torch_load_meta(view, f"{where}/{path} ({key!r})", trust_pickle=self.trust_pickle)
        if not hasattr(t, "untyped_storage") or tuple(t.shape) != sizes:
            raise DCPFormatError(
                f"{where}/{path}: item {key!r} holds {getattr(t, 'shape', type(t).__name__)}, "
                f"expected a tensor of shape {list(sizes)}"
            )
        if dtypes.from_torch(t.dtype).name != dt.name:
            raise DCPFormatError(f"{where}/{path}: item {key!r} has dtype {t.dtype}, not {dt.name}")
        return int(info.offset) + storage_offset(t, f"{where}/{path}")

    def _find_ties(self) -> None:
        """A frozen ``param`` whose bytes equal a trained parameter's is that parameter saved
        under its second name (DCP writes tied parameters once per name)."""
        trained = {t.name for t in self.tensors if t.kind not in ("param", "buffer")}
        params = {t.name: t for t in self.tensors if t.kind == "param"}
        aliases: dict[str, str] = {}
        for name, t in params.items():
            if name in trained:
                continue
            for other in trained:
                o = params.get(other)
                if o is None or (o.shape, o.dtype) != (t.shape, t.dtype):
                    continue
                if self._equal(t, o):
                    aliases[name] = other
                    break
        if aliases:
            self.tensors = [t for t in self.tensors if t.name not in aliases]
            self.ties = aliases

    def _equal(self, a: SourceTensor, b: SourceTensor) -> bool:
        for lo in range(0, a.numel, _COMPARE_WINDOW):
            hi = min(lo + _COMPARE_WINDOW, a.numel)
            if not np.array_equal(
                self.read(a, lo, hi).view(np.uint8), self.read(b, lo, hi).view(np.uint8)
            ):
                return False
        return True

    def _state(
        self,
        md: Any,
        paths: dict[str, tuple[str, ...]],
        optim: dict[str, dict[str, str]],
        locations: dict[tuple[str, tuple[int, ...]], Any],
    ) -> None:
        step = None
        for kinds in optim.values():
            if "step" in kinds:
                t = self._small_tensor(kinds["step"], md, locations)
                if t is not None:
                    step = int(t)
                break
        opt: dict[str, Any] = {}
        groups: dict[str, Any] = {}
        for key, meta in md.state_dict_metadata.items():
            p = paths[key]
            if hasattr(meta, "chunks") or len(p) < 3 or p[-3] != "param_groups" or p[-2] != "0":
                continue
            value = self._bytes_item(key, locations)
            if isinstance(value, (int, float, bool, list, tuple)):
                groups[p[-1]] = list(value) if isinstance(value, tuple) else value
        if "betas" in groups:
            opt["name"] = "adamw" if groups.get("decoupled_weight_decay", True) else "adam"
        elif "momentum" in groups:
            opt["name"] = "sgd"
        for k in ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov"):
            if k in groups:
                opt[k] = groups[k]
        if step is not None:
            opt["step"] = step
        self.step = step or 0
        self.state = {
            "train": {"global_step": self.step, "micro_steps": self.step, "optimizer": opt},
            "source": {"format": "dcp", "path": self.url},
        }

    def _small_tensor(
        self, key: str, md: Any, locations: dict[tuple[str, tuple[int, ...]], Any]
    ) -> float | None:
        meta = md.state_dict_metadata[key]
        t = self._tensor("step", "step", key, meta, locations, self.storage.url)
        if t.numel != 1:
            return None
        return float(self.read(t, 0, 1).astype(np.float64)[0])

    def _bytes_item(self, key: str, locations: dict[tuple[str, tuple[int, ...]], Any]) -> Any:
        import torch  # why: heavy; detecting formats (sources imports this module) needs no torch

        info = next((v for (k, _), v in locations.items() if k == key), None)
        if info is None or int(info.length) > 1 << 20:
            return None
        raw = self.storage.read_range(
            str(info.relative_path), int(info.offset), int(info.offset) + int(info.length)
        )
        try:
            return torch.load(io.BytesIO(raw), weights_only=True)
        except Exception:
            return None  # hyperparameters are informational; a value we cannot read is skipped


def _common_prefix(paths: list[tuple[str, ...]]) -> int:
    """1 when every model path starts with the same key (``("model", fqn)``), else 0."""
    if paths and all(len(p) >= 2 for p in paths) and len({p[0] for p in paths}) == 1:
        return 1
    return 0


def _whole(chunk: Any, size: Any) -> bool:
    return tuple(int(s) for s in chunk.sizes) == tuple(int(s) for s in size) and not any(
        int(o) for o in chunk.offsets
    )


def _runs(
    shape: tuple[int, ...],
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    key: str,
    data: int,
    itemsize: int,
) -> list[Piece]:
    """The chunk ``offsets``/``sizes`` of a row-major tensor as contiguous runs of its
    flattened elements (the chunk's own data is row-major from byte ``data``)."""
    if not shape:
        return [Piece(key, data, 0, 1)]
    # Trailing dimensions the chunk covers whole join the run; the first partial one ends it.
    k = len(shape) - 1
    while k > 0 and sizes[k] == shape[k] and offsets[k] == 0:
        k -= 1
    inner = math.prod(shape[k + 1 :])
    run = sizes[k] * inner
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    pieces = []
    for n, idx in enumerate(np.ndindex(*sizes[:k]) if k else [()]):
        start = sum((offsets[d] + idx[d]) * strides[d] for d in range(k)) + offsets[k] * inner
        pieces.append(Piece(key, data + n * run * itemsize, start, run))
    return pieces
