"""``zshard plot``: training curves of one or several runs in one figure.

Reads the ``metrics.jsonl`` a run writes next to its checkpoints (one JSON object per logged
step: ``step``, ``loss``, ``lr``, ``tokens_per_s``, ``step_time_s``, ``peak_rss_bytes``, and
``val_loss`` on evaluation steps) and draws four panels: loss (validation dashed), learning rate,
throughput and peak memory. Several runs are overlaid, labelled by their directory name.

matplotlib is an optional extra (``pip install zshard[plot]``), imported only here and only when
a plot is drawn; the Agg backend renders without a display.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zshard.errors import InvalidArgumentError, OutputExistsError, ZshardError
from zshard.store.root import parent_url
from zshard.store.storage import open_storage

METRICS_FILE = "metrics.jsonl"  # as zshard.train.run._loop writes it
FORMATS = ("png", "svg", "pdf")
_GIB = float(1 << 30)


class MissingExtraError(ZshardError, ImportError):
    """An optional dependency (an extra of the zshard package) is not installed."""


@dataclass(frozen=True)
class Run:
    label: str  # the run directory's name
    source: str  # the metrics file read
    records: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of the records that have a number under ``key``."""
        xs, ys = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                xs.append(float(r["step"]))
                ys.append(float(v))
        return xs, ys


def load_run(source: str) -> Run:
    """A run directory (holding ``metrics.jsonl``) or a metrics file, as a :class:`Run`."""
    storage = open_storage(source)
    if storage.isdir(""):
        directory, key = source.rstrip("/") or source, METRICS_FILE
        if not storage.exists(key):
            raise InvalidArgumentError(
                f"{source}: no {METRICS_FILE} in this directory; pass a run directory "
                "(the training's checkpoint.dir) or a metrics .jsonl file"
            )
        folder = open_storage(directory)
    else:
        directory, key = parent_url(source)
        folder = open_storage(directory)
        if not folder.exists(key):
            raise InvalidArgumentError(f"{source}: no such run directory or metrics file")
    label = posixpath.basename(directory.rstrip("/")) or directory
    where = f"{directory.rstrip('/')}/{key}"
    raw = folder.read(key).decode("utf-8", errors="replace")
    records = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise InvalidArgumentError(
                f"{where}:{lineno}: not a JSON object; is this a zshard metrics file?"
            ) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            raise InvalidArgumentError(f"{where}:{lineno}: a metrics record needs a numeric 'step'")
        records.append(rec)
    if not records:
        raise InvalidArgumentError(f"{where}: no metrics records (the run logged nothing yet)")
    return Run(label=label, source=where, records=records)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("install matplotlib (pip install zshard[plot])") from None
    matplotlib.use("Agg")  # render to files; no display needed
    import matplotlib.pyplot as plt

    return plt


def _unique_labels(runs: list[Run]) -> list[str]:
    """Directory names, made unique (``run``, ``run (2)``) when two runs share one."""
    seen: dict[str, int] = {}
    out = []
    for r in runs:
        n = seen.get(r.label, 0) + 1
        seen[r.label] = n
        out.append(r.label if n == 1 else f"{r.label} ({n})")
    return out


def plot_runs(sources: Sequence[str], out: str, *, overwrite: bool = False) -> list[Run]:
    """Draw the four panels for ``sources`` into ``out`` (.png, .svg or .pdf); returns the runs."""
    if not sources:
        raise InvalidArgumentError("give at least one run directory or metrics.jsonl file")
    fmt = posixpath.splitext(out)[1].lstrip(".").lower() or "png"
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"-o {out}: expected a .png, .svg or .pdf file name")
    directory, name = parent_url(out)
    target = open_storage(directory)
    if target.exists(name) and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    runs = [load_run(s) for s in sources]  # validate every input before drawing anything
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, constrained_layout=True)
    (ax_loss, ax_lr), (ax_tok, ax_mem) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, label) in enumerate(zip(runs, _unique_labels(runs))):
        color = colors[i % len(colors)]
        xs, ys = run.series("loss")
        ax_loss.plot(xs, ys, color=color, label=f"{label} train")
        xs, ys = run.series("val_loss")
        if xs:
            ax_loss.plot(xs, ys, color=color, linestyle="--", marker=".", label=f"{label} val")
        ax_lr.plot(*run.series("lr"), color=color, label=label)
        ax_tok.plot(*run.series("tokens_per_s"), color=color, label=label)
        xs, ys = run.series("peak_rss_bytes")
        ax_mem.plot(xs, [y / _GIB for y in ys], color=color, label=label)
    panels = (
        (ax_loss, "loss", "loss"),
        (ax_lr, "learning rate", "lr"),
        (ax_tok, "throughput", "tokens/s"),
        (ax_mem, "memory (peak RSS, rank 0)", "GiB"),
    )
    for ax, title, ylabel in panels:
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_tok, ax_mem):
        ax.set_xlabel("step")
    ax_loss.legend(fontsize="small")
    if len(runs) > 1:
        ax_lr.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    plt.close(fig)
    # Written whole under a temporary name and renamed: never a half-written image.
    target.write_atomic(name, buf.getvalue())
    return runs
