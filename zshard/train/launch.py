"""``zshard train``: validate the configuration, then start workers with torch.distributed.run.

Everything that can be checked before any process starts is checked here (the configuration,
the resume path, that the checkpoint matches the model), so bad input ends in one line and exit
code 2 with nothing written. Workers run ``zshard.train.loop`` under torch's elastic launcher
(rendezvous on 127.0.0.1 by default; several nodes and restarts through its own options).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from zshard.errors import CheckpointNotFoundError, ConfigError, InvalidArgumentError, ZshardError
from zshard.store.reader import CheckpointReader
from zshard.store.root import latest_name
from zshard.store.storage import open_storage
from zshard.train.config import ZshardConfig
from zshard.train.ds_config import load_with_deepspeed, warning_line


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """How to start the workers; mirrors torch.distributed.run's options."""

    nproc: int | None = None  # default: one per GPU, else 2 on CPU
    nnodes: str = "1"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    max_restarts: int = 0
    overrides: list[str] = field(default_factory=list)
    deepspeed_config: str | None = None  # a DeepSpeed JSON config to start from

    def __post_init__(self) -> None:
        if self.nproc is not None and self.nproc < 1:
            raise InvalidArgumentError(f"--nproc must be >= 1, got {self.nproc}")
        if self.max_restarts < 0:
            raise InvalidArgumentError(f"--max-restarts must be >= 0, got {self.max_restarts}")


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def preflight(cfg: ZshardConfig, world_size: int) -> None:
    """Fail before launch on what workers would only discover after start-up."""
    cfg.train.resolved_global_batch(world_size)  # batch arithmetic must work at this size
    resume = cfg.checkpoint.resume
    ckpt_dir = cfg.checkpoint.dir
    source = None
    if resume not in ("auto", "never"):
        source = resume
    elif resume == "auto" and ckpt_dir and latest_name(open_storage(ckpt_dir)) is not None:
        source = ckpt_dir
    elif resume == "never" and ckpt_dir and latest_name(open_storage(ckpt_dir)) is not None:
        raise ConfigError(
            f"checkpoint.dir {ckpt_dir} already holds checkpoints and checkpoint.resume is "
            "'never'; use resume: auto to continue, or a new checkpoint.dir"
        )
    if source is not None:
        try:
            reader = CheckpointReader.open(source)
        except CheckpointNotFoundError:
            raise ConfigError(f"checkpoint.resume: no checkpoint at {source}") from None
        check_model_matches(cfg, reader)


def check_model_matches(cfg: ZshardConfig, reader: CheckpointReader) -> None:
    """Compare parameter names and shapes of the configured model with the checkpoint's."""
    import torch

    from zshard.train.loop import build

    factory, _, _ = build(cfg)
    with torch.device("meta"):
        model = factory()
    want = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    have = {t.name: t.shape for t in reader.manifest.tensors if t.kind in ("param", "master")}
    for alias, target in reader.manifest.ties.items():
        if target in have:
            have[alias] = have[target]
    diffs = []
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            diffs.append(
                f"{name}: model {want.get(name, 'absent')}, checkpoint {have.get(name, 'absent')}"
            )
    if diffs:
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ConfigError(
            f"checkpoint {reader.url} is from a different model: {'; '.join(diffs[:4])}{more}"
        )


def launch(config_path: str, opts: LaunchConfig) -> int:
    """Run training; returns the exit code (0 ok, 1 worker failure, 2 bad input)."""
    nproc = opts.nproc or default_nproc()
    multi_node = opts.nnodes not in ("1", "1:1")
    cfg, ignored = load_with_deepspeed(
        config_path, opts.overrides, opts.deepspeed_config, None if multi_node else nproc
    )
    if ignored:
        print(warning_line(ignored), file=sys.stderr)
    if not multi_node:
        preflight(cfg, nproc)
    error_dir = tempfile.mkdtemp(prefix="zshard-errors-")
    log_path = os.path.join(error_dir, "launcher.log")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--nnodes={opts.nnodes}",
        f"--max-restarts={opts.max_restarts}",
    ]
    if opts.node_rank is not None:
        # A fixed node rank means static rendezvous: the endpoint is the master's host:port.
        host, _, port = (opts.rdzv_endpoint or "127.0.0.1:29500").partition(":")
        cmd += [
            f"--node-rank={opts.node_rank}",
            f"--master-addr={host}",
            f"--master-port={port or 29500}",
        ]
    else:
        endpoint = opts.rdzv_endpoint or f"127.0.0.1:{free_port()}"
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]
    cmd += ["-m", "zshard.train.loop", config_path]
    if opts.deepspeed_config:
        cmd += ["--deepspeed-config", os.path.abspath(opts.deepspeed_config)]
    for o in opts.overrides:
        cmd += ["--set", o]
    env = dict(
        os.environ,
        ZSHARD_ERROR_DIR=error_dir,
        OMP_NUM_THREADS=os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc))
        ),
    )
    with open(log_path, "wb") as log:
        # The launcher's own failure report is long and repeats per rank: keep it in the log and
        # show the root cause once. Workers print progress on stdout, which passes through.
        proc = subprocess.run(cmd, env=env, stderr=log, check=False)
    if proc.returncode == 0:
        shutil.rmtree(error_dir, ignore_errors=True)
        return 0
    return report_failure(error_dir, log_path)


def report_failure(error_dir: str, log_path: str) -> int:
    errors = []
    for path in glob.glob(os.path.join(error_dir, "rank-*.json")):
        try:
            with open(path) as f:
                errors.append(json.load(f))
        except (OSError, ValueError):
            continue
    if not errors:
        tail = _tail(log_path)
        print(f"zshard: error: training failed: {tail} (full log: {log_path})", file=sys.stderr)
        return 1
    # The earliest error is the root cause; others are usually peers losing their connection.
    first = min(errors, key=lambda e: (not e.get("bad_input"), e.get("time", 0)))
    print(
        f"zshard: error: rank {first['rank']}: {first['message']} (full log: {log_path})",
        file=sys.stderr,
    )
    return 2 if first.get("bad_input") else 1


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no output"
    return lines[-1][:300] if lines else "no output"


__all__ = ["LaunchConfig", "ZshardError", "launch", "preflight"]
