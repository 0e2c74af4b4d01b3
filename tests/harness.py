"""The one harness of the tests and of ``tools/``: ports, process groups, the CLI, the tiny config.

    port = free_port()
    results = run_ranks(fn, world_size=3, args=(...), timeout=120)  # [rank 0's return, ...]
    outputs = run_rank_commands([script, "--worker", spec], world_size=2, timeout=600)
    proc = run_cli("inspect", "ckpt", cwd=tmp)                       # a CompletedProcess
    cfg = write_tiny_config(tmp / "cfg.yaml", tmp / "run", stage=2, steps=4)

Process groups. :func:`run_ranks` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh
processes (``torch.multiprocessing`` spawn context) with torchrun-style environment variables
(:func:`rank_env`: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` 127.0.0.1,
``MASTER_PORT``), so ``dist.init_process_group("gloo")`` joins them. ``fn`` must be importable
(module level) and return something picklable. The first failure, or the deadline, kills every
process and raises :class:`RankFailed` with the rank's traceback: a hung collective never stalls
the caller. Start-up costs ~2 s (importing torch), so run several checks inside one call.
:func:`run_rank_commands` is the same for whole interpreters (``python ARGV...`` per rank, output
captured), for benchmarks that must measure a process from its first byte.

The command line. :func:`run_cli` runs ``python -m zshard.cli ARGS`` as users run it, with this
checkout on ``PYTHONPATH`` and, unless told otherwise, :func:`subprocess_env` (no inherited AWS or
fsspec settings, dummy keys). :func:`start_cli` starts the same without waiting.

Only the standard library is imported at module level: tools and their worker processes import
this module without paying for torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Collectives inside the children time out well before a harness deadline, so a deadlock
# surfaces as an error with a traceback rather than as a kill.
COLLECTIVE_TIMEOUT_S = 60


# -- ports and ranks ----------------------------------------------------------------------------


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives rank ``rank`` of a one-node group on 127.0.0.1:``port``."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


class RankFailed(AssertionError):
    """A rank raised, or the group missed its deadline."""


def _entry(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, args: Sequence[Any], results: Any
) -> None:
    os.environ.update(rank_env(rank, world_size, port))
    import torch
    import torch.distributed as dist

    # A few processes share 2 cores: more intra-op threads only oversubscribe them.
    torch.set_num_threads(1)
    try:
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *, timeout: float = 120.0
) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each in its own process."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry, args=(fn, r, world_size, port, tuple(args), results), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailed(
                    f"{fn.__name__} at world size {world_size}: no result from ranks "
                    f"{sorted(set(range(world_size)) - set(out))} within {timeout:.0f} s"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out
                ]
                if dead:
                    raise RankFailed(
                        f"{fn.__name__}: rank(s) {dead} died (exit codes "
                        f"{[procs[r].exitcode for r in dead]})"
                    ) from None
                continue
            if not ok:
                raise RankFailed(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    return [out[r] for r in range(world_size)]


def mean_over_ranks(value: Any) -> float:
    """The mean of a scalar tensor over the process group (e.g. a loss), as a float."""
    import torch.distributed as dist

    t = value.detach().float().reshape(1)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


@dataclass(frozen=True)
class RankOutput:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def run_rank_commands(
    argv: Sequence[str],
    world_size: int,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> list[RankOutput]:
    """``python ARGV...`` as ``world_size`` fresh processes, each with :func:`rank_env` on top of
    ``env`` (default: this process's environment), in rank order.

    Waits until every rank exits, one exits non-zero or ``timeout`` passes, then kills the rest
    (their return code is then negative). Output goes to temporary files, not pipes, so a chatty
    rank never blocks on a full pipe while the others wait for it in a collective.
    """
    port = free_port()
    base = dict(os.environ if env is None else env)
    with contextlib.ExitStack() as stack:
        procs, logs = [], []
        for r in range(world_size):
            out = stack.enter_context(tempfile.TemporaryFile("w+"))
            err = stack.enter_context(tempfile.TemporaryFile("w+"))
            logs.append((out, err))
            rank_vars = {**base, **rank_env(r, world_size, port)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv], env=rank_vars, stdout=out, stderr=err, text=True
                )
            )
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outputs = []
        for r, (p, (out, err)) in enumerate(zip(procs, logs)):
            out.seek(0)
            err.seek(0)
            outputs.append(RankOutput(r, p.returncode, out.read(), err.read()))
    return outputs


# -- the command line ---------------------------------------------------------------------------

AWS_DUMMY = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never ask an instance metadata service (169.254.169.254) for credentials.
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_MAX_ATTEMPTS": "1",
}


# Every child interpreter (a CLI run, a launcher, its agent and workers, a spawned rank) imports
# zshard from source. Without a bytecode cache each one compiled every zshard module again: about
# 1.5 s of CPU per process, and a `zshard train` starts four. A cache outside the checkout keeps
# the checkout free of __pycache__ (what PYTHONDONTWRITEBYTECODE was for) and compiles each module
# once; Python revalidates every entry against its source's mtime and size.
PYCACHE = os.path.join(tempfile.gettempdir(), f"zshard-tests-pycache-{os.getuid()}")


def use_bytecode_cache(env: MutableMapping[str, str]) -> None:
    """Point ``env``'s interpreters at :data:`PYCACHE` (and let them write to it)."""
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", PYCACHE)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for CLI subprocesses: no inherited AWS/fsspec settings, dummy keys, the
    shared bytecode cache (:func:`use_bytecode_cache`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env.update(AWS_DUMMY)
    use_bytecode_cache(env)
    env.update(extra)
    return env


def run_python_json(code: str, *args: str, timeout: float = 120, **env: str) -> Any:
    """Run ``python -c code args`` in a fresh interpreter (this checkout importable, ``env`` on top
    of :func:`subprocess_env`) for what is process-wide and set once (allocator settings, lazy
    imports); return the JSON of its last output line. A non-zero exit fails with its stderr."""
    full = subprocess_env(**env)
    full["PYTHONPATH"] = os.pathsep.join([REPO, full.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=REPO,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cli(
    args: Sequence[str], env: Mapping[str, str] | None, pythonpath: Sequence[str | os.PathLike]
) -> tuple[list[str], dict[str, str]]:
    full = dict(subprocess_env() if env is None else env)
    path = [*map(str, pythonpath), REPO, full.get("PYTHONPATH", "")]
    full["PYTHONPATH"] = os.pathsep.join(path)
    return [sys.executable, "-m", "zshard.cli", *map(str, args)], full


def run_cli(
    *args: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    pythonpath: Sequence[str | os.PathLike] = (),
) -> subprocess.CompletedProcess[str]:
    """``zshard ARGS`` in a subprocess, output captured as text; never raises on the exit code.

    ``env`` is the whole environment (default :func:`subprocess_env`); this checkout and then
    ``pythonpath`` (e.g. a directory with a test model module) go in front of its PYTHONPATH.
    Training runs take longer than the default ``timeout``: pass one.
    """
    cmd, full = _cli(args, env, pythonpath)
    return subprocess.run(
        cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout, check=False
    )


def start_cli(
    *args: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    pythonpath: Sequence[str | os.PathLike] = (),
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """:func:`run_cli` without waiting: the running ``Popen`` (text mode)."""
    cmd, full = _cli(args, env, pythonpath)
    return subprocess.Popen(cmd, cwd=cwd, env=full, stdout=stdout, stderr=stderr, text=True)


def run_cli_together(
    *argvs: Sequence[str | os.PathLike], env: Mapping[str, str] | None = None, timeout: float = 240
) -> list[tuple[int, str]]:
    """Several ``zshard`` commands at the same time: (exit code, stderr) of each, in order. None
    is left running, whatever happens.

    A training run spends most of its wall time starting processes one after another (launcher,
    agent, workers), with a core often idle, so independent runs finish sooner side by side.
    """
    procs = [start_cli(*argv, env=env) for argv in argvs]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# -- the tiny training run ----------------------------------------------------------------------

TINY_GPT = "{name: gpt, args: {n_layer: 1, n_head: 2, d_model: 32}}"


def tiny_config(
    ckpt: str | os.PathLike,
    *,
    model: str = TINY_GPT,
    stage: int = 1,
    steps: int = 6,
    every: int = 3,
    keep_last: int = 5,
) -> str:
    """The YAML of a run that takes seconds on 2 CPU ranks: a 1-layer GPT (``model`` is the
    ``model:`` mapping, e.g. ``"{name: 'mymodule:model'}"``), the built-in text at 32 tokens,
    ``steps`` steps of 12 sequences (micro batch 2), AdamW with a cosine schedule, ZeRO
    ``stage``, a checkpoint into ``ckpt`` every ``every`` steps."""
    return (
        f"model: {model}\n"
        "data: {name: builtin, seq_len: 32}\n"
        f"train: {{steps: {steps}, micro_batch_size: 2, global_batch_size: 12, seed: 3, "
        "log_every: 1}\n"
        "optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 0.1}\n"
        "scheduler: {name: cosine, warmup_steps: 2}\n"
        f"zero: {{stage: {stage}}}\n"
        f"checkpoint: {{dir: {os.fspath(ckpt)}, every: {every}, keep_last: {keep_last}}}\n"
    )


def write_tiny_config(path: str | os.PathLike, ckpt: str | os.PathLike, **kw: Any) -> Path:
    """:func:`tiny_config` written to ``path``; returns the path."""
    out = Path(path)
    out.write_text(tiny_config(ckpt, **kw))
    return out


# -- S3 (moto on 127.0.0.1) ---------------------------------------------------------------------


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def new_bucket(endpoint: str, prefix: str = "zshard") -> str:
    """``s3://<prefix>-<fresh name>``, created on the server at ``endpoint``."""
    import boto3

    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def s3_fast_fail() -> dict[str, Any]:
    """fsspec ``s3`` options that fail in about a second (1 s connect timeout, 1 attempt)."""
    return {"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}


# -- JSON trees (manifest fuzzing) --------------------------------------------------------------


def json_paths(
    obj: Any, keep: Callable[[tuple[Any, ...], Any], bool] | None = None
) -> list[tuple[Any, ...]]:
    """The path (keys and indices) of every node of a JSON tree, the root ``()`` included, in
    pre-order; with ``keep``, only the nodes for which ``keep(path, node)`` is true."""
    out: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if keep is None or keep(path, node):
            out.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(obj, ())
    return out
