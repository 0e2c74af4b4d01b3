"""Reshard planning and its guards: placement per (name, size), and the source is never touched."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_same_tensors, read_all, snapshot, write_checkpoint
from zshard.convert.reshard import plan_layout, reshard
from zshard.errors import InvalidArgumentError, OutputExistsError
from zshard.store.layout import coverage_errors
from zshard.store.reader import CheckpointReader


def _adam_like(root: str, world: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    shapes = {"w": (6, 7), "b": (7,), "one": (1,)}
    tensors = {
        "param": {n: torch.randn(s, generator=g) for n, s in shapes.items()},
        "exp_avg": {n: torch.randn(s, generator=g) for n, s in shapes.items()},
        # torch's Adam keeps a per-parameter scalar `step`: another size for the same name.
        "step": {n: torch.tensor(float(i + 1)) for i, n in enumerate(shapes)},
    }
    write_checkpoint(root, 3, tensors, world)
    return tensors


def test_plan_layout_places_each_size_of_a_name(tmp_path):
    _adam_like(str(tmp_path), 2)
    m = CheckpointReader.open(str(tmp_path)).manifest
    for world in (1, 3, 4):
        layout, tensors = plan_layout(m, world, 1)
        assert layout.world_size == world
        for t in tensors:
            assert coverage_errors(t.fragments, t.numel) == [], (t.name, t.kind)
        # A name's kinds of one size still line up: param and exp_avg share fragments.
        by_key = {(t.name, t.kind): t for t in tensors}
        for name in ("w", "b"):
            assert by_key[(name, "param")].fragments == by_key[(name, "exp_avg")].fragments
            assert by_key[(name, "step")].fragments != by_key[(name, "param")].fragments


@pytest.mark.parametrize(("n", "m"), [(1, 3), (2, 2), (3, 1), (2, 5)])
def test_reshard_names_with_several_sizes(tmp_path, n, m):
    tensors = _adam_like(str(tmp_path), n)
    ref = reshard(str(tmp_path), m)
    reader = CheckpointReader.open(ref.url)
    for kind, by_name in tensors.items():
        assert_same_tensors(read_all(reader, kind), by_name)


def test_reshard_never_replaces_its_source(tmp_path):
    tensors = _adam_like(str(tmp_path / "root"), 2)
    before = snapshot(str(tmp_path))
    # The same root and step name as the source, with --overwrite: refused, nothing deleted.
    with pytest.raises(InvalidArgumentError, match="replace the source"):
        reshard(str(tmp_path / "root"), 3, out=str(tmp_path / "root"), overwrite=True)
    with pytest.raises(InvalidArgumentError, match="replace the source"):
        reshard(str(tmp_path / "root" / "step-00000003"), 3, out=str(tmp_path / "root" / "."))
    assert snapshot(str(tmp_path)) == before
    assert_same_tensors(read_all(CheckpointReader.open(str(tmp_path / "root"))), tensors["param"])


def test_reshard_guards(tmp_path):
    _adam_like(str(tmp_path), 2)
    ref = reshard(str(tmp_path), 3)
    before = snapshot(str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="already laid out"):
        reshard(ref.url, 3)
    with pytest.raises(OutputExistsError):
        reshard(str(tmp_path / "step-00000003"), 3)
    for bad in (0, -1):
        with pytest.raises(InvalidArgumentError, match="--to"):
            reshard(str(tmp_path), bad)
    with pytest.raises(InvalidArgumentError, match="--stage"):
        reshard(str(tmp_path), 2, stage=4)
    assert snapshot(str(tmp_path)) == before
    # --overwrite replaces an earlier reshard output (not the source).
    ref2 = reshard(str(tmp_path / "step-00000003"), 3, overwrite=True, stage=0)
    assert ref2.name == ref.name
    assert CheckpointReader.open(ref2.url).manifest.layout.stage == 0
