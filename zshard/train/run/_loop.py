"""The training loop every ``zshard train`` worker runs (``python -m zshard.train.run._loop``).

One optimizer step = ``grad_accum`` micro batches per rank, drawn by global sample index
(``GlobalBatchSampler``), so a run resumed at another world size trains on the same samples in
the same steps. Rank 0 shows a progress bar and appends metrics to
``<checkpoint.dir>/metrics.jsonl``. An error is recorded for the launcher (``ZSHARD_ERROR_DIR``)
so it can show the failing rank's message once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
import traceback
from typing import Any, TextIO, cast

import torch
import torch.distributed as dist
from tqdm import tqdm

from zshard.errors import ZshardError
from zshard.store.root import join_url, step_dir_name
from zshard.store.storage import open_storage, translate_errors
from zshard.train.config import ZshardConfig, load_with_deepspeed
from zshard.train.data import (
    GlobalBatchSampler,
    collate,
    model_vocab_size,
    open_data,
    read_ahead,
)
from zshard.train.engine import initialize, resume_source
from zshard.train.models import make_model, on_meta
from zshard.train.run._saves import SaveFailed, Saves
from zshard.train.run._stop import (
    AGENT_PID_ENV,
    SafeStream,
    StopSignals,
    agree,
    die_with_parent,
    stop_signals,
    write_stopped,
)

METRICS_FILE = "metrics.jsonl"


def build(cfg: ZshardConfig) -> tuple[Any, Any, Any]:
    """The model factory, the training set and the validation set (None if none)."""
    model_args = cfg.model_kwargs()
    provided: list[Any] = []

    def factory() -> torch.nn.Module:
        made = make_model(cfg.model.name, **model_args)
        provided[:] = [made.dataset]
        return made.model

    # Build once on the meta device: no memory, and it tells us whether the provider brings data
    # and how many token ids the model embeds (the data is checked against it).
    with on_meta():
        meta_model = factory()
    dataset = provided[0]
    val = None
    if dataset is None:
        # hf_dataset: the first process on a node tokenizes (showing progress), the others wait.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dataset, val = open_data(
            **dataclasses.asdict(cfg.data),
            vocab_size=model_vocab_size(meta_model),
            progress=local_rank == 0,
        )
    return factory, dataset, val


class MetricsLog:
    """metrics.jsonl next to the checkpoints: appended locally, rewritten whole on object stores
    (they cannot append), so it stays a plain JSON-lines file either way."""

    def __init__(self, directory: str, fresh: bool) -> None:
        self.storage = open_storage(directory)
        self.lines: list[str] = []
        if not fresh and self.storage.exists(METRICS_FILE):
            self.lines = self.storage.read(METRICS_FILE).decode().splitlines()

    def append(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record))
        self.storage.write_atomic(METRICS_FILE, ("\n".join(self.lines) + "\n").encode())


def peak_rss_bytes() -> int:
    """This process's own peak RSS. ``ru_maxrss`` is not used where ``VmHWM`` exists: Linux
    carries the parent's high-water mark into a forked child, so launched workers over-report."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


@torch.no_grad()
def evaluate(engine: Any, val: Any, cfg: ZshardConfig, batches: int = 4) -> float:
    """Mean validation loss over a few fixed batches, split across ranks."""
    micro = cfg.train.resolve_batch(engine.world_size)[0]
    n = len(val)
    losses = []
    for b in range(batches):
        start = (b * engine.world_size + engine.rank) * micro
        idx = [(start + i) % n for i in range(micro)]
        x, y = collate(val, idx)
        losses.append(float(engine(x.to(engine.device), y.to(engine.device)).item()))
    return mean_across_ranks(sum(losses) / len(losses), engine.device)


def train(cfg: ZshardConfig, stop: StopSignals | None = None) -> dict[str, Any]:
    """Train ``cfg.train.steps`` steps (from the resume point), or until the ranks agree to
    stop (``stop``: this rank's signals and the launcher's stop request; see ``_stop``).
    Returns the last step's metrics record."""
    return _Run(cfg, stop or StopSignals(error_dir="")).run()


