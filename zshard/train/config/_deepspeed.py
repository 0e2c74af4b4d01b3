"""DeepSpeed configuration compatibility: a DeepSpeed JSON config -> a zshard config tree.

One rule for every DeepSpeed key: it is **honoured** with the same meaning (mapped onto a zshard
key, or already what zshard always does), or **refused** (:class:`ConfigError`, naming the key
and what zshard supports). Only keys that cannot change the training result (logging, monitors,
profilers, performance knobs) are accepted with a **warning**, and so is ``"auto"`` (the Hugging
Face Trainer convention), which leaves the key to zshard: the warning says what it resolved to.
A key absent from :data:`RULES` is refused. ``docs/deepspeed.md`` is generated from
:data:`RULES` (``tools/gen_deepspeed_docs.py``), so the table and the behaviour cannot drift::

    tree, notes = from_deepspeed(json.load(open("ds_config.json")), world_size=8)
    cfg = load_config(tree)
    if notes:
        print(warning_line(notes))  # one line: keys accepted with a warning, "auto" resolved

A training YAML can name a DeepSpeed config (a JSON file, relative to the YAML, or an inline
mapping) under ``deepspeed:``, and ``zshard train CONFIG --deepspeed-config ds.json`` names one on
the command line (relative to the working directory; it replaces the YAML's). Precedence, lowest
first: zshard defaults < the DeepSpeed config < keys set in the zshard YAML < ``--set``. The
YAML is the more specific, zshard-native file, so it wins; every DeepSpeed value it overrides is
reported. The batch sizes are one unit: if the YAML sets any of ``train.micro_batch_size``,
``train.grad_accum``, ``train.global_batch_size``, DeepSpeed's three are all dropped.

Semantics follow DeepSpeed 0.19 (its pydantic config models and ``engine.py``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from zshard.errors import ConfigError
from zshard.train.config._lrsched import BY_DS_TYPE, DS_SCHEDULES, schedule_params

AUTO = "auto"
_BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum", "train.global_batch_size")
DOCS = "docs/deepspeed.md"

Treatment = Literal["mapped", "same", "warn", "refused"]
Handler = Callable[["_Mapping", str, Any], None]


@dataclass(frozen=True)
class Rule:
    """How zshard treats one DeepSpeed key.

    ``treatment`` applies to any value, except the values in ``ok`` (or those ``ok_if``
    accepts), which are accepted silently because zshard already behaves that way. ``mapped``
    keys are applied by ``apply``; their ``caveat``, if any, is reported as a warning (a key
    whose effect is memory or speed only and is approximated). ``zshard`` names the zshard key
    it sets, for the docs and for ``"auto"`` resolution.
    """

    key: str
    treatment: Treatment
    zshard: str = ""
    note: str = ""
    ok: tuple[Any, ...] = ()
    ok_if: Callable[[Any], bool] | None = None
    ok_doc: str = ""
    apply: Handler | None = None
    caveat: str = ""
    section: bool = False  # a mapping whose keys have rules of their own

    def accepts_quietly(self, value: Any) -> bool:
        if self.ok_if is not None and self.ok_if(value):
            return True
        return any(_same_value(value, v) for v in self.ok)

    def doc_treatment(self) -> str:
        """The treatment column of docs/deepspeed.md."""
        quiet = self.ok_doc or ", ".join(f"`{_show(v)}`" for v in self.ok)
        words = {
            "mapped": "honoured",
            "same": "honoured (zshard already does it)",
            "warn": "warning (cannot change the result)",
            "refused": "refused",
        }
        text = words[self.treatment]
        if self.caveat:
            text += ", with a warning"
        if quiet:
            text = f"{quiet}: honoured; other values: {text}"
        return text


def _same_value(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value, booleans only to booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


# -- handlers -------------------------------------------------------------------------------


def _to(target: str, kind: str = "int", minimum: float = 0) -> Handler:
    """Set zshard ``target`` from the value, checked as ``kind`` (int, number, flag, str)."""

    def apply(m: _Mapping, ds_key: str, value: Any) -> None:
        if kind == "int":
            v: Any = m.integer(ds_key, value, int(minimum))
        elif kind == "number":
            v = m.number(ds_key, value, minimum)
        elif kind == "positive":
            v = m.number(ds_key, value, 0)
            if v <= 0:
                raise m.bad(ds_key, value, "a number > 0")
        elif kind == "flag":
            v = m.flag(ds_key, value)
        else:
            if not isinstance(value, str) or not value:
                raise m.bad(ds_key, value, "a string")
            v = value
        m.set(target, v, ds_key)

    return apply


def _pending(name: str) -> Handler:
    """Keep the value for the section's post-processing."""

    def apply(m: _Mapping, ds_key: str, value: Any) -> None:
        m.pending[name] = (ds_key, value)

    return apply


def _off(value: Any) -> bool:
    """A section that is not turned on: absent keys, ``enabled: false``, or false/null."""
    if value in (None, False):
        return True
    return isinstance(value, Mapping) and not value.get("enabled", False)


def _empty_or_off(value: Any) -> bool:
    return value in (None, False, {}) or (
        isinstance(value, Mapping) and all(v in (None, False, 0, "", []) for v in value.values())
    )


_MONITOR = "a monitor: writes metrics somewhere, trains the same; zshard logs metrics.jsonl"
_PERF = "tunes DeepSpeed's implementation, speed or memory only"
_NO_MP = "zshard is data parallel only (no tensor, pipeline, sequence or expert parallelism)"


