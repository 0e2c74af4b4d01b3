"""Shared helpers for the ``tools/bench_*.py`` benchmarks: timing, page cache, child processes,
machine description and tables.

Not a public API and not imported by zshard. Scripts in ``tools/`` import it as a sibling module
(``python tools/bench_x.py`` puts ``tools/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

# The repository root, for ``tests.harness`` (process groups shared with the test suite).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

T = TypeVar("T")
GIB = 1 << 30
MIB = 1 << 20
# A child process announces its result on one stdout line starting with this marker, so that
# library chatter (warnings, progress) printed before it cannot break the parsing.
RESULT_MARKER = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float  # user + system seconds of this process, all threads


def timed(fn: Callable[[], T]) -> tuple[Timing, T]:
    """Wall-clock and CPU seconds of one call, and its result.

    CPU time is what the method itself costs; wall time also contains waiting for the disk and,
    on a shared machine, for other processes' CPU use, so the two together tell them apart.
    """
    c0, t0 = _cpu_seconds(), time.perf_counter()
    out = fn()
    return Timing(time.perf_counter() - t0, _cpu_seconds() - c0), out


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def load_average() -> str:
    """The 1/5/15-minute load averages: anything well above 0 means others shared the CPUs."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Samples:
    """Repeated measurements of one quantity; the median is what tables report."""

    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self, fmt: str = "{:.2f}") -> str:
        """``median (min-max)``: the range shows how noisy the machine was."""
        if len(self.values) < 2:
            return fmt.format(self.median)
        lo, hi = min(self.values), max(self.values)
        return f"{fmt.format(self.median)} ({fmt.format(lo)}-{fmt.format(hi)})"


@dataclass
class TimingSamples:
    """Wall and CPU seconds of repeated runs of one phase."""

    wall: Samples = field(default_factory=Samples)
    cpu: Samples = field(default_factory=Samples)

    def add(self, t: Timing) -> None:
        self.wall.add(t.wall)
        self.cpu.add(t.cpu)


def wait_for_idle(max_load: float, timeout: float = 600) -> float:
    """Block until the 1-minute load average is below ``max_load`` (other tenants quiet), or
    ``timeout`` seconds passed. Returns the seconds waited."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= max_load and time.monotonic() - t0 < timeout:
        time.sleep(5)
    return time.monotonic() - t0


def settle(seconds: float) -> None:
    """Let background work (writeback, discards of deleted files) finish between phases."""
    if seconds > 0:
        time.sleep(seconds)


# ---------------------------------------------------------------------------------------------
# Page cache


def try_drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False without the privilege."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def fadvise_dontneed(paths: Sequence[str]) -> int:
    """Evict every file under ``paths`` from the page cache (works unprivileged once data is
    on disk: dirty pages are not dropped, so sync first). Returns the number of files."""
    os.sync()
    n = 0
    for p in paths:
        files = [p] if os.path.isfile(p) else _walk_files(p)
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


def _walk_files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


class PageCache:
    """Evicts written files before they are read, the same way for every method measured.

    Uses ``drop_caches`` when the process may (global, also clears metadata), otherwise
    ``posix_fadvise(DONTNEED)`` on each file. ``how`` records which one worked.
    """

    def __init__(self) -> None:
        self.can_drop = try_drop_caches()
        self.how = "drop_caches" if self.can_drop else "posix_fadvise(DONTNEED) per file"

    def evict(self, paths: Sequence[str]) -> None:
        if not (self.can_drop and try_drop_caches()):
            fadvise_dontneed(paths)


# ---------------------------------------------------------------------------------------------
# Memory and child processes


def disable_numpy_hugepages() -> bool:
    """Stop numpy from asking for transparent huge pages for its large arrays (torch does not).

    On a VM whose balloon driver returns free 2 MiB blocks to the host (free page reporting),
    a huge page is almost always taken from a returned block and costs 512 host faults: here
    up to 2-3 s per GiB, more than the disk. Whether a load hits that depended on which library
    allocated its output (numpy madvises huge pages, torch does not) and on what ran just
    before, not on its I/O. With this off, every method gets ordinary 4 KiB pages.
    """
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            __import__(mod, fromlist=["_set_madvise_hugepage"])._set_madvise_hugepage(False)
            return True
    return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_bytes() -> int:
    """This process's peak resident set size: ``VmHWM``, the high-water mark of its own memory.

    Not ``ru_maxrss``: Linux carries a process's ``ru_maxrss`` across fork and exec, so a child
    started by a parent holding 2 GiB reports at least 2 GiB whatever it does itself.
    """
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    """This process's current resident set size."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS (``clear_refs`` 5, Linux >= 4.0), so a peak read
    later covers only what ran after this call. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def emit_child_result(**fields: Any) -> None:
    """Child side: print ``fields`` plus this process's own peak RSS as the result line."""
    fields["peak_rss_bytes"] = peak_rss_bytes()
    print(RESULT_MARKER + json.dumps(fields), flush=True)


