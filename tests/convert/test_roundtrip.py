"""import -> reshard (N -> M) -> consolidate, bitwise, on a local disk, memory:// and S3 (moto)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load, load_file, save_file

from tests.conftest import assert_same_tensors, awkward_state_dict, read_all
from zshard.convert.consolidate import consolidate
from zshard.convert.importer import import_safetensors
from zshard.convert.reshard import reshard
from zshard.store.reader import CheckpointReader
from zshard.store.storage import open_storage
from zshard.store.verify import verify

GRID = [(n, m) for n in range(1, 6) for m in range(1, 6)]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    sd = awkward_state_dict()
    path = tmp_path_factory.mktemp("src") / "model.safetensors"
    save_file(sd, str(path))
    return str(path), sd


def round_trip(src: str, root: str, out: str, n: int, m: int, stage: int = 1):
    ref = import_safetensors(src, root, n, stage)
    assert CheckpointReader.open(ref.url).manifest.layout.world_size == n
    ref2 = reshard(ref.url, m)
    reader = CheckpointReader.open(ref2.url)
    assert reader.manifest.layout.world_size == m
    assert reader.manifest.state["resharded_from"] == {"world_size": n, "stage": stage}
    files = consolidate(ref2.url, out, dtype="keep")
    return reader, files


@pytest.mark.parametrize(("n", "m"), GRID)
def test_local_grid(tmp_path, source, n, m):
    src, sd = source
    out = str(tmp_path / "out.safetensors")
    reader, files = round_trip(src, str(tmp_path / "ckpt"), out, n, m)
    assert files == [out]
    assert_same_tensors(load_file(out), sd)
    assert_same_tensors(read_all(reader), sd)
    assert verify(reader.url).ok


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_stages_round_trip(tmp_path, source, stage):
    # Stage 3 packs one flat group per module and dtype.
    src, sd = source
    out = str(tmp_path / "out.safetensors")
    reader, _ = round_trip(src, str(tmp_path / "ckpt"), out, 3, 2, stage)
    assert reader.manifest.layout.stage == stage
    assert_same_tensors(load_file(out), sd)


def test_reshard_into_another_root_and_stage(tmp_path, source):
    src, sd = source
    ref = import_safetensors(src, str(tmp_path / "a"), 4)
    ref2 = reshard(ref.url, 2, out=str(tmp_path / "b"), stage=3)
    assert ref2.name == "step-00000000"
    reader = CheckpointReader.open(str(tmp_path / "b"))
    assert (reader.manifest.layout.world_size, reader.manifest.layout.stage) == (2, 3)
    assert_same_tensors(read_all(reader), sd)
    # Chained reshards stay bitwise.
    ref3 = reshard(ref2.url, 5)
    assert_same_tensors(read_all(CheckpointReader.open(ref3.url)), sd)


def _remote_round_trip(base: str, source, n: int, m: int) -> None:
    src, sd = source
    reader, files = round_trip(src, f"{base}/ckpt", f"{base}/out.safetensors", n, m)
    assert files == [f"{base}/out.safetensors"]
    storage = open_storage(base)
    assert_same_tensors(load(storage.read("out.safetensors")), sd)
    assert_same_tensors(read_all(reader), sd)
    report = verify(f"{base}/ckpt", all_faults=True)
    assert report.ok, report.faults
    # A directory of HF-style shards on the remote store as well.
    files = consolidate(reader.url, f"{base}/hf", dtype="keep", max_shard_size="300B")
    assert len(files) > 2
    loaded: dict[str, torch.Tensor] = {}
    for f in files[:-1]:
        loaded.update(load(storage.read(f"hf/{f.rsplit('/', 1)[1]}")))
    assert_same_tensors(loaded, sd)


@pytest.mark.parametrize(("n", "m"), [(1, 3), (4, 2), (5, 5)])
def test_memory_round_trip(memory_root, source, n, m):
    _remote_round_trip(memory_root, source, n, m)


@pytest.mark.s3
@pytest.mark.parametrize(("n", "m"), [(2, 3), (3, 1)])
def test_s3_round_trip(s3_bucket, source, n, m):
    # Plain s3:// URLs: the endpoint comes from fsspec's standard configuration only.
    assert "FSSPEC_S3_ENDPOINT_URL" in os.environ
    _remote_round_trip(f"{s3_bucket}/run", source, n, m)


@pytest.mark.s3
def test_s3_import_from_s3_source(s3_bucket, source, tmp_path):
    src, sd = source
    storage = open_storage(s3_bucket)
    with open(src, "rb") as f:
        storage.write_atomic("weights/model.safetensors", f.read())
    ref = import_safetensors(f"{s3_bucket}/weights/model.safetensors", str(tmp_path / "c"), 2)
    assert_same_tensors(read_all(CheckpointReader.open(ref.url)), sd)
