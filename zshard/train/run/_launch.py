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
import sys
import tempfile
from dataclasses import dataclass, field

from zshard.errors import CheckpointNotFoundError, ConfigError, InvalidArgumentError, ZshardError
from zshard.store.lock import RUN_ID_ENV, RootLock
from zshard.store.reader import CheckpointReader
from zshard.store.root import join_url, latest_name
from zshard.store.storage import open_storage
from zshard.train.config import ZshardConfig, default_nproc, load_with_deepspeed, warning_line
from zshard.train.engine import check_model_matches, holds_checkpoints, resume_source
from zshard.train.models import on_meta
from zshard.train.offload import preflight as check_offload
from zshard.train.run._loop import build
from zshard.train.run._stop import (
    EXIT_STOPPED,
    PREEMPT_ENV,
    STOP_REQUEST_FILE,
    STOPPED_FILE,
    read_json,
    signal_name,
)
from zshard.train.run._supervise import RunSignals, run_attempt
from zshard.train.zero import check_zeropp


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
    # The model and the data as every worker builds them: bad data fails here, in one line, and
    # an hf_dataset is tokenized once, by this process, before any worker starts.
    factory, *datasets = build(cfg)
    for ds in datasets:
        close = getattr(ds, "close", None)
        if callable(close):
            close()
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
    with on_meta():
        model = factory()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    check_model_matches(reader.url, reader.manifest, shapes)


def launch(config_path: str, opts: LaunchConfig) -> int:
    """Run training; returns the exit code: 0 done, 1 a worker failed, 2 bad input,
    :data:`EXIT_STOPPED` (75) stopped by a signal after committing a checkpoint, 128 + N ended
    by signal N without one (``checkpoint.on_signal: exit``, or a second signal)."""
    nproc = opts.nproc or default_nproc()
    multi_node = opts.nnodes not in ("1", "1:1")
    cfg, ignored = load_with_deepspeed(
        config_path, opts.overrides, opts.deepspeed_config, None if multi_node else nproc
    )
    if ignored:
        print(warning_line(ignored), file=sys.stderr)
    if not multi_node:
        preflight(cfg, nproc)
    # ZeRO++: hpZ groups must lie inside a node (nproc ranks) and divide the world.
    nodes = opts.nnodes if opts.nnodes.isdigit() else "1"
    check_zeropp(cfg.zero, int(nodes) * nproc, nproc)
    # One run per checkpoint root (lock.py): the launcher lives as long as the run (it returns
    # only once every process of the run is gone, and they die with it: _stop), restarts
    # included, so it holds the root's lock and its workers inherit the run id. Under c10d
    # rendezvous across nodes no launcher knows it hosts global rank 0: there each save's rank 0
    # locks the root while it writes (CheckpointWriter.prepare).
    lock = None
    if cfg.checkpoint.dir and (not multi_node or opts.node_rank == 0):
        lock = RootLock(cfg.checkpoint.dir, purpose=f"zshard train {config_path}").acquire()
    try:
        ckpt = cfg.checkpoint
        with RunSignals(ckpt.preempt_signal, ckpt.on_signal, bool(ckpt.dir)) as signals:
            return _run(config_path, opts, nproc, lock, cfg, signals)
    finally:
        if lock is not None:
            if lock.lost:
                print(
                    f"zshard: warning: the lock of {cfg.checkpoint.dir} was taken over during "
                    "the run; another run may have written there",
                    file=sys.stderr,
                )
            lock.release()


def last_committed(root: str | None) -> str | None:
    """The newest committed checkpoint under ``root`` (None: none, or unreadable)."""
    if not root:
        return None
    try:
        name = latest_name(open_storage(root))
    except ZshardError:
        return None
    return join_url(root, name) if name else None


def _last_note(root: str | None) -> str:
    if not root:
        return "no checkpoint.dir: nothing was saved"
    last = last_committed(root)
    return f"last committed checkpoint {last}" if last else f"no checkpoint committed in {root}"


def _run(
    config_path: str,
    opts: LaunchConfig,
    nproc: int,
    lock: RootLock | None,
    cfg: ZshardConfig,
    signals: RunSignals,
) -> int:
    # Restarts on one node are the launcher's, not torch.distributed.run's: torch 2.13 restarts a
    # failed worker group on the agent's TCPStore of the failed attempt, without a per-attempt key
    # prefix, and the restarted workers read the dead workers' gloo addresses from it ("Gloo
    # connectFullMesh failed ... Connection refused"): no restart ever succeeds. A fresh
    # torch.distributed.run per attempt gets a fresh store. Across nodes the agents must restart
    # together, so there torch's own --max-restarts stays in charge.
    multi_node = opts.nnodes not in ("1", "1:1")
    attempts = 1 if multi_node else opts.max_restarts + 1
    root = cfg.checkpoint.dir
    for attempt in range(attempts):
        code, error_dir, log_path = _run_once(
            config_path, opts, nproc, lock, attempt, multi_node, cfg, signals
        )
        ended = _ended_by_signal(code, error_dir, root, signals)
        if ended is not None:
            shutil.rmtree(error_dir, ignore_errors=True)
            return ended
        if code == 0:
            shutil.rmtree(error_dir, ignore_errors=True)
            _report_success(root)
            return 0
        first = _first_error(error_dir)
        stopping = signals.first or os.path.exists(os.path.join(error_dir, STOP_REQUEST_FILE))
        if attempt + 1 == attempts or stopping or (first is not None and first.get("bad_input")):
            return report_failure(error_dir, log_path, root, single_node=not multi_node)
        killed = _tail(log_path, single_node=not multi_node)
        if first is not None and " was killed by " not in killed:
            cause = f"rank {first['rank']}: {first['message']}"
        else:
            cause = killed
        last = last_committed(root)
        where = f", {last}" if last else " (none committed yet: from the start)"
        print(
            f"zshard: worker group failed ({' '.join(cause.split())[:300]}); restarting from the "
            f"newest checkpoint{where} (restart {attempt + 1} of {opts.max_restarts}; log: "
            f"{log_path})",
            file=sys.stderr,
        )
    raise AssertionError("unreachable")


