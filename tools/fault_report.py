"""Run the fault-injection harness with report-sized counts and write docs/reliability.md.

    python tools/fault_report.py                 # full run (about 10 minutes on 2 cores)
    python tools/fault_report.py --quick         # small counts, to check the script itself
    python tools/fault_report.py --out -         # print the Markdown instead of writing it

Every figure in the report comes from the harness functions in tests/reliability/_harness.py,
the same ones the test suite asserts with: a run that breaks an invariant raises instead of
being counted. The pytest-based rows (bad inputs, no pickle, path escapes, fuzzing) run pytest on
the corresponding tests and record how many cases passed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.harness import moto_server, new_bucket  # noqa: E402
from tests.reliability import _harness as h  # noqa: E402
from tests.reliability._workload import configure_s3  # noqa: E402
from tests.train._stop_runs import stop_report  # noqa: E402


def _pytest(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", tail)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", tail)) else 0
    # With --hypothesis-show-statistics: how many examples each property really ran.
    examples = [int(n) for n in re.findall(r"(\d+) passing examples", r.stdout)]
    return {
        "passed": passed,
        "failed": failed,
        "examples": examples,
        "seconds": time.monotonic() - t0,
        "tail": tail,
    }


def run(quick: bool) -> dict[str, Any]:
    k = (lambda full, small: small) if quick else (lambda full, small: full)
    results: list[h.Outcome] = []
    extra: dict[str, Any] = {}
    t0 = time.monotonic()

    def step(name: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f} s] {name}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="zshard-report-") as tmp:
        step("SIGKILL during saves (local)")
        results.append(h.crash_save(f"{tmp}/l1", world=1, kills=k(25, 4), seed=1))
        results.append(h.crash_save(f"{tmp}/l3", world=3, kills=k(25, 4), seed=3))
        for kind in ("reshard", "consolidate", "consolidate-dir"):
            step(f"SIGKILL during {kind}")
            d = os.path.join(tmp, kind)
            os.makedirs(d)
            results.append(h.crash_convert(kind, kills=k(15, 3), seed=5, workdir=d))
        step("corruption sweep")
        results.append(h.corruption_sweep(f"{tmp}/corrupt", samples_per_chunk=k(64, 4), seed=2))
        step("lying manifests")
        results.append(h.lie_fuzz(tmp, cases=k(5000, 200), seed=4))
        step("flaky store (memory)")
        os.environ["ZSHARD_RETRY_BASE_S"] = "0.01"  # the policy as shipped, shorter waits
        results.append(h.flaky_store(runs=k(30, 3), seed=1, error_rate=0.1))
        results.append(h.flaky_store(runs=k(30, 3), seed=2, error_rate=0.2))
        del os.environ["ZSHARD_RETRY_BASE_S"]
        step("store down (default retry policy: 5 attempts, 0.2 s base)")
        results.append(h.exhausted_retries())
        step("lock races (local)")
        results.append(
            h.lock_race(lambda r: f"{tmp}/race{r}", rounds=k(10, 2), racers=3, stale=True)
        )
        results.append(
            h.lock_race(lambda r: f"{tmp}/fresh{r}", rounds=k(10, 2), racers=3, stale=False)
        )
        with moto_server() as endpoint:
            configure_s3(endpoint)
            bucket = new_bucket(endpoint)
            step("SIGKILL during saves (S3)")
            results.append(
                h.crash_save(
                    f"{bucket}/crash", world=2, kills=k(20, 3), seed=7, s3_endpoint=endpoint
                )
            )
            step("flaky store (S3)")
            os.environ["ZSHARD_RETRY_BASE_S"] = "0.01"
            results.append(
                h.flaky_store(
                    runs=k(8, 2), seed=3, error_rate=0.1, target="s3", s3_base=f"{bucket}/flaky"
                )
            )
            del os.environ["ZSHARD_RETRY_BASE_S"]
            results.append(h.exhausted_retries(target="s3", s3_base=f"{bucket}/down"))
            step("lock races (S3)")
            results.append(
                h.lock_race(
                    lambda r: f"{bucket}/race{r}", rounds=k(5, 1), racers=3,
                    s3_endpoint=endpoint, label="S3 (moto, conditional PUT)",
                )
            )  # fmt: skip
        step("zshard train with killed workers")
        results.append(h.elastic_runs(f"{tmp}"))
        step("stopping zshard train: signals, a killed worker or launcher, a full disk")
        results += stop_report(Path(tmp) / "stop", runs=k(3, 1))
    step("pytest: bad inputs, no pickle, path escapes, fuzzing")
    extra["bad_inputs"] = _pytest("tests/reliability/test_bad_inputs.py")
    extra["no_pickle"] = _pytest("tests/reliability/test_security.py", "-k", "unpickle")
    extra["paths"] = _pytest("tests/reliability/test_security.py", "-k", "escape")
    extra["fuzz"] = _pytest(
        "tests/reliability/test_security.py", "-k", "fuzz", "--hypothesis-show-statistics",
        env={"ZSHARD_FUZZ": "long" if not quick else ""},
    )  # fmt: skip
    extra["lies"] = _pytest("tests/reliability/test_corruption.py", "-k", "lying or zarr_json")
    extra["seconds"] = time.monotonic() - t0
    return {"outcomes": [o.to_json() for o in results], "extra": extra}


# -- Markdown


def _outcome_cell(o: dict[str, Any]) -> str:
    c = o["counts"]
    if o["fault"].startswith("single-byte flips"):
        verify = sum(n for k, n in c.items() if k.endswith("detected by verify"))
        load = sum(n for k, n in c.items() if k.endswith("detected at load"))
        padding = sum(n for k, n in c.items() if k.endswith("padding only, read by no tensor"))
        text = (
            f"reported by verify, naming the file (and tensors): {verify} of {o['runs']}; "
            f"raised at load, naming tensor and file: {load} of {o['runs']}"
        )
        if padding:
            text += f" (the other {padding}: padding no tensor reads; verify reports them)"
        return text
    parts = []
    for key, n in o["counts"].items():
        if key.startswith("store ") or key.startswith("killed: ") or key == "max seconds to fail":
            continue
        parts.append(f"{key}: {n}")
    return "; ".join(parts)


def render(data: dict[str, Any]) -> str:
    ex = data["extra"]
    lines = [
        "# Reliability",
        "",
        "What zshard does under faults, load and bad input, measured by the fault-injection",
        "harness in `tests/reliability/` (the test suite runs it with small counts and asserts",
        "every invariant; `tools/fault_report.py` runs it with the counts below and wrote this",
        "page). A run that breaks an invariant raises instead of being counted, so every count",
        "below is of runs whose invariants were checked.",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d} on {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, in "
        f"{ex['seconds'] / 60:.0f} minutes. S3 is a moto server on 127.0.0.1.",
        "",
        "## Summary",
        "",
        "| fault injected | runs | outcome |",
        "|---|---:|---|",
    ]
    for o in data["outcomes"]:
        lines.append(f"| {o['fault']} | {o['runs']} | {_outcome_cell(o)} |")
    bi, npk, pth, fz, lies = ex["bad_inputs"], ex["no_pickle"], ex["paths"], ex["fuzz"], ex["lies"]
    cases = bi["passed"] + bi["failed"] - 1  # one test checks the table itself
    examples = " + ".join(f"{n:,}" for n in fz["examples"]) or str(fz["passed"])
    lines += [
        f"| bad input to every command and the training config (one consolidated table) | "
        f"{cases} | exit 2 with one line on stderr, nothing written: "
        f"{cases - bi['failed']} passed, {bi['failed']} failed |",
        f"| `pickle.load(s)`, `pickle.Unpickler`, `torch.load`, `np.load(allow_pickle)` trapped "
        f"during open, read, verify, inspect, ls, reshard, consolidate, import, engine load | "
        f"{npk['passed']} | {'never called' if not npk['failed'] else 'CALLED'} |",
        f"| hostile group names and state kinds (`..`, absolute, URLs, separators, NUL, "
        f"unicode) in manifests with a correct checksum; hostile `latest` | {pth['passed']} | "
        f"refused before any read outside the root: {pth['passed']} passed, {pth['failed']} "
        "failed |",
        f"| fuzzed manifest and safetensors-header parsing (hypothesis) | {examples} "
        f"| only clean ZshardErrors: {fz['passed']} targets passed, {fz['failed']} failed |",
        f"| catalogue of inconsistent lies (shapes, offsets, lengths, ranks, partition and "
        f"chunk sizes, world size, dtypes of both widths) and edited zarr.json | "
        f"{lies['passed']} | clean error at open or first read: {lies['passed']} passed, "
        f"{lies['failed']} failed |",
        "",
        "## Details",
        "",
    ]
    for o in data["outcomes"]:
        lines.append(f"### {o['fault']}")
        lines.append("")
        lines.append(f"{o['runs']} runs in {o['seconds']:.0f} s.")
        lines.append("")
        for key, n in sorted(o["counts"].items()):
            lines.append(f"- {key}: {n}")
        for note in o["notes"][:6]:
            lines.append(f"- note: {note}")
        lines.append("")
    lines += [DISCUSSION.strip(), ""]
    return "\n".join(lines)


DISCUSSION = """
## How each fault is injected

