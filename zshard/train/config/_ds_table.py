"""The DeepSpeed key table, as data: one :class:`Rule` per key DeepSpeed 0.19 accepts, in the order
``docs/deepspeed.md`` lists them (``tools/gen_deepspeed_docs.py`` renders :data:`RULES`). This
module holds the top-level keys and sections; ``zero_optimization`` is in ``_ds_table_zero.py``.
The mapping code that dispatches on the table is ``_deepspeed.py``.
"""

from __future__ import annotations

from zshard.train.config._ds_rule import (
    ANY,
    AUTO,
    PERF,
    Rule,
    Table,
    empty_or_off,
    is_off,
    pending,
    same_value,
    sets,
)
from zshard.train.config._ds_table_zero import zero_rules
from zshard.train.config._lrsched import DS_SCHEDULES

_MONITOR = "a monitor: writes metrics somewhere, trains the same; zshard logs metrics.jsonl"
_NO_MP = "zshard is data parallel only (no tensor, pipeline, sequence or expert parallelism)"

# (key, zshard key, note) of optimizer parameters zshard maps; which types take which is in
# TYPE_PARAMS.
OPTIMIZER_PARAMS = (
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
# (key, the value zshard matches or ANY, note): accepted with that value, refused otherwise.
_OPTIMIZER_SAME = (
    ("torch_adam", ANY, "a kernel choice; same arithmetic"),
    ("fused", ANY, "a kernel choice; same arithmetic"),
    ("foreach", ANY, "a kernel choice; same arithmetic"),
    ("capturable", ANY, "a kernel choice; same arithmetic"),
    ("differentiable", False, "zshard's optimizer step is not differentiable"),
    ("fp32_optimizer_states", True, "zshard keeps fp32 optimizer state"),
    ("set_grad_none", ANY, "zshard's gradients live in flat buffers"),
    ("amsgrad", False, "AMSGrad is not implemented in zshard"),
    ("maximize", False, "zshard minimises the loss"),
    ("dampening", 0, "zshard's SGD has no dampening"),
)
# Which parameters each optimizer type takes (the mapping refuses the others).
TYPE_PARAMS = {
    "adam": {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction"},
    "adamw": {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction"},
    "sgd": {"lr", "momentum", "nesterov", "weight_decay"},
    "lamb": {"lr", "betas", "eps", "weight_decay", "max_coeff", "min_coeff", "bias_correction"}
    | {"eps_inside_sqrt"},
}
OPTIMIZER_TYPES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "lamb": "Lamb"}


def _general(t: Table) -> None:
    """Batch sizes, clipping, logging and monitors, checkpoint and compile keys."""
    add = t.add
    add(
        "train_batch_size",
        "mapped",
        "train.global_batch_size",
        apply=sets("train.global_batch_size", minimum=1),
    )
    add(
        "train_micro_batch_size_per_gpu",
        "mapped",
        "train.micro_batch_size",
        apply=sets("train.micro_batch_size", minimum=1),
    )
    add(
        "gradient_accumulation_steps",
        "mapped",
        "train.grad_accum",
        apply=sets("train.grad_accum", minimum=1),
    )
    add(
        "gradient_clipping",
        "mapped",
        "grad_clip",
        "max global gradient norm, torch's rule",
        apply=sets("grad_clip", "number"),
    )
    add("steps_per_print", "mapped", "train.log_every", apply=sets("train.log_every"))
    add("wall_clock_breakdown", "warn", note="timing logs", ok=(False,))
    add("memory_breakdown", "warn", note="memory logs", ok=(False,))
    add("dump_state", "warn", note="prints the config at start-up", ok=(False,))
    add("log_level", "warn", note="DeepSpeed's logger", ok=("info",))
    add("timers", "warn", note="DeepSpeed's timers", ok_if=is_off, ok_doc="off")
    for name in ("tensorboard", "wandb", "csv_monitor", "comet", "aim"):
        add(name, "warn", note=_MONITOR, ok_if=is_off, ok_doc="`enabled: false`")
    add("flops_profiler", "warn", note="a profiler", ok_if=is_off, ok_doc="`enabled: false`")
    add("comms_logger", "warn", note="logs collectives", ok_if=is_off, ok_doc="`enabled: false`")
    add("zero_allow_untested_optimizer", "same", note="every zshard optimizer runs under ZeRO")
    add(
        "zero_force_ds_cpu_optimizer",
        "same",
        note="which Adam kernel DeepSpeed picks; same arithmetic",
    )
    add("disable_python_gc", "warn", note=PERF, ok=(None,))
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
    add("checkpoint.parallel_write", "warn", note=PERF, ok_if=empty_or_off, ok_doc="off")
    add(
        "aio", "warn", note="NVMe I/O tuning of DeepSpeed's swapper; zshard's swap I/O tunes itself"
    )
    add(
        "compile",
        "warn",
        note="torch.compile of the model: same arithmetic up to rounding",
        ok_if=empty_or_off,
        ok_doc="off",
    )


def _numerics(t: Table) -> None:
    """Numerics zshard implements only one way, and features it does not have."""
    add = t.add
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
        ok_if=is_off,
        ok_doc="`enabled: false`",
    )
    add(
        "torch_autocast",
        "refused",
        note="zshard casts the model (fp16/bf16) instead of autocast",
        ok_if=is_off,
        ok_doc="`enabled: false`",
    )
    for name in ("pipeline", "tensor_parallel", "expert_parallel", "sequence_parallel_size"):
        add(
            name,
            "refused",
            note=_NO_MP,
            ok_if=lambda v: v == {} or any(same_value(v, o) for o in (None, 1)),
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
        add(name, "refused", note="not implemented in zshard", ok_if=is_off, ok_doc="off")


def _precision(t: Table) -> None:
    """fp16, bf16 (and its alias bfloat16), data_types."""
    add = t.add
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
        apply=sets("precision.loss_scale.static_scale", "number"),
    )
    add(
        "fp16.initial_scale_power",
        "mapped",
        "precision.loss_scale.initial_scale_power",
        apply=sets("precision.loss_scale.initial_scale_power"),
    )
    add(
        "fp16.loss_scale_window",
        "mapped",
        "precision.loss_scale.window",
        apply=sets("precision.loss_scale.window", minimum=1),
    )
    add(
        "fp16.hysteresis",
        "mapped",
        "precision.loss_scale.hysteresis",
        apply=sets("precision.loss_scale.hysteresis", minimum=1),
    )
    add(
        "fp16.consecutive_hysteresis",
        "mapped",
        "precision.loss_scale.consecutive_hysteresis",
        apply=sets("precision.loss_scale.consecutive_hysteresis", "flag"),
    )
    add(
        "fp16.min_loss_scale",
        "mapped",
        "precision.loss_scale.min_scale",
        apply=sets("precision.loss_scale.min_scale", "positive"),
    )
    add(
        "fp16.raise_error_at_min_scale",
        "mapped",
        "precision.loss_scale.raise_error_at_min_scale",
        "DynamicLossScaler's argument (always true from a DeepSpeed config)",
        apply=sets("precision.loss_scale.raise_error_at_min_scale", "flag"),
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
        apply=pending("grad_accum_dtype"),
    )
    add(
        "data_types.keep_in_fp32_modules",
        "refused",
        note="zshard casts every module to the module dtype",
        ok_if=lambda v: v in (None, AUTO, []),
        ok_doc="`auto`, `[]`",
    )


def _optimizer(t: Table) -> None:
    """optimizer: its type and the parameters of each."""
    add = t.add
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
    for key, target, note in OPTIMIZER_PARAMS:
        add(f"optimizer.params.{key}", "mapped", target, note)
    for key, ok, note in _OPTIMIZER_SAME:
        add(
            f"optimizer.params.{key}",
            "refused" if ok is not ANY else "same",
            note=note,
            ok=() if ok is ANY else (ok,),
        )
    add(
        "optimizer.params.max_grad_norm",
        "refused",
        note="DeepSpeed refuses it too: use gradient_clipping",
    )


def _scheduler(t: Table) -> None:
    """scheduler: DeepSpeed's schedules and their parameters."""
    add = t.add
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


def _activation_checkpointing(t: Table) -> None:
    """activation_checkpointing."""
    add = t.add
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
        apply=sets("train.activation_checkpointing.number_checkpoints"),
    )
    add(
        "activation_checkpointing.cpu_checkpointing",
        "mapped",
        "train.activation_checkpointing.cpu_checkpointing",
        "keep checkpointed inputs in host memory",
        apply=sets("train.activation_checkpointing.cpu_checkpointing", "flag"),
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


def _rules() -> list[Rule]:
    t = Table()
    for part in (
        _general,
        _numerics,
        _precision,
        _optimizer,
        _scheduler,
        _activation_checkpointing,
    ):
        part(t)
    return t.rules + zero_rules()


RULES: dict[str, Rule] = {rule.key: rule for rule in _rules()}