def _ended_by_signal(
    code: int, error_dir: str, root: str | None, signals: RunSignals
) -> int | None:
    """The exit code of an attempt that a signal ended (after its one line), else None."""
    if signals.aborted:
        name = signal_name(signals.aborted)
        print(
            f"zshard: aborted by a second {name}: every process of the run was killed; "
            f"{_last_note(root)} (intact); rerun the same command to resume",
            file=sys.stderr,
        )
        return 128 + signals.aborted
    stopped = read_json(os.path.join(error_dir, STOPPED_FILE))
    if stopped is not None and code == 0:
        step, name = stopped.get("step"), stopped.get("signal", "a signal")
        checkpoint = stopped.get("checkpoint")
        signum = int(getattr(signal.Signals, str(name), signal.SIGTERM))
        if stopped.get("on_signal") == "save" and checkpoint:
            print(
                f"zshard: stopped at step {step} by {name}; checkpoint {checkpoint}; rerun the "
                "same command to resume",
                file=sys.stderr,
            )
            return EXIT_STOPPED
        why = (
            "without saving (checkpoint.on_signal: exit)"
            if stopped.get("on_signal") == "exit" and root
            else "before any checkpoint"
        )
        print(
            f"zshard: stopped at step {step} by {name} {why}; {_last_note(root)}; rerun the "
            "same command to resume",
            file=sys.stderr,
        )
        return 128 + signum
    if code < 0:
        # The agent itself was killed (a second signal sent to it, the OOM killer): its workers
        # died with it (PR_SET_PDEATHSIG). torch's agent ends a failed worker group with exit 1.
        name = signal_name(-code)
        print(
            f"zshard: error: the elastic agent (torch.distributed.run) was killed by {name}; "
            f"its workers with it; {_last_note(root)}; rerun the same command to resume",
            file=sys.stderr,
        )
        return 128 - code
    return None


def _report_success(root: str | None) -> None:
    last = last_committed(root)
    if last is None:
        print(f"zshard: done; {_last_note(root)}", flush=True)
        return
    print(
        f"zshard: done: checkpoint {last}; next: zshard consolidate {last} model.safetensors",
        flush=True,
    )


def _run_once(
    config_path: str,
    opts: LaunchConfig,
    nproc: int,
    lock: RootLock | None,
    attempt: int,
    multi_node: bool,
    cfg: ZshardConfig,
    signals: RunSignals,
) -> tuple[int, str, str]:
    error_dir = tempfile.mkdtemp(prefix="zshard-errors-")
    log_path = os.path.join(error_dir, "launcher.log")
    # torch.distributed.run, through _agent.py (run as a script: see there).
    cmd = [
        sys.executable,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "_agent.py"),
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
    env[PREEMPT_ENV] = cfg.checkpoint.preempt_signal or ""
    if lock is not None:
        env[RUN_ID_ENV] = lock.run_id
    with open(log_path, "wb") as log:
        # The launcher's own failure report is long and repeats per rank: keep it in the log and
        # show the root cause once. Workers print progress on stdout, which passes through.
        code = run_attempt(cmd, env, log, signals, error_dir)
    return code, error_dir, log_path


def _first_error(error_dir: str) -> dict | None:
    """The root cause among the ranks' error files: bad input first, then a rank's own failure
    before a failure it only saw on another rank, else the earliest."""
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
    return min(
        errors,
        key=lambda e: (not e.get("bad_input"), bool(e.get("secondary")), e.get("time", 0)),
    )


def report_failure(
    error_dir: str, log_path: str, root: str | None = None, *, single_node: bool = True
) -> int:
    """One line for a failed run: the rank that failed and its signal or error, and the last
    committed checkpoint. Returns the exit code (2 bad input, else 1)."""
    first = _first_error(error_dir)
    tail = _tail(log_path, single_node=single_node)
    if first is None or (not first.get("bad_input") and " was killed by " in tail):
        # A worker killed by a signal leaves no error file; its peers' errors are consequences.
        print(
            f"zshard: error: training failed: {tail}; {_last_note(root)} (full log: {log_path})",
            file=sys.stderr,
        )
        return 1
    note = "" if first.get("bad_input") else f"; {_last_note(root)}"
    print(
        f"zshard: error: rank {first['rank']}: {first['message']}{note} (full log: {log_path})",
        file=sys.stderr,
    )
    return 2 if first.get("bad_input") else 1


def _tail(path: str, *, single_node: bool = True) -> str:
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
            name = signal_name(-int(m.group(1)))
            local, pid = m.group(2), m.group(3)
            # On one node the global rank is the local rank.
            who = (
                f"rank {local} (local rank {local}, pid {pid})"
                if single_node
                else f"local rank {local} (pid {pid})"
            )
            oom = " (the kernel's OOM killer also sends SIGKILL)" if name == "SIGKILL" else ""
            return f"{who} was killed by {name}{oom}"
    meaningful = [line for line in lines if any(c.isalnum() for c in line)]
    return meaningful[-1][:300] if meaningful else "no output"


# torch.distributed.run: "failed (exitcode: -9) local_rank: 1 (pid: 123) of binary: ..."
_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")


__all__ = ["EXIT_STOPPED", "LaunchConfig", "last_committed", "launch", "preflight"]