- **SIGKILL during a save.** One to three rank processes (forked from a preloaded server, so
  kills can be many) run the engine's save protocol with `CheckpointWriter` and a file-based
  barrier between phases: rank 0 prepares, each rank writes its own shards and rank state, rank 0
  commits (zarr metadata, `manifest.json`, `latest`, retention with `keep_last=2`). A random rank
  is killed at a random moment spread over about 2.5 saves (then the others, as the launcher
  would), or all at once. After every kill, every committed step is read back bitwise and
  verified; the newest step reported committed before the kill is still there; `load`,
  `inspect`, `ls`, `consolidate` and `reshard` all resolve the root to the newest committed
  step; and a fresh save of the next step succeeds, clearing the leftover and taking over the
  lock of the dead rank 0.
- **SIGKILL during reshard/consolidate.** The `zshard reshard` / `zshard consolidate` command
  line (its `main`, in a forked child) is killed at a random moment of a run; the final name
  must then be absent or complete and bitwise right, and a rerun must succeed.
- **Corruption.** Single-byte flips in each shard index and its crc, each chunk body (sampled
  positions plus first and last byte) and each chunk crc (every byte), the manifest, rank state
  and array `zarr.json`; shards truncated at several points; shards removed. `verify --all` must
  name the file (and, for data, the tensors), and reading an affected tensor must raise a
  one-line ZshardError naming the tensor and the file.
