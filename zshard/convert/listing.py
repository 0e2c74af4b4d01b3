"""``zshard ls``: the checkpoints under a root, oldest first.

Only committed checkpoints (a step directory with its ``manifest.json``) are checkpoints; each
row comes from its manifest alone (step, created, layout, tensor bytes), so listing reads one
small JSON object per checkpoint, never data. Step directories without a manifest are saves that
never committed: shown separately, and only when asked (``include_incomplete``), as they are not
checkpoints (docs/design.md, invariant 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from zshard.errors import CheckpointNotFoundError, NotACheckpointError, ZshardError
from zshard.store.manifest import MANIFEST_KEY, Manifest
from zshard.store.root import LATEST_KEY, committed_steps, latest_name, parse_step_dir
from zshard.store.storage import open_storage


@dataclass(frozen=True)
class CheckpointRow:
    """One committed checkpoint. ``error`` is set (and the rest zero) if its manifest is bad."""

    name: str  # the step directory, e.g. step-00000100
    step: int
    created: str
    bytes: int  # sum of logical tensor bytes in the manifest
    tensors: int
    world_size: int
    stage: int
    latest: bool  # the one `latest` resolves to
    error: str = ""


@dataclass(frozen=True)
class Listing:
    root: str
    checkpoints: list[CheckpointRow]
    incomplete: list[str]  # step directories without a committed manifest
    latest: str | None

    def to_json(self, include_incomplete: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "root": self.root,
            "latest": self.latest,
            "checkpoints": [asdict(c) for c in self.checkpoints],
        }
        if include_incomplete:
            out["incomplete"] = list(self.incomplete)
        return out


def list_checkpoints(root: str) -> Listing:
    """Every committed checkpoint under ``root`` (a path or URL) and every incomplete one."""
    storage = open_storage(root)
    if storage.exists(MANIFEST_KEY):
        raise NotACheckpointError(
            f"{root}: is a checkpoint (step directory), not a checkpoint root; list its parent"
        )
    if not storage.isdir(""):
        if storage.exists(""):
            raise NotACheckpointError(f"{root}: is a file, not a checkpoint root")
        raise CheckpointNotFoundError(f"{root}: no such checkpoint root")
    committed = committed_steps(storage)
    names = {name for _, name in committed}
    incomplete = [
        n for n in storage.listdir("") if parse_step_dir(n) is not None and n not in names
    ]
    if not committed and not incomplete and not storage.exists(LATEST_KEY):
        raise NotACheckpointError(
            f"{root}: not a checkpoint root (no step-*/ directories); pass the directory "
            "checkpoints were saved to (checkpoint.dir)"
        )
    latest = latest_name(storage)
    rows = [_row(storage, root, step, name, name == latest) for step, name in committed]
    return Listing(root=root, checkpoints=rows, incomplete=incomplete, latest=latest)


def _row(storage: Any, root: str, step: int, name: str, latest: bool) -> CheckpointRow:
    key = f"{name}/{MANIFEST_KEY}"
    try:
        m = Manifest.from_bytes(storage.read(key), f"{root.rstrip('/')}/{key}")
    except ZshardError as e:
        # One bad manifest must not hide the others: show it, and `zshard verify` explains.
        return CheckpointRow(name, step, "", 0, 0, 0, 0, latest, error=str(e))
    return CheckpointRow(
        name=name,
        step=m.step,
        created=m.created,
        bytes=sum(t.nbytes for t in m.tensors),
        tensors=len(m.tensors),
        world_size=m.layout.world_size,
        stage=m.layout.stage,
        latest=latest,
    )


def human_size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render(listing: Listing, include_incomplete: bool) -> list[str]:
    """A table: one row per checkpoint, ``*`` on the one ``latest`` resolves to."""
    header = ("", "step", "created", "size", "world", "stage", "name")
    rows: list[tuple[str, ...]] = [header]
    for c in listing.checkpoints:
        mark = "*" if c.latest else ""
        if c.error:
            rows.append(
                (mark, str(c.step), "-", "-", "-", "-", f"{c.name}  (unreadable: {c.error})")
            )
            continue
        rows.append(
            (
                mark,
                str(c.step),
                c.created or "-",
                human_size(c.bytes),
                str(c.world_size),
                str(c.stage),
                c.name,
            )
        )
    lines = [f"checkpoints in {listing.root}"]
    if listing.checkpoints:
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        right = {1, 3, 4, 5}
        for r in rows:
            cells = [
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
            ]
            lines.append("  ".join(cells).rstrip())
        if listing.latest:
            lines.append(f"* latest: {listing.latest}")
    else:
        lines.append("no committed checkpoints")
    if include_incomplete and listing.incomplete:
        lines.append("incomplete (not a checkpoint: no committed manifest):")
        lines.extend(f"  {name}" for name in listing.incomplete)
    elif listing.incomplete:
        n = len(listing.incomplete)
        lines.append(f"{n} incomplete director{'y' if n == 1 else 'ies'} not shown (--all)")
    return lines