class _Run:
    """One worker's run, in phases: set up (model, data, resume) on construction, then
    :meth:`run` steps until done or until a stop is agreed, then the final save."""

    def __init__(self, cfg: ZshardConfig, stop: StopSignals) -> None:
        self.cfg, self.stop = cfg, stop
        factory, self.dataset, self.val = build(cfg)
        self.engine = engine = initialize(None, cfg, model_factory=factory)
        self.rank, self.world = engine.rank, engine.world_size
        self.micro, self.accum, global_batch = cfg.train.resolve_batch(self.world)
        self.sampler = GlobalBatchSampler(len(self.dataset), global_batch, cfg.train.seed)
        self.tokens_per_step = global_batch * cfg.data.seq_len
        resumed = engine.resume()  # checkpoint.resume, decided as the launcher decided it
        self.start = engine.global_step
        ckpt_dir = cfg.checkpoint.dir
        self.saves: Saves | None = None
        if ckpt_dir:
            here = resumed is not None and resume_source(cfg.checkpoint) == ckpt_dir
            known = join_url(ckpt_dir, step_dir_name(self.start)) if here else None
            self.saves = Saves(engine, cfg.checkpoint, known)
        lead = self.rank == 0
        self.log = MetricsLog(ckpt_dir, fresh=self.start == 0) if (lead and ckpt_dir) else None
        # stdout: the launcher keeps stderr in its log and shows only a failure's root cause.
        self.bar = (
            tqdm(
                total=cfg.train.steps,
                initial=self.start,
                desc="train",
                unit="step",
                file=sys.stdout,
            )
            if lead
            else None
        )

    def run(self) -> dict[str, Any]:
        last: dict[str, Any] = {}
        stopped = 0
        for step in range(self.start, self.cfg.train.steps):
            stopped = self._agreed_stop()
            if stopped:
                break
            last = self._step(step)
            self._after_step(step, last)
        checkpoint = self._finish(stopped)
        if stopped:
            write_stopped(
                self.engine.global_step, stopped, checkpoint, self.cfg.checkpoint.on_signal
            )
        return last

    def _agreed_stop(self) -> int:
        """Every rank, before every step: the signal any rank was stopped by (0: go on), so all
        stop at one step; also where a held-back save failure is reported."""
        saves = self.saves
        agreed = agree(
            self.engine.comm,
            self.engine.device,
            self.stop.seen(),
            saves.failed_code() if saves else 0,
        )
        if saves is not None:
            saves.report(agreed.reporter, self.rank)
        return agreed.signum

    def _step(self, step: int) -> dict[str, Any]:
        """One optimizer step over ``accum`` micro batches; its metrics record."""
        engine = self.engine
        t0 = time.perf_counter()
        total = 0.0
        for a in range(self.accum):
            # Token files on an object store start fetching the next micro batches now.
            read_ahead(self.dataset, self.sampler, step, a, self.rank, self.world, self.micro)
            x, y = collate(
                self.dataset, self.sampler.micro_batch(step, self.rank, self.world, self.micro, a)
            )
            loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            total += float(loss.detach().float().item())
        # Before step(): its all-reduce queues behind the gradient reductions (which step waits
        # for anyway), not behind the parameter all-gathers step() starts for the next forward.
        loss_mean = mean_across_ranks(total / self.accum, engine.device)
        engine.step()
        dt = time.perf_counter() - t0
        comm = engine.stats()  # this rank's collectives during the step, by kind (bytes)
        record: dict[str, Any] = {
            "step": step + 1,
            "loss": loss_mean,
            "lr": engine.lr,
            "tokens_per_s": self.tokens_per_step / dt,
            "step_time_s": dt,
            "peak_rss_bytes": peak_rss_bytes(),
            "comm_bytes": {k: c["bytes"] for k, c in comm["comm"].items() if c["calls"]},
            "comm_cross_node_bytes": comm["comm_cross_node_bytes"],
        }
        every = self.cfg.train.eval_every
        if self.val is not None and every and (step + 1) % every == 0:
            record["val_loss"] = evaluate(engine, self.val, self.cfg)
        if not math.isfinite(loss_mean):
            raise ZshardError(f"step {step + 1}: loss is {loss_mean}; lower optimizer.lr")
        return record

    def _after_step(self, step: int, record: dict[str, Any]) -> None:
        """Progress bar, metrics.jsonl and the periodic save."""
        cfg = self.cfg
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )
            self.bar.update(1)
        saving = bool(
            self.saves is not None
            and cfg.checkpoint.every
            and (step + 1) % cfg.checkpoint.every == 0
        )
        if saving:
            assert self.saves is not None
            self.saves.periodic()  # checkpoint.on_error decides what a failure does
            last = self.engine.checkpointer.last_save
            if last.get("step") == self.engine.global_step:  # this step's save was taken
                # What the save cost training (rank 0): the stall and, within it, the snapshot.
                record["checkpoint"] = {
                    k: last[k] for k in ("async", "stall_s", "snapshot_s", "wait_s")
                }
        log_every = max(1, cfg.train.log_every)
        if self.log is not None and (
            (step + 1) % log_every == 0 or step + 1 == cfg.train.steps or "checkpoint" in record
        ):
            self.log.append(record)

    def _finish(self, stopped: int) -> str | None:
        """The final save (unless stopped with ``on_signal: exit``); the newest checkpoint."""
        checkpoint = None
        saves, engine = self.saves, self.engine
        if saves is not None:
            agreed = agree(engine.comm, engine.device, 0, saves.failed_code())
            saves.report(agreed.reporter, self.rank)  # a failure held back at the last save
            on_exit = stopped and self.cfg.checkpoint.on_signal == "exit"
            if engine.global_step > self.start and not on_exit:
                saves.last()  # synchronous: committed before this process reports anything
            checkpoint = saves.settled()
        engine.close()
        if self.bar is not None:
            self.bar.close()
        return checkpoint


