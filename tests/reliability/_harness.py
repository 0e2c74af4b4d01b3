"""The fault-injection harness: each function injects one class of fault many times and returns
what it observed. The tests in this package run them with small counts and assert the
invariants; ``tools/fault_report.py`` runs the same functions with larger counts and writes
docs/reliability.md from the returned :class:`Outcome`s, so the figures there come from this code.

Every function asserts its invariants as it goes (an ``AssertionError`` is a found bug) and also
counts outcomes, so a report never shows a number that an assertion did not check.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tests.harness import json_paths, run_cli, start_cli, write_tiny_config
from tests.reliability._workload import KINDS, Workload, configure_s3, read_bytes, read_text
from zshard.errors import ZshardError
from zshard.store.root import committed_steps, join_url, parse_step_dir, resolve
from zshard.store.storage import open_storage


@dataclass
class Outcome:
    """What one harness run did: ``runs`` injections, and named counts of what followed."""

    fault: str
    runs: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def to_json(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "runs": self.runs,
            "counts": dict(self.counts),
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
        }


# -- processes ------------------------------------------------------------------------------------

_CTX: Any = None


def fork_context() -> Any:
    """A forkserver that has imported zshard, numpy, torch and s3fs once: children start in
    milliseconds, so kills can be many and still land anywhere in a save."""
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(
            [
                "numpy",
                "tests.reliability._workload",
                "zshard.store.verify",
                "zshard.cli",
                "zshard.convert.consolidate",
                "zshard.convert.reshard",
                "s3fs",
                "torch",
            ]
        )
        _CTX = ctx
    return _CTX


def _kill(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join(10)


def _read_log(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.0005)


# -- checks shared by the crash harnesses ----------------------------------------------------------


def check_root(root: str, wl: Workload, must_have: int | None, scratch: str) -> dict[str, Any]:
    """Everything a reader, tool or retention can see under ``root`` after a crash.

    Every committed step is intact bitwise and verifies; ``must_have`` (the newest step the dead
    run reported committed) is still committed; the root resolves to the newest committed step
    for load, inspect, ls, consolidate and reshard alike; no uncommitted directory is visible.
    """
    from safetensors.numpy import load_file

    from zshard.convert.consolidate import consolidate
    from zshard.convert.inspect import summarize
    from zshard.convert.listing import list_checkpoints
    from zshard.convert.reshard import reshard
    from zshard.store.reader import CheckpointReader

    storage = open_storage(root)
    committed = committed_steps(storage)
    steps = [s for s, _ in committed]
    assert committed, f"{root}: no committed checkpoint left"
    if must_have is not None:
        assert must_have in steps, (must_have, steps)
    for step, name in committed:
        wl.assert_intact(join_url(root, name), step)
    newest_step, newest = committed[-1]
    partial = [
        n
        for n in storage.listdir("")
        if parse_step_dir(n) is not None and n not in dict((nm, s) for s, nm in committed)
    ]
    # load
    assert resolve(root).name == newest
    assert CheckpointReader.open(root).manifest.step == newest_step
    # inspect
    assert summarize(root)["step"] == newest_step
    # ls: committed ones as checkpoints, the rest only as "incomplete"
    listing = list_checkpoints(root)
    assert [c.name for c in listing.checkpoints] == [n for _, n in committed]
    assert all(not c.error for c in listing.checkpoints)
    assert listing.latest == newest and sorted(listing.incomplete) == sorted(partial)
    # consolidate and reshard read the newest committed step only
    out = os.path.join(scratch, f"c-{uuid.uuid4().hex[:8]}.safetensors")
    consolidate(root, out, dtype="keep")
    got = load_file(out)
    want = wl.values(newest_step, "param")
    assert sorted(got) == sorted(want)
    for n, a in want.items():
        assert got[n].tobytes() == a.tobytes(), n
    os.remove(out)
    rs = os.path.join(scratch, f"r-{uuid.uuid4().hex[:8]}")
    ref = reshard(root, wl.world + 1, out=rs)
    r2 = CheckpointReader.open(ref.url)
    for k in KINDS:
        for n, a in wl.values(newest_step, k).items():
            assert r2.read_tensor(n, k).tobytes() == a.tobytes(), (n, k)
    shutil.rmtree(rs)
    return {"steps": steps, "partial": partial, "newest": newest_step}


# -- SIGKILL during a save


def crash_save(
    root: str,
    *,
    world: int,
    kills: int,
    seed: int,
    s3_endpoint: str | None = None,
    label: str = "",
) -> Outcome:
    """Rank processes save step after step (keep_last=2); SIGKILL one rank at a random moment
    (then the rest, as the launcher would) or all at once. After each kill: :func:`check_root`,
    then a fresh save of the next step must succeed."""
    where = "S3 (moto)" if s3_endpoint else "local"
    out = Outcome(f"SIGKILL during save, {where}, {world} rank{'s' if world > 1 else ''}{label}")
    t0 = time.monotonic()
    ctx = fork_context()
    rng = random.Random(seed)
    wl = Workload(world)
    scratch = tempfile.mkdtemp(prefix="zshard-crash-")
    env = {"ZSHARD_LOCK_TIMEOUT_S": "60"}
    try:
        wl.save(root, 1)
        next_step = 2
        period: float | None = None
        for i in range(kills + 1):  # iteration 0 calibrates the save period; not counted
            work = os.path.join(scratch, f"w{i}")
            os.makedirs(work)
            spec = {"root": root, "world": world, "work": work, "start": next_step, "env": env}
            if s3_endpoint:
                spec["s3_endpoint"] = s3_endpoint
            from tests.reliability._workload import rank_main

            procs = [
                ctx.Process(target=rank_main, args=({**spec, "rank": r},), daemon=True)
                for r in range(world)
            ]
            for p in procs:
                p.start()
            log0 = os.path.join(work, "log-0.txt")
            try:
                _wait_for(lambda p=log0: len(_read_log(p)) >= 1, 60, "the first commit")
                if period is None:
                    _wait_for(lambda p=log0: len(_read_log(p)) >= 4, 120, "calibration")
                    ts = [e["t"] for e in _read_log(log0)]
                    period = max((ts[-1] - ts[0]) / (len(ts) - 1), 0.005)
                    _kill(procs)
                    next_step = check_root(root, wl, None, scratch)["newest"] + 1
                    continue
                # Stratified over ~2.5 saves: prepare, shards, barrier, manifest, latest,
                # retention of the next save or two.
                delay = (i - 1 + rng.random()) / kills * 2.5 * period
                time.sleep(delay)
                mode = rng.choice(["one rank", "all ranks"]) if world > 1 else "all ranks"
                if mode == "one rank":
                    victim = rng.randrange(world)
                    os.kill(procs[victim].pid, signal.SIGKILL)
                    time.sleep(rng.random() * 0.01)  # the others notice a moment later
                _kill(procs)
            finally:
                _kill(procs)
            out.runs += 1
            out.add(f"killed: {mode}")
            for p in procs:
                assert p.exitcode == -signal.SIGKILL, (p.exitcode, "a rank died on its own")
            reported = [e["committed"] for e in _read_log(log0)]
            seen = check_root(root, wl, max(reported) if reported else None, scratch)
            out.add("previous checkpoint intact")
            out.add("partial checkpoint visible", 0)
            newest = seen["newest"]
            if reported and newest > max(reported):
                out.add("kill after the commit point (new step committed)")
            elif seen["partial"]:
                out.add("kill mid-save (uncommitted directory left, invisible)")
            else:
                out.add("kill between saves (nothing left)")
            # The next save succeeds, clearing any leftover and taking over the dead lock.
            next_step = newest + 1
            wl.save(root, next_step)
            wl.assert_intact(join_url(root, f"step-{next_step:08d}"), next_step)
            out.add("next save succeeded")
            next_step += 1
        out.notes.append(f"save period ~{(period or 0) * 1000:.0f} ms; data {_mb(wl)} per save")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out.seconds = time.monotonic() - t0
    return out


def _mb(wl: Workload) -> str:
    g, _, _ = wl.plan(1)
    return f"{2 * g.partition_numel * wl.world * 4 / 1e6:.1f} MB"


# -- SIGKILL during reshard / consolidate


def _convert_source(root: str, rows: int) -> Workload:
    wl = Workload(2, chunk=4096, rows=rows)
    wl.save(root, 7)
    return wl


def crash_convert(kind: str, *, kills: int, seed: int, workdir: str, rows: int = 3000) -> Outcome:
    """Kill ``zshard reshard`` / ``zshard consolidate`` (file and directory output) at random
    moments; the final name is absent or complete, never half-written; a rerun succeeds."""
    from safetensors.numpy import load_file

    from tests.reliability._workload import run_cli
    from zshard.store.reader import CheckpointReader

    labels = {
        "reshard": "zshard reshard",
        "consolidate": "zshard consolidate to a file",
        "consolidate-dir": "zshard consolidate to a directory",
    }
    out = Outcome(f"SIGKILL during {labels[kind]}, local")
    t0 = time.monotonic()
    ctx = fork_context()
    rng = random.Random(seed)
    src = os.path.join(workdir, "src")
    wl = _convert_source(src, rows)
    final = {
        "reshard": os.path.join(workdir, "resharded"),
        "consolidate": os.path.join(workdir, "out.safetensors"),
        "consolidate-dir": os.path.join(workdir, "hf"),
    }[kind]
    argv = {
        "reshard": ["reshard", src, "--to", "3", "--out", final, "-q", "--overwrite"],
        "consolidate": ["consolidate", src, final, "--dtype", "keep", "-q", "--overwrite"],
        "consolidate-dir": [
            "consolidate", src, final, "--dtype", "keep", "--max-shard-size", "400kB", "-q",
            "--overwrite",
        ],
    }[kind]  # fmt: skip
    want = wl.values(7, "param")

    def complete() -> bool:
        """Absent -> False; present -> must be complete and bitwise right (else AssertionError)."""
        if kind == "reshard":
            storage = open_storage(final)
            if not storage.isdir(""):
                return False
            steps = committed_steps(storage)
            if not steps:
                return False
            wlr = Workload(3, rows=rows)
            r = CheckpointReader.open(final)
            for k in KINDS:
                for n, a in wl.values(7, k).items():
                    assert r.read_tensor(n, k).tobytes() == a.tobytes(), (n, k)
            from zshard.store.verify import verify

            assert verify(final).ok
            del wlr
            return True
        if kind == "consolidate":
            if not os.path.exists(final):
                return False
            got = load_file(final)
            assert sorted(got) == sorted(want)
            assert all(got[n].tobytes() == a.tobytes() for n, a in want.items())
            return True
        if not os.path.exists(final):
            return False
        with open(os.path.join(final, "model.safetensors.index.json")) as f:
            index = json.load(f)
        got = {}
        for fname in set(index["weight_map"].values()):
            got.update(load_file(os.path.join(final, fname)))
        assert sorted(got) == sorted(want)
        assert all(got[n].tobytes() == a.tobytes() for n, a in want.items())
        return True

    period: float | None = None
    for i in range(kills + 1):
        work = os.path.join(workdir, f"cli{i}")
        os.makedirs(work)
        spec = {"argv": argv, "work": work}
        # Start from no output, so a kill shows whether the final name appears early. (With an
        # existing output, --overwrite keeps the old one whole until the new one is complete.)
        if os.path.isdir(final):
            shutil.rmtree(final)
        elif os.path.exists(final):
            os.remove(final)
        p = ctx.Process(target=run_cli, args=(spec,), daemon=True)
        p.start()
        log = os.path.join(work, "cli.txt")
        try:
            _wait_for(lambda p=log: len(_read_log(p)) >= 1, 60, "start")
            start = _read_log(log)[0]["start"]
            if period is None:  # calibrate: one uninterrupted run
                p.join(120)
                assert p.exitcode == 0, p.exitcode
                period = max(_read_log(log)[-1]["done"] - start, 0.01)
                assert complete()
                continue
            time.sleep((i - 1 + rng.random()) / kills * 1.2 * period)
        finally:
            _kill([p])
        out.runs += 1
        finished = p.exitcode == 0
        ok = complete()  # raises if a half-written output sits under the final name
        if finished or ok:
            out.add("output complete under the final name")
        else:
            out.add("output absent (killed before the rename/commit)")
        out.add("half-written under the final name", 0)
        leftovers = [n for n in os.listdir(workdir) if ".tmp-" in n or ".old-" in n]
        if kind == "reshard" and os.path.isdir(final):
            leftovers += [
                n for n in os.listdir(final) if parse_step_dir(n) is not None
                and not os.path.exists(os.path.join(final, n, "manifest.json"))
            ]  # fmt: skip
        if leftovers:
            out.add("temporary leftovers (invisible, removed by the next run)")
        # The next run with --overwrite succeeds.
        rerun = ctx.Process(target=run_cli, args=({**spec, "work": work},), daemon=True)
        rerun.start()
        rerun.join(120)
        assert rerun.exitcode == 0, rerun.exitcode
        assert complete()
        out.add("rerun succeeded")
        for n in os.listdir(workdir):  # keep the workdir small: old temporaries go
            if ".tmp-" in n or ".old-" in n:
                path = os.path.join(workdir, n)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    out.notes.append(f"one uninterrupted run ~{(period or 0) * 1000:.0f} ms")
    out.seconds = time.monotonic() - t0
    return out


# -- corruption


def corruption_sweep(workdir: str, *, samples_per_chunk: int, seed: int) -> Outcome:
    """Flip single bytes in every region of every file of a checkpoint (each shard's index and
    its crc, each chunk's body and crc, the manifest, rank state, array zarr.json); truncate and
    remove shards. Each must be reported by ``verify`` naming the file (and the tensor, for
    data), and fail at load with a ZshardError naming the tensor and file."""
    from zshard.store import dtypes
    from zshard.store.reader import CheckpointReader
    from zshard.store.shard import CRC_NBYTES, Geometry
    from zshard.store.verify import verify

    out = Outcome("single-byte flips, truncation, missing files")
    t0 = time.monotonic()
    rng = random.Random(seed)
    root = os.path.join(workdir, "root")
    wl = Workload(3, chunk=1024, rows=23)
    wl.save(root, 5)
    step_dir = os.path.join(root, "step-00000005")
    reader = CheckpointReader.open(root)
    m = reader.manifest
    g = m.layout.group("g0000")
    dt = dtypes.dtype("float32")
    stored = {k: m.locate("g0000", k)[0] for k in KINDS}  # one group: base 0 in each shard
    geo = Geometry(stored["param"].shard_numel, stored["param"].chunk_numel, dt.itemsize)
    n_chunks, csize, ibytes = geo.n_chunks, geo.chunk_nbytes, geo.index_nbytes

    def tensors_at(rank: int, lo: int, hi: int) -> list[str]:
        base = rank * g.partition_numel
        return [
            t.name
            for t in m.tensors
            if t.kind == "param"
            and any(f.rank == rank and f.offset < base + hi and base + lo < f.offset + f.length
                    for f in t.fragments)
        ]  # fmt: skip

    def check_flip(rel: str, pos: int, region: str, names: list[str], kind: str) -> None:
        path = os.path.join(step_dir, rel)
        raw = bytearray(read_bytes(path))
        raw[pos] ^= 1 << rng.randrange(8)
        with open(path, "wb") as f:
            f.write(raw)
        try:
            _expect_detected(root, path, names, kind, region)
        finally:
            raw[pos] = open_orig[rel][pos]
            with open(path, "wb") as f:
                f.write(raw)
        out.runs += 1
        out.add(f"{region}: detected by verify")
        if names or region in ("manifest", "rank state", "array zarr.json"):
            out.add(f"{region}: detected at load")
        else:
            out.add(f"{region}: padding only, read by no tensor")

    def _expect_detected(root: str, path: str, names: list[str], kind: str, region: str) -> None:
        if region == "manifest":
            try:
                CheckpointReader.open(root)
            except ZshardError as e:
                assert "manifest" in str(e) and "\n" not in str(e), e
                return
            raise AssertionError(f"manifest flip at {path} not detected")
        report = verify(root, all_faults=True)
        assert not report.ok, (region, path)
        assert any(path in f for f in report.faults), (path, report.faults)
        if region == "rank state":
            try:
                CheckpointReader.open(root).read_rank_state(int(path[-10:-5]))
            except ZshardError as e:
                assert path in str(e)
                return
            raise AssertionError("rank state flip not detected at load")
        if region == "array zarr.json":
            assert any("array metadata" in f for f in report.faults), report.faults
            # The reader checks each array's zarr.json against the manifest before its first
            # read: the first tensor of this kind raises, naming the tensor and the file.
            try:
                CheckpointReader.open(root).read("w", kind)
            except ZshardError as e:
                assert path in str(e) and "'w'" in str(e) and "\n" not in str(e), e
                return
            raise AssertionError(f"edited {path} not detected at load")
        assert any(repr(n) in f for f in report.faults for n in names) or not names, report.faults
        r = CheckpointReader.open(root)
        for n in names:
            try:
                r.read(n, kind)
            except ZshardError as e:
                msg = str(e)
                assert repr(n) in msg and path in msg and "\n" not in msg, msg
            else:
                raise AssertionError(f"flip in {region} of {path} not detected reading {n!r}")

    open_orig: dict[str, bytes] = {}
    for k in KINDS:
        a = stored[k]
        for rank in range(wl.world):
            rel = a.shard_key(rank)
            open_orig[rel] = read_bytes(os.path.join(step_dir, rel))
            everyone = tensors_at(rank, 0, g.partition_numel)
            idx_positions = sorted({0, ibytes - CRC_NBYTES - 1, *rng.sample(range(ibytes - 4), 3)})
            for pos in idx_positions:
                check_flip(rel, pos, "shard index", everyone, k)
            for pos in range(ibytes - CRC_NBYTES, ibytes):
                check_flip(rel, pos, "shard index crc", everyone, k)
            for c in range(n_chunks):
                base = ibytes + c * csize
                body = csize - CRC_NBYTES
                names = tensors_at(rank, c * geo.chunk_numel, (c + 1) * geo.chunk_numel)
                picks = {0, body - 1, *rng.sample(range(body), min(samples_per_chunk, body))}
                for off in sorted(picks):
                    check_flip(rel, base + off, "chunk body", names, k)
                for off in range(body, csize):
                    check_flip(rel, base + off, "chunk crc", names, k)
    # The manifest: every byte (small), or a sample.
    rel = "manifest.json"
    open_orig[rel] = read_bytes(os.path.join(step_dir, rel))
    size = len(open_orig[rel])
    positions = range(size) if samples_per_chunk >= 64 else sorted(rng.sample(range(size), 200))
    for pos in positions:
        check_flip(rel, pos, "manifest", [], "param")
    for rank in range(wl.world):
        rel = f"ranks/rank-{rank:05d}.json"
        open_orig[rel] = read_bytes(os.path.join(step_dir, rel))
        for pos in sorted(rng.sample(range(len(open_orig[rel])), 8)):
            check_flip(rel, pos, "rank state", [], "param")
    for k in KINDS:
        rel = f"{stored[k].path}/zarr.json"
        open_orig[rel] = read_bytes(os.path.join(step_dir, rel))
        for pos in sorted(rng.sample(range(len(open_orig[rel])), 12)):
            check_flip(rel, pos, "array zarr.json", [], k)
    # Truncations and missing shards.
    for k in KINDS:
        a = stored[k]
        for rank in range(wl.world):
            rel = a.shard_key(rank)
            path = os.path.join(step_dir, rel)
            full = open_orig[rel]
            cuts = {0, 3, ibytes - 1, ibytes + 5, len(full) - 1, rng.randrange(ibytes, len(full))}
            for cut in sorted(cuts):
                with open(path, "wb") as f:
                    f.write(full[:cut])
                # The tensors that lost bytes: all of the shard's if the index is cut, else
                # those in the cut chunk and after it (reads of earlier chunks are still right).
                first_lost = 0 if cut < ibytes else (cut - ibytes) // csize
                lost = tensors_at(rank, first_lost * geo.chunk_numel, g.partition_numel)
                _expect_detected(root, path, lost, k, "truncated shard")
                out.runs += 1
                out.add("truncated shard: detected by verify")
                out.add("truncated shard: detected at load")
            os.remove(path)
            _expect_detected(root, path, tensors_at(rank, 0, g.partition_numel), k, "missing shard")
            out.runs += 1
            out.add("missing shard: detected by verify")
            out.add("missing shard: detected at load")
            with open(path, "wb") as f:
                f.write(full)
    assert verify(root, all_faults=True).ok
    out.notes.append(
        f"3 ranks x 2 kinds, {n_chunks} chunks per shard, {samples_per_chunk} sampled body "
        "positions per chunk plus its first and last byte; every crc byte; every index crc byte"
    )
    out.seconds = time.monotonic() - t0
    return out


# -- object-store faults


def flaky_store(
    *, runs: int, seed: int, error_rate: float, target: str = "memory", s3_base: str = ""
) -> Outcome:
    """Save, load, verify, reshard, consolidate and import through a store that fails a fraction
    of calls (before or after taking effect), delays some, and throttles: every run either
    succeeds bitwise or fails with one StorageError naming the URL and nothing committed."""
    import fsspec
    from safetensors.numpy import load as load_bytes
    from safetensors.numpy import save as save_bytes

    from tests.reliability import _flaky
    from zshard.convert.consolidate import consolidate
    from zshard.convert.importer import import_safetensors
    from zshard.convert.reshard import reshard
    from zshard.store.reader import CheckpointReader
    from zshard.store.verify import verify

    name = "flaky (memory://)" if target == "memory" else "flaky (S3 via moto)"
    out = Outcome(f"{name}: {error_rate:.0%} of calls fail, 10% delayed")
    t0 = time.monotonic()
    wl = Workload(2, chunk=1024, rows=40)
    for i in range(runs):
        _flaky.configure(
            _flaky.FaultPlan(error_rate=error_rate, latency_rate=0.1, seed=seed * 1000 + i)
        )
        if target == "memory":
            base = f"flaky://rel-{uuid.uuid4().hex[:10]}"
        else:
            base = s3_base.replace("s3://", "flakys3://") + f"/r{i}"
        root = f"{base}/root"
        try:
            wl.save(root, 3)
            wl.assert_intact(root, 3)
            ref = reshard(root, 3)
            r = CheckpointReader.open(ref.url)
            for k in KINDS:
                for n, a in wl.values(3, k).items():
                    assert r.read_tensor(n, k).tobytes() == a.tobytes()
            assert verify(ref.url).ok
            consolidate(root, f"{base}/out.safetensors", dtype="keep")
            got = load_bytes(open_storage(base).read("out.safetensors"))
            want = wl.values(3, "param")
            assert all(got[n].tobytes() == a.tobytes() for n, a in want.items())
            src = {n: np.ascontiguousarray(a) for n, a in want.items()}
            open_storage(base).write_atomic("src.safetensors", save_bytes(src))
            import_safetensors(f"{base}/src.safetensors", f"{base}/imported", 2)
            r = CheckpointReader.open(f"{base}/imported")
            assert all(r.read_tensor(n, "param").tobytes() == a.tobytes() for n, a in src.items())
            out.add("succeeded, bitwise")
        except ZshardError as e:
            msg = str(e)
            assert "\n" not in msg and ("flaky" in msg or "s3://" in msg), msg
            out.add("failed cleanly (one-line error naming the URL)")
            # Nothing half-committed: every committed step is intact.
            _flaky.configure(_flaky.FaultPlan())
            for step, nm in committed_steps(open_storage(root)):
                wl.assert_intact(join_url(root, nm), step)
        out.runs += 1
        for k, v in _flaky.STATS.items():
            if k in ("calls", "faults", "faults.before", "faults.after", "latency"):
                out.add(f"store {k}", v)
        if target == "memory":
            with contextlib.suppress(FileNotFoundError):
                fsspec.filesystem("memory").rm("/" + base.split("://", 1)[1], recursive=True)
    _flaky.configure(_flaky.FaultPlan())
    out.seconds = time.monotonic() - t0
    return out


def exhausted_retries(*, target: str = "memory", s3_base: str = "") -> Outcome:
    """Every PUT fails (or every read): the operation fails with one StorageError naming the URL
    and the attempts, after bounded retries, with nothing committed."""
    from tests.reliability import _flaky
    from zshard.store.reader import CheckpointReader

    out = Outcome("store down: every PUT or every read fails")
    t0 = time.monotonic()
    wl = Workload(2, chunk=1024, rows=8)
    for op in ("pipe_file", "cat_file", "exists", "mv"):
        if target == "memory":
            root = f"flaky://down-{uuid.uuid4().hex[:10]}/root"
        else:
            root = s3_base.replace("s3://", "flakys3://") + f"/down-{op}/root"
            if op == "mv":
                continue  # object stores never rename
        _flaky.configure(_flaky.FaultPlan())
        wl.save(root, 1)
        _flaky.configure(_flaky.FaultPlan(always={op}))
        began = time.monotonic()
        try:
            wl.save(root, 2)
            if op == "cat_file":
                CheckpointReader.open(root).read_tensor("w", "param")
        except ZshardError as e:
            msg = str(e)
            assert "\n" not in msg and "gave up after" in msg and "://" in msg, msg
            out.add("one-line StorageError naming the URL and attempts")
        else:
            raise AssertionError(f"{op} always failing went unnoticed")
        out.runs += 1
        out.add("max seconds to fail", 0)
        out.counts["max seconds to fail"] = max(
            out.counts["max seconds to fail"], round(time.monotonic() - began)
        )
        _flaky.configure(_flaky.FaultPlan())
        committed = committed_steps(open_storage(root))
        assert [s for s, _ in committed] in ([1], [1, 2]), committed
        for step, nm in committed:
            wl.assert_intact(join_url(root, nm), step)
        out.add("nothing half-committed; earlier checkpoint intact")
    out.seconds = time.monotonic() - t0
    return out


__all__ = [
    "Outcome",
    "check_root",
    "configure_s3",
    "corruption_sweep",
    "crash_convert",
    "crash_save",
    "exhausted_retries",
    "flaky_store",
]


# -- the root lock ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def forge_lock(root: str, *, pid: int, host: str | None = None, age_s: float = 0.0) -> None:
    """Write a lock as another run would have (for staleness tests)."""
    from zshard.store.lock import HOST, LOCK_KEY, LockInfo

    now = time.time()
    info = LockInfo(
        host=host or HOST,
        pid=pid,
        run_id="other-run",
        purpose="zshard train other.yaml",
        created=now - age_s,
        heartbeat=now - age_s,
        nonce=uuid.uuid4().hex,
    )
    open_storage(root).write_atomic(LOCK_KEY, info.to_bytes())


def _race_child(spec: dict[str, Any]) -> None:
    os.environ.update(spec.get("env", {}))
    if spec.get("s3_endpoint"):
        configure_s3(spec["s3_endpoint"])
    from zshard.store.lock import RootLock, RootLockedError

    barrier_dir = spec["work"]
    open(os.path.join(barrier_dir, f"ready-{spec['i']}"), "w").close()
    _wait_for(lambda: os.path.exists(os.path.join(barrier_dir, "go")), 30, "go")
    try:
        lock = RootLock(spec["root"], run_id=f"racer-{spec['i']}", heartbeat=False).acquire()
        result = "won" if lock.owned else "ours?"
    except RootLockedError:
        result = "refused"
    with open(os.path.join(barrier_dir, f"result-{spec['i']}"), "w") as f:
        f.write(result)
    time.sleep(spec.get("hold_s", 0.5))  # hold it while the others look


def lock_race(
    root_of: Callable[[int], str],
    *,
    rounds: int,
    racers: int,
    s3_endpoint: str | None = None,
    stale: bool = True,
    label: str = "local",
) -> Outcome:
    """``racers`` processes try to take one root's lock at the same instant (a stale lock left
    by a dead process, or none): exactly one may win each round."""
    out = Outcome(
        f"{racers} runs start on one root at once, {label}"
        + (" (stale lock of a dead run present)" if stale else "")
    )
    t0 = time.monotonic()
    ctx = fork_context()
    scratch = tempfile.mkdtemp(prefix="zshard-race-")
    try:
        for r in range(rounds):
            root = root_of(r)
            if stale:
                forge_lock(root, pid=_dead_pid())
            work = os.path.join(scratch, f"r{r}")
            os.makedirs(work)
            procs = [
                ctx.Process(
                    target=_race_child,
                    args=({"root": root, "work": work, "i": i, "s3_endpoint": s3_endpoint},),
                    daemon=True,
                )
                for i in range(racers)
            ]
            for p in procs:
                p.start()
            _wait_for(
                lambda w=work: all(
                    os.path.exists(os.path.join(w, f"ready-{i}")) for i in range(racers)
                ),
                60,
                "racers",
            )
            open(os.path.join(work, "go"), "w").close()
            for p in procs:
                p.join(60)
            results = [read_text(os.path.join(work, f"result-{i}")) for i in range(racers)]
            winners = results.count("won")
            assert winners == 1, results
            out.runs += 1
            out.add("exactly one run got the lock")
            out.add("others refused with the owner named", results.count("refused"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out.seconds = time.monotonic() - t0
    return out


# -- elastic training ------------------------------------------------------------------------------

# A model provider for `zshard train` that kills its own worker with SIGKILL where told, on the
# given attempt of the elastic launcher only (TORCHELASTIC_RESTART_COUNT), so the restarted
# group runs clean. ZSHARD_TEST_KILLS is a JSON list of
# {"attempt": a, "rank": r, "at": "forward" | "save", "n": n}: the n-th forward call, or the
# n-th shard this rank writes in a save.
KILLING_MODEL = """
import json, os, signal
import torch
from zshard.train.models import gpt

