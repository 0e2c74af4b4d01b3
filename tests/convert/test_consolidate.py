"""Consolidate: HF-style shards and index, dtype casts, ties, and every optimizer state kind."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import (
    assert_same_tensors,
    awkward_state_dict,
    read_all,
    snapshot,
    temp_names,
    write_checkpoint,
)
from zshard.convert.consolidate import consolidate
from zshard.convert.importer import import_safetensors
from zshard.convert.reshard import reshard
from zshard.convert.safetensors_io import INDEX_NAME, TIES_METADATA_KEY
from zshard.errors import InvalidArgumentError, OutputExistsError
from zshard.store.reader import CheckpointReader
from zshard.store.verify import verify
from zshard.units import parse_size


@pytest.fixture
def imported(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    sd = awkward_state_dict(1)
    src = tmp_path / "src.safetensors"
    save_file(sd, str(src))
    ref = import_safetensors(str(src), str(tmp_path / "ckpt"), 3)
    return ref.url, sd


def load_hf_dir(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Reassemble a HF-style sharded directory through its index, as transformers does."""
    with open(os.path.join(path, INDEX_NAME)) as f:
        index = json.load(f)
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        part = load_file(os.path.join(path, fname))
        assert all(index["weight_map"][k] == fname for k in part)
        assert not set(part) & set(out)
        out.update(part)
    assert set(out) == set(index["weight_map"])
    return out, index