def record_error(exc: BaseException) -> None:
    """Leave the failing rank's one-line error where the launcher looks for it."""
    directory = os.environ.get("ZSHARD_ERROR_DIR")
    if not directory:
        return
    rank = os.environ.get("RANK", "0")
    info = {
        "rank": int(rank),
        "time": time.time(),
        # A failed save is a run failure (exit 1): only other ZshardErrors are bad input.
        "bad_input": isinstance(exc, ZshardError) and not isinstance(exc, SaveFailed),
        # Another rank's failure, seen from here: the launcher shows the root cause first.
        "secondary": bool(getattr(exc, "secondary", False)),
        "message": f"{type(exc).__name__}: {exc}" if not isinstance(exc, ZshardError) else str(exc),
    }
    with translate_errors(directory), open(os.path.join(directory, f"rank-{rank}.json"), "w") as f:
        json.dump(info, f)


def main(argv: list[str] | None = None) -> None:
    # Die with the agent that started us (a SIGKILLed launcher takes its agent along), and stop
    # gracefully on SIGINT/SIGTERM/SIGHUP from the first moment (see _stop).
    die_with_parent(int(os.environ.get(AGENT_PID_ENV, "0")) or None)
    stop = StopSignals().install()
    sys.stdout = cast(TextIO, SafeStream(sys.stdout))  # progress must not break a stop
    parser = argparse.ArgumentParser(prog="python -m zshard.train.run._loop")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--deepspeed-config")
    args = parser.parse_args(argv)
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        cfg, _ = load_with_deepspeed(
            args.config, args.overrides, args.deepspeed_config, world_size
        )  # the launcher already showed the warning for settings not applied
        stop.install(stop_signals(cfg.checkpoint.preempt_signal))
        train(cfg, stop)
    except BaseException as exc:
        record_error(exc)
        if isinstance(exc, SaveFailed):
            print(f"zshard: error: {' '.join(str(exc).split())}", file=sys.stderr)
            sys.exit(1)
        if isinstance(exc, ZshardError):
            print(f"zshard: error: {' '.join(str(exc).split())}", file=sys.stderr)
            sys.exit(2)
        traceback.print_exc()
        sys.exit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