KILLS = json.loads(os.environ.get("ZSHARD_TEST_KILLS", "[]"))
# zshard's launcher restarts torchrun itself (ZSHARD_RESTART_COUNT); plain torchrun counts its
# own; neither is set in the launcher, which imports this too (to check the model)
ATTEMPT = int(
    os.environ.get("ZSHARD_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
)
RANK = int(os.environ.get("RANK", "0"))
MINE = [k for k in KILLS if k["attempt"] == ATTEMPT and k["rank"] == RANK]
COUNTS = {"forward": 0, "save": 0}


def _tick(where):
    COUNTS[where] += 1
    for k in MINE:
        if k["at"] == where and k["n"] == COUNTS[where]:
            os.kill(os.getpid(), signal.SIGKILL)


if any(k["at"] == "save" for k in MINE):
    from zshard.store.writer import CheckpointWriter

    _real = CheckpointWriter.write_shard

    def write_shard(self, *a, **kw):
        n = _real(self, *a, **kw)
        _tick("save")  # killed after a shard: the save is half written
        return n

    CheckpointWriter.write_shard = write_shard


class Killable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = gpt(n_layer=1, n_head=2, d_model=32, seq_len=32)

    def forward(self, x, y=None):
        _tick("forward")
        return self.inner(x, y)


def model():
    return Killable()
"""

KILLMODEL = "{name: 'killmodel:model'}"


def zshard_train(
    workdir: str,
    ckpt: str,
    *args: str,
    kills: list[dict[str, Any]] | None = None,
    wait: bool = True,
) -> Any:
    """Run ``zshard train`` (a real launcher and workers) on the tiny config with the killing
    model; returns the CompletedProcess, or the Popen if not ``wait``."""
    model = os.path.join(workdir, "killmodel.py")
    # Runs go side by side: never rewrite the module while another run's processes import it.
    if not os.path.exists(model) or read_text(model) != KILLING_MODEL:
        with open(model, "w") as f:
            f.write(KILLING_MODEL)
    cfg = os.path.join(workdir, f"cfg-{uuid.uuid4().hex[:6]}.yaml")
    write_tiny_config(cfg, ckpt, model=KILLMODEL)
    env = dict(os.environ, OMP_NUM_THREADS="1", ZSHARD_TEST_KILLS=json.dumps(kills or []))
    if not wait:
        return start_cli("train", cfg, *args, env=env, pythonpath=[workdir])
    return run_cli("train", cfg, *args, env=env, pythonpath=[workdir], timeout=600)


def final_params(ckpt: str) -> dict[str, Any]:
    from zshard.store.reader import CheckpointReader

    r = CheckpointReader.open(ckpt)
    kinds = {t.kind for t in r.manifest.tensors}
    kind = "master" if "master" in kinds else "param"
    return {t.name: r.read_tensor(t.name, t.kind) for t in r.manifest.tensors if t.kind == kind}


def _reap(proc: Any) -> None:
    """Kill ``proc`` if it still runs (a launcher: its agent and workers die with it)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _check_restarted(
    p: Any,
    ckpt: str,
    reference: dict[str, Any],
    during_restart: Callable[[str, int], None] | None,
) -> None:
    """Run 1 of :func:`elastic_runs` (launcher ``p`` on ``ckpt``): while it holds its root,
    ``during_restart``; then two restarts, no lock left, bitwise equal to ``reference``."""
    from zshard.store.lock import LOCK_KEY
    from zshard.store.reader import CheckpointReader

    if during_restart is not None:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(ckpt, LOCK_KEY)):
            assert p.poll() is None and time.monotonic() < deadline, "no lock while running"
            time.sleep(0.05)
        during_restart(ckpt, p.pid)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert err.count("restarting from the newest checkpoint") == 2, err
    assert not os.path.exists(os.path.join(ckpt, LOCK_KEY)), "lock left behind"
    got = final_params(ckpt)
    assert got.keys() == reference.keys()
    assert all(got[n].tobytes() == reference[n].tobytes() for n in got), "not bitwise"
    assert CheckpointReader.open(ckpt).manifest.step == 6


