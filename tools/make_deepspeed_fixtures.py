"""Make the committed DeepSpeed ZeRO fixtures in ``tests/fixtures/deepspeed/`` with real DeepSpeed.

The DeepSpeed reader tests (``tests/convert/test_deepspeed.py``) run from these files, so
``make test`` needs no DeepSpeed. Re-make them only when the fixture set changes or to check a new
DeepSpeed release. DeepSpeed goes into a venv of its own, never the project's (its CPU ops are
JIT-built with ninja and a C++ compiler on first use, which takes minutes)::

    python3 -m venv /tmp/dsvenv
    /tmp/dsvenv/bin/pip install torch==2.13.0
    /tmp/dsvenv/bin/pip install "deepspeed==0.19.*" safetensors numpy
    DS_ACCELERATOR=cpu /tmp/dsvenv/bin/python tools/make_deepspeed_fixtures.py

It trains ``tests/convert/_make_deepspeed.py``'s model at its ``mini`` size (a tied
embedding/head, a frozen projection, a buffer, odd sizes that ranks cut unevenly; 1774
parameters) on CPU: one process group per world size, gloo on 127.0.0.1. Each fixture
``NAME/`` holds:

``ckpt/``
    DeepSpeed's save directory as ``engine.save_checkpoint`` wrote it: ``latest`` and two tags,
    ``global_step2`` and ``global_step3`` (DeepSpeed's copies of its own ``zero_to_fp32.py`` and
    ``zero_to_torch.py`` scripts are left out).
``<tag>.zero_to_fp32.safetensors``
    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint(ckpt, tag)``, every key as returned
    (tied names included, each its own copy); metadata ``shared`` maps each key that was the
    same tensor as another to that one.
``<tag>.optim.safetensors``
    at the moment of the save, the live engine's ``safe_get_full_fp32_param`` (``master.NAME``)
    and ``safe_get_full_optimizer_state`` (``exp_avg.NAME``, ``exp_avg_sq.NAME``) of every
    trainable parameter: DeepSpeed's own assembly of the partitioned optimizer state.
``job.json``
    the job (``tests.convert._make_deepspeed.Job`` fields), world size, versions, per tag the
    step, optimizer step counter, skipped steps and loss scale, and the loss of every step
    (``losses_by_step``): a run resumed from tag ``global_step<n>`` must follow
    ``losses_by_step[n:]``.

fp16: DeepSpeed's CPU accelerator refuses fp16 ("Type fp16 is not supported on your device")
because its capability check asks oneDNN. The fp16 fixtures are still DeepSpeed's own output:
the worker overrides only that check (``get_accelerator().is_fp16_supported``), torch computes in
fp16 on the CPU, and DeepSpeed's fp16 ZeRO path (dynamic loss scaler, fp16 module weights, fp32
partitions and moments) writes the files. Nothing in them is rewritten by hand.

The directory is replaced as a whole; ``--check`` only prints what is there and its size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.convert._make_deepspeed import Job  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "deepspeed")

# name: s<stage><f|b|h for fp32|bf16|fp16><world size>. Every stage at both world sizes and in
# both 16-bit formats, without the whole product (the fixtures stay small). Every job saves after
# 2 and 3 steps; "s2f2" then trains 3 more: the reference curve of the resume test.
FIXTURES: dict[str, tuple[int, Job]] = {
    name: (world, Job(name, stage, dtype, steps=3, more=more, model="mini", saves=(2,)))
    for name, world, stage, dtype, more in [
        ("s1f2", 2, 1, "fp32", 0),
        ("s1b3", 3, 1, "bf16", 0),
        ("s2f2", 2, 2, "fp32", 3),
        ("s2b3", 3, 2, "bf16", 0),
        ("s2h2", 2, 2, "fp16", 0),
        ("s3f3", 3, 3, "fp32", 0),
        ("s3b2", 2, 3, "bf16", 0),
        ("s3h3", 3, 3, "fp16", 0),
    ]
}


def zero_to_fp32(save_dir: str, tag: str, path: str) -> None:
    """DeepSpeed's consolidation of one tag, written as it came (shared tensors noted)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
    # Stages 1-2 return views into one flat buffer: "the same tensor" is the same elements.
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    shared: dict[str, str] = {}
    for name, t in sd.items():
        key = (t.data_ptr(), t.numel(), tuple(t.shape))
        if key in first:
            shared[name] = first[key]
        else:
            first[key] = name
    tensors = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    save_file(tensors, path, metadata={"shared": json.dumps(shared, sort_keys=True)})


def make_all(out: str, timeout: float) -> None:
    import deepspeed
    import torch

    from tests.convert._make_deepspeed import make

    work = tempfile.mkdtemp(prefix="ds-fixtures-")
    try:
        raw, refs = os.path.join(work, "raw"), os.path.join(work, "refs")
        by_world: dict[int, list[Job]] = {}
        for world, job in FIXTURES.values():
            by_world.setdefault(world, []).append(job)
        errors: list[BaseException] = []

        def run(world: int, jobs: list[Job]) -> None:
            try:
                make(raw, world, jobs, timeout=timeout, reference_dir=refs)
            except BaseException as e:
                errors.append(e)

        # One process group per world size at the same time: start-up dominates.
        threads = [threading.Thread(target=run, args=item) for item in by_world.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

        staged = os.path.join(work, "out")
        for name, (_, job) in FIXTURES.items():
            dest = os.path.join(staged, name)
            src = os.path.join(raw, name)
            shutil.copytree(
                src,
                os.path.join(dest, "ckpt"),
                ignore=shutil.ignore_patterns("zero_to_*.py", "job.json"),
            )
            with open(os.path.join(src, "job.json")) as f:
                record = json.load(f)
            record["versions"] = {"deepspeed": deepspeed.__version__, "torch": torch.__version__}
            with open(os.path.join(dest, "job.json"), "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
                f.write("\n")
            tags = [f"global_step{n}" for n in job.save_steps]
            if sorted(record["tags"]) != sorted(tags):
                raise RuntimeError(f"{name}: saved tags {sorted(record['tags'])}, wanted {tags}")
            for tag in tags:
                zero_to_fp32(
                    os.path.join(dest, "ckpt"),
                    tag,
                    os.path.join(dest, f"{tag}.zero_to_fp32.safetensors"),
                )
                shutil.copy(
                    os.path.join(refs, name, f"{tag}.optim.safetensors"),
                    os.path.join(dest, f"{tag}.optim.safetensors"),
                )
        if os.path.exists(out):
            _check_ours(out)
            shutil.rmtree(out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copytree(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_ours(out: str) -> None:
    """Refuse to replace a directory that holds anything but fixtures (a mistyped --out)."""
    for name in os.listdir(out):
        if not os.path.isfile(os.path.join(out, name, "job.json")):
            raise SystemExit(f"{out}: {name} is not a fixture made by this script; not replacing")


def report(out: str) -> None:
    total = 0
    for name in sorted(os.listdir(out)):
        size = 0
        for dirpath, _, files in os.walk(os.path.join(out, name)):
            size += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        total += size
        print(f"{name:8s} {size / 1024:8.1f} KiB")
    print(f"{'total':8s} {total / 1024:8.1f} KiB")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="fixture directory (replaced as a whole)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process group")
    p.add_argument("--check", action="store_true", help="only list the fixtures and their sizes")
    a = p.parse_args(argv)
    if not a.check:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        make_all(a.out, a.timeout)
    report(a.out)


if __name__ == "__main__":
    main()
