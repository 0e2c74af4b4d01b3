"""``zshard train``: validate the configuration, then start workers with torch.distributed.run.

Everything that can be checked before any process starts is checked here (the configuration,
the resume path, that the checkpoint matches the model), so bad input ends in one line and exit
code 2 with nothing written. Workers run ``zshard.train.run._loop`` under torch's elastic launcher
(rendezvous on 127.0.0.1 by default; several nodes and restarts through its own options).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from zshard.errors import CheckpointNotFoundError, ConfigError, InvalidArgumentError
from zshard.store.lock import RUN_ID_ENV, RootLock
from zshard.store.reader import CheckpointReader
from zshard.train.config import ZshardConfig, default_nproc, load_with_deepspeed, warning_line
from zshard.train.engine import check_model_matches, holds_checkpoints, resume_source
from zshard.train.models import make_model
from zshard.train.offload import preflight as check_offload


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def preflight(cfg: ZshardConfig, world_size: int) -> None:
    """Fail before launch on what workers would only discover after start-up."""
    cfg.train.resolved_global_batch(world_size)  # batch arithmetic must work at this size
    check_offload(cfg, world_size)  # offload paths writable, reachable, with room
    ckpt_dir = cfg.checkpoint.dir
    if cfg.checkpoint.resume == "never" and ckpt_dir and holds_checkpoints(ckpt_dir):
        raise ConfigError(
            f"checkpoint.dir {ckpt_dir} already holds checkpoints and checkpoint.resume is "
            "'never'; use resume: auto to continue, or a new checkpoint.dir"
        )
    source = resume_source(cfg.checkpoint)
    if source is None:
        return
    try:
        reader = CheckpointReader.open(source)
    except CheckpointNotFoundError:
        raise ConfigError(f"checkpoint.resume: no checkpoint at {source}") from None
    check_model_matches(reader.url, reader.manifest, _model_shapes(cfg))


def _model_shapes(cfg: ZshardConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name (tied ones included) of the configured model, built on ``meta``."""
    with torch.device("meta"):
        model = make_model(cfg.model.name, **cfg.model_kwargs()).model
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}


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
    # One run per checkpoint root (lock.py): the launcher lives as long as the run, restarts
    # included, so it holds the root's lock and its workers inherit the run id. Under c10d
    # rendezvous across nodes no launcher knows it hosts global rank 0: there each save's rank 0
    # locks the root while it writes (CheckpointWriter.prepare).
    lock = None
    if cfg.checkpoint.dir and (not multi_node or opts.node_rank == 0):
        lock = RootLock(cfg.checkpoint.dir, purpose=f"zshard train {config_path}").acquire()
    try:
        return _run(config_path, opts, nproc, lock)
    finally:
        if lock is not None:
            if lock.lost:
                print(
                    f"zshard: warning: the lock of {cfg.checkpoint.dir} was taken over during "
                    "the run; another run may have written there",
                    file=sys.stderr,
                )
            lock.release()


def _run(config_path: str, opts: LaunchConfig, nproc: int, lock: RootLock | None) -> int:
    # Restarts on one node are the launcher's, not torch.distributed.run's: torch 2.13 restarts a
    # failed worker group on the agent's TCPStore of the failed attempt, without a per-attempt key
    # prefix, and the restarted workers read the dead workers' gloo addresses from it ("Gloo
    # connectFullMesh failed ... Connection refused"): no restart ever succeeds. A fresh
    # torch.distributed.run per attempt gets a fresh store. Across nodes the agents must restart
    # together, so there torch's own --max-restarts stays in charge.
    multi_node = opts.nnodes not in ("1", "1:1")
    attempts = 1 if multi_node else opts.max_restarts + 1
    for attempt in range(attempts):
        code, error_dir, log_path = _run_once(config_path, opts, nproc, lock, attempt, multi_node)
        if code == 0:
            return 0
        first = _first_error(error_dir)
        if attempt + 1 == attempts or (first is not None and first.get("bad_input")):
            return report_failure(error_dir, log_path)
        killed = _tail(log_path)
        if first is not None and " was killed by " not in killed:
            cause = f"rank {first['rank']}: {first['message']}"
        else:
            cause = killed
        print(
            f"zshard: worker group failed ({' '.join(cause.split())[:300]}); restarting from the "
            f"newest checkpoint (restart {attempt + 1} of {opts.max_restarts}; log: {log_path})",
            file=sys.stderr,
        )
    raise AssertionError("unreachable")