def elastic_runs(
    workdir: str, *, during_restart: Callable[[str, int], None] | None = None
) -> Outcome:
    """Workers SIGKILLed mid-save and mid-step under ``zshard train --max-restarts 2``: the
    group restarts, resumes from the newest committed checkpoint and ends bitwise equal to an
    uninterrupted run. Then a run at 3 ranks killed mid-step, resumed at 2 ranks: equal within
    fp32 reduction-order noise. ``during_restart(ckpt, launcher_pid)`` runs while the restarted
    run holds its root (for the concurrency check)."""
    from zshard.store.reader import CheckpointReader

    out = Outcome("SIGKILL of a `zshard train` worker (fp32, ZeRO-1, tiny GPT)")
    t0 = time.monotonic()
    # The uninterrupted reference and the 3-rank run (killed in step 5, no restarts) together.
    straight = os.path.join(workdir, "straight")
    resized = os.path.join(workdir, "resized")
    p_ref = zshard_train(workdir, straight, "--nproc", "2", wait=False)
    kill3 = [{"attempt": 0, "rank": 2, "at": "forward", "n": 9}]
    p3 = zshard_train(workdir, resized, "--nproc", "3", kills=kill3, wait=False)
    _, err_ref = p_ref.communicate(timeout=600)
    _, err3 = p3.communicate(timeout=600)
    assert p_ref.returncode == 0, err_ref
    assert p3.returncode == 1 and "local rank 2" in err3 and "SIGKILL" in err3, err3
    reference = final_params(straight)
    # 1. attempt 0: rank 1 killed after its first shard of the step-3 save (nothing committed);
    #    attempt 1: rank 0 killed in step 5 (step 3 committed); attempt 2 finishes.
    ckpt = os.path.join(workdir, "restarted")
    kills = [
        {"attempt": 0, "rank": 1, "at": "save", "n": 1},
        {"attempt": 1, "rank": 0, "at": "forward", "n": 13},
    ]
    p = zshard_train(workdir, ckpt, "--nproc", "2", "--max-restarts", "2", kills=kills, wait=False)
    # 2. (checked below) The 3-rank run left step 3 (world size 3); resume it at 2 ranks, side by
    # side with run 1: a launch spends much of its wall time starting processes one after
    # another, with a core often idle.
    m = CheckpointReader.open(resized).manifest
    assert (m.step, m.layout.world_size) == (3, 3)
    p_resized = zshard_train(workdir, resized, "--nproc", "2", wait=False)
    # A failed check below must not leave a launcher running (its agent and workers die with it).
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_reap, p)
        cleanup.callback(_reap, p_resized)
        _check_restarted(p, ckpt, reference, during_restart)
        out.runs += 1
        out.add("2 ranks, killed mid-save then mid-step, --max-restarts 2: bitwise equal")
        # 2. The 3-rank run resumed at 2 ranks.
        _, err_resized = p_resized.communicate(timeout=600)
    assert p_resized.returncode == 0, err_resized
    got = final_params(resized)
    # Same samples in the same steps; only the order of fp32 gradient reductions differs
    # between 3 and 2 ranks, and Adam's normalisation magnifies that for near-zero gradients:
    # a few 1e-6 on parameters that moved ~6e-3 (6 steps at lr 1e-3).
    worst = max(float(np.max(np.abs(got[n] - reference[n]))) for n in got)
    for n in got:
        np.testing.assert_allclose(got[n], reference[n], rtol=1e-5, atol=1e-5, err_msg=n)
    out.runs += 1
    out.add("3 ranks killed mid-step, resumed at 2 ranks: equal within atol 1e-5")
    out.notes.append(f"3 -> 2 ranks: largest absolute parameter difference {worst:.1e}")
    out.seconds = time.monotonic() - t0
    return out


