"""Checkpoint roots: step directories, the ``latest`` pointer, retention and CKPT resolution.

A root holds ``step-00000100/`` directories and a ``latest`` text file. A step directory counts
only once its ``manifest.json`` exists (the commit marker, written last): readers, tools and
retention never see anything else (docs/design.md, invariant 2).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from zshard.errors import CheckpointNotFoundError, NotACheckpointError
from zshard.store.manifest import MANIFEST_KEY
from zshard.store.storage import Storage, is_remote, open_storage

LATEST_KEY = "latest"
# "step-00000100", or "step-00000100-w16" for the same step resharded to 16 ranks.
_STEP_DIR = re.compile(r"^step-(\d{8,})(?:-w\d+)?$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def resharded_dir_name(step: int, world_size: int) -> str:
    return f"{step_dir_name(step)}-w{world_size}"


def parse_step_dir(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def committed_steps(root: Storage) -> list[tuple[int, str]]:
    """``(step, directory name)`` of every committed checkpoint under ``root``, oldest first."""
    found = []
    for name in root.listdir(""):
        step = parse_step_dir(name)
        if step is not None and root.exists(f"{name}/{MANIFEST_KEY}"):
            found.append((step, name))
    return sorted(found)


def latest_name(root: Storage) -> str | None:
    """The newest committed step directory: ``latest`` if it names a committed one, else the
    newest found by listing (``latest`` lags if a save died between manifest and pointer)."""
    steps = committed_steps(root)
    pointer: str | None = None
    if root.exists(LATEST_KEY):
        pointer = root.read(LATEST_KEY).decode(errors="replace").strip()
    names = {name for _, name in steps}
    if not steps:
        return None
    newest = steps[-1][1]
    if pointer in names and parse_step_dir(pointer or "") == steps[-1][0]:
        return pointer
    return newest


def write_latest(root: Storage, name: str) -> None:
    # Advisory (readers fall back to listing): published whole by a rename, but not fsynced.
    root.write_atomic(LATEST_KEY, f"{name}\n".encode(), durable=False)


def apply_retention(root: Storage, keep_last: int) -> list[str]:
    """Delete committed checkpoints older than the newest ``keep_last``; returns what went.

    Uncommitted directories are left alone: one may be a save in progress.
    """
    if keep_last <= 0:
        return []
    steps = committed_steps(root)
    doomed = [name for _, name in steps[:-keep_last]]
    for name in doomed:
        # Remove the commit marker first: a crash mid-delete leaves an invisible directory,
        # never a committed checkpoint with missing shards.
        root.child(name).remove_tree(MANIFEST_KEY)
        root.remove_tree(name)
    return doomed


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved CKPT argument: the root URL and the step directory name within it."""

    root_url: str
    name: str

    @property
    def url(self) -> str:
        return join_url(self.root_url, self.name)


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else posixpath.join(base, name)


def parent_url(url: str) -> tuple[str, str]:
    stripped = url.rstrip("/")
    if "://" not in url and posixpath.basename(stripped) in ("", ".", ".."):
        # "." (the cwd is a step directory) names no directory of its own: resolve it, or the
        # step directory would become its own root and outputs would land inside it.
        stripped = os.path.abspath(stripped or url)
    head, _, tail = stripped.rpartition("/")
    if not head or head.endswith(":/"):  # "s3://bucket" has no parent inside the store
        head = head + "/" if head.endswith(":/") else "."
    return head, tail


def resolve(url: str) -> CheckpointRef:
    """Resolve a CKPT argument: a step directory, or a root whose newest checkpoint is used."""
    storage = open_storage(url)
    if storage.exists(MANIFEST_KEY):
        root, name = parent_url(url)
        return CheckpointRef(root, name)
    if parse_step_dir(url.rstrip("/").rpartition("/")[2]) is not None and storage.isdir(""):
        raise CheckpointNotFoundError(
            f"{url}: checkpoint is not committed (no {MANIFEST_KEY}); it was interrupted while "
            "saving: use an earlier step or the checkpoint root"
        )
    if not storage.exists("") and not storage.isdir(""):
        raise CheckpointNotFoundError(f"{url}: no such checkpoint or checkpoint root")
    newest = latest_name(storage)
    if newest is None:
        raise NotACheckpointError(
            f"{url}: not a zshard checkpoint (no committed step-*/{MANIFEST_KEY} and no "
            f"{LATEST_KEY}); pass a checkpoint root or a step directory"
        )
    return CheckpointRef(url.rstrip("/") or url, newest)
