"""The checkpoint manifest: what a checkpoint holds and where. JSON only, never pickle.

On disk (``manifest.json``) the body is framed with its checksum so that any flipped byte is
caught, independently of how a JSON parser treats it::

    {"crc32c":"<8 lowercase hex digits>","manifest":<body>}

where the checksum is crc32c over the exact bytes of ``<body>``. Per-rank state files
(``ranks/rank-NNNNN.json``) use the same framing with the key ``state`` (:func:`frame_json`).
Parsing validates every field's type and every fragment against the layout, so a manifest that
lies (shapes, offsets, lengths, dtypes) is rejected before any data is read.

Two format versions are read (docs/format.md). Version 2 (written now) stores all flat groups of
one (state kind, dtype) in one zarr array: each rank's shard holds its partition of every such
group end to end, at the recorded ``base`` of each group (a :class:`StoredArray`), so the number
of files a rank writes does not grow with the number of groups. Version 1 stored one array per
(flat group, state kind); it is read as the special case of one group per stored array.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zshard.errors import FormatVersionError, ManifestError
from zshard.store import dtypes
from zshard.store.layout import (
    FlatGroup,
    Fragment,
    Layout,
    coverage_errors,
    placement_errors,
    plan_shard,
)
from zshard.store.manifest_framing import _frame, _FrameError, _unframe
from zshard.store.manifest_framing import frame_json as frame_json
from zshard.store.manifest_framing import unframe_json as unframe_json

FORMAT_NAME = "zshard.checkpoint"
FORMAT_VERSION = 2  # what this zshard writes
READABLE_VERSIONS = (1, 2)
MANIFEST_KEY = "manifest.json"
# Group names and state kinds become path components: keep them to a safe alphabet.
_IDENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_MAX_ELEMENTS = 1 << 60


def rank_state_key(rank: int) -> str:
    return f"ranks/rank-{rank:05d}.json"


def identifier_error(value: str, what: str) -> str | None:
    if isinstance(value, str) and _IDENT.match(value):
        return None
    return (
        f"{what} {value!r} is not a safe identifier (letters, digits, '_', '.', '-'; "
        "not starting with '.' or '-')"
    )


def check_identifier(value: str, what: str, where: str = "") -> str:
    err = identifier_error(value, what)
    if err:
        raise ManifestError(f"{where}: {err}" if where else err)
    return value


@dataclass(frozen=True)
class ArrayEntry:
    """A flat group's buffer for one state kind (logical: where it is stored is a
    :class:`StoredArray`'s business, see :meth:`Manifest.locate`)."""

    group: str
    kind: str
    dtype: str  # logical dtype name


@dataclass(frozen=True)
class StoredArray:
    """One zarr array on disk: state kind ``kind`` in logical dtype ``dtype`` of the flat groups
    in ``segments``. Rank ``r``'s shard holds ``shard_numel`` elements in chunks of
    ``chunk_numel``; group ``g``'s rank-``r`` partition lies at element ``base`` of it, for each
    ``(g, base)`` of ``segments``. Format 1 had one group per array, at base 0
    (``version=1``), under another path."""

    kind: str
    dtype: str
    chunk_numel: int
    shard_numel: int
    segments: tuple[tuple[str, int], ...]  # (group, base)
    version: int = FORMAT_VERSION

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.dtype}" if self.version >= 2 else self.segments[0][0]

    @property
    def path(self) -> str:
        """The array's directory in the step directory (derived from names, never read)."""
        if self.version >= 2:
            return f"data/{self.kind}.{self.dtype}"
        return f"data/{self.segments[0][0]}/{self.kind}"

    @property
    def key_separator(self) -> str:
        """zarr's chunk key separator: shard keys are ``c.<rank>`` (2) or ``c/<rank>`` (1)."""
        return "." if self.version >= 2 else "/"

    def shard_key(self, rank: int) -> str:
        return f"{self.path}/c{self.key_separator}{rank}"

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_numel // self.chunk_numel

    def base(self, group: str) -> int:
        for g, b in self.segments:
            if g == group:
                return b
        raise KeyError(group)


