"""Benchmark: ``zshard consolidate`` against DeepSpeed's zero_to_fp32 and torch's dcp_to_torch_save.

    python tools/bench_convert.py [--workdir DIR] [--params 100000000] [--reuse]

Makes two real checkpoints of the same ~100M-parameter model (a tied 32000x1024 embedding and
MLP blocks, >= 400 MB of fp32 weights): a 2-rank DeepSpeed ZeRO-2 run and a 2-rank FSDP2 run
saved with ``dcp.save`` (model + AdamW state), one optimizer step each, on CPU/gloo. Then runs
each conversion once in a fresh child process, with the source evicted from the page cache
first (posix_fadvise), and prints wall time, the child's peak RSS (``VmHWM``; ``ru_maxrss``
too) and ratios:

    zshard consolidate  DeepSpeed dir -> model.safetensors (fp32)
    zero_to_fp32        convert_zero_checkpoint_to_fp32_state_dict (its default pickle output;
                        its --safe_serialization refuses the tied weight)
    zshard consolidate  DCP dir -> model.safetensors, and with --include-optimizer
    dcp_to_torch_save   DCP dir -> one torch.save file (model *and* optimizer state)

Targets (issue 5): zshard's time <= 0.5x the baseline's, and its peak RSS <= the largest tensor
+ 256 MB. Needs deepspeed (``DS_ACCELERATOR=cpu`` is set here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import _bench_util as bu  # noqa: E402

MB = 1_000_000


# -- child side ---------------------------------------------------------------------------------


def child(method: str, src: str, out: str) -> None:
    bu.disable_numpy_hugepages()
    import torch  # every method needs it: imported before the baseline RSS and the clock

    if os.path.exists(os.path.join(src, ".metadata")):
        # Both DCP readers need torch.distributed.checkpoint (its metadata classes), a ~2 s
        # import: done before the clock starts for each, like the imports above.
        import torch.distributed.checkpoint  # noqa: F401

    if method.startswith("zshard"):
        from zshard.convert.consolidate import consolidate
    elif method == "zero_to_fp32":
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    base = bu.rss_bytes()
    t0 = time.perf_counter()
    if method == "zshard":
        consolidate(src, out, dtype="fp32", max_shard_size="100GB")
    elif method == "zshard+optim":
        consolidate(src, out, dtype="fp32", max_shard_size="100GB", include_optimizer=True)
    elif method == "zero_to_fp32":
        convert_zero_checkpoint_to_fp32_state_dict(src, out, max_shard_size="100GB")
    else:
        dcp_to_torch_save(src, out)
    if os.path.isdir(out):
        for f in os.listdir(out):
            bu.fsync_path(os.path.join(out, f))
    else:
        bu.fsync_path(out)
    wall = time.perf_counter() - t0
    bu.emit_child_result(
        wall=wall,
        baseline_rss_bytes=base,
        ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        out_bytes=bu.dir_bytes(out),
    )


# -- parent side --------------------------------------------------------------------------------


def make_checkpoints(work: str, params: int, reuse: bool) -> tuple[str, str]:
    from tests.convert import _make_dcp, _make_deepspeed

    job = _make_deepspeed.Job("ds", 2, "fp32", steps=1, model="wide", params=params)
    ds, dcp = os.path.join(work, "ds"), os.path.join(work, "dcp")
    if not (reuse and os.path.exists(os.path.join(ds, "latest"))):
        bu.remove(ds)
        t = time.perf_counter()
        _make_deepspeed.make(work, 2, [job], timeout=1800)
        print(f"made DeepSpeed ZeRO-2 checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
    if not (reuse and os.path.exists(os.path.join(dcp, ".metadata"))):
        bu.remove(dcp)
        os.makedirs(dcp)
        t = time.perf_counter()
        _make_dcp.make(dcp, 2, job, timeout=1800)
        print(f"made FSDP2 DCP checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
    return ds, dcp


def largest_tensor_bytes(src: str) -> tuple[int, int]:
    """(largest fp32 weight, all fp32 weights) in bytes, from zshard's reading of ``src``."""
    from zshard.convert.consolidate import open_checkpoint, select

    tensors = select(open_checkpoint(src), "fp32", False)
    return max(t.nbytes for t in tensors), sum(t.nbytes for t in tensors)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=os.path.join("/tmp", "zshard-bench-convert"))
    p.add_argument("--params", type=int, default=100_000_000)
    p.add_argument("--reuse", action="store_true", help="keep checkpoints made by a former run")
    p.add_argument("--child", nargs=3, metavar=("METHOD", "SRC", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(*a.child)
        return
    os.makedirs(a.workdir, exist_ok=True)
    ds, dcp = make_checkpoints(a.workdir, a.params, a.reuse)
    largest, total = largest_tensor_bytes(ds)
    runs = [
        ("DeepSpeed ZeRO-2", "zshard consolidate", "zshard", ds, "ds.safetensors"),
        ("DeepSpeed ZeRO-2", "zero_to_fp32", "zero_to_fp32", ds, "ds_z2f"),
        ("DCP (FSDP2)", "zshard consolidate", "zshard", dcp, "dcp.safetensors"),
        (
            "DCP (FSDP2)",
            "zshard consolidate --include-optimizer",
            "zshard+optim",
            dcp,
            "dcp_opt.safetensors",
        ),
        ("DCP (FSDP2)", "dcp_to_torch_save", "dcp_to_torch_save", dcp, "dcp.pt"),
    ]
    results = {}
    for source, label, method, src, out_name in runs:
        out = os.path.join(a.workdir, "out", out_name)
        bu.remove(out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        # Per file, not drop_caches: other benchmarks may share the machine's page cache.
        bu.fadvise_dontneed([src])
        t = time.perf_counter()
        r = bu.run_child([os.path.abspath(__file__), "--child", method, src, out], timeout=3600)
        r["outer"] = time.perf_counter() - t
        results[(source, label)] = r
        print(
            f"{source:18} {label:40} {r['wall']:7.2f} s  peak RSS "
            f"{r['peak_rss_bytes'] / MB:7.0f} MB",
            flush=True,
        )
        bu.remove(out)
    info = bu.machine_info(a.workdir)
    with __import__("contextlib").suppress(ImportError):
        info["deepspeed"] = __import__("deepspeed").__version__
    rows = []
    for (source, label), r in results.items():
        rows.append(
            [
                source,
                label,
                f"{r['wall']:.2f}",
                f"{r['outer']:.2f}",
                f"{r['peak_rss_bytes'] / MB:.0f}",
                f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / MB:.0f}",
                f"{r['out_bytes'] / MB:.0f}",
            ]
        )
    print()
    print(
        f"weights: {total / MB:.0f} MB fp32, largest tensor {largest / MB:.0f} MB; "
        "source evicted from the page cache (posix_fadvise) before each run; "
        f"load {bu.load_average()}"
    )
    print("machine: " + json.dumps(info))
    print()
    print(
        bu.markdown_table(
            [
                "source",
                "method",
                "conversion s",
                "process s",
                "peak RSS MB",
                "RSS over imports MB",
                "output MB",
            ],
            rows,
        )
    )
    zd, zb = (
        results[("DeepSpeed ZeRO-2", "zshard consolidate")],
        results[("DeepSpeed ZeRO-2", "zero_to_fp32")],
    )
    dz, dzo, db = (
        results[("DCP (FSDP2)", m)]
        for m in (
            "zshard consolidate",
            "zshard consolidate --include-optimizer",
            "dcp_to_torch_save",
        )
    )
    print()
    for name, z, b in (
        ("DeepSpeed: zshard / zero_to_fp32", zd, zb),
        ("DCP: zshard (model) / dcp_to_torch_save", dz, db),
        ("DCP: zshard (+optimizer) / dcp_to_torch_save", dzo, db),
    ):
        print(
            f"{name}: time {z['wall'] / b['wall']:.2f}x, peak RSS "
            f"{z['peak_rss_bytes'] / b['peak_rss_bytes']:.2f}x"
        )
    limit = largest + 256 * MB
    for name, z in (("DeepSpeed", zd), ("DCP", dz), ("DCP +optimizer", dzo)):
        print(
            f"{name}: zshard peak RSS {z['peak_rss_bytes'] / MB:.0f} MB vs target largest "
            f"tensor + 256 MB = {limit / MB:.0f} MB: "
            f"{'met' if z['peak_rss_bytes'] <= limit else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
