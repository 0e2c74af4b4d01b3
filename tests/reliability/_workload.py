"""The checkpoint the fault-injection harness writes, and its rank processes.

A :class:`Workload` is a deterministic training state per step: three logical tensors in one flat
group, two state kinds (``param`` and ``exp_avg``), small chunks (16 KiB) so that a kill lands
between chunks as well as between files. Every committed step can therefore be checked bitwise
against :meth:`Workload.expected`.

:func:`rank_main` is one rank of a multi-process save loop (run in a forkserver child, see
_harness.py): rank 0 prepares, every rank writes its own shards and rank state, rank 0 commits,
with a file-based barrier between the phases, exactly the engine's protocol without a process
group. Progress goes to ``<work>/log-<rank>.txt`` line by line, so it survives SIGKILL.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tests.harness import s3_fast_fail
from zshard.store import layout
from zshard.store.layout import FlatGroup, Layout, pack
from zshard.store.manifest import ArrayEntry, TensorEntry
from zshard.store.writer import CheckpointWriter

KINDS = ("param", "exp_avg")


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


@dataclass(frozen=True)
class Workload:
    world: int
    chunk: int = 4096  # elements per chunk
    rows: int = 211  # "w" is rows x 331 floats (~280 KB per kind)

    def expected(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(1000 + step)
        return {
            "w": rng.standard_normal((self.rows, 331), dtype=np.float32),
            "b": rng.standard_normal(1009, dtype=np.float32),
            "s": np.float32(step).reshape(()),
        }

    def values(self, step: int, kind: str) -> dict[str, np.ndarray]:
        scale = np.float32(1.0 if kind == "param" else 0.5)
        return {n: a * scale for n, a in self.expected(step).items()}

    def plan(self, step: int) -> tuple[FlatGroup, dict[str, list[Any]], Layout]:
        old = layout.TARGET_CHUNK_NUMEL
        layout.TARGET_CHUNK_NUMEL = self.chunk
        try:
            g, frags = pack(
                "g0000", [(n, a.size) for n, a in self.expected(step).items()], self.world
            )
        finally:
            layout.TARGET_CHUNK_NUMEL = old
        return g, frags, Layout(self.world, 1, (g,))

    def writer(self, root: str, step: int, rank: int = 0, **kw: Any) -> CheckpointWriter:
        g, frags, lay = self.plan(step)
        data = self.expected(step)
        arrays = [ArrayEntry(g.name, k, "float32") for k in KINDS]
        tensors = [
            TensorEntry(n, k, a.shape, "float32", tuple(frags[n]))
            for k in KINDS
            for n, a in data.items()
        ]
        return CheckpointWriter(root, step, lay, arrays, tensors, rank=rank, **kw)

    def partition(self, step: int, kind: str, rank: int) -> np.ndarray:
        g, frags, _ = self.plan(step)
        flat = np.zeros(g.partition_numel * self.world, dtype=np.float32)
        for n, a in self.values(step, kind).items():
            v = a.reshape(-1)
            for f in frags[n]:
                flat[f.offset : f.offset + f.length] = v[f.start : f.start + f.length]
        lo, hi = g.partition_range(rank)
        return flat[lo:hi]

    def rank_state(self, step: int, rank: int) -> dict[str, Any]:
        return {"rank": rank, "step": step}

    def save(self, root: str, step: int, keep_last: int = 2, **kw: Any) -> None:
        """One complete save from this process, every rank's part in turn."""
        w = self.writer(root, step, **kw)
        w.prepare()
        g, _, _ = self.plan(step)
        for rank in range(self.world):
            for k in KINDS:
                w.write_shard(g.name, k, self.partition(step, k, rank), rank)
            w.write_rank_state(self.rank_state(step, rank), rank)
        w.commit({"step": step}, keep_last=keep_last)

    def assert_intact(self, url: str, step: int) -> None:
        """The checkpoint at ``url`` is step ``step``, bitwise, and verifies."""
        from zshard.store.reader import CheckpointReader
        from zshard.store.verify import verify

        reader = CheckpointReader.open(url)
        m = reader.manifest
        if "resharded_from" in m.state:  # a reshard of this workload: same tensors, new layout
            assert m.step == step, (url, m.step)
            for k in KINDS:
                for n, a in self.values(step, k).items():
                    assert reader.read_tensor(n, k).tobytes() == a.tobytes(), (url, n, k)
            assert verify(url, all_faults=True).ok
            return
        assert m.step == step and m.state == {"step": step}, (url, m.step, m.state)
        for k in KINDS:
            for n, a in self.values(step, k).items():
                got = reader.read_tensor(n, k)
                assert got.shape == a.shape and got.tobytes() == a.tobytes(), (url, n, k)
        for rank in range(self.world):
            assert reader.read_rank_state(rank) == self.rank_state(step, rank), (url, rank)
        report = verify(url, all_faults=True)
        assert report.ok, report.faults


# -- rank processes -------------------------------------------------------------------------------


def barrier(work: str, name: str, rank: int, world: int, timeout_s: float = 60.0) -> None:
    """All ``world`` ranks reach ``name``: each drops a file and waits for the others'."""
    d = os.path.join(work, "barrier")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{name}.{rank}"), "wb"):
        pass
    deadline = time.monotonic() + timeout_s
    want = [os.path.join(d, f"{name}.{r}") for r in range(world)]
    while not all(os.path.exists(p) for p in want):
        if time.monotonic() > deadline:
            os._exit(3)  # a peer died and nobody killed us: leave like a timed-out collective
        time.sleep(0.0005)


def configure_s3(endpoint: str) -> None:
    """Point fsspec's s3 at a moto endpoint in this process (env and live configuration)."""
    import fsspec.config

    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        FSSPEC_S3_ENDPOINT_URL=endpoint,
    )
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint, **s3_fast_fail()}
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass


def rank_main(spec: dict[str, Any]) -> None:
    """One rank saving steps ``start``, ``start + 1``, ... under ``root`` until killed."""
    os.environ.update(spec.get("env", {}))
    if spec.get("s3_endpoint"):
        configure_s3(spec["s3_endpoint"])
    wl = Workload(spec["world"], spec.get("chunk", 4096))
    rank, world, work, root = spec["rank"], spec["world"], spec["work"], spec["root"]
    log = open(os.path.join(work, f"log-{rank}.txt"), "a", buffering=1)  # noqa: SIM115
    step = spec["start"]
    while True:
        w = wl.writer(root, step, rank)
        if rank == 0:
            w.prepare()
        barrier(work, f"{step}.prepared", rank, world)
        g, _, _ = wl.plan(step)
        for k in KINDS:
            w.write_shard(g.name, k, wl.partition(step, k, rank))
        w.write_rank_state(wl.rank_state(step, rank))
        barrier(work, f"{step}.written", rank, world)
        if rank == 0:
            w.commit({"step": step}, keep_last=spec.get("keep_last", 2))
            log.write(json.dumps({"committed": step, "t": time.monotonic()}) + "\n")
        barrier(work, f"{step}.committed", rank, world)
        step += 1


def run_cli(spec: dict[str, Any]) -> None:
    """A ``zshard`` command line in a child process: exits like the console script."""
    os.environ.update(spec.get("env", {}))
    import sys

    from zshard.cli import main

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the summary line is not wanted here

    log = os.path.join(spec["work"], "cli.txt")
    with open(log, "a", buffering=1) as f:
        f.write(json.dumps({"start": time.monotonic()}) + "\n")
    main(spec["argv"])
    with open(log, "a", buffering=1) as f:
        f.write(json.dumps({"done": time.monotonic()}) + "\n")
