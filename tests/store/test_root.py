"""Checkpoint roots: retention, the commit marker, and a lagging ``latest``."""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import read_all, snapshot, write_checkpoint
from zshard.convert.consolidate import consolidate
from zshard.convert.inspect import summarize
from zshard.convert.reshard import reshard
from zshard.errors import CheckpointNotFoundError, NotACheckpointError, OutputExistsError
from zshard.store.reader import CheckpointReader
from zshard.store.root import (
    apply_retention,
    committed_steps,
    latest_name,
    parent_url,
    resolve,
    step_dir_name,
)
from zshard.store.storage import open_storage


def _params(step: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return {"param": {"w": torch.randn(4, 5, generator=g), "b": torch.randn(3, generator=g)}}


def _uncommitted(root, step: int) -> str:
    """A step directory with shards but no manifest: a save that died before its commit."""
    name = step_dir_name(step)
    write_checkpoint(str(root), step, _params(step), 2)
    os.remove(root / name / "manifest.json")
    return name


def test_keep_last_deletes_only_older_committed_checkpoints(tmp_path):
    old_uncommitted = _uncommitted(tmp_path, 0)
    for step in range(1, 6):
        write_checkpoint(str(tmp_path), step, _params(step), 2)
    new_uncommitted = _uncommitted(tmp_path, 9)
    stray = tmp_path / "notes"
    stray.mkdir()
    root = open_storage(str(tmp_path))
    gone = apply_retention(root, 2)
    assert gone == [step_dir_name(s) for s in (1, 2, 3)]
    assert [s for s, _ in committed_steps(root)] == [4, 5]
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(
        ["latest", "notes", old_uncommitted, new_uncommitted, step_dir_name(4), step_dir_name(5)]
    )
    # Nothing of the uncommitted directories was touched.
    assert os.listdir(tmp_path / old_uncommitted / "data")
    # keep_last <= 0 keeps everything; keeping more than exist deletes nothing.
    assert apply_retention(root, 0) == []
    assert apply_retention(root, 5) == []
    assert [s for s, _ in committed_steps(root)] == [4, 5]


def test_commit_applies_retention(tmp_path):
    for step in range(1, 5):
        write_checkpoint(str(tmp_path), step, _params(step), 1, keep_last=2)
    assert [s for s, _ in committed_steps(open_storage(str(tmp_path)))] == [3, 4]
    reader = CheckpointReader.open(str(tmp_path))
    assert reader.manifest.step == 4
    for name, t in read_all(reader).items():
        assert torch.equal(t, _params(4)["param"][name])


def test_uncommitted_directory_is_invisible_to_every_tool(tmp_path):
    write_checkpoint(str(tmp_path), 1, _params(1), 2)
    hidden = _uncommitted(tmp_path, 2)
    # `latest` even points at the uncommitted directory (a save that died after writing it).
    (tmp_path / "latest").write_text(hidden + "\n")
    root = str(tmp_path)
    assert latest_name(open_storage(root)) == step_dir_name(1)
    reader = CheckpointReader.open(root)
    assert reader.manifest.step == 1
    assert summarize(root)["step"] == 1
    out = tmp_path.parent / f"{tmp_path.name}-out.safetensors"
    consolidate(root, str(out))
    from safetensors.torch import load_file

    loaded = load_file(str(out))
    for name, t in _params(1)["param"].items():
        assert torch.equal(loaded[name], t)
    ref = reshard(root, 3)
    assert ref.name == f"{step_dir_name(1)}-w3"
    assert apply_retention(open_storage(root), 1) == [step_dir_name(1)]
    assert os.path.isdir(tmp_path / hidden)
    # Naming it directly is a clear error, not a read of half-written data.
    with pytest.raises(CheckpointNotFoundError, match="not committed"):
        CheckpointReader.open(str(tmp_path / hidden))


def test_root_with_only_uncommitted_directories_is_not_a_checkpoint(tmp_path):
    _uncommitted(tmp_path, 3)
    with pytest.raises(NotACheckpointError):
        CheckpointReader.open(str(tmp_path))
    assert apply_retention(open_storage(str(tmp_path)), 1) == []
    with pytest.raises(NotACheckpointError):
        resolve(str(tmp_path))


@pytest.mark.parametrize("pointer", [None, "older", "garbage", "empty", "missing-dir"])
def test_lagging_latest_resolves_to_the_newest_committed(tmp_path, pointer):
    for step in (1, 2, 3):
        write_checkpoint(str(tmp_path), step, _params(step), 2)
    latest = tmp_path / "latest"
    if pointer is None:
        latest.unlink()
    elif pointer == "older":
        latest.write_text(step_dir_name(1) + "\n")
    elif pointer == "garbage":
        latest.write_bytes(b"\xff\xfe../../etc\n")
    elif pointer == "empty":
        latest.write_text("")
    else:
        latest.write_text(step_dir_name(7))
    ref = resolve(str(tmp_path))
    assert ref.name == step_dir_name(3)
    reader = CheckpointReader.open(str(tmp_path))
    assert reader.manifest.step == 3
    for name, t in read_all(reader).items():
        assert torch.equal(t, _params(3)["param"][name])


def test_latest_is_written_last_and_names_the_new_step(tmp_path):
    write_checkpoint(str(tmp_path), 1, _params(1), 2)
    assert (tmp_path / "latest").read_text() == step_dir_name(1) + "\n"
    write_checkpoint(str(tmp_path), 12, _params(12), 2)
    assert (tmp_path / "latest").read_text() == step_dir_name(12) + "\n"


def test_committed_step_is_never_replaced_without_overwrite(tmp_path):
    write_checkpoint(str(tmp_path), 1, _params(1), 2)
    before = snapshot(str(tmp_path))
    with pytest.raises(OutputExistsError):
        write_checkpoint(str(tmp_path), 1, _params(5), 2)
    assert snapshot(str(tmp_path)) == before
    write_checkpoint(str(tmp_path), 1, _params(5), 3, overwrite=True)
    reader = CheckpointReader.open(str(tmp_path))
    assert reader.manifest.layout.world_size == 3
    for name, t in read_all(reader).items():
        assert torch.equal(t, _params(5)["param"][name])


def test_step_directory_given_as_cwd_resolves_to_its_real_parent(tmp_path, monkeypatch):
    write_checkpoint(str(tmp_path), 4, _params(4), 2)
    step = tmp_path / step_dir_name(4)
    monkeypatch.chdir(step)
    ref = resolve(".")
    assert os.path.realpath(ref.root_url) == os.path.realpath(tmp_path)
    assert ref.name == step_dir_name(4)
    # Resharding "here" puts the result next to the step directory, never inside it.
    out = reshard(".", 2)
    assert os.path.isdir(tmp_path / f"{step_dir_name(4)}-w2")
    assert sorted(os.listdir(step)) == ["data", "manifest.json", "zarr.json"]
    assert out.name == f"{step_dir_name(4)}-w2"


@pytest.mark.parametrize(
    ("url", "parent", "name"),
    [
        ("a/b/step-00000001", "a/b", "step-00000001"),
        ("a/b/step-00000001/", "a/b", "step-00000001"),
        ("step-00000001", ".", "step-00000001"),
        ("s3://bucket/root/step-00000001", "s3://bucket/root", "step-00000001"),
        ("s3://bucket/x", "s3://bucket", "x"),
        ("memory://r/out.safetensors", "memory://r", "out.safetensors"),
    ],
)
def test_parent_url(url, parent, name):
    assert parent_url(url) == (parent, name)