def _rules() -> list[Rule]:
    r: list[Rule] = []

    def add(key: str, treatment: Treatment, zshard: str = "", note: str = "", **kw: Any) -> None:
        r.append(Rule(key, treatment, zshard, note, **kw))

    # -- batch, clipping, logging
    add(
        "train_batch_size",
        "mapped",
        "train.global_batch_size",
        apply=_to("train.global_batch_size", minimum=1),
    )
    add(
        "train_micro_batch_size_per_gpu",
        "mapped",
        "train.micro_batch_size",
        apply=_to("train.micro_batch_size", minimum=1),
    )
    add(
        "gradient_accumulation_steps",
        "mapped",
        "train.grad_accum",
        apply=_to("train.grad_accum", minimum=1),
    )
    add(
        "gradient_clipping",
        "mapped",
        "grad_clip",
        "max global gradient norm, torch's rule",
        apply=_to("grad_clip", "number"),
    )
    add("steps_per_print", "mapped", "train.log_every", apply=_to("train.log_every"))
    add("wall_clock_breakdown", "warn", note="timing logs", ok=(False,))
    add("memory_breakdown", "warn", note="memory logs", ok=(False,))
    add("dump_state", "warn", note="prints the config at start-up", ok=(False,))
    add("log_level", "warn", note="DeepSpeed's logger", ok=("info",))
    add("timers", "warn", note="DeepSpeed's timers", ok_if=_off, ok_doc="off")
    for name in ("tensorboard", "wandb", "csv_monitor", "comet", "aim"):
        add(name, "warn", note=_MONITOR, ok_if=_off, ok_doc="`enabled: false`")
    add("flops_profiler", "warn", note="a profiler", ok_if=_off, ok_doc="`enabled: false`")
    add("comms_logger", "warn", note="logs collectives", ok_if=_off, ok_doc="`enabled: false`")
    add("zero_allow_untested_optimizer", "same", note="every zshard optimizer runs under ZeRO")
    add(
        "zero_force_ds_cpu_optimizer",
        "same",
        note="which Adam kernel DeepSpeed picks; same arithmetic",
    )
    add("disable_python_gc", "warn", note=_PERF, ok=(None,))
    add(
        "dataloader_drop_last",
        "warn",
        note="applies to DeepSpeed's own data loader; zshard's sampler always uses whole batches",
    )
    add("checkpoint", "same", section=True)
    add("checkpoint.tag_validation", "same", note="zshard validates every manifest and chunk")
    add(
        "checkpoint.load_universal",
        "same",
        note="zshard checkpoints load at any world size and stage",
    )
    add(
        "checkpoint.use_node_local_storage",
        "warn",
        note="where DeepSpeed writes; zshard writes to checkpoint.dir",
        ok=(False,),
    )
    add("checkpoint.parallel_write", "warn", note=_PERF, ok_if=_empty_or_off, ok_doc="off")
    add(
        "aio", "warn", note="NVMe I/O tuning of DeepSpeed's swapper; zshard's swap I/O tunes itself"
    )
    add(
        "compile",
        "warn",
        note="torch.compile of the model: same arithmetic up to rounding",
        ok_if=_empty_or_off,
        ok_doc="off",
    )
    # -- numerics zshard implements only one way
    add(
        "prescale_gradients",
        "refused",
        note="zshard averages gradients after reducing them",
        ok=(False,),
    )
    add(
        "gradient_predivide_factor",
        "refused",
        note="zshard averages gradients after reducing them",
        ok=(1.0,),
    )
    add(
        "gradient_allreduce_op",
        "refused",
        note="zshard averages gradients over ranks",
        ok=("mean",),
    )
    add(
        "communication_data_type",
        "refused",
        note="zshard reduces gradients in their accumulation dtype (data_types.grad_accum_dtype)",
        ok=(None,),
    )
    add(
        "seq_parallel_communication_data_type",
        "warn",
        note="sequence parallelism only; " + _NO_MP,
        ok=("fp32",),
    )
    add("sparse_gradients", "refused", note="zshard reduces dense gradients", ok=(False,))
    add(
        "disable_allgather",
        "refused",
        note="zshard always all-gathers updated partitions",
        ok=(False,),
    )
    add(
        "amp",
        "refused",
        note="zshard casts the model (fp16/bf16) instead of NVIDIA Apex AMP",
        ok_if=_off,
        ok_doc="`enabled: false`",
    )
    add(
        "torch_autocast",
        "refused",
        note="zshard casts the model (fp16/bf16) instead of autocast",
        ok_if=_off,
        ok_doc="`enabled: false`",
    )
    for name in ("pipeline", "tensor_parallel", "expert_parallel", "sequence_parallel_size"):
        add(
            name,
            "refused",
            note=_NO_MP,
            ok_if=lambda v: v == {} or any(_same_value(v, o) for o in (None, 1)),
            ok_doc="off / 1",
        )
    add("use_data_before_expert_parallelism", "warn", note="MoE only; " + _NO_MP, ok=(False,))
    for name in (
        "elasticity",
        "autotuning",
        "data_efficiency",
        "curriculum_learning",
        "hybrid_engine",
        "weight_quantization",
        "quantize_training",
        "compression_training",
        "sparse_attention",
        "zenflow",
    ):
        add(name, "refused", note="not implemented in zshard", ok_if=_off, ok_doc="off")
    # -- precision
    add("fp16", "mapped", "precision", section=True)
    add(
        "fp16.enabled",
        "mapped",
        "precision.dtype",
        "`true`: fp16 module, fp32 master and optimizer state",
    )
    add(
        "fp16.auto_cast",
        "same",
        note="zshard casts floating inputs to the module dtype "
        "(models fed token ids see no difference)",
    )
    add(
        "fp16.loss_scale",
        "mapped",
        "precision.loss_scale.static_scale",
        "0: dynamic; > 0: that fixed scale",
        apply=_to("precision.loss_scale.static_scale", "number"),
    )
    add(
        "fp16.initial_scale_power",
        "mapped",
        "precision.loss_scale.initial_scale_power",
        apply=_to("precision.loss_scale.initial_scale_power"),
    )
    add(
        "fp16.loss_scale_window",
        "mapped",
        "precision.loss_scale.window",
        apply=_to("precision.loss_scale.window", minimum=1),
    )
    add(
        "fp16.hysteresis",
        "mapped",
        "precision.loss_scale.hysteresis",
        apply=_to("precision.loss_scale.hysteresis", minimum=1),
    )
    add(
        "fp16.consecutive_hysteresis",
        "mapped",
        "precision.loss_scale.consecutive_hysteresis",
        apply=_to("precision.loss_scale.consecutive_hysteresis", "flag"),
    )
    add(
        "fp16.min_loss_scale",
        "mapped",
        "precision.loss_scale.min_scale",
        apply=_to("precision.loss_scale.min_scale", "positive"),
    )
    add(
        "fp16.raise_error_at_min_scale",
        "mapped",
        "precision.loss_scale.raise_error_at_min_scale",
        "DynamicLossScaler's argument (always true from a DeepSpeed config)",
        apply=_to("precision.loss_scale.raise_error_at_min_scale", "flag"),
    )
    add(
        "fp16.fp16_master_weights_and_grads",
        "refused",
        note="zshard keeps fp32 master weights",
        ok=(False,),
    )
    for name in ("bf16", "bfloat16"):
        add(name, "mapped", "precision", section=True)
        add(
            f"{name}.enabled",
            "mapped",
            "precision.dtype",
            "`true`: bf16 module, fp32 master and optimizer state",
        )
        add(
            f"{name}.immediate_grad_update",
            "refused",
            note="zshard accumulates gradients in data_types.grad_accum_dtype and applies "
            "them at the step",
            ok=(False,),
        )
        add(
            f"{name}.check_grad_overflow",
            "refused",
            note="zshard always skips a step whose gradients are not finite",
            ok=(True,),
        )
        add(
            f"{name}.bf16_master_weights_and_grads",
            "refused",
            note="zshard keeps fp32 master weights",
            ok=(False,),
        )
        add(
            f"{name}.bf16_optimizer_states",
            "refused",
            note="zshard keeps fp32 optimizer state",
            ok=(False,),
        )
    add("data_types", "mapped", section=True)
    add(
        "data_types.grad_accum_dtype",
        "mapped",
        "precision.grad_accum_dtype",
        "`fp32`, or the module dtype (`param`)",
        apply=_pending("grad_accum_dtype"),
    )
    add(
        "data_types.keep_in_fp32_modules",
        "refused",
        note="zshard casts every module to the module dtype",
        ok_if=lambda v: v in (None, AUTO, []),
        ok_doc="`auto`, `[]`",
    )
    # -- optimizer
    add("optimizer", "mapped", "optimizer", section=True)
    add(
        "optimizer.type",
        "mapped",
        "optimizer.name",
        "`Adam` (AdamW unless adam_w_mode is false), `AdamW`, `SGD`, `Lamb`; "
        "any other type is refused",
    )
    add("optimizer.params", "mapped", "optimizer", "per type, below", section=True)
    add("optimizer.legacy_fusion", "same", note="a kernel choice; same arithmetic")
    for key, target, note in _OPTIMIZER_PARAMS:
        add(f"optimizer.params.{key}", "mapped", target, note)
    for key, ok, note in _OPTIMIZER_SAME:
        add(
            f"optimizer.params.{key}",
            "refused" if ok is not _ANY else "same",
            note=note,
            ok=() if ok is _ANY else (ok,),
        )
    add(
        "optimizer.params.max_grad_norm",
        "refused",
        note="DeepSpeed refuses it too: use gradient_clipping",
    )
    # -- scheduler
    add("scheduler", "mapped", "scheduler", section=True)
    add(
        "scheduler.type",
        "mapped",
        "scheduler.name",
        ", ".join(f"`{ds}` -> `{n}`" for n, (ds, _) in DS_SCHEDULES.items())
        + "; any other type is refused",
    )
    add(
        "scheduler.params",
        "mapped",
        "scheduler.params",
        "DeepSpeed's parameters, names and defaults; unknown ones refused",
        section=True,
    )
    params: dict[str, list[str]] = {}
    for _, (ds, defaults) in DS_SCHEDULES.items():
        for p in defaults:
            params.setdefault(p, []).append(ds)
    for p, types in params.items():
        add(f"scheduler.params.{p}", "mapped", f"scheduler.params.{p}", ", ".join(types))
    add(
        "scheduler.params.last_batch_iteration",
        "refused",
        note="zshard resumes the schedule from its checkpoint",
        ok=(-1,),
    )
    # -- activation checkpointing
    add(
        "activation_checkpointing",
        "mapped",
        "train.activation_checkpointing",
        "its presence turns it on: the built-in GPT's blocks, an HF model's layers, or "
        "train.activation_checkpointing.blocks",
        section=True,
    )
    add(
        "activation_checkpointing.partition_activations",
        "refused",
        note="it splits checkpointed activations across model-parallel ranks; " + _NO_MP,
        ok=(False,),
    )
    add(
        "activation_checkpointing.number_checkpoints",
        "mapped",
        "train.activation_checkpointing.number_checkpoints",
        "checkpoint the first N blocks",
        ok=(None,),
        apply=_to("train.activation_checkpointing.number_checkpoints"),
    )
    add(
        "activation_checkpointing.cpu_checkpointing",
        "mapped",
        "train.activation_checkpointing.cpu_checkpointing",
        "keep checkpointed inputs in host memory",
        apply=_to("train.activation_checkpointing.cpu_checkpointing", "flag"),
    )
    add(
        "activation_checkpointing.contiguous_memory_optimization",
        "warn",
        note="buffer layout of partitioned activations",
        ok=(False,),
    )
    add(
        "activation_checkpointing.synchronize_checkpoint_boundary",
        "warn",
        note="a device synchronize",
        ok=(False,),
    )
    add("activation_checkpointing.profile", "warn", note="timing logs", ok=(False,))
    # -- ZeRO
    z = "zero_optimization"
    add(z, "mapped", "zero", "`true`/`false`: stage 1/0 (DeepSpeed's legacy form)", section=True)
    add(f"{z}.stage", "mapped", "zero.stage", apply=_stage)
    add(
        f"{z}.reduce_bucket_size",
        "mapped",
        "zero.reduce_bucket_size",
        "elements",
        apply=_to("zero.reduce_bucket_size", minimum=1),
    )
    add(
        f"{z}.allgather_bucket_size",
        "mapped",
        "zero.allgather_bucket_size",
        "elements",
        apply=_to("zero.allgather_bucket_size", minimum=1),
    )
    add(
        f"{z}.overlap_comm",
        "mapped",
        "zero.overlap_comm",
        "overlap gradient reduction with backward",
        ok=(None,),
        apply=_to("zero.overlap_comm", "flag"),
    )
    add(f"{z}.contiguous_gradients", "same", note="zshard's gradients always live in flat buffers")
    add(f"{z}.round_robin_gradients", "same", note="an ordering of DeepSpeed's offload copies")
    add(f"{z}.use_multi_rank_bucket_allreduce", "same", note="a communication pattern; same sums")
    add(f"{z}.memory_efficient_linear", "same", note="a DeepSpeed-3 memory trick; same arithmetic")
    add(f"{z}.elastic_checkpoint", "same", note="zshard checkpoints load at any world size")
    add(
        f"{z}.reduce_scatter",
        "warn",
        note="all-reduce instead of reduce-scatter: the same sums",
        ok=(True,),
    )
    add(
        f"{z}.allgather_partitions",
        "warn",
        note="broadcasts instead of an all-gather: the same values",
        ok=(True,),
    )
    add(
        f"{z}.load_from_fp32_weights",
        "refused",
        note="zshard always resumes from the fp32 master weights",
        ok=(True,),
    )
    add(
        f"{z}.ignore_unused_parameters",
        "warn",
        note="a check for parameters without gradients (zshard treats them as zero)",
        ok=(True,),
    )
    add(f"{z}.legacy_stage1", "refused", note="zshard has one stage-1 implementation", ok=(False,))
    add(
        f"{z}.sub_group_size",
        "mapped",
        "zero.offload_optimizer.sub_group_size",
        "elements per optimizer sub-group; used with offload_optimizer "
        "(without it only speed changes)",
        apply=_pending("sub_group_size"),
    )
    add(
        f"{z}.cpu_offload",
        "mapped",
        "zero.offload_optimizer.device",
        "DeepSpeed's legacy form: `true` = offload_optimizer to cpu",
        apply=_legacy_offload("offload_optimizer"),
    )
    add(
        f"{z}.cpu_offload_param",
        "mapped",
        "zero.offload_param.device",
        "legacy form: `true` = offload_param to cpu",
        apply=_legacy_offload("offload_param"),
    )
    add(
        f"{z}.cpu_offload_use_pin_memory",
        "mapped",
        "zero.offload_*.pin_memory",
        "legacy form",
        apply=_pending("pin_memory"),
    )
    for alias in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
        add(
            f"{z}.{alias}",
            "mapped",
            "zero.prefetch",
            "elements gathered ahead -> modules gathered ahead, counted on the configured "
            "model (0 disables); a warning when the model cannot be counted",
            apply=_pending("prefetch_bucket_size"),
        )
    for alias in ("stage3_param_persistence_threshold", "param_persistence_threshold"):
        add(
            f"{z}.{alias}",
            "mapped",
            "zero.param_persistence_threshold",
            caveat=_PERSISTENCE,
            apply=_to("zero.param_persistence_threshold"),
        )
    for alias in (
        "stage3_gather_16bit_weights_on_model_save",
        "gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save",
    ):
        add(
            f"{z}.{alias}",
            "mapped",
            "checkpoint.save_16bit",
            "`true`: 16-bit weights (safetensors, HF layout) written next to each "
            "checkpoint; also `Engine.save_16bit_model`",
            apply=_to("checkpoint.save_16bit", "flag"),
        )
    for alias in (
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
        "stage3_model_persistence_threshold",
        "max_live_parameters",
        "max_reuse_distance",
        "model_persistence_threshold",
        "stage3_module_granularity_threshold",
        "module_granularity_threshold",
    ):
        add(
            f"{z}.{alias}",
            "warn",
            note=_PERF + " (zshard gathers per module and releases after use)",
        )
    for alias in (
        "stage3_use_all_reduce_for_fetch_params",
        "use_all_reduce_for_fetch_params",
        "stage3_allgather_sequential",
        "allgather_sequential",
    ):
        add(f"{z}.{alias}", "warn", note=_PERF, ok=(False, 1))
    # ZeRO++ (stage 3).
    add(
        f"{z}.zero_quantized_weights",
        "mapped",
        "zero.quantized_weights",
        "ZeRO++ qwZ: int8 parameter all-gathers, one scale per zero.quantization_block_size "
        "elements (stage 3)",
        apply=_to("zero.quantized_weights", "flag"),
    )
    add(
        f"{z}.zero_quantized_gradients",
        "mapped",
        "zero.quantized_gradients",
        "ZeRO++ qgZ: gradients reduced by a hierarchical all-to-all of int8 blocks (stage 3)",
        apply=_to("zero.quantized_gradients", "flag"),
    )
    add(
        f"{z}.zero_hpz_partition_size",
        "mapped",
        "zero.hpz_partition_size",
        "ZeRO++ hpZ: secondary partition over that many ranks of a node, backward all-gather "
        "inside it (stage 3; 1 = off)",
        apply=_to("zero.hpz_partition_size", minimum=1),
    )
    add(
        f"{z}.zero_quantized_nontrainable_weights",
        "refused",
        note="zshard keeps frozen weights in the module dtype",
        ok=(False,),
    )
    add(f"{z}.mics_shard_size", "refused", note="zshard partitions over all ranks", ok=(-1,))
    add(
        f"{z}.mics_hierarchical_params_gather",
        "refused",
        note="zshard partitions over all ranks",
        ok=(False,),
    )
    add(f"{z}.zenflow", "refused", note="not implemented in zshard", ok_if=_off, ok_doc="off")
    for name in (
        "pipeline_loading_checkpoint",
        "log_trace_cache_warnings",
        "enable_sanity_checks",
        "parameter_alignment",
    ):
        add(f"{z}.{name}", "warn", note="DeepSpeed-3 internals, checks or logs", ok=(False,))
    add(
        f"{z}.leaf_module",
        "warn",
        note="which modules DeepSpeed-3 hooks; zshard gathers per module",
        ok_if=_empty_or_off,
        ok_doc="empty",
    )
    add(f"{z}.override_module_apply", "same", note="DeepSpeed-3 internals")
    add(
        f"{z}.save_muon_momentum_buffer_in_memory",
        "same",
        note="Muon only (refused as an optimizer)",
    )
    add(
        f"{z}.compute_grad_norm",
        "refused",
        note="zshard always computes the global gradient norm (clipping, overflow checks)",
        ok=(True,),
    )
    for which, buffers in (("offload_optimizer", 4), ("offload_param", 5)):
        o = f"{z}.{which}"
        add(o, "mapped", f"zero.{which}", section=True)
        add(
            f"{o}.device",
            "mapped",
            f"zero.{which}.device",
            "`none`, `cpu`, `nvme`",
            apply=_to(f"zero.{which}.device", "str"),
        )
        add(
            f"{o}.nvme_path",
            "mapped",
            f"zero.{which}.path",
            "any fsspec path",
            apply=_to(f"zero.{which}.path", "str"),
        )
        add(
            f"{o}.buffer_count",
            "mapped",
            f"zero.{which}.buffer_count",
            f"DeepSpeed's default {buffers}",
            apply=_to(f"zero.{which}.buffer_count", minimum=1),
        )
        add(
            f"{o}.pin_memory",
            "mapped",
            f"zero.{which}.pin_memory",
            apply=_to(f"zero.{which}.pin_memory", "flag"),
        )
    oo, op = f"{z}.offload_optimizer", f"{z}.offload_param"
    add(
        f"{oo}.ratio",
        "refused",
        note="partial offload is not supported; 1.0 offloads everything",
        ok=(1.0,),
    )
    for name, note in (
        ("pipeline_read", "zshard always reads the next sub-group ahead"),
        ("pipeline_write", "zshard always writes sub-groups back in the background"),
        ("pipeline", "zshard always overlaps reads and writes with the update"),
        ("fast_init", "zshard always initialises offloaded state by streaming"),
    ):
        add(f"{oo}.{name}", "same", note=note)
    add(f"{oo}.super_offload", "refused", note="not implemented in zshard", ok=(False,))
    add(f"{oo}.cpuadam_cores_perc", "warn", note=_PERF)
    add(f"{op}.buffer_size", "same", note="zshard sizes fetch buffers to each module's partition")
    add(
        f"{op}.max_in_cpu",
        "mapped",
        "zero.offload_param.max_in_memory",
        "elements of fetched partitions kept cached",
        apply=_to("zero.offload_param.max_in_memory"),
    )
    return r