def _run_once(
    config_path: str,
    opts: LaunchConfig,
    nproc: int,
    lock: RootLock | None,
    attempt: int,
    multi_node: bool,
) -> tuple[int, str, str]:
    error_dir = tempfile.mkdtemp(prefix="zshard-errors-")
    log_path = os.path.join(error_dir, "launcher.log")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--nnodes={opts.nnodes}",
        f"--max-restarts={opts.max_restarts if multi_node else 0}",
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
    cmd += ["-m", "zshard.train.run._loop", config_path]
    if opts.deepspeed_config:
        cmd += ["--deepspeed-config", os.path.abspath(opts.deepspeed_config)]
    for o in opts.overrides:
        cmd += ["--set", o]
    env = dict(
        os.environ,
        ZSHARD_ERROR_DIR=error_dir,
        ZSHARD_RESTART_COUNT=str(attempt),  # torch's TORCHELASTIC_RESTART_COUNT restarts at 0
        OMP_NUM_THREADS=os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc))
        ),
    )
    if lock is not None:
        env[RUN_ID_ENV] = lock.run_id
    with open(log_path, "wb") as log:
        # The launcher's own failure report is long and repeats per rank: keep it in the log and
        # show the root cause once. Workers print progress on stdout, which passes through.
        proc = subprocess.run(cmd, env=env, stderr=log, check=False)
    if proc.returncode == 0:
        shutil.rmtree(error_dir, ignore_errors=True)
    return proc.returncode, error_dir, log_path


def _first_error(error_dir: str) -> dict | None:
    """The root cause among the ranks' error files: bad input first, else the earliest."""
    errors = []
    for path in glob.glob(os.path.join(error_dir, "rank-*.json")):
        try:
            with open(path) as f:
                errors.append(json.load(f))
        except (OSError, ValueError):
            continue
    if not errors:
        return None
    # The earliest error is the root cause; others are usually peers losing their connection.
    return min(errors, key=lambda e: (not e.get("bad_input"), e.get("time", 0)))


def report_failure(error_dir: str, log_path: str) -> int:
    first = _first_error(error_dir)
    tail = _tail(log_path)
    if first is None or (not first.get("bad_input") and " was killed by " in tail):
        # A worker killed by a signal leaves no error file; its peers' errors are consequences.
        print(f"zshard: error: training failed: {tail} (full log: {log_path})", file=sys.stderr)
        return 1
    print(
        f"zshard: error: rank {first['rank']}: {first['message']} (full log: {log_path})",
        file=sys.stderr,
    )
    return 2 if first.get("bad_input") else 1


def _tail(path: str) -> str:
    """The root cause in torch.distributed.run's log: a worker killed by a signal (its peers'
    errors are then only consequences), else the last meaningful line."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no output"
    for line in lines:
        m = _FAILED.search(line)
        if m and int(m.group(1)) < 0:
            sig = -int(m.group(1))
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return f"local rank {m.group(2)} (pid {m.group(3)}) was killed by {name}"
    meaningful = [line for line in lines if any(c.isalnum() for c in line)]
    return meaningful[-1][:300] if meaningful else "no output"


# torch.distributed.run: "failed (exitcode: -9) local_rank: 1 (pid: 123) of binary: ..."
_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")


__all__ = ["LaunchConfig", "launch", "preflight"]