def plan_stored(layout: Layout, arrays: Sequence[ArrayEntry]) -> list[StoredArray]:
    """Format 2: one stored array per (state kind, dtype), in order of first appearance in
    ``arrays``; its groups in layout order, end to end (``layout.plan_shard``), in chunks no
    larger than the largest of its groups' own (``plan_partition``'s, at most 2^20 elements):
    an array of one group is chunked exactly as that group's partition."""
    order = {g.name: i for i, g in enumerate(layout.groups)}
    by_key: dict[tuple[str, str], list[str]] = {}
    for a in arrays:
        by_key.setdefault((a.kind, a.dtype), []).append(a.group)
    out = []
    for (kind, dt), groups in by_key.items():
        groups.sort(key=lambda g: order.get(g, len(order)))
        known = [layout.group(g) for g in groups if g in order]
        parts = [(g, layout.group(g).partition_numel if g in order else 1) for g in groups]
        target = max((g.chunk_numel for g in known), default=1)
        shard, chunk, bases = plan_shard(parts, target)
        out.append(StoredArray(kind, dt, chunk, shard, tuple(bases)))
    return out


def v1_stored(layout: Layout, arrays: Sequence[ArrayEntry]) -> list[StoredArray]:
    """Format 1's arrays: one per (flat group, state kind), the group's own chunking."""
    groups = {g.name: g for g in layout.groups}
    out = []
    for a in arrays:
        g = groups.get(a.group)
        if g is None:  # reported by Manifest.errors()
            continue
        out.append(
            StoredArray(a.kind, a.dtype, g.chunk_numel, g.partition_numel, ((a.group, 0),), 1)
        )
    return out