@pytest.mark.parametrize("max_size", ["200B", "0.3KB", "100", "1"])
def test_sharded_directory_with_index(tmp_path, imported, max_size):
    url, sd = imported
    out = tmp_path / "hf"
    files = consolidate(url, str(out), dtype="keep", max_shard_size=max_size)
    names = sorted(os.listdir(out))
    shards = [n for n in names if n != INDEX_NAME]
    n = len(shards)
    assert n > 1 and INDEX_NAME in names
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert [os.path.basename(f) for f in files] == [*shards, INDEX_NAME]
    limit = parse_size(max_size)
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]  # noqa: SIM118
        # A shard over the limit holds a single tensor larger than the limit.
        assert sum(sizes) <= limit or len(sizes) == 1
    loaded, index = load_hf_dir(str(out))
    assert_same_tensors(loaded, sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert temp_names(str(tmp_path)) == []


def test_single_file_over_the_limit_is_refused(tmp_path, imported):
    url, _ = imported
    before = snapshot(str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="max-shard-size"):
        consolidate(url, str(tmp_path / "x.safetensors"), max_shard_size="100B")
    assert snapshot(str(tmp_path)) == before


@pytest.mark.parametrize("dtype", ["keep", "fp32", "fp16", "bf16"])
def test_dtype_casts_equal_torch(tmp_path, imported, dtype):
    url, sd = imported
    out = str(tmp_path / f"{dtype}.safetensors")
    consolidate(url, out, dtype=dtype)
    target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    want = {
        k: t.to(target) if target is not None and t.is_floating_point() else t
        for k, t in sd.items()
    }
    assert_same_tensors(load_file(out), want)
    loaded, _ = (load_file(out), None)
    # Integers and booleans are never cast.
    assert loaded["i32"].dtype == torch.int32 and loaded["mask"].dtype == torch.bool


def test_dtype_casts_large_tensor_across_windows(tmp_path, monkeypatch):
    # Windows smaller than the tensor: casting window by window equals one torch cast.
    from zshard.convert import consolidate as mod

    monkeypatch.setattr(mod, "WINDOW_BYTES", 64)
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(1000, generator=g) * 1e3, "h": torch.randn(77, generator=g).half()}
    save_file(sd, str(tmp_path / "s.safetensors"))
    ref = import_safetensors(str(tmp_path / "s.safetensors"), str(tmp_path / "c"), 2)
    for dtype, target in [("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        out = str(tmp_path / f"{dtype}.safetensors")
        consolidate(ref.url, out, dtype=dtype)
        assert_same_tensors(load_file(out), {k: t.to(target) for k, t in sd.items()})


def test_unknown_dtype_is_refused(tmp_path, imported):
    url, _ = imported
    with pytest.raises(InvalidArgumentError, match="--dtype"):
        consolidate(url, str(tmp_path / "x.safetensors"), dtype="fp8")
    assert not (tmp_path / "x.safetensors").exists()


def test_existing_output_needs_overwrite(tmp_path, imported):
    url, sd = imported
    for out in (tmp_path / "o.safetensors", tmp_path / "dir"):
        consolidate(url, str(out), dtype="keep", max_shard_size="1KB")
        before = snapshot(str(tmp_path))
        with pytest.raises(OutputExistsError):
            consolidate(url, str(out), dtype="bf16", max_shard_size="1KB")
        assert snapshot(str(tmp_path)) == before
    # --overwrite replaces a sharded directory whole, leaving no stale shard behind.
    consolidate(url, str(tmp_path / "dir"), dtype="keep", max_shard_size="100KB", overwrite=True)
    assert sorted(os.listdir(tmp_path / "dir")) == ["model-00001-of-00001.safetensors", INDEX_NAME]
    assert_same_tensors(load_hf_dir(str(tmp_path / "dir"))[0], sd)
    consolidate(url, str(tmp_path / "o.safetensors"), dtype="bf16", overwrite=True)
    assert load_file(str(tmp_path / "o.safetensors"))["w.prime"].dtype == torch.bfloat16
    assert temp_names(str(tmp_path)) == []


@pytest.mark.parametrize(
    ("text", "value"),
    [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 5 * 10**8), ("10", 10), ("1.5KB", 1500)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "5 XB", "five"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidArgumentError):
        parse_size(text)


# -- ties -------------------------------------------------------------------------------------


def test_tied_names_are_written_once_and_recorded(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {"embed.weight": torch.randn(11, 4, generator=g), "ln": torch.ones(4)}
    ties = {"lm_head.weight": "embed.weight"}
    src = tmp_path / "tied.safetensors"
    save_file(sd, str(src), metadata={"format": "pt", TIES_METADATA_KEY: json.dumps(ties)})
    ref = import_safetensors(str(src), str(tmp_path / "c"), 3)
    reader = CheckpointReader.open(ref.url)
    assert reader.manifest.ties == ties
    # The alias reads as its target.
    assert torch.equal(
        reader.read_torch("lm_head.weight", "param").reshape(11, 4), sd["embed.weight"]
    )
    ref2 = reshard(ref.url, 2)
    assert CheckpointReader.open(ref2.url).manifest.ties == ties
    out = tmp_path / "o.safetensors"
    consolidate(ref2.url, str(out), dtype="keep")
    with safe_open(str(out), "pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "ln"]
        assert json.loads(f.metadata()[TIES_METADATA_KEY]) == ties
    assert_same_tensors(load_file(str(out)), sd)
    # A sharded directory records the ties in every shard and in the index metadata.
    consolidate(ref2.url, str(tmp_path / "hf"), dtype="keep", max_shard_size="50B")
    loaded, index = load_hf_dir(str(tmp_path / "hf"))
    assert_same_tensors(loaded, sd)
    assert json.loads(index["metadata"][TIES_METADATA_KEY]) == ties
    # Importing the consolidated output again keeps the ties.
    ref3 = import_safetensors(str(out), str(tmp_path / "again"), 1)
    assert CheckpointReader.open(ref3.url).manifest.ties == ties


def test_ties_to_missing_or_stored_names_are_dropped_on_import(tmp_path):
    sd = {"a": torch.ones(2), "b": torch.zeros(2)}
    meta = {TIES_METADATA_KEY: json.dumps({"b": "a", "c": "nope", "d": "a"})}
    save_file(sd, str(tmp_path / "s.safetensors"), metadata=meta)
    ref = import_safetensors(str(tmp_path / "s.safetensors"), str(tmp_path / "c"), 2)
    assert CheckpointReader.open(ref.url).manifest.ties == {"d": "a"}


# -- any optimizer -----------------------------------------------------------------------------


def optimizer_checkpoint(root: str, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """bf16 params, fp32 master weights, Adam *and* SGD state, an int buffer kind."""
    g = torch.Generator().manual_seed(9)
    shapes = {"w1": (7, 13), "b1": (5,), "scale": (), "emb": (3, 4), "tiny": (2,)}
    master = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    tensors = {
        "param": {n: t.to(torch.bfloat16) for n, t in master.items()},
        "master": master,
        "exp_avg": {n: torch.randn(s, generator=g) for n, s in shapes.items()},
        "exp_avg_sq": {n: torch.rand(s, generator=g) for n, s in shapes.items()},
        # Not every name has every kind (e.g. SGD momentum only for some parameters).
        "momentum_buffer": {n: torch.randn(shapes[n], generator=g) for n in ("w1", "emb")},
        "step_count": {n: torch.tensor(40 + i, dtype=torch.int64) for i, n in enumerate(shapes)},
    }
    write_checkpoint(
        root,
        40,
        tensors,
        world,
        state={"optimizer": {"name": "AdamW+SGD", "lr": 3e-4}, "step": 40},
        rank_state=[{"rank": r, "rng": f"seed-{r}"} for r in range(world)],
    )
    return tensors


@pytest.mark.parametrize(("n", "m"), [(1, 4), (3, 2), (4, 4), (2, 5)])
def test_reshard_carries_every_state_kind_bitwise(tmp_path, n, m):
    tensors = optimizer_checkpoint(str(tmp_path), n)
    ref = reshard(str(tmp_path), m)
    reader = CheckpointReader.open(ref.url)
    assert sorted(reader.manifest.kinds()) == sorted(tensors)
    for kind, by_name in tensors.items():
        assert_same_tensors(read_all(reader, kind), by_name)
    state = reader.manifest.state
    assert state["optimizer"] == {"name": "AdamW+SGD", "lr": 3e-4} and state["step"] == 40
    # Per-rank state follows its rank; new ranks start empty.
    for r in range(m):
        want = {"rank": r, "rng": f"seed-{r}"} if r < n else {}
        assert reader.read_rank_state(r) == want
    assert verify(ref.url, all_faults=True).ok


def test_consolidate_prefers_master_and_includes_every_optimizer_kind(tmp_path):
    tensors = optimizer_checkpoint(str(tmp_path / "c"), 3)
    ref = reshard(str(tmp_path / "c"), 2)
    out = tmp_path / "o.safetensors"
    consolidate(ref.url, str(out), dtype="keep", include_optimizer=True)
    loaded = load_file(str(out))
    want = dict(tensors["master"])  # fp32 master weights over the bf16 params
    for kind in ("exp_avg", "exp_avg_sq", "momentum_buffer", "step_count"):
        want.update({f"optimizer.{kind}.{n}": t for n, t in tensors[kind].items()})
    assert_same_tensors(loaded, want)
    # Without --include-optimizer only the weights are written.
    consolidate(ref.url, str(tmp_path / "w.safetensors"), dtype="bf16")
    assert_same_tensors(
        load_file(str(tmp_path / "w.safetensors")),
        {k: t.to(torch.bfloat16) for k, t in tensors["master"].items()},
    )
    assert re.fullmatch(r"step-00000040-w2", ref.name)
