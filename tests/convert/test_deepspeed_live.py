"""DeepSpeed ZeRO checkpoints made fresh by a live DeepSpeed (opt-in: skipped without deepspeed).

``test_deepspeed.py`` runs the same checks from committed fixtures with no DeepSpeed; this module
repeats the core of them on checkpoints the installed DeepSpeed makes now, so a new DeepSpeed
release (or a layout the fixtures lack: world size 1, the default ``tiny`` model) can be checked
without re-making the fixtures. Run it with deepspeed installed (``pip install -e .[interop]``, or
``tools/make_deepspeed_fixtures.py``'s separate venv): its first use JIT-builds CPU ops for minutes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading

import pytest
import torch

from tests.convert._deepspeed_fixtures import TIES, load_safetensors
from tests.convert._make_deepspeed import Job
from zshard.convert.consolidate import consolidate
from zshard.convert.importer import import_checkpoint
from zshard.convert.sources import detect
from zshard.store.reader import CheckpointReader

pytestmark = pytest.mark.slow

# name -> (world size, job): world size 1 and the default model, which the fixtures lack, and
# one of each dtype at the other stages.
JOBS = {
    "s2f1": (1, Job("s2f1", 2, "fp32")),
    "s1b2": (2, Job("s1b2", 1, "bf16")),
    "s2h2": (2, Job("s2h2", 2, "fp16", steps=3, saves=(1,))),
    "s3f2": (2, Job("s3f2", 3, "fp32")),
    "s3b3": (3, Job("s3b3", 3, "bf16")),
}


@pytest.fixture(scope="module")
def ds_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    from tests.convert._make_deepspeed import make

    root = str(tmp_path_factory.mktemp("deepspeed"))
    by_world: dict[int, list[Job]] = {}
    for world, job in JOBS.values():
        by_world.setdefault(world, []).append(job)
    errors: list[BaseException] = []

    def run(world: int, jobs: list[Job]) -> None:
        try:
            make(root, world, jobs, timeout=240)
        except BaseException as e:
            errors.append(e)

    # One process group per world size, all at once: start-up (imports) dominates.
    threads = [threading.Thread(target=run, args=item) for item in by_world.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return root


def _zero_to_fp32(path: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(path, tag=tag)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_consolidate_equals_zero_to_fp32(ds_root, tmp_path, name):
    job = JOBS[name][1]
    src = os.path.join(ds_root, name)
    assert detect(src) == "deepspeed"
    for step in job.save_steps:
        tag = f"global_step{step}"
        out = str(tmp_path / f"{tag}.safetensors")
        consolidate(src, out, dtype="fp32", tag=tag)
        got, ties = load_safetensors(out)
        want = _zero_to_fp32(src, tag)
        assert ties == TIES
        for alias, target in ties.items():
            got[alias] = got[target]
        extra = set(got) - set(want)
        assert extra == ({"frozen.weight"} if job.stage == 1 else set())
        for k, w in want.items():
            assert got[k].dtype == torch.float32, k
            assert torch.equal(got[k], w.float()), (tag, k)


def test_import_at_another_world_size(ds_root, tmp_path):
    world, job = JOBS["s3b3"]
    src = os.path.join(ds_root, job.name)
    ref = import_checkpoint(src, str(tmp_path / "z"), 2)
    m = CheckpointReader.open(ref.url).manifest
    assert m.step == job.steps and m.layout.world_size == 2 and m.layout.stage == job.stage
    with open(os.path.join(src, "job.json")) as f:
        assert json.load(f)["world_size"] == world
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    consolidate(ref.url, a, include_optimizer=True)
    consolidate(src, b, include_optimizer=True)
    ga, gb = load_safetensors(a)[0], load_safetensors(b)[0]
    assert ga.keys() == gb.keys()
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