- **Lies.** The manifest is edited and re-framed with a correct crc32c, so only validation can
  catch it. Reads are wrapped to fail the run on any access past the end of a shard.
- **Object-store faults.** `flaky://` (over `memory://`) and `flakys3://` (over moto S3) are
  fsspec file systems that, for a seeded fraction of calls, raise what object stores raise
  (connection reset, timeouts, botocore read/connect timeouts, `503 SlowDown`, s3fs's
  translation of it), before the call or after it took effect (a lost response), and delay 10%
  of calls. Each run saves, loads, verifies, reshards, consolidates and imports, with the
  shipped policy (5 attempts, jittered exponential backoff; base shortened to 0.01 s to keep the
  runs short). On `flaky://` every write is a PUT and a rename, two calls that can each fail,
  so at a 20% failure rate five attempts are sometimes not enough: such a run must then end with
  one clean error and nothing half-committed, and the counts show which runs did.
- **Store down.** Every PUT, read, existence check or rename fails: the operation must end with
  one StorageError naming the URL and the number of attempts, and nothing half-committed.
- **Lock races.** Three processes start on one root at the same instant (with a stale lock of a
  dead run present, or none): exactly one may get the lock.
- **Worker kills.** A model provider for `zshard train` SIGKILLs its own worker: on the first
  attempt after rank 1 wrote its first shard of the step-3 save, on the second in step 5; with
  `--max-restarts 2` the run must finish with parameters bitwise equal to an uninterrupted run.
  A 3-rank run killed in step 5 is resumed at 2 ranks (global batch 12 divides both).
- **Stopping a run** (`tests/train/_stop_runs.py`, also run by `tests/train/test_stop.py`). A
  model provider for `zshard train` holds rank 0 inside step 4 until the harness opens a gate,
  so a signal sent meanwhile lands in that step: SIGTERM or SIGINT to the launcher alone (the run
  must stop after step 4, commit it, exit 75, and its rerun end bitwise equal to an
  uninterrupted run), the preemption signal with `on_signal: exit`, a second SIGTERM while rank
  1 stalls after its first shard of the stop's save, SIGKILL of the launcher. Other providers
  SIGKILL rank 1 in step 5, or fail every write of rank 1 into one step directory with ENOSPC
  (raised where a full disk raises it, in `LocalStream.write`). While a run goes, the harness
  records every descendant of the launcher (psutil); none may be left once it has exited.

