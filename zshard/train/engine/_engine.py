"""The ZeRO training engine: ``initialize(model, config)`` wraps a model for stages 0-3.

Run it like DeepSpeed, with no change to model code::

    engine = initialize(model, {"zero": {"stage": 2}, "precision": "bf16"})
    for batch in loader:                        # one micro batch per call
        loss = engine(batch["x"], batch["y"])   # whatever the model returns
        engine.backward(loss)
        engine.step()                           # steps at the end of each accumulation window

What each stage keeps per rank (N ranks, see docs/design.md and zero.FlatParamGroup):

    stage 0  full params, full grads, full master + optimizer state  (all-reduce)
    stage 1  full params, full grads, master + state partition       (reduce to owners, gather)
    stage 2  full params, grad partition, master + state partition   (reduce to owners, gather)
    stage 3  param/grad/master/state partitions                      (gather per module, _stage3)

Communication overlaps compute (``zero.overlap_comm``, default true; zero/_reduce.py,
zero/_gather.py, zero/_stage3.py): gradient buckets are reduced with asynchronous collectives
started from the gradient hooks during backward (stages 0-1 in the window's last backward),
waited for at ``step()``; at stages 1-2 the updated partitions are all-gathered per bucket after
the step and each bucket is waited for just before the first module using it in the next
forward. ``synchronize()`` waits for everything in flight (saving, loading and
``gathered_parameters()`` call it). The optimizer update runs in windows of ``UPDATE_WINDOW``
elements through one reused scratch buffer; staging buffers are allocated once at start-up.

``zero.offload_optimizer`` (stages 1-3) moves master and optimizer state, ``zero.offload_param``
(stage 3) the parameter partitions, to host memory or store-format swap files on any fsspec
path; the step then streams them in sub-groups (offload.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zshard.errors import InvalidArgumentError
from zshard.train.config import ZshardConfig, load_config
from zshard.train.engine._checkpoint import Checkpointer
from zshard.train.engine._export import save_16bit_model as export_16bit_model
from zshard.train.engine._gathered import gathered_module
from zshard.train.engine._host_alloc import apply_host_alloc_policy, release_free_heap
from zshard.train.engine._setup import (
    allocate_state,
    build_groups,
    gradient_sink,
    param_gather,
    start_offload,
)
from zshard.train.engine._update import Updater
from zshard.train.models import apply_activation_checkpointing
from zshard.train.offload import Offload, SwapArray, any_rank
from zshard.train.optim import (
    FlatOptimizer,
    LossScaler,
    build_optimizer,
    lr_at,
    module_dtype,
    optimizer_at,
)
from zshard.train.zero import (
    Comm,
    FlatBufferGroup,
    FlatParamGroup,
    Member,
    Stage3,
    buffer_groups,
    build_model,
    canonical_parameters,
    numel_bytes,
    prepare_buffers,
    resolve_device,
)

log = logging.getLogger("zshard.train")

ConfigSource = ZshardConfig | Mapping[str, Any] | str | Path | None


def initialize(
    model: nn.Module | None = None,
    config: ConfigSource = None,
    model_factory: Callable[[], nn.Module] | None = None,
) -> Engine:
    """Wrap ``model`` (or build one with ``model_factory``) in a ZeRO :class:`Engine`.

    Args:
        model: a model built the same way on every rank (rank 0's values are broadcast).
        config: a :class:`ZshardConfig`, a dict, or a YAML path.
        model_factory: builds the model instead; at stage 3 it is called on the ``meta`` device
            and materialised one module at a time, so no rank ever holds the whole model.
            Values are drawn from the RNG seeded with ``train.seed`` (the same on every rank).
    """
    cfg = config if isinstance(config, ZshardConfig) else load_config(config)
    return Engine(model, cfg, model_factory=model_factory)


class Engine:
    """A model plus its partitioned training state. See :func:`initialize`."""

    def __init__(
        self,
        model: nn.Module | None,
        config: ZshardConfig,
        *,
        model_factory: Callable[[], nn.Module] | None = None,
    ) -> None:
        cfg = self.config = config
        if (model is None) == (model_factory is None):
            raise InvalidArgumentError("initialize: give exactly one of model and model_factory")
        self.device = resolve_device(cfg.dist)
        if self.device.type == "cpu":  # before the model's tensors: see _host_alloc.py
            apply_host_alloc_policy()
        self.comm = Comm.from_env(cfg.dist, self.device)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.stage = cfg.zero.stage
        self.micro_batch_size, self.grad_accum, self.global_batch_size = cfg.train.resolve_batch(
            self.world_size
        )
        self.dtype = module_dtype(cfg.precision.dtype)
        self.mixed = self.dtype != torch.float32
        self.grad_dtype = torch.float32 if cfg.precision.grad_accum_dtype == "fp32" else self.dtype
        self.optimizer: FlatOptimizer = build_optimizer(cfg.optimizer)
        self.scaler = LossScaler(cfg.precision.loss_scale, enabled=cfg.precision.dtype == "fp16")
        self.global_step = 0  # accumulation windows completed (overflow-skipped ones included)
        self.micro_steps = 0  # backward() calls
        self._window_micro = 0  # backward() calls in the current accumulation window
        self.optimizer_steps = 0  # updates applied: Adam's step and the LR schedule's clock
        self.skipped_steps = 0
        self.grad_norm: float | None = None  # global norm of the last window's gradients
        self.checkpointer = Checkpointer(self)

        if model_factory is not None:
            model = build_model(
                model_factory, seed=cfg.train.seed, device=self.device, meta=self.stage == 3
            )
        assert model is not None
        self.module = model
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        self.param_names, self.ties = canonical_parameters(model)
        self._offload: Offload | None = None
        if cfg.zero.offload_optimizer is not None or cfg.zero.offload_param is not None:
            self._offload = start_offload(
                cfg,
                self.comm,
                self.param_names,
                self.optimizer.state_keys,
                dtype=self.dtype,
                device=self.device,
                mixed=self.mixed,
            )
        self.groups = build_groups(
            model,
            cfg,
            self.comm,
            self.param_names,
            self._offload,
            dtype=self.dtype,
            device=self.device,
            mixed=self.mixed,
        )
        self.param_names, _ = canonical_parameters(model)  # materialising made new objects
        prepare_buffers(
            model, comm=self.comm, dtype=self.dtype, device=self.device, mixed=self.mixed
        )
        self.buffer_groups: list[FlatBufferGroup] = buffer_groups(model, self.comm)
        allocate_state(
            self.groups,
            self.optimizer.state_keys,
            self._offload,
            stage=self.stage,
            grad_dtype=self.grad_dtype,
            device=self.device,
        )
        self._sink = gradient_sink(
            model, self.groups, self.comm, cfg.zero, self._offload, device=self.device
        )
        self._stage3 = self._sink if isinstance(self._sink, Stage3) else None
        self._hook_handles: list[Any] = []
        self._member_of: dict[int, tuple[FlatParamGroup, Member]] = {}
        for g in self.groups:
            for m in g.members:
                self._member_of[id(m.param)] = (g, m)
                if g.trainable:
                    self._hook_handles.append(
                        m.param.register_post_accumulate_grad_hook(self._on_grad)
                    )
        self._gather = param_gather(model, self.groups, self.comm, cfg.zero, self.device)
        self._updater = Updater(
            self.groups,
            self.comm,
            self.optimizer,
            self._offload,
            stage=self.stage,
            grad_dtype=self.grad_dtype,
            device=self.device,
        )
        self._comm_mark = self.comm.counters()  # counters at the end of the last step
        self._comm_last: dict[str, dict[str, int]] = _counter_delta(
            self._comm_mark, self._comm_mark
        )
        if self.rank == 0:
            log.info(
                "%s; overlap_comm %s",
                self.comm.describe(),
                "on" if cfg.zero.overlap_comm else "off",
            )
        log.info(
            "zero stage %d, %s, rank %d/%d: %d flat groups, %d parameters",
            self.stage,
            cfg.precision.dtype,
            self.rank,
            self.world_size,
            len(self.groups),
            sum(g.numel for g in self.groups),
        )

    # -- forward / backward / step -------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._prepare_inputs((args, kwargs))
        out = self.module(*args, **kwargs)
        if self._stage3 is not None and not torch.is_grad_enabled():
            self._stage3.release_all()  # no backward follows: drop prefetched groups now
        return out

    forward = __call__

    def _prepare_inputs(self, obj: Any) -> Any:
        """Move tensors to the engine's device; floating ones to the module dtype."""
        if isinstance(obj, torch.Tensor):
            dtype = self.dtype if (self.mixed and obj.is_floating_point()) else obj.dtype
            return obj.to(device=self.device, dtype=dtype)
        if isinstance(obj, tuple):
            return tuple(self._prepare_inputs(x) for x in obj)
        if isinstance(obj, list):
            return [self._prepare_inputs(x) for x in obj]
        if isinstance(obj, dict):
            return {k: self._prepare_inputs(v) for k, v in obj.items()}
        return obj

    def _on_grad(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        param.grad = None  # the flat group's storage now holds it
        g, m = self._member_of[id(param)]
        self._sink.on_grad(g, m, grad)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro batch's loss (averaged over the window and, fp16, scaled).

        Call it ``grad_accum`` times per window, with or without ``step()`` in between.
        """
        if self._window_micro >= self.grad_accum:
            raise InvalidArgumentError(
                f"backward(): the accumulation window already has its {self.grad_accum} micro "
                "batches; call step() before the next backward()"
            )
        self._window_micro += 1
        self.micro_steps += 1
        boundary = self._window_micro == self.grad_accum
        if self.device.type == "cpu":
            release_free_heap()  # the forward's free heap pages (see _host_alloc.py)
        self._sink.begin_backward(boundary)
        (loss.float() * (self.scaler.scale / self.grad_accum)).backward()
        self._sink.finish_backward(boundary)  # reductions may still be in flight

    def step(self) -> bool:
        """At the end of an accumulation window, update the weights (True if it did; False
        mid-window or when an fp16 overflow skipped the update)."""
        if self._window_micro < self.grad_accum:
            return False
        self._window_micro = 0
        self.global_step += 1
        self._sink.wait()  # the window's reductions: group.grad is complete from here
        stepped = self._update()
        self.zero_grad()
        mark = self.comm.counters()
        self._comm_last = _counter_delta(mark, self._comm_mark)
        self._comm_mark = mark
        return stepped

    def synchronize(self) -> None:
        """Wait for every collective in flight: reductions of gradients and, at stages 1-2,
        the all-gather of updated parameters (which the next forward waits for module by
        module). Call it before reading parameters outside their modules' forward."""
        self._sink.wait()
        if self._gather is not None:
            self._gather.wait_all()

    def zero_grad(self) -> None:
        self._sink.wait()
        for g in self.groups:
            if g.grad is not None:
                g.grad.zero_()
        for _, p in self.param_names:
            p.grad = None

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
        cfg = self.config
        return lr_at(self.optimizer_steps, cfg.optimizer.lr, cfg.scheduler, cfg.total_steps)

    def _update(self) -> bool:
        trainable = [g for g in self.groups if g.trainable]
        # One all-reduce gives both the global norm and, for fp16, the overflow verdict.
        total = float(self.comm.all_reduce(self._updater.sum_of_squares(trainable)).item())
        if not math.isfinite(total):
            # Skipped in every precision, as DeepSpeed's ZeRO does (bf16: check_grad_overflow).
            self.scaler.update(overflow=True)
            self.skipped_steps += 1
            log.info(
                "step %d: gradient overflow (non-finite), skipped; loss scale now %g",
                self.global_step,
                self.scaler.scale,
            )
            return False
        unscale = 1.0 / (self.world_size * self.scaler.scale)  # sums over ranks -> mean, unscaled
        self.grad_norm = math.sqrt(total) * unscale
        clip = self.config.grad_clip
        coef = min(1.0, clip / (self.grad_norm + 1e-6)) if clip > 0 else 1.0  # torch's rule
        lr = self.lr
        # One-cycle schedules set Adam's and LAMB's beta1 per update (DeepSpeed's OneCycle).
        optimizer = optimizer_at(self.optimizer, self.optimizer_steps, self.config.scheduler)
        self.optimizer_steps += 1
        self._updater.apply(
            trainable, optimizer, scale=unscale * coef, lr=lr, step=self.optimizer_steps
        )
        if self._gather is not None:
            self._gather.start()  # every rank's updated partition to all, overlapping forward
        if self._stage3 is not None:
            self._stage3.refresh_persistent()
            self._stage3.after_step()
        self.scaler.update(overflow=False)
        return True

    # -- parameters as a whole -----------------------------------------------------------------

    @contextlib.contextmanager
    def gathered_parameters(self, modifier_rank: int | None = 0) -> Iterator[nn.Module]:
        """Full parameters in ``engine.module`` for inspection or editing (stage 3 gathers them;
        other stages hold them already). On exit, edits made on ``modifier_rank`` (every rank's
        own edits if None) are written back to the partitions and to the fp32 master."""
        self.synchronize()
        with gathered_module(
            self.module,
            self.groups,
            self.comm,
            stage=self.stage,
            stage3=self._stage3,
            offload=self._offload,
            device=self.device,
            modifier_rank=modifier_rank,
        ) as module:
            yield module

    # -- accounting and checkpoint access --------------------------------------------------------

    def memory_report(self) -> dict[str, int]:
        """Bytes of model state this rank holds, by category (tensor accounting).

        With offload, ``offload_buffers`` (its sub-group slots and fetched parameter partitions)
        count in ``total``; ``offloaded`` is what it keeps in host memory or swap files instead,
        not in ``total``."""
        params = grads = master = optim = 0
        for g in self.groups:
            params += numel_bytes(g.flat) + (numel_bytes(g.param_part) if self.stage == 3 else 0)
            grads += numel_bytes(g.grad)
            master += 0 if g.master_is_param else numel_bytes(g.master)
            optim += sum(numel_bytes(t) for t in g.state.values())
        buffers = sum(numel_bytes(b) for b in self.module.buffers())
        off = self._offload.memory() if self._offload is not None else {}
        slots = off.get("offload_buffers", 0)
        comm = self._sink.buffer_bytes() + (
            self._gather.buffer_bytes() if self._gather is not None else 0
        )
        scratch = numel_bytes(self._updater.scratch)
        # ZeRO++ hpZ: each gathered module's slice kept for the node's backward all-gather.
        secondary = self._stage3.secondary_bytes() if self._stage3 is not None else 0
        return {
            "params": params,
            "grads": grads,
            "master": master,
            "optimizer": optim,
            "offload_buffers": slots,
            "total": params + grads + master + optim + slots,
            "buffers": buffers,
            # Off the rank: host memory (device cpu) or swap files (nvme); not in the total.
            "offloaded": off.get("offloaded", 0),
            # Allocated once at start-up, reused every step; not in the total (model states).
            "comm_buffers": comm,  # gradient-bucket and all-gather staging slots
            "update_scratch": scratch,  # the windowed optimizer update's buffer
            "hpz_secondary": secondary,
            "total_with_buffers": params
            + grads
            + master
            + optim
            + slots
            + comm
            + scratch
            + secondary,
        }

    def stats(self) -> dict[str, Any]:
        """Counters of this rank: ``comm`` is what the last completed step (from the end of
        the step before, forward and backward included, to the end of its update) handed to
        torch.distributed, per kind of collective: ``calls``, ``bytes`` and
        ``cross_node_bytes`` (see ``Comm.counters``); ``comm_total`` the same since start-up.
        ``in_flight`` counts collectives started and not yet waited for."""
        last = self._comm_last
        return {
            "global_step": self.global_step,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "collectives": self.comm.mode,
            "overlap_comm": self.config.zero.overlap_comm,
            "comm": last,
            "comm_bytes": sum(c["bytes"] for c in last.values()),
            "comm_cross_node_bytes": sum(c["cross_node_bytes"] for c in last.values()),
            "comm_total": self.comm.counters(),
            "in_flight": self.comm.in_flight,
            # ZeRO++ (stage 3): node size, nodes and options in effect; None when off.
            "zeropp": (
                self._stage3.zeropp.info()
                if self._stage3 is not None and self._stage3.zeropp is not None
                else None
            ),
        }

    def state_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        """This rank's partition (P,) of every (flat group, state kind) held in memory (offload
        device ``cpu`` included): exactly its shards. Kinds offloaded to files are in
        :meth:`offloaded_shards` instead."""
        self.synchronize()
        out: dict[tuple[str, str], torch.Tensor] = {}
        host = self._offload.host_tensors() if self._offload is not None else {}
        for g in self.groups:
            if g.param_part is not None:
                out[(g.name, "param")] = g.param_part
            if not g.trainable:
                continue
            lo, hi = g.partition_range
            base = g.update_range[0]
            if not g.master_is_param and g.master is not None:
                out[(g.name, "master")] = g.master[lo - base : hi - base]
            for key, t in g.state.items():
                out[(g.name, key)] = t[lo - base : hi - base]
        out.update(host)
        for bg in self.buffer_groups:
            out[(bg.name, "buffer")] = bg.partition()
        return out

    def offloaded_shards(self) -> dict[tuple[str, str], SwapArray]:
        """Partitions kept in swap files (offload device ``nvme``), by (flat group, kind); each
        is a store shard of the checkpoint's geometry, so a save copies it byte for byte."""
        return self._offload.file_arrays() if self._offload is not None else {}

    def train_state(self) -> dict[str, Any]:
        """Non-tensor state for the checkpoint manifest (JSON)."""
        return {
            "global_step": self.global_step,
            "micro_steps": self.micro_steps,
            "skipped_steps": self.skipped_steps,
            "optimizer": {
                "name": self.optimizer.name,
                "step": self.optimizer_steps,
                "lr": self.lr,
                **self.optimizer.hyperparams(),
            },
            "loss_scaler": self.scaler.state_dict(),
            "scheduler": {"name": self.config.scheduler.name, "base_lr": self.config.optimizer.lr},
        }

    def load_train_state(self, state: Mapping[str, Any], *, with_optimizer: bool) -> None:
        self.global_step = int(state.get("global_step", 0))
        self.micro_steps = int(state.get("micro_steps", 0))
        self._window_micro = 0
        self.skipped_steps = int(state.get("skipped_steps", 0))
        opt = state.get("optimizer", {})
        self.optimizer_steps = int(opt.get("step", 0)) if with_optimizer else 0
        self.scaler.load_state_dict(state.get("loss_scaler", {}))

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def offload(self) -> Offload | None:
        """This rank's offloaded state (None without offload)."""
        return self._offload

    @property
    def pending_micro_batches(self) -> int:
        """backward() calls of the current accumulation window not yet stepped."""
        return self._window_micro

    @property
    def last_save_stall_s(self) -> float:
        """How long the last save blocked training (the snapshot, for an async save)."""
        return self.checkpointer.last_stall_s

    def save(self, root_url: str | None = None, *, extra: Mapping[str, Any] | None = None) -> str:
        """Save a checkpoint under ``root_url`` (default ``checkpoint.dir``); every rank writes its
        own shards. Returns the step directory's URL. See :mod:`zshard.train.engine._checkpoint`."""
        self.synchronize()
        return self.checkpointer.save(root_url, extra=extra)

    def load(self, url: str | None = None) -> dict[str, Any]:
        """Load a checkpoint saved at any world size and stage; returns the saved ``extra``."""
        self.synchronize()
        out = self.checkpointer.load(url)
        self._comm_mark = self.comm.counters()  # a load's traffic is no step's
        return out

    def maybe_save(self, *, extra: Mapping[str, Any] | None = None) -> str | None:
        """Save if ``checkpoint.every`` divides ``global_step`` (and a directory is set)."""
        every = self.config.checkpoint.every
        if every and self.config.checkpoint.dir and self.global_step % every == 0:
            return self.save(extra=extra)
        return None

    def resume(self) -> dict[str, Any] | None:
        """Apply ``checkpoint.resume`` (``auto``/``never``/URL); the saved ``extra`` or None."""
        return self.checkpointer.resume()

    def wait_for_save(self) -> None:
        """Block until a pending async save has committed (re-raising its error)."""
        self.checkpointer.wait()

    def save_16bit_model(
        self, save_dir: str, *, max_shard_size: str = "5GB", overwrite: bool = False
    ) -> str | None:
        """DeepSpeed's ``save_16bit_model``: the weights in the module dtype as a Hugging
        Face-loadable safetensors directory (``config.json`` too for an HF model). Every rank
        calls it; stage 3 gathers one module at a time; rank 0 writes, all or nothing. Returns
        ``save_dir`` on rank 0 (None elsewhere). See :mod:`zshard.train.engine._export`."""
        self.synchronize()  # stages 1-2: the parameter all-gathers of the last step
        return export_16bit_model(
            self,
            save_dir,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            agree=lambda failed: any_rank(self.comm, self.device, failed),
        )

    # -- conveniences --------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Engine:
        self.module.train(mode)
        return self

    def eval(self) -> Engine:
        return self.train(False)

    def close(self, *, destroy_process_group: bool = False) -> None:
        """Finish pending saves and remove hooks. The process group stays up for later engines
        (re-creating one on the same port races) unless ``destroy_process_group``."""
        self.wait_for_save()
        self.synchronize()
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()
        if self._stage3 is not None:
            self._stage3.remove()
        if self._gather is not None:
            self._gather.remove()
        if self._offload is not None:
            self._offload.close()
        if destroy_process_group:
            self.comm.close()


def _counter_delta(
    now: dict[str, dict[str, int]], before: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Per kind, ``now - before`` of every counter."""
    return {k: {f: v - before[k][f] for f, v in c.items()} for k, c in now.items()}