@dataclass(frozen=True)
class TensorEntry(dtypes.Shaped):
    """One logical tensor: a name and state kind, its shape and logical dtype, and fragments."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    fragments: tuple[Fragment, ...]


@dataclass
class Manifest:
    """What a checkpoint holds. ``arrays`` are the logical (group, kind) buffers; ``stored``
    the zarr arrays that hold them (computed from ``arrays`` when not given: format 2 packing,
    or format 1's one array per buffer when ``format_version`` is 1)."""

    step: int
    layout: Layout
    arrays: list[ArrayEntry]
    tensors: list[TensorEntry]
    ties: dict[str, str] = field(default_factory=dict)  # alias name -> stored name
    state: dict[str, Any] = field(default_factory=dict)  # non-tensor state, JSON only
    rank_state: int = 0  # number of per-rank state files (0 or the world size)
    created: str = ""
    zshard_version: str = ""
    format_version: int = FORMAT_VERSION
    stored: list[StoredArray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stored:
            plan = v1_stored if self.format_version == 1 else plan_stored
            try:
                self.stored = plan(self.layout, self.arrays)
            except ValueError:
                self.stored = []  # an impossible plan: errors() says why
        if self.format_version >= 2:
            # Format 2 chunks the stored arrays; a group is recorded by its partition alone.
            lay = self.layout
            if any(g.chunk_numel != g.partition_numel for g in lay.groups):
                self.layout = Layout(
                    lay.world_size,
                    lay.stage,
                    tuple(
                        FlatGroup(g.name, g.partition_numel, g.partition_numel) for g in lay.groups
                    ),
                )
        self._where: dict[tuple[str, str], tuple[StoredArray, int]] = {}

    def array(self, group: str, kind: str) -> ArrayEntry:
        for a in self.arrays:
            if a.group == group and a.kind == kind:
                return a
        raise KeyError((group, kind))

    def locate(self, group: str, kind: str) -> tuple[StoredArray, int]:
        """The stored array holding ``group``'s ``kind``, and the group's base in each shard."""
        if not self._where:
            for s in self.stored:
                for g, base in s.segments:
                    self._where.setdefault((g, s.kind), (s, base))
        try:
            return self._where[(group, kind)]
        except KeyError:
            raise KeyError((group, kind)) from None

    def tensor(self, name: str, kind: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name and t.kind == kind:
                return t
        raise KeyError((name, kind))

    def kinds(self) -> list[str]:
        return sorted({t.kind for t in self.tensors})

    # -- serialisation -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        v1 = self.format_version == 1
        groups: list[dict[str, Any]] = [
            {"name": g.name, "partition_numel": g.partition_numel} for g in self.layout.groups
        ]
        if v1:
            for d, g in zip(groups, self.layout.groups):
                d["chunk_numel"] = g.chunk_numel
            arrays: list[dict[str, Any]] = [
                {"group": a.group, "kind": a.kind, "dtype": a.dtype} for a in self.arrays
            ]
        else:
            arrays = [
                {
                    "kind": s.kind,
                    "dtype": s.dtype,
                    "shard_numel": s.shard_numel,
                    "chunk_numel": s.chunk_numel,
                    "groups": [[g, base] for g, base in s.segments],
                }
                for s in self.stored
            ]
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "zshard_version": self.zshard_version,
            "created": self.created,
            "step": self.step,
            "layout": {
                "world_size": self.layout.world_size,
                "stage": self.layout.stage,
                "groups": groups,
            },
            "arrays": arrays,
            "tensors": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    # [group, rank, offset, start, length]: compact for large world sizes.
                    "fragments": [list(f) for f in t.fragments],
                }
                for t in self.tensors
            ],
            "ties": dict(self.ties),
            "state": self.state,
            "rank_state": self.rank_state,
        }

    def to_bytes(self) -> bytes:
        self.validate()
        try:
            body = json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise ManifestError(f"checkpoint state is not JSON-serialisable: {e}") from e
        return _frame(body, b"manifest")

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Manifest:
        try:
            body = _unframe(raw, b"manifest")
        except _FrameError as e:
            problem = {
                "framing": "not a zshard manifest (bad framing)",
                "truncated": "manifest is truncated",
                "checksum": "manifest fails its crc32c checksum (corrupted)",
            }[e.reason]
            raise ManifestError(f"{where}: {problem}") from None
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise ManifestError(f"{where}: manifest is not valid JSON: {e}") from None
        m = cls.from_json(obj, where)
        m.validate(where)
        return m

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Manifest:
        p = _Parser(where)
        obj = p.mapping(obj, "manifest")
        if p.get(obj, "format", str) != FORMAT_NAME:
            raise ManifestError(f"{where}: not a zshard checkpoint manifest")
        version = p.get(obj, "format_version", int)
        if version < 1:  # no zshard ever wrote one: an edited or foreign manifest
            raise ManifestError(f"{where}: format_version must be >= 1, got {version}")
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: format version {version} is newer than this zshard reads "
                f"({FORMAT_VERSION}); upgrade zshard"
            )
        v1 = version == 1
        lay = p.mapping(p.get(obj, "layout", dict), "layout")
        groups = []
        for g in p.get(lay, "groups", list):
            g = p.mapping(g, "layout.groups[]")
            name = check_identifier(p.get(g, "name", str), "group name", where)
            partition = p.count(g, "partition_numel")
            # Format 2 chunks stored arrays, not groups: a group is one "chunk" of its own.
            chunk = p.count(g, "chunk_numel") if v1 else partition
            try:
                groups.append(FlatGroup(name, partition, chunk))
            except ValueError as e:
                raise ManifestError(f"{where}: {e}") from None
        try:
            layout = Layout(p.get(lay, "world_size", int), p.get(lay, "stage", int), tuple(groups))
        except ValueError as e:
            raise ManifestError(f"{where}: layout: {e}") from None
        arrays: list[ArrayEntry] = []
        stored: list[StoredArray] = []
        for a in p.get(obj, "arrays", list):
            a = p.mapping(a, "arrays[]")
            kind = check_identifier(p.get(a, "kind", str), "state kind", where)
            dt = p.dtype(p.get(a, "dtype", str))
            if v1:
                group = check_identifier(p.get(a, "group", str), "group name", where)
                arrays.append(ArrayEntry(group, kind, dt))
                continue
            segments = []
            for seg in p.get(a, "groups", list):
                if not isinstance(seg, list) or len(seg) != 2 or not isinstance(seg[0], str):
                    raise ManifestError(f"{where}: array {kind}.{dt}: malformed group {seg!r}")
                group = check_identifier(seg[0], "group name", where)
                segments.append((group, p.count(seg[1], f"base of group {group!r}", raw=True)))
                arrays.append(ArrayEntry(group, kind, dt))
            stored.append(
                StoredArray(
                    kind,
                    dt,
                    p.count(a, "chunk_numel"),
                    p.count(a, "shard_numel"),
                    tuple(segments),
                )
            )
        tensors = []
        for t in p.get(obj, "tensors", list):
            t = p.mapping(t, "tensors[]")
            name = p.get(t, "name", str)
            shape = tuple(
                p.count(s, f"shape of {name!r}", raw=True) for s in p.get(t, "shape", list)
            )
            frags = []
            for f in p.get(t, "fragments", list):
                if not isinstance(f, list) or len(f) != 5 or not isinstance(f[0], str):
                    raise ManifestError(f"{where}: tensor {name!r}: malformed fragment {f!r}")
                nums = [p.count(x, f"fragment of {name!r}", raw=True) for x in f[1:]]
                frags.append(Fragment(f[0], *nums))
            tensors.append(
                TensorEntry(
                    name,
                    check_identifier(p.get(t, "kind", str), "state kind", where),
                    shape,
                    p.dtype(p.get(t, "dtype", str)),
                    tuple(frags),
                )
            )
        ties = p.get(obj, "ties", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items()):
            raise ManifestError(f"{where}: ties must map names to names")
        return cls(
            step=p.count(obj, "step"),
            layout=layout,
            arrays=arrays,
            tensors=tensors,
            ties=dict(ties),
            state=p.get(obj, "state", dict),
            rank_state=p.count(obj, "rank_state"),
            created=p.get(obj, "created", str),
            zshard_version=p.get(obj, "zshard_version", str),
            format_version=version,
            stored=stored,
        )

    # -- consistency ---------------------------------------------------------------------------

    def validate(self, where: str = "manifest") -> None:
        """Raise ``ManifestError`` unless every fragment fits the layout exactly once."""
        errs = self.errors()
        if errs:
            more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
            raise ManifestError(f"{where}: {errs[0]}{more}")

    def errors(self) -> list[str]:
        errs: list[str] = []
        lay = self.layout
        groups = {g.name: g for g in lay.groups}
        # Group names and kinds become paths: a writer must refuse "../x" before any byte lands.
        for flat in lay.groups:
            if err := identifier_error(flat.name, "group name"):
                errs.append(err)
        arrays: dict[tuple[str, str], ArrayEntry] = {}
        for entry in self.arrays:
            label = f"array {entry.group}/{entry.kind}"
            if err := identifier_error(entry.kind, "state kind"):
                errs.append(err)
            if entry.group not in groups:
                errs.append(f"{label} names unknown group {entry.group!r}")
            if (entry.group, entry.kind) in arrays:
                errs.append(f"{label} is listed twice")
            arrays[(entry.group, entry.kind)] = entry
        errs += self._stored_errors(groups, arrays)
        seen: set[tuple[str, str]] = set()
        used: dict[tuple[str, str], list[tuple[int, int, str]]] = defaultdict(list)
        for t in self.tensors:
            label = f"tensor {t.name!r} ({t.kind})"
            if (t.name, t.kind) in seen:
                errs.append(f"{label} is listed twice")
            seen.add((t.name, t.kind))
            if t.numel > _MAX_ELEMENTS:
                errs.append(f"{label} has an implausible shape {list(t.shape)}")
                continue
            errs += [f"{label}: {e}" for e in coverage_errors(t.fragments, t.numel)]
            for f in t.fragments:
                g = groups.get(f.group)
                a = arrays.get((f.group, t.kind))
                if g is None or a is None:
                    errs.append(f"{label}: no array for group {f.group!r} and kind {t.kind!r}")
                    continue
                if a.dtype != t.dtype:
                    errs.append(
                        f"{label}: dtype {t.dtype} differs from array {a.group}/{a.kind}'s "
                        f"{a.dtype}"
                    )
                errs += [f"{label}: {e}" for e in placement_errors(f, g, lay.world_size)]
                used[(f.group, t.kind)].append((f.offset, f.offset + f.length, t.name))
        for (group, kind), spans in used.items():
            spans.sort()
            for (_, hi, first), (lo, _, second) in zip(spans, spans[1:]):
                if lo < hi:
                    errs.append(f"tensors {first!r} and {second!r} overlap in array {group}/{kind}")
        names = {t.name for t in self.tensors}
        for alias, target in self.ties.items():
            if alias in names:
                errs.append(f"tie {alias!r} -> {target!r}: the alias is also stored")
            if target not in names:
                errs.append(f"tie {alias!r} -> {target!r}: the target is not stored")
        if self.rank_state not in (0, lay.world_size):
            errs.append(f"rank_state={self.rank_state} must be 0 or the world size")
        return errs

    def _stored_errors(
        self, groups: Mapping[str, FlatGroup], arrays: Mapping[tuple[str, str], ArrayEntry]
    ) -> list[str]:
        """Every logical buffer in exactly one stored array of its dtype, every segment inside
        its shard, segments never overlapping, chunks dividing shards."""
        errs: list[str] = []
        if self.format_version not in READABLE_VERSIONS:
            errs.append(f"format_version {self.format_version} is not one zshard writes")
        names: set[tuple[str, str]] = set()
        placed: set[tuple[str, str]] = set()
        for s in self.stored:
            label = f"array {s.kind}.{s.dtype}"
            if s.dtype not in dtypes.DTYPES:
                errs.append(f"{label}: unknown dtype")
            if (s.kind, s.dtype) in names and s.version >= 2:
                errs.append(f"{label} is listed twice")
            names.add((s.kind, s.dtype))
            if s.chunk_numel < 1 or s.shard_numel < 1 or s.shard_numel % s.chunk_numel:
                errs.append(
                    f"{label}: chunk_numel={s.chunk_numel} does not divide "
                    f"shard_numel={s.shard_numel}"
                )
            if s.shard_numel > _MAX_ELEMENTS:
                errs.append(f"{label}: implausible shard_numel {s.shard_numel}")
            if not s.segments:
                errs.append(f"{label} holds no group")
            spans = []
            for g, base in s.segments:
                group = groups.get(g)
                a = arrays.get((g, s.kind))
                if group is None:
                    errs.append(f"{label} names unknown group {g!r}")
                    continue
                if a is None or a.dtype != s.dtype:
                    errs.append(f"{label}: group {g!r} has no {s.kind} buffer of this dtype")
                if (g, s.kind) in placed:
                    errs.append(f"{label}: group {g!r} of kind {s.kind} is stored twice")
                placed.add((g, s.kind))
                if base + group.partition_numel > s.shard_numel:
                    errs.append(
                        f"{label}: group {g!r} at [{base}, {base + group.partition_numel}) "
                        f"lies outside the shard's {s.shard_numel} elements"
                    )
                spans.append((base, base + group.partition_numel, g))
            spans.sort()
            for (_, hi, first), (lo, _, second) in zip(spans, spans[1:]):
                if lo < hi:
                    errs.append(f"{label}: groups {first!r} and {second!r} overlap")
        for key in arrays:
            if key not in placed:
                errs.append(f"array {key[0]}/{key[1]} is not stored in any array")
        return errs


class _Parser:
    """Typed field access that turns every surprise into a one-line ManifestError."""

    def __init__(self, where: str) -> None:
        self.where = where

    def mapping(self, obj: Any, what: str) -> Mapping[str, Any]:
        if not isinstance(obj, dict):
            raise ManifestError(f"{self.where}: {what} must be a JSON object")
        return obj

    def get(self, obj: Mapping[str, Any], key: str, typ: type) -> Any:
        if key not in obj:
            raise ManifestError(f"{self.where}: missing field {key!r}")
        value = obj[key]
        if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
            raise ManifestError(f"{self.where}: field {key!r} must be {typ.__name__}")
        return value

    def count(self, obj: Any, key: str, raw: bool = False) -> int:
        value = obj if raw else self.get(obj, key, int)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_ELEMENTS:
            raise ManifestError(
                f"{self.where}: {key} must be a non-negative integer, got {value!r}"
            )
        return value

    def dtype(self, name: str) -> str:
        if name not in dtypes.DTYPES:
            raise ManifestError(f"{self.where}: unknown dtype {name!r}")
        return name