# -- lies

# Manifest fields that describe the file rather than the tensors: lies there change nothing read.
NOT_LAYOUT = ("created", "zshard_version", "state", "format")


def edited_leaf(path: tuple[Any, ...], node: Any) -> bool:
    """A manifest leaf that the lie fuzzers may edit (:func:`tests.harness.json_paths`)."""
    return not isinstance(node, (dict, list)) and bool(path) and path[0] not in NOT_LAYOUT


def lie_fuzz(workdir: str, *, cases: int, seed: int) -> Outcome:
    """Random edits of a real checkpoint's manifest (numbers nudged or replaced, names and dtypes
    swapped), reframed with a correct checksum, then every tensor read: a clean ZshardError, the
    true data (a harmless edit), or, for lies consistent with every stored byte, other data.
    Reads past the end of a file never happen (asserted)."""
    import crc32c

    from zshard.store.reader import CheckpointReader
    from zshard.store.storage import LocalStorage

    out = Outcome("manifest edited to lie, with a correct checksum (random edits)")
    t0 = time.monotonic()
    rng = random.Random(seed)
    root = os.path.join(workdir, "lies")
    wl = Workload(3, chunk=1024, rows=23)
    wl.save(root, 5)
    path = os.path.join(root, "step-00000005", "manifest.json")
    pristine = read_bytes(path)
    truth = {(n, k): a.tobytes() for k in KINDS for n, a in wl.values(5, k).items()}

    real_into = LocalStorage.readinto

    def bounded(self: Any, key: str, offset: int, buffers: list[memoryview]) -> None:
        size = os.path.getsize(self._p(key))
        assert offset + sum(b.nbytes for b in buffers) <= size or not key.endswith(
            tuple("0123456789")
        ), key
        real_into(self, key, offset, buffers)

    LocalStorage.readinto = bounded  # type: ignore[method-assign]
    try:
        for _ in range(cases):
            obj = json.loads(pristine[32:-1])
            spots = json_paths(obj, edited_leaf)
            for _ in range(rng.randint(1, 2)):
                spot = rng.choice(spots)
                target = obj
                for k in spot[:-1]:
                    target = target[k]
                old = target[spot[-1]]
                if isinstance(old, bool) or not isinstance(old, int):
                    target[spot[-1]] = rng.choice(
                        ["float64", "int32", "bfloat16", "uint8", "g0001", "../x", "param",
                         "exp_avg", "w", "b", "s", 0, -1, None]
                    )  # fmt: skip
                else:
                    target[spot[-1]] = rng.choice(
                        [old + rng.randint(-3, 3), rng.randint(-(2**63), 2**64), 0, -old]
                    )
            body = json.dumps(obj, separators=(",", ":")).encode()
            with open(path, "wb") as f:
                f.write(b'{"crc32c":"' + f"{crc32c.crc32c(body):08x}".encode())
                f.write(b'","manifest":' + body + b"}")
            out.runs += 1
            try:
                r = CheckpointReader.open(root)
                got = {(t.name, t.kind): r.read_tensor(t.name, t.kind).tobytes()
                       for t in r.manifest.tensors}  # fmt: skip
                for rank in range(r.manifest.rank_state):
                    r.read_rank_state(rank)
            except ZshardError as e:
                assert "\n" not in str(e)
                out.add("rejected with a clean error")
                continue
            if got == truth:
                out.add("harmless (read back the true data)")
            elif sorted(got.values()) == sorted(truth.values()):
                out.add("a tensor renamed (names are data, never paths): true data")
            else:
                out.add("consistent lie: other data read, in bounds")
                out.notes.append(_describe_lie(pristine, obj))
    finally:
        LocalStorage.readinto = real_into  # type: ignore[method-assign]
        with open(path, "wb") as f:
            f.write(pristine)
    out.seconds = time.monotonic() - t0
    return out


