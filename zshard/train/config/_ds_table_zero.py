"""The ``zero_optimization`` rows of the DeepSpeed key table (see ``_ds_table.py``): the stage,
buffers, stage-3 and ZeRO++ keys, and the two offload blocks.
"""

from __future__ import annotations

from typing import Any

from zshard.train.config._ds_rule import (
    PERF,
    DsMapping,
    Handler,
    Rule,
    Table,
    empty_or_off,
    is_off,
    pending,
    sets,
)
from zshard.train.config._sections_zero import OffloadOptimizerConfig, OffloadParamConfig

ZERO = "zero_optimization"
_PERSISTENCE = (
    "zshard keeps whole each module (flat group) with fewer parameters; DeepSpeed each "
    "parameter with at most that many elements: memory and traffic differ, results do not"
)


def _stage(m: DsMapping, ds_key: str, value: Any) -> None:
    stage = m.integer(ds_key, value)
    if stage not in (0, 1, 2, 3):
        raise m.bad(ds_key, value, "one of 0, 1, 2, 3")
    m.set("zero.stage", stage, ds_key)


def _legacy_offload(which: str) -> Handler:
    def apply(m: DsMapping, ds_key: str, value: Any) -> None:
        if m.flag(ds_key, value):
            m.set(f"zero.{which}.device", "cpu", ds_key)

    return apply


def zero_rules() -> list[Rule]:
    t = Table()
    _zero(t)
    _offload(t)
    return t.rules


def _zero(t: Table) -> None:
    """The stage, buckets, stage-3 (and its aliases), ZeRO++ and DeepSpeed-3 internals."""
    add = t.add
    z = ZERO
    add(z, "mapped", "zero", "`true`/`false`: stage 1/0 (DeepSpeed's legacy form)", section=True)
    add(f"{z}.stage", "mapped", "zero.stage", apply=_stage)
    add(
        f"{z}.reduce_bucket_size",
        "mapped",
        "zero.reduce_bucket_size",
        "elements",
        apply=sets("zero.reduce_bucket_size", minimum=1),
    )
    add(
        f"{z}.allgather_bucket_size",
        "mapped",
        "zero.allgather_bucket_size",
        "elements",
        apply=sets("zero.allgather_bucket_size", minimum=1),
    )
    add(
        f"{z}.overlap_comm",
        "mapped",
        "zero.overlap_comm",
        "overlap gradient reduction with backward",
        ok=(None,),
        apply=sets("zero.overlap_comm", "flag"),
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
        apply=pending("sub_group_size"),
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
        apply=pending("pin_memory"),
    )
    for alias in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
        add(
            f"{z}.{alias}",
            "mapped",
            "zero.prefetch",
            "elements gathered ahead -> modules gathered ahead, counted on the configured "
            "model (0 disables); a warning when the model cannot be counted",
            apply=pending("prefetch_bucket_size"),
        )
    for alias in ("stage3_param_persistence_threshold", "param_persistence_threshold"):
        add(
            f"{z}.{alias}",
            "mapped",
            "zero.param_persistence_threshold",
            caveat=_PERSISTENCE,
            apply=sets("zero.param_persistence_threshold"),
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
            apply=sets("checkpoint.save_16bit", "flag"),
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
            note=PERF + " (zshard gathers per module and releases after use)",
        )
    for alias in (
        "stage3_use_all_reduce_for_fetch_params",
        "use_all_reduce_for_fetch_params",
        "stage3_allgather_sequential",
        "allgather_sequential",
    ):
        add(f"{z}.{alias}", "warn", note=PERF, ok=(False, 1))
    # ZeRO++ (stage 3).
    add(
        f"{z}.zero_quantized_weights",
        "mapped",
        "zero.quantized_weights",
        "ZeRO++ qwZ: int8 parameter all-gathers, one scale per zero.quantization_block_size "
        "elements (stage 3)",
        apply=sets("zero.quantized_weights", "flag"),
    )
    add(
        f"{z}.zero_quantized_gradients",
        "mapped",
        "zero.quantized_gradients",
        "ZeRO++ qgZ: gradients reduced by a hierarchical all-to-all of int8 blocks (stage 3)",
        apply=sets("zero.quantized_gradients", "flag"),
    )
    add(
        f"{z}.zero_hpz_partition_size",
        "mapped",
        "zero.hpz_partition_size",
        "ZeRO++ hpZ: secondary partition over that many ranks of a node, backward all-gather "
        "inside it (stage 3; 1 = off)",
        apply=sets("zero.hpz_partition_size", minimum=1),
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
    add(f"{z}.zenflow", "refused", note="not implemented in zshard", ok_if=is_off, ok_doc="off")
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
        ok_if=empty_or_off,
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


def _offload(t: Table) -> None:
    """offload_optimizer and offload_param."""
    add = t.add
    z = ZERO
    for which, buffers in (("offload_optimizer", 4), ("offload_param", 5)):
        o = f"{z}.{which}"
        add(o, "mapped", f"zero.{which}", section=True)
        add(
            f"{o}.device",
            "mapped",
            f"zero.{which}.device",
            "`none`, `cpu`, `nvme`",
            apply=sets(f"zero.{which}.device", "str"),
        )
        add(
            f"{o}.nvme_path",
            "mapped",
            f"zero.{which}.path",
            "any fsspec path",
            apply=sets(f"zero.{which}.path", "str"),
        )
        add(
            f"{o}.buffer_count",
            "mapped",
            f"zero.{which}.buffer_count",
            f"DeepSpeed's default {buffers}",
            apply=sets(f"zero.{which}.buffer_count", minimum=1),
        )
        add(
            f"{o}.pin_memory",
            "mapped",
            f"zero.{which}.pin_memory",
            apply=sets(f"zero.{which}.pin_memory", "flag"),
        )
    oo, op = f"{z}.offload_optimizer", f"{z}.offload_param"
    add(
        f"{oo}.ratio",
        "refused",
        note="partial offload is not supported; 1.0 offloads everything",
        ok=(1.0,),
    )
    # The keys a zshard YAML's offload sections also accept as no-ops: one reason for both.
    for name, note in OffloadOptimizerConfig._noops.items():
        add(f"{oo}.{name}", "same", note=note)
    add(f"{oo}.super_offload", "refused", note="not implemented in zshard", ok=(False,))
    add(f"{oo}.cpuadam_cores_perc", "warn", note=PERF)
    for name, note in OffloadParamConfig._noops.items():
        add(f"{op}.{name}", "same", note=note)
    add(
        f"{op}.max_in_cpu",
        "mapped",
        "zero.offload_param.max_in_memory",
        "elements of fetched partitions kept cached",
        apply=sets("zero.offload_param.max_in_memory"),
    )