## What the harness found, and the fixes

- **Restarts never worked** (`zshard train --max-restarts`): torch 2.13's elastic agent restarts
  the worker group on the previous attempt's TCPStore without a per-attempt key prefix, so the
  restarted workers read the dead workers' gloo addresses ("Gloo connectFullMesh failed ...
  Connection refused") and every restart failed. On one node the launcher now restarts
  `torch.distributed.run` itself, each attempt with a fresh store (`zshard/train/run/_launch.py`);
  bad input is not retried.
- **Stale listings on S3**: s3fs answers `exists`/`ls` from listings cached in the process and
  invalidates them only on its own writes. A reader (or rank 0 checking the other ranks'
  shards) could miss a checkpoint another process had just committed: the S3 crash runs saw a
  committed step reported missing. `FsspecStorage` now drops the cached listing before every
  metadata call (`zshard/store/storage.py`).
- **A consistent dtype lie read as a wrong tensor**: relabelling float32 as int32 in both the
  tensor and its array keeps every size and offset valid. The reader now checks each array's
  `zarr.json` against the manifest once per array (`zshard/store/reader.py`).
- **No retries**: one transient S3 error failed a whole save. `zshard/store/retry.py` adds
  bounded, jittered retries for idempotent operations; streamed objects are spooled locally and
  uploaded whole so that a failed upload can be replayed.
- **Two runs could write one root**: `zshard/store/lock.py` adds the root lock.
- **Orphaned runs**: `zshard train` ran torch.distributed.run as a plain child and did nothing on
  signals. SIGTERM or SIGINT to it alone ended it at once (143, 130) and left the agent and
  workers training without a parent and without the root's lock: a second run could take the
  lock and write to the same root. The launcher now turns signals into a stop request, returns
  only when no process of the run is left, and its agent and workers die with it (see "Stopping
  a run").
- **A failed periodic save read as bad input**: a disk-full StorageError is a ZshardError, so the
  run ended with exit 2, and the line shown could be another rank's "another rank failed". It is
  now exit 1 naming the rank whose write failed, with the last committed checkpoint;
  `checkpoint.on_error: continue` keeps training (`zshard/train/run/_saves.py`).
- A manifest with `format_version` 0 or negative was accepted; it is now rejected.

## Stopping a run

- **Signals.** `zshard train` catches SIGINT, SIGTERM, SIGHUP and `checkpoint.preempt_signal`
  (default SIGUSR1, which SLURM's `--signal=USR1@<seconds>` sends ahead of the time limit; `none`
  for no extra signal). The first writes a stop request into the attempt's local error
  directory and says so on stderr; before each step every worker reads it, and the ranks agree
  with one 16-byte all-reduce (MAX), so all stop at the same step, on every node. Then
  `checkpoint.on_signal: save` (default) commits a synchronous checkpoint of that step and the
  run ends with `stopped at step N by SIGTERM; checkpoint <path>; rerun the same command to
  resume`, exit 75; `exit` ends without saving, exit 128 + N. A second signal SIGKILLs every
  process of the run at once (exit 128 + N): a checkpoint exists only once its manifest is
  committed, so the last committed one stays as it was. The elastic agent and the workers catch
  the same signals when sent to them directly (SLURM signals every task of a step): the agent
  writes the same stop request, a worker counts it as its own; torch's agent keeps only SIGQUIT.
- **No orphans.** The agent starts in a session of its own, so a Ctrl-C in the terminal reaches
  the launcher alone. The agent and each worker ask for SIGKILL when their parent dies
  (`prctl(PR_SET_PDEATHSIG)`, Linux), then check that their parent is still the one that started
  them; a SIGKILLed launcher thus takes its agent and, through it, the workers along. The
  launcher records its descendants while the run goes (torch starts each worker in a session of
  its own) and returns only when none is left (SIGKILL after 10 s), so the root's lock, held by
  the launcher, lasts as long as the run.
- **A dead rank.** torch's agent notices a dead worker within 0.1 s and sends SIGTERM to the
  others; a peer blocked in a collective with a dead process fails at once (gloo sees the closed
  connection), or at the latest after `dist.timeout_s` (default 300 s). The run ends with one
  line naming the rank, its signal (or error) and the last committed checkpoint; with
  `--max-restarts` the launcher restarts from that checkpoint instead.
- **A failed save.** Disk full, permission denied or an unreachable store during a periodic save:
  nothing of that step is committed and earlier checkpoints are untouched. `checkpoint.on_error:
  stop` (default) ends the run (exit 1) with one line naming the rank, the step directory and the
  cause; `continue` prints one warning (from the rank whose write failed) and saves again at the
  next interval. The final save of a run, or of a stop, is never skipped: its failure ends the
  run.

| exit code | meaning |
|---:|---|
| 0 | done; the last line names the newest checkpoint and `zshard consolidate` |
| 1 | training failed: one line with the rank, its signal or error, the last committed checkpoint |
| 2 | bad input (nothing written) |
| 75 | stopped by a signal after committing a checkpoint of the step reached; rerun to resume |
| 128 + N | ended by signal N without a new checkpoint (`on_signal: exit`, a second signal) |

## Limits

- **Lies consistent with every stored byte cannot be detected**: the manifest is the only record
  of placement and shape. The random-lie runs above count them: a 0-d tensor's fragment moved
  into the zero padding of its partition reads as 0; a shape with the same element count reads
  the same bytes in another shape. Changing these needs a deliberate edit and a recomputed
  crc32c; a per-tensor checksum in the manifest would catch the first kind (format change).
- **Padding** bytes are covered by their chunk's crc32c (verify reports them) but belong to no
  tensor, so a load never reads them.
- **Object stores without conditional PUT**: the lock falls back to write, wait
  `ZSHARD_LOCK_SETTLE_S` (1 s), read back; two runs starting within that window on a store
  that is not consistent within it could both proceed. AWS S3, MinIO and moto support
  `If-None-Match`. Staleness across hosts compares heartbeat times written by one host's clock
  with another's: clocks must agree to well within `ZSHARD_LOCK_TIMEOUT_S` (120 s).
- **Multi-node runs** with c10d rendezvous keep torch's own `--max-restarts` (agents on all
  nodes must restart together), with the restart problem above; the launcher holds the root
  lock only on a single node or on static node rank 0 (otherwise each save's rank 0 locks the
  root while it writes).