def _diff(pristine: bytes, obj: Any) -> list[Any]:
    """The leaves where ``obj`` differs from the pristine manifest (for the report)."""
    base = json.loads(pristine[32:-1])
    found: list[Any] = []

    def walk(a: Any, b: Any, path: tuple) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in set(a) | set(b):
                walk(a.get(k), b.get(k), (*path, k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, (*path, i))
        elif a != b:
            found.append([list(path), a, b])

    walk(base, obj, ())
    return found


def _describe_lie(pristine: bytes, obj: Any) -> str:
    """One line on what a consistent lie changed, naming the tensors."""
    base = json.loads(pristine[32:-1])
    parts = []
    for path, old, new in _diff(pristine, obj):
        if path[:1] == ["tensors"] and len(path) > 1:
            t = base["tensors"][path[1]]
            what = f"tensor {t['name']!r} ({t['kind']}, shape {t['shape']})"
            field = ".".join(str(p) for p in path[2:])
            if path[2:3] == ["fragments"] and len(path) == 5:
                field = ["group", "rank", "offset", "start", "length"][path[4]]
                field = f"fragment {path[3]} {field}"
            parts.append(f"{what}: {field} {old} -> {new}")
        else:
            parts.append(f"{'.'.join(str(p) for p in path)}: {old} -> {new}")
    return "; ".join(parts)