_ANY = object()
_PERSISTENCE = (
    "zshard keeps whole each module (flat group) with fewer parameters; DeepSpeed each "
    "parameter with at most that many elements: memory and traffic differ, results do not"
)
# (key, zshard key, note) of optimizer parameters zshard maps; which types take which is in
# _TYPE_PARAMS.
_OPTIMIZER_PARAMS = (
    ("lr", "optimizer.lr", "absent: 0.001, DeepSpeed's optimizers' default"),
    ("betas", "optimizer.betas", "Adam, AdamW, Lamb"),
    ("eps", "optimizer.eps", "Adam, AdamW, Lamb"),
    ("weight_decay", "optimizer.weight_decay", "absent: 0 (0.01 for torch_adam AdamW, torch's)"),
    ("adam_w_mode", "optimizer.name", "Adam: `false` = Adam with L2 decay (`adam`)"),
    ("momentum", "optimizer.momentum", "SGD"),
    ("nesterov", "optimizer.nesterov", "SGD"),
    ("max_coeff", "optimizer.max_coeff", "Lamb: trust-ratio ceiling"),
    ("min_coeff", "optimizer.min_coeff", "Lamb: trust-ratio floor"),
    ("bias_correction", "optimizer.bias_correction", "Lamb; Adam/AdamW only `true`"),
    ("eps_inside_sqrt", "optimizer.eps_inside_sqrt", "Lamb"),
)
# (key, the value zshard matches or _ANY, note): accepted with that value, refused otherwise.
_OPTIMIZER_SAME = (
    ("torch_adam", _ANY, "a kernel choice; same arithmetic"),
    ("fused", _ANY, "a kernel choice; same arithmetic"),
    ("foreach", _ANY, "a kernel choice; same arithmetic"),
    ("capturable", _ANY, "a kernel choice; same arithmetic"),
    ("differentiable", False, "zshard's optimizer step is not differentiable"),
    ("fp32_optimizer_states", True, "zshard keeps fp32 optimizer state"),
    ("set_grad_none", _ANY, "zshard's gradients live in flat buffers"),
    ("amsgrad", False, "AMSGrad is not implemented in zshard"),
    ("maximize", False, "zshard minimises the loss"),
    ("dampening", 0, "zshard's SGD has no dampening"),
)
_TYPE_PARAMS = {
    "adam": {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction"},
    "adamw": {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction"},
    "sgd": {"lr", "momentum", "nesterov", "weight_decay"},
    "lamb": {"lr", "betas", "eps", "weight_decay", "max_coeff", "min_coeff", "bias_correction"}
    | {"eps_inside_sqrt"},
}
_OPTIMIZER_TYPES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "lamb": "Lamb"}


def _stage(m: _Mapping, ds_key: str, value: Any) -> None:
    stage = m.integer(ds_key, value)
    if stage not in (0, 1, 2, 3):
        raise m.bad(ds_key, value, "one of 0, 1, 2, 3")
    m.set("zero.stage", stage, ds_key)


def _legacy_offload(which: str) -> Handler:
    def apply(m: _Mapping, ds_key: str, value: Any) -> None:
        if m.flag(ds_key, value):
            m.set(f"zero.{which}.device", "cpu", ds_key)

    return apply


class _Mapping:
    """Collects zshard leaves (dotted key -> value, and which DeepSpeed key set it), the notes
    for the warning line, and the keys left to zshard by ``"auto"``."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.leaves: dict[str, Any] = {}
        self.origin: dict[str, str] = {}
        self.notes: list[str] = []
        self.auto: list[tuple[str, str]] = []  # (DeepSpeed key, zshard key)
        self.pending: dict[str, tuple[str, Any]] = {}

    def set(self, key: str, value: Any, ds_key: str) -> None:
        self.leaves[key] = value
        self.origin[key] = ds_key

    def note(self, ds_key: str, value: Any = None, why: str = "") -> None:
        shown = ds_key if value is None else f"{ds_key}={_show(value)}"
        self.notes.append(f"{shown} ({why})" if why else shown)

    def bad(self, ds_key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}: {ds_key}: expected {expected}, got {value!r}")

    def refuse(self, ds_key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: {ds_key}={_show(value)} is not supported: {why}")

    def integer(self, ds_key: str, value: Any, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(ds_key, value, "a number")
        if isinstance(value, float) and not value.is_integer():
            raise self.bad(ds_key, value, "a whole number")
        if value < minimum:
            raise self.bad(ds_key, value, f"a number >= {minimum}")
        return int(value)

    def number(self, ds_key: str, value: Any, minimum: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(ds_key, value, "a number")
        if minimum is not None and value < minimum:
            raise self.bad(ds_key, value, f"a number >= {minimum:g}")
        return float(value)

    def flag(self, ds_key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.bad(ds_key, value, "true or false")
        return value

    def block(self, ds_key: str, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.bad(ds_key, value, "a mapping")
        return value


RULES: dict[str, Rule] = {rule.key: rule for rule in _rules()}


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _rule(m: _Mapping, ds_key: str, value: Any) -> Rule:
    rule = RULES.get(ds_key)
    if rule is None:
        section, _, _ = ds_key.rpartition(".")
        known = sorted(k.rpartition(".")[2] for k in RULES if k.rpartition(".")[0] == section)
        where = f"; {section or 'the top level'} takes {', '.join(known)}" if known else ""
        raise ConfigError(
            f"{m.where}: {ds_key}: not a DeepSpeed key zshard supports{where} (see {DOCS})"
        )
    return rule


def _key(m: _Mapping, ds_key: str, value: Any) -> Rule | None:
    """Apply the generic part of a key's rule: quiet, warn, refuse or (mapped) its handler.
    Returns the rule when the caller has more to do (sections, mapped keys without handler)."""
    rule = _rule(m, ds_key, value)
    if value == AUTO:
        if rule.zshard and rule.treatment == "mapped":
            m.auto.append((ds_key, rule.zshard))
        return None
    if rule.accepts_quietly(value):
        return None
    if rule.treatment == "refused":
        raise m.refuse(ds_key, value, rule.note)
    if rule.treatment == "warn":
        m.note(ds_key, value if not isinstance(value, Mapping) else None, rule.note)
        return None
    if rule.treatment == "same":
        if rule.section and isinstance(value, Mapping):
            _walk(m, ds_key, value)
        return None
    if rule.caveat:
        m.note(ds_key, value, rule.caveat)
    if rule.apply is not None:
        rule.apply(m, ds_key, value)
        return None
    return rule


def _walk(m: _Mapping, prefix: str, block: Mapping[str, Any]) -> None:
    for key, value in block.items():
        ds_key = f"{prefix}.{key}"
        rule = _key(m, ds_key, value)
        if rule is not None and rule.section:
            _walk(m, ds_key, m.block(ds_key, value))


def from_deepspeed(
    ds: Mapping[str, Any],
    world_size: int | None = None,
    *,
    stage3_modules: Sequence[int] | None = None,
    where: str = "DeepSpeed config",
) -> tuple[dict[str, Any], list[str]]:
    """Map a DeepSpeed config onto a zshard config tree (the nested dict ``load_config`` takes).

    Args:
        ds: the DeepSpeed config, as parsed from its JSON.
        world_size: if known, DeepSpeed's batch rule (train_batch_size = micro batch x
            accumulation x world size) is checked when all three are given.
        stage3_modules: parameter counts of the modules stage 3 gathers (see
            ``zshard.train.models.stats``), to convert ``stage3_prefetch_bucket_size``.
        where: names the config in error messages.

    Returns:
        ``(tree, notes)``: the zshard tree, and the notes for the warning line (keys accepted
        with a warning, ``"auto"`` keys and what zshard's defaults make of them).
    """
    m = _map(ds, world_size, stage3_modules, where)
    tree = _nest(m.leaves)
    notes = list(m.notes)
    if "unconverted_prefetch" in m.pending:
        notes.append(_unconverted_note(*m.pending["unconverted_prefetch"]))
    return tree, notes + auto_notes(m.auto, tree)


def _unconverted_note(ds_key: str, bucket: int) -> str:
    return (
        f"{ds_key}={bucket} (the model could not be counted to convert it to modules: "
        "zshard's zero.prefetch default kept)"
    )


def auto_notes(
    auto: Sequence[tuple[str, str]], tree: Mapping[str, Any], overrides: Sequence[str] = ()
) -> list[str]:
    """One note per ``"auto"`` key: the zshard key that decides it and, when the config
    validates, its value."""
    if not auto:
        return []
    from zshard.train.config._load import load_config

    try:
        plain: Any = load_config(tree, overrides).to_dict()
    except Exception:  # an invalid tree is reported by the real load later
        plain = None
    out = []
    for ds_key, zshard_key in auto:
        value = _resolved(plain, zshard_key)
        shown = "" if value is _ANY else f" = {_show(value)}"
        out.append(f"{ds_key}=auto (zshard's {zshard_key}{shown})")
    return out


def _resolved(plain: Any, dotted: str) -> Any:
    node = plain
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ANY
        node = node[part]
    if node is None and dotted.startswith("train."):
        return "derived from the other batch sizes at start-up"
    return node if not isinstance(node, Mapping) else _ANY


def _map(
    ds: Mapping[str, Any],
    world_size: int | None,
    stage3_modules: Sequence[int] | None,
    where: str,
) -> _Mapping:
    m = _Mapping(where)
    if not isinstance(ds, Mapping):
        raise ConfigError(f"{where}: expected a JSON object at the top level, got {ds!r}")
    for key, value in ds.items():
        if key == "zero_optimization":
            _zero(m, value, stage3_modules)
        elif key in ("fp16", "bf16", "bfloat16"):
            _rule(m, key, value)
        elif key == "optimizer":
            _optimizer(m, value)
        elif key == "scheduler":
            pass  # after the optimizer and precision
        elif key == "activation_checkpointing":
            if value == AUTO:
                m.auto.append((key, "train.activation_checkpointing"))
                continue
            m.set("train.activation_checkpointing.enabled", True, key)
            _walk(m, key, m.block(key, value))
        else:
            rule = _key(m, key, value)
            if rule is not None and rule.section:
                _walk(m, key, m.block(key, value))
    _precision(m, ds)
    if "scheduler" in ds:
        _scheduler(m, ds["scheduler"])
    _check_batch(m, world_size)
    return m


def _check_batch(m: _Mapping, world_size: int | None) -> None:
    mb, ga, gb = (m.leaves.get(k) for k in _BATCH_KEYS)
    if not world_size or mb is None or ga is None or gb is None:
        return
    want = int(mb) * int(ga) * world_size
    if gb != want:
        raise ConfigError(
            f"{m.where}: train_batch_size={gb} != train_micro_batch_size_per_gpu={mb} x "
            f"gradient_accumulation_steps={ga} x world size {world_size} = {want}; "
            'fix one of them or set it to "auto"'
        )


# -- sections with more than key-by-key rules ----------------------------------------------------


def _zero(m: _Mapping, z: Any, stage3_modules: Sequence[int] | None) -> None:
    key = "zero_optimization"
    if z == AUTO:
        return
    if isinstance(z, bool):  # DeepSpeed's legacy form: `"zero_optimization": true` is stage 1
        m.set("zero.stage", 1 if z else 0, key)
        return
    z = m.block(key, z)
    for sub, value in z.items():
        ds_key = f"{key}.{sub}"
        if sub in ("offload_optimizer", "offload_param"):
            _offload(m, ds_key, sub, value)
            continue
        _key(m, ds_key, value)
    pending = m.pending
    if "pin_memory" in pending:
        ds_key, value = pending.pop("pin_memory")
        for which in ("offload_optimizer", "offload_param"):
            if f"zero.{which}.device" in m.leaves:
                m.set(f"zero.{which}.pin_memory", m.flag(ds_key, value), ds_key)
    if "sub_group_size" in pending:
        ds_key, value = pending.pop("sub_group_size")
        size = m.integer(ds_key, value, 1)
        if m.leaves.get("zero.offload_optimizer.device") in ("cpu", "nvme"):
            m.set("zero.offload_optimizer.sub_group_size", size, ds_key)
        # Without offload it only groups DeepSpeed's stage-3 step: the same update.
    if "prefetch_bucket_size" in pending:
        ds_key, value = pending.pop("prefetch_bucket_size")
        bucket = m.integer(ds_key, value)
        prefetch = prefetch_modules(bucket, stage3_modules)
        if prefetch is not None:
            m.set("zero.prefetch", prefetch, ds_key)
        else:
            m.pending["unconverted_prefetch"] = (ds_key, bucket)


def _offload(m: _Mapping, ds_key: str, which: str, value: Any) -> None:
    if value == AUTO:
        return
    if value is None:
        return  # DeepSpeed's default: no offload
    block = m.block(ds_key, value)
    device = block.get("device", "none")  # DeepSpeed's default device is none
    if device == AUTO:
        m.auto.append((f"{ds_key}.device", f"zero.{which}"))
        return
    if not isinstance(device, str) or device.lower() not in ("none", "cpu", "nvme"):
        raise m.bad(f"{ds_key}.device", device, "one of none, cpu, nvme")
    for sub in block:
        _rule(m, f"{ds_key}.{sub}", block[sub])  # unknown keys are refused even when off
    if device.lower() == "none":
        return
    m.set(f"zero.{which}.device", device.lower(), f"{ds_key}.device")
    for sub, v in block.items():
        if sub != "device":
            _key(m, f"{ds_key}.{sub}", v)


def prefetch_modules(bucket: int, stage3_modules: Sequence[int] | None) -> int | None:
    """DeepSpeed's prefetch bucket (elements) -> zshard's ``zero.prefetch`` (modules ahead).

    0 disables prefetch in both. Otherwise: how many of the model's average gathered module fit
    in the bucket, at least 1 and at most the number of modules; None (keep zshard's default)
    when the model's modules are unknown.
    """
    if bucket == 0:
        return 0
    sizes = [s for s in (stage3_modules or ()) if s > 0]
    if not sizes:
        return None
    mean = sum(sizes) / len(sizes)
    return max(1, min(len(sizes), round(bucket / mean)))


def _enabled(m: _Mapping, name: str, block: Mapping[str, Any]) -> bool | None:
    value = block.get("enabled", False)  # DeepSpeed: a block without `enabled` is off
    if value == AUTO:
        return None
    return m.flag(f"{name}.enabled", value)


def _precision(m: _Mapping, ds: Mapping[str, Any]) -> None:
    blocks: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for key in ("fp16", "bf16", "bfloat16"):
        if key in ds and ds[key] != AUTO:
            blocks["bf16" if key == "bfloat16" else key] = (key, m.block(key, ds[key]))
        elif key in ds:
            m.auto.append((key, "precision.dtype"))
    state = {name: _enabled(m, key, block) for name, (key, block) in blocks.items()}
    for name, (key, _) in blocks.items():
        if state[name] is None:
            m.auto.append((f"{key}.enabled", "precision.dtype"))
    fp16, bf16 = state.get("fp16"), state.get("bf16")
    if fp16 and bf16:
        raise ConfigError(f"{m.where}: fp16.enabled and bf16.enabled are both true; pick one")
    for name, (key, block) in blocks.items():
        for sub, value in block.items():
            if sub == "enabled":
                continue
            ds_key = f"{key}.{sub}"
            _rule(m, ds_key, value)  # unknown keys are refused in a disabled block too
            if state[name] is not False:  # on, or "auto" (the zshard config may turn it on)
                _key(m, ds_key, value)
    if fp16:
        m.set("precision.dtype", "fp16", f"{blocks['fp16'][0]}.enabled")
        if m.leaves.get("precision.loss_scale.static_scale") == 0.0:
            del m.leaves["precision.loss_scale.static_scale"]  # 0 = dynamic, zshard's default
    elif bf16:
        m.set("precision.dtype", "bf16", f"{blocks['bf16'][0]}.enabled")
    elif fp16 is False or bf16 is False:
        m.set("precision.dtype", "fp32", "fp16.enabled" if fp16 is False else "bf16.enabled")
    if "grad_accum_dtype" in m.pending:
        ds_key, value = m.pending.pop("grad_accum_dtype")
        dtype = m.leaves.get("precision.dtype")
        names = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}
        names |= {"bf16": "bf16", "bfloat16": "bf16"}
        want = names.get(value) if isinstance(value, str) else None
        if value is None:
            return
        if want is None:
            raise m.bad(ds_key, value, "fp32, fp16 or bf16")
        if want == "fp32":
            m.set("precision.grad_accum_dtype", "fp32", ds_key)
        elif dtype in (None, want):
            m.set("precision.grad_accum_dtype", "param", ds_key)
        else:
            raise m.refuse(
                ds_key,
                value,
                f"zshard accumulates gradients in fp32 or in the module dtype ({dtype})",
            )


def _optimizer(m: _Mapping, value: Any) -> None:
    block = m.block("optimizer", value)
    kind = block.get("type")
    if kind == AUTO:
        m.auto.append(("optimizer.type", "optimizer.name"))
        return
    if not isinstance(kind, str):
        raise m.bad("optimizer.type", kind, "a name such as AdamW")
    for key in block:
        if key not in ("type", "params"):
            _key(m, f"optimizer.{key}", block[key])
    params = dict(m.block("optimizer.params", block.get("params", {})))
    low = kind.lower()
    if low not in _OPTIMIZER_TYPES:
        raise m.refuse(
            "optimizer.type",
            kind,
            "zshard implements Adam, AdamW, SGD and Lamb (not OneBitAdam, ZeroOneAdam, "
            "OneBitLamb, Adagrad, Lion, Muon or other torch.optim classes)",
        )
    # DeepSpeed reads adam_w_mode from params; some configs put it beside `type`.
    w_mode = params.pop("adam_w_mode", block.get("adam_w_mode", True))
    name = low
    if low == "adam" and w_mode != AUTO:
        name = "adamw" if m.flag("optimizer.params.adam_w_mode", w_mode) else "adam"
    m.set("optimizer.name", name, "optimizer.type")
    # DeepSpeed's optimizer classes' defaults where they differ from zshard's.
    m.set("optimizer.lr", 0.001, "optimizer.params.lr (DeepSpeed's default)")
    if name == "adamw" and params.get("torch_adam") is True:  # torch.optim.AdamW's default
        m.set("optimizer.weight_decay", 0.01, "optimizer.params.weight_decay (torch's default)")
    allowed = _TYPE_PARAMS[name]
    for key, value in params.items():
        ds_key = f"optimizer.params.{key}"
        rule = _rule(m, ds_key, value)
        if value == AUTO:
            if rule.zshard:
                m.leaves.pop(rule.zshard, None)
                m.auto.append((ds_key, rule.zshard))
            continue
        if rule.treatment != "mapped":
            _key(m, ds_key, value)
            continue
        if key not in allowed:
            raise m.refuse(ds_key, value, f"not a parameter of {_OPTIMIZER_TYPES[name]} in zshard")
        if key == "betas":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise m.bad(ds_key, value, "a list of 2 numbers")
            m.set("optimizer.betas", [m.number(ds_key, v) for v in value], ds_key)
        elif key in ("nesterov", "eps_inside_sqrt"):
            m.set(f"optimizer.{key}", m.flag(ds_key, value), ds_key)
        elif key == "bias_correction":
            flag = m.flag(ds_key, value)
            if name != "lamb" and not flag:
                raise m.refuse(ds_key, value, "zshard's Adam always corrects the moments' bias")
            if name == "lamb":
                m.set("optimizer.bias_correction", flag, ds_key)
        else:
            m.set(f"optimizer.{key}", m.number(ds_key, value), ds_key)


def _scheduler(m: _Mapping, value: Any) -> None:
    block = m.block("scheduler", value)
    kind = block.get("type")
    if kind == AUTO:
        m.auto.append(("scheduler.type", "scheduler.name"))
        return
    if not isinstance(kind, str):
        raise m.bad("scheduler.type", kind, "a name such as WarmupLR")
    for key in block:
        if key not in ("type", "params"):
            _rule(m, f"scheduler.{key}", block[key])  # refuses it: not a scheduler key
    name = BY_DS_TYPE.get(kind)
    if name is None:
        raise m.refuse(
            "scheduler.type",
            kind,
            f"zshard implements DeepSpeed's {', '.join(BY_DS_TYPE)} (not torch.optim.lr_scheduler "
            "classes)",
        )
    given: dict[str, Any] = {}
    for key, v in m.block("scheduler.params", block.get("params", {})).items():
        ds_key = f"scheduler.params.{key}"
        _rule(m, ds_key, v)
        if key == "last_batch_iteration":
            _key(m, ds_key, v)
            continue
        if key not in DS_SCHEDULES[name][1]:
            raise m.refuse(ds_key, v, f"not a parameter of DeepSpeed's {kind}")
        if v == AUTO:
            # The Hugging Face Trainer fills these from the run: here, zshard's values.
            if key in ("warmup_max_lr", "total_num_steps"):
                given[key] = None
                what = "optimizer.lr" if key == "warmup_max_lr" else "train.steps"
                m.auto.append((ds_key, what))
            else:
                default = DS_SCHEDULES[name][1][key]
                m.note(ds_key, v, f"DeepSpeed's default {_show(default)}")
            continue
        given[key] = v
    try:
        schedule_params(name, given, "scheduler.params")
    except ConfigError as e:
        raise ConfigError(f"{m.where}: {e}") from None
    m.set("scheduler.name", name, "scheduler.type")
    m.set("scheduler.params", given, "scheduler.params")


# -- dotted keys into a tree ----------------------------------------------------------------

# Sections a zshard YAML may give as one string (``precision: bf16``): their field.
SHORTHAND = {"precision": "dtype", "offload_optimizer": "device", "offload_param": "device"}


def _nest(leaves: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in leaves.items():
        _put(tree, dotted, copy.deepcopy(value))
    return tree


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part in SHORTHAND:
            child = {SHORTHAND[part]: child}  # `precision: bf16`, `offload_param: cpu`
        elif child is True and part == "activation_checkpointing":
            child = {}  # `activation_checkpointing: true` with DeepSpeed's details
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value