- **Spooling**: a streamed object larger than 16 MiB is spooled to a local temporary file
  (`TMPDIR`) before upload, so that it can be replayed; this needs local scratch space for one
  shard at a time and uploads after the shard is produced rather than during.
- **Stops happen between steps**: a step that never ends (a peer hung, not dead) ends only by
  `dist.timeout_s` or a second signal. A signal sent straight to a worker in its first seconds,
  before its handlers are installed, kills it (the run then fails as for a dead worker); the
  launcher's and the agent's requests go through a file and are never lost that way. The
  checkpoint side channel waits at least an hour (slow object stores), so a peer lost mid-save on
  a host that vanished without closing its connections holds the others that long.
- **PR_SET_PDEATHSIG is Linux only**: elsewhere a SIGKILLed launcher leaves its agent and
  workers running (signals to the launcher still end the whole run).

## Settings

| variable | default | meaning |
|---|---|---|
| `ZSHARD_RETRIES` | 5 | attempts per object-store call (1 disables retries) |
| `ZSHARD_RETRY_BASE_S` | 0.2 | first backoff; doubled per attempt, full jitter |
| `ZSHARD_RETRY_CAP_S` | 5 | largest single backoff |
| `ZSHARD_LOCK_TIMEOUT_S` | 120 | heartbeat age after which a root lock is stale |
| `ZSHARD_LOCK_SETTLE_S` | 1 | wait before read-back, only on stores without conditional PUT |

## Reproduce

```sh
pytest tests/reliability                     # the suite (small counts), ~3 minutes on 2 cores
ZSHARD_FUZZ=long pytest tests/reliability -k fuzz   # 10,000 cases per parser
python tools/fault_report.py                 # this page
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (checks the script)")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "reliability.md"))
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    data = run(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    text = render(data)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
