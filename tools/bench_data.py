"""Benchmark the token-file loader against what training consumes.

Run from the repository root (tables go to stdout as markdown; progress to stderr)::

    python tools/bench_data.py                 # 1 GiB local corpus, 64 MiB on S3, both models
    python tools/bench_data.py --quick         # 16 MiB corpus, 8 MiB on S3, short runs: ~1 min
    python tools/bench_data.py --json out.json

What it measures, in this one process (one rank's view: in ``zshard train`` every rank reads only
its own micro batches, so one loader feeds one model replica):

* **loader, local**: ``TokenDataset`` over 4 uint16 token files of random ids (vocabulary 50304)
  read as one stream, micro batches drawn by ``GlobalBatchSampler`` (shuffled over the whole
  corpus, as training draws them) through ``collate``, at the model's shape (micro batch x
  seq_len). Once with the files in the page cache (warm) and once after evicting them (cold:
  ``drop_caches`` if allowed, else ``posix_fadvise(DONTNEED)``). Tokens/s, CPU s and RSS growth
  (the loader must not hold the corpus).
* **loader, S3**: the same files on a moto S3 server on 127.0.0.1 (a separate process, so it
  does not share this interpreter's GIL), read by byte range in blocks through a bounded cache.
  moto is a Python server: this is a floor, not what S3 or MinIO would do.
* **training**: forward + backward + AdamW step of the built-in GPT on random batches, fp32, one
  intra-op thread (``zshard train`` on 2 CPU cores runs 2 ranks of 1 thread each): the tiny model
  of examples/tiny.yaml (4 layers, d 128, micro batch 4 x 128) and the 57M model of
  tools/bench_train.py (8 layers, d 768, micro batch 2 x 128). Tokens/s of one rank.

Target: the loader delivers >= 10x the tokens/s the tiny model consumes (printed PASS/FAIL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from _bench_util import (
    MIB,
    PageCache,
    load_average,
    machine_info,
    markdown_table,
    rss_bytes,
    scratch_dir,
    timed,
)

VOCAB = 50304
MODELS = {
    # name: (GPTConfig kwargs, micro batch)
    "tiny": ({"n_layer": 4, "n_head": 4, "d_model": 128, "seq_len": 128, "vocab_size": 256}, 4),
    "57M": ({"n_layer": 8, "n_head": 12, "d_model": 768, "seq_len": 128, "vocab_size": 256}, 2),
}


def log(msg: str) -> None:
    print(f"[bench_data] {msg}", file=sys.stderr, flush=True)


def write_corpus(root: str, files: int, tokens_per_file: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(0)
    paths = []
    for i in range(files):
        path = os.path.join(root, f"part-{i:03d}.bin")
        with open(path, "wb") as f:
            left = tokens_per_file
            while left:
                n = min(left, 1 << 24)
                f.write(rng.integers(0, VOCAB, n, dtype=np.uint16).tobytes())
                left -= n
        paths.append(path)
    os.sync()
    return paths


def loader_run(
    path: str, seq_len: int, micro: int, batches: int, ahead: int = 0, **kw: Any
) -> dict[str, Any]:
    """Read ``batches`` shuffled micro batches (with ``read_ahead`` of the next ``ahead``, as a
    training loop would call it); tokens/s, CPU and RSS growth."""
    from zshard.train.data import GlobalBatchSampler, TokenDataset, collate, read_ahead

    ds = TokenDataset(path, seq_len=seq_len, vocab_size=VOCAB, **kw)
    sampler = GlobalBatchSampler(len(ds), micro * 2, seed=0)  # 2 ranks, this is rank 0
    collate(ds, sampler.micro_batch(0, 0, 2, micro, 0))  # first use: maps, threads, imports
    rss0 = rss_bytes()

    def run() -> int:
        n = 0
        for step in range(1, batches + 1):
            if ahead:
                read_ahead(ds, sampler, step, 0, 0, 2, micro, batches=ahead)
            x, _ = collate(ds, sampler.micro_batch(step, 0, 2, micro, 0))
            n += x.numel()
        return n

    t, tokens = timed(run)
    out = {
        "tokens": tokens,
        "wall_s": t.wall,
        "cpu_s": t.cpu,
        "tokens_per_s": tokens / t.wall,
        "rss_growth_mib": (rss_bytes() - rss0) / MIB,
        "corpus_tokens": ds.num_tokens,
    }
    remote = ds._remote
    if remote is not None:
        out["fetched_mib"] = remote.bytes_fetched / MIB
        out["requests"] = remote.requests
    ds.close()
    return out


def model_run(name: str, steps: int) -> dict[str, Any]:
    """Tokens/s of forward + backward + AdamW of one rank's micro batch, one thread."""
    import torch

    from zshard.train.models import GPT, GPTConfig

    torch.set_num_threads(1)
    kwargs, micro = MODELS[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kwargs))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    seq = kwargs["seq_len"]
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        x = torch.randint(0, kwargs["vocab_size"], (micro, seq + 1), generator=gen)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    runs = sorted((timed(step)[0] for _ in range(steps)), key=lambda t: t.wall)
    median = runs[len(runs) // 2]
    return {
        "step_s": median.wall,
        "cpu_s": median.cpu,
        "tokens_per_s": micro * seq / median.wall,
        "micro": micro,
        "seq": seq,
    }


@contextlib.contextmanager
def moto_process() -> Iterator[str]:
    """A moto S3 server in its own process on 127.0.0.1; yields the endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def s3_setup(endpoint: str) -> str:
    """Point fsspec at ``endpoint`` (dummy keys) and create a bucket; ``s3://bucket``."""
    import boto3
    import fsspec.config

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ[k] = v
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="bench-data"
    )
    return "s3://bench-data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small corpus, short runs (~1 min)")
    ap.add_argument("--scratch", help="directory for the corpus (default: system temp)")
    ap.add_argument("--json", help="write every measurement to this file")
    ap.add_argument("--no-s3", action="store_true", help="skip the moto S3 loader")
    args = ap.parse_args()

    tokens_per_file = (2 << 20) if args.quick else (128 << 20)  # 4 files: 16 MiB / 1 GiB
    s3_files = 1 if args.quick else 8  # of the 4 (quick) or a 64 MiB corpus (full)
    batches = 300 if args.quick else 3000
    s3_batches = 50 if args.quick else 300
    model_steps = 3 if args.quick else 10

    results: dict[str, Any] = {"quick": args.quick, "load_average_start": load_average()}
    with scratch_dir(args.scratch, "bench-data-") as scratch:
        results["machine"] = machine_info(scratch)
        log(f"writing 4 x {tokens_per_file * 2 / MIB:.0f} MiB of token files")
        paths = write_corpus(scratch, 4, tokens_per_file)
        glob = os.path.join(scratch, "part-*.bin")
        cache = PageCache()
        results["eviction"] = cache.how
        loader: dict[str, Any] = {}
        for model, (kw, micro) in MODELS.items():
            seq = kw["seq_len"]
            log(f"loader local warm ({model} shape {micro} x {seq})")
            loader[f"local warm, {micro}x{seq}"] = loader_run(glob, seq, micro, batches)
        micro, seq = MODELS["tiny"][1], MODELS["tiny"][0]["seq_len"]
        cache.evict(paths)
        log("loader local cold")
        loader[f"local cold, {micro}x{seq}"] = loader_run(glob, seq, micro, batches)
        log("loader local warm, 8 x 1024")
        loader["local warm, 8x1024"] = loader_run(glob, 1024, 8, batches // 4)
        if not args.no_s3:
            with moto_process() as endpoint:
                import fsspec

                bucket = s3_setup(endpoint)
                fs = fsspec.filesystem("s3")
                size = 8 * MIB if args.quick else 64 * MIB
                for i in range(s3_files):
                    with open(paths[i % len(paths)], "rb") as f:
                        fs.pipe(f"{bucket}/corpus/part-{i:03d}.bin", f.read(size // s3_files))
                url = f"{bucket}/corpus/part-*.bin"
                # The default cache (32 blocks) holds a quarter (full) or all (quick) of this
                # corpus; a cache of 2 blocks is what a corpus much larger than the cache sees:
                # nearly every shuffled window is a ranged GET.
                for block, blocks, ahead in (
                    (1 << 20, 32, 0),
                    (1 << 20, 2, 0),
                    (256 << 10, 2, 0),
                    (256 << 10, 2, 4),
                ):
                    label = f"S3 (moto), {micro}x{seq}, {block // 1024} KiB x {blocks} cached"
                    label += f", {ahead} batches read ahead" if ahead else ""
                    log(f"loader {label}")
                    loader[label] = loader_run(
                        url, seq, micro, s3_batches, ahead, block_bytes=block, cache_blocks=blocks
                    )
        results["loader"] = loader
        training = {}
        for model in MODELS:
            log(f"training step, {model}")
            training[model] = model_run(model, model_steps if model == "tiny" else 2)
        results["training"] = training
    results["load_average_end"] = load_average()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)

    print(f"machine: {results['machine']}")
    print(f"load average: start {results['load_average_start']}, end {load_average()}\n")
    rows = [
        [
            name,
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens'] / max(r['cpu_s'], 1e-6):,.0f}",
            f"{r['cpu_s'] / r['tokens'] * 1e9:.0f}",
            f"{r['rss_growth_mib']:.1f}",
            f"{r.get('fetched_mib', 0):.0f}" if "fetched_mib" in r else "-",
        ]
        for name, r in loader.items()
    ]
    headers = [
        "loader",
        "tokens/s (wall)",
        "tokens per CPU s",
        "CPU ns/token",
        "RSS growth MiB",
        "fetched MiB",
    ]
    print(markdown_table(headers, rows) + "\n")
    rows = [
        [
            name,
            f"{r['micro']}x{r['seq']}",
            f"{r['step_s']:.3f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['micro'] * r['seq'] / max(r['cpu_s'], 1e-6):,.0f}",
        ]
        for name, r in training.items()
    ]
    headers = ["model (1 rank, 1 thread)", "micro batch", "step s", "tokens/s", "per CPU s"]
    print(markdown_table(headers, rows))
    tiny = training["tiny"]["tokens_per_s"]
    print()
    for name, r in loader.items():
        if "x128" not in name:
            continue
        ratio = r["tokens_per_s"] / tiny
        verdict = "PASS" if ratio >= 10 else "FAIL"
        print(f"- {verdict}: loader {name} >= 10x the tiny model's tokens/s: {ratio:,.0f}x")


if __name__ == "__main__":
    main()
