"""A full disk (ENOSPC) during import, reshard or consolidate: one clear StorageError, earlier
checkpoints intact, nothing under the final name, no temporary files left behind."""

from __future__ import annotations

import errno
import io
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import (
    assert_same_tensors,
    awkward_state_dict,
    read_all,
    snapshot,
    temp_names,
)
from zshard.convert.consolidate import consolidate
from zshard.convert.importer import import_safetensors
from zshard.convert.reshard import reshard
from zshard.errors import StorageError, ZshardError
from zshard.store import storage_local
from zshard.store.reader import CheckpointReader
from zshard.store.verify import verify


class _FullDisk(io.FileIO):
    """A file on a disk with ``budget`` bytes free (shared by every open file)."""

    budget = 0

    def write(self, data):  # type: ignore[override]
        n = memoryview(data).nbytes
        if n > _FullDisk.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.budget -= n
        return super().write(data)


@pytest.fixture
def disk_full(monkeypatch):
    """Call with a byte budget; every local write beyond it fails with ENOSPC."""

    def arm(budget: int) -> None:
        monkeypatch.setattr(_FullDisk, "budget", budget)

        def limited_open(path, mode="r", *args, **kwargs):
            if "w" in mode:
                return _FullDisk(path, "wb")
            return open(path, mode, *args, **kwargs)

        monkeypatch.setattr(storage_local, "open", limited_open, raising=False)

    return arm


@pytest.fixture
def world(tmp_path):
    """A root with a committed checkpoint, and a safetensors source for another import."""
    sd = awkward_state_dict(4)
    src = tmp_path / "src.safetensors"
    save_file(sd, str(src))
    ref = import_safetensors(str(src), str(tmp_path / "ckpt"), 3)
    return tmp_path, ref, sd


def _intact(ref, sd) -> None:
    reader = CheckpointReader.open(ref.url)
    assert_same_tensors(read_all(reader), sd)
    assert verify(ref.url, all_faults=True).ok


def _space_error(info) -> None:
    assert isinstance(info.value, StorageError) and isinstance(info.value, ZshardError)
    assert "space" in str(info.value)
    assert "\n" not in str(info.value)


# Budgets: 0 fails on the very first write (headers, shard indexes); the others mid-data.
BUDGETS = [0, 64, 600, 1200]


@pytest.mark.parametrize("budget", BUDGETS)
def test_consolidate_to_a_file(world, disk_full, budget):
    tmp_path, ref, sd = world
    before = snapshot(str(tmp_path))
    out = tmp_path / "out.safetensors"
    disk_full(budget)
    with pytest.raises(StorageError) as info:
        consolidate(ref.url, str(out), dtype="keep")
    _space_error(info)
    assert not out.exists()
    assert temp_names(str(tmp_path)) == []
    assert snapshot(str(tmp_path)) == before
    _intact(ref, sd)


@pytest.mark.parametrize("budget", BUDGETS)
def test_consolidate_to_a_directory(world, disk_full, budget):
    tmp_path, ref, sd = world
    before = snapshot(str(tmp_path))
    disk_full(budget)
    with pytest.raises(StorageError) as info:
        consolidate(ref.url, str(tmp_path / "hf"), dtype="keep", max_shard_size="200B")
    _space_error(info)
    assert not (tmp_path / "hf").exists()
    assert temp_names(str(tmp_path)) == []
    assert snapshot(str(tmp_path)) == before
    _intact(ref, sd)


@pytest.mark.parametrize("budget", BUDGETS)
def test_import(world, disk_full, budget):
    tmp_path, ref, sd = world
    before = snapshot(str(tmp_path))
    disk_full(budget)
    with pytest.raises(StorageError) as info:
        import_safetensors(str(tmp_path / "src.safetensors"), str(tmp_path / "ckpt"), 2, step=5)
    _space_error(info)
    assert not (tmp_path / "ckpt" / "step-00000005").exists()
    assert temp_names(str(tmp_path)) == []
    assert snapshot(str(tmp_path)) == before
    _intact(ref, sd)


@pytest.mark.parametrize("budget", BUDGETS)
def test_reshard(world, disk_full, budget):
    tmp_path, ref, sd = world
    before = snapshot(str(tmp_path))
    disk_full(budget)
    with pytest.raises(StorageError) as info:
        reshard(ref.url, 2)
    _space_error(info)
    assert not (tmp_path / "ckpt" / "step-00000000-w2").exists()
    assert temp_names(str(tmp_path)) == []
    assert snapshot(str(tmp_path)) == before
    _intact(ref, sd)


def test_after_space_is_freed_the_same_commands_succeed(world, disk_full, monkeypatch):
    tmp_path, ref, sd = world
    disk_full(300)
    with pytest.raises(StorageError):
        consolidate(ref.url, str(tmp_path / "out.safetensors"), dtype="keep")
    monkeypatch.undo()
    consolidate(ref.url, str(tmp_path / "out.safetensors"), dtype="keep")
    assert_same_tensors(load_file(str(tmp_path / "out.safetensors")), sd)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["w.prime"], sd["w.prime"])