def child_result(stdout: str) -> dict[str, Any] | None:
    """The last result line a child printed (see :func:`emit_child_result`), if any."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if not lines:
        return None
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_MARKER) :])
    return result


def run_child(argv: Sequence[str], timeout: float = 1800) -> dict[str, Any]:
    """Run a fresh Python child (``argv`` after the interpreter) and return its result line."""
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    result = child_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(
            f"child {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return result


def run_workers(
    argv: Sequence[str], world_size: int, *, timeout: float, env: dict[str, str], label: str
) -> list[dict[str, Any]]:
    """``python ARGV...`` as the ranks of one gloo group on 127.0.0.1 (fresh processes, through
    ``tests.harness.run_rank_commands``); each rank's result line, in rank order, with its
    ``exit_code``. A rank without a result line raises ``RuntimeError`` with its stderr."""
    from tests.harness import run_rank_commands

    results = []
    for out in run_rank_commands(argv, world_size, timeout=timeout, env=env):
        result = child_result(out.stdout)
        if result is None:
            raise RuntimeError(
                f"{label} rank {out.rank} failed (exit {out.returncode}):\n{out.stderr[-4000:]}"
            )
        result["exit_code"] = out.returncode
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# Scratch space


@contextlib.contextmanager
def scratch_dir(parent: str | None, prefix: str) -> Iterator[str]:
    """A fresh directory (under ``parent`` or the system temp dir), removed at exit."""
    if parent:
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove(path: str) -> None:
    """Delete a file or tree and sync, so freeing blocks is not billed to the next phase."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    os.sync()


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(f) for f in _walk_files(path))


# ---------------------------------------------------------------------------------------------
# Machine description


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _disk_of(path: str) -> str:
    """Device, file system and rotational flag of the file system holding ``path``."""
    path = os.path.realpath(path)
    best = ("", "", "")
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    dev, _, fstype = best
    name = os.path.basename(dev)
    kind = ""
    with contextlib.suppress(OSError), open(f"/sys/block/{name}/queue/rotational") as f:
        kind = "rotational" if f.read().strip() == "1" else "non-rotational"
    if name.startswith("vd"):
        kind = f"virtio block device, reports {kind}" if kind else "virtio block device"
    return ", ".join(x for x in (dev, fstype, kind) if x) or "unknown"


def git_revision(path: str, *under: str) -> str:
    """The code a benchmark measured: ``<short commit>``, plus the tracked files (under the
    ``under`` paths, relative to the repository root) that differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", path, *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        top = git("rev-parse", "--show-toplevel")
        changed = git("-C", top, "diff", "--name-only", "HEAD", "--", *(under or ["."])).split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not changed:
        return rev
    shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    return f"{rev} with uncommitted changes to {shown}"


def machine_info(scratch: str) -> dict[str, str]:
    """What a reader needs to compare numbers across machines."""
    info = {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} cores",
        "RAM": f"{_ram_bytes() / GIB:.1f} GiB",
        "disk": f"{_disk_of(scratch)} (scratch {scratch})",
        "OS": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    for mod in ("torch", "numpy", "zarr", "safetensors", "fsspec"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    return info


# ---------------------------------------------------------------------------------------------
# Formatting


def gib_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / GIB / seconds if seconds > 0 else float("inf")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table padded to line up as plain text too. Numbers align right."""
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    sep = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)]
    return "\n".join([line(cells[0]), "| " + " | ".join(sep) + " |", *map(line, cells[1:])])


def _looks_numeric(s: str) -> bool:
    head = s.split(" ", 1)[0].rstrip("x%")
    try:
        float(head)
    except ValueError:
        return s in ("", "-")
    return True
