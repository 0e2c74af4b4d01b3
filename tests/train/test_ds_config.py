"""DeepSpeed config compatibility: configs shaped like DeepSpeed's documented examples map onto
zshard config trees that validate through ``load_config``; the rest is reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from zshard.errors import ConfigError
from zshard.train.config import (
    OffloadOptimizerConfig,
    OffloadParamConfig,
    apply_deepspeed,
    from_deepspeed,
    load_config,
    load_with_deepspeed,
    prefetch_modules,
    warning_line,
)

# Shaped after the examples in DeepSpeed's configuration reference and its ZeRO / ZeRO-Offload
# tutorials (values as they appear there; written out as data here).
BASIC = {
    "train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
    "fp16": {"enabled": True},
    "zero_optimization": True,
}
ZERO2 = {
    "zero_optimization": {
        "stage": 2,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    },
}
ZERO3_OFFLOAD = {
    "zero_optimization": {
        "stage": 3,
        "contiguous_gradients": True,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_prefetch_bucket_size": 1e7,
        "stage3_param_persistence_threshold": 1e5,
        "reduce_bucket_size": 1e7,
        "sub_group_size": 1e9,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    },
}
NVME = {
    "zero_optimization": {
        "stage": 3,
        "offload_param": {
            "device": "nvme",
            "nvme_path": "/local_nvme",
            "pin_memory": True,
            "buffer_count": 5,
            "buffer_size": 1e8,
            "max_in_cpu": 1e9,
        },
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 4},
    },
    "aio": {"block_size": 262144, "queue_depth": 32, "thread_count": 1},
}
# The Hugging Face Trainer template: "auto" everywhere the trainer would fill in a value.
HF_AUTO = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
    },
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
FULL_FP16 = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "steps_per_print": 10,
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7},
    },
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": 0,
            "warmup_max_lr": 0.001,
            "warmup_num_steps": 1000,
            "total_num_steps": 10000,
            "warmup_type": "linear",
        },
    },
    "fp16": {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8},
}


def mapped(ds: dict[str, Any], world_size: int | None = None) -> tuple[Any, list[str]]:
    tree, ignored = from_deepspeed(ds, world_size)
    return load_config(tree), ignored


def test_basic_example() -> None:
    cfg, ignored = mapped(BASIC, world_size=8)
    assert cfg.zero.stage == 1  # `"zero_optimization": true` is DeepSpeed's stage 1
    assert cfg.optimizer.name == "adamw"  # "Adam" means AdamW unless adam_w_mode is false
    assert cfg.optimizer.lr == 0.00015
    assert cfg.precision.dtype == "fp16"
    assert cfg.train.global_batch_size == 8 and cfg.train.grad_accum == 1
    assert cfg.train.resolve_batch(8) == (1, 1, 8)
    assert ignored == []


def test_zero2_example_maps_buckets_and_accepts_noops() -> None:
    cfg, ignored = mapped(ZERO2)
    assert cfg.zero.stage == 2
    assert cfg.zero.reduce_bucket_size == cfg.zero.allgather_bucket_size == 500_000_000
    assert ignored == []


def test_zero3_offload_example() -> None:
    tree, ignored = from_deepspeed(ZERO3_OFFLOAD, stage3_modules=[2_000_000] * 40)
    cfg = load_config(tree)
    z = cfg.zero
    assert z.stage == 3 and z.reduce_bucket_size == 10_000_000
    assert z.param_persistence_threshold == 100_000
    assert z.prefetch == 5  # 1e7 elements ahead = 5 modules of 2M parameters
    assert z.offload_optimizer == OffloadOptimizerConfig(device="cpu")
    assert z.offload_param == OffloadParamConfig(device="cpu")
    assert sorted(ignored) == [
        "zero_optimization.stage3_max_live_parameters",
        "zero_optimization.stage3_max_reuse_distance",
        "zero_optimization.sub_group_size",
    ]
    # Without the model the prefetch bucket cannot be converted: zshard's default stays.
    assert load_config(from_deepspeed(ZERO3_OFFLOAD)[0]).zero.prefetch == 2


def test_nvme_offload_passes_through() -> None:
    cfg, ignored = mapped(NVME)
    assert cfg.zero.offload_param == OffloadParamConfig(
        device="nvme", path="/local_nvme", pin_memory=True, buffer_count=5
    )
    assert cfg.zero.offload_optimizer == OffloadOptimizerConfig(
        device="nvme", path="/local_nvme", buffer_count=4
    )
    assert ignored == [
        "zero_optimization.offload_param.buffer_size",
        "zero_optimization.offload_param.max_in_cpu",
        "aio",
    ]
    tree, _ = from_deepspeed({"zero_optimization": {"offload_optimizer": {"device": "none"}}})
    assert load_config(tree).zero.offload_optimizer is None


def test_hf_auto_template_leaves_auto_unset() -> None:
    cfg, ignored = mapped(HF_AUTO)
    default = load_config({})
    assert cfg.precision == default.precision  # fp16/bf16 "auto": zshard decides
    assert cfg.optimizer.name == "adamw"
    assert (cfg.optimizer.lr, cfg.optimizer.betas) == (
        default.optimizer.lr,
        default.optimizer.betas,
    )
    assert cfg.scheduler.name == "constant" and cfg.scheduler.warmup_steps == 0
    assert cfg.train.micro_batch_size is None and cfg.train.global_batch_size is None
    assert cfg.grad_clip == 0.0 and cfg.train.log_every == 2000
    assert cfg.zero.stage == 3 and cfg.zero.reduce_bucket_size == default.zero.reduce_bucket_size
    assert "zero_optimization.sub_group_size" in ignored


def test_full_fp16_example() -> None:
    cfg, ignored = mapped(FULL_FP16, world_size=4)
    assert cfg.train.resolve_batch(4) == (4, 4, 64)
    assert cfg.grad_clip == 1.0 and cfg.train.log_every == 10
    assert cfg.optimizer.betas == (0.8, 0.999) and cfg.optimizer.weight_decay == 3e-7
    s = cfg.scheduler
    assert (s.name, s.warmup_steps, s.total_steps, s.min_lr_ratio) == ("linear", 1000, 10000, 0.0)
    ls = cfg.precision.loss_scale
    assert (ls.initial_scale_power, ls.window, ls.hysteresis, ls.min_scale) == (16, 1000, 2, 1.0)
    assert cfg.zero.stage == 1
    assert ignored == []


def test_optimizer_variants() -> None:
    adam = {"optimizer": {"type": "Adam", "params": {"adam_w_mode": False, "torch_adam": True}}}
    assert mapped(adam)[0].optimizer.name == "adam"
    sgd = {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}}
    cfg, ignored = mapped(sgd)
    assert (cfg.optimizer.name, cfg.optimizer.momentum, cfg.optimizer.nesterov) == (
        "sgd",
        0.9,
        True,
    )
    assert ignored == []
    lamb = {"optimizer": {"type": "Lamb", "params": {"lr": 0.1, "max_coeff": 0.3}}}
    cfg, ignored = mapped(lamb)
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 3e-4  # untouched
    assert ignored == ["optimizer.type=Lamb (zshard has adamw, adam, sgd)"]
    amsgrad = {"optimizer": {"type": "AdamW", "params": {"amsgrad": True, "bias_correction": True}}}
    assert mapped(amsgrad)[1] == ["optimizer.params.amsgrad=true"]


def test_schedulers() -> None:
    warm = {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.01}}}
    cfg, ignored = mapped(warm)
    # DeepSpeed's defaults for what is absent: 1000 log-rate warmup steps.
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps, cfg.optimizer.lr) == (
        "constant",
        1000,
        0.01,
    )
    assert ignored == ["scheduler.params.warmup_type=log (zshard warms up linearly)"]
    cosine = {
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": 5000,
                "warmup_num_steps": 100,
                "warmup_type": "linear",
                "cos_min_ratio": 0.1,
            },
        },
        "bf16": {"enabled": True},
    }
    cfg, ignored = mapped(cosine)
    s = cfg.scheduler
    assert (s.name, s.total_steps, s.warmup_steps, s.min_lr_ratio) == ("cosine", 5000, 100, 0.1)
    assert cfg.precision.dtype == "bf16" and ignored == []
    decay = {
        "optimizer": {"type": "AdamW", "params": {"lr": 0.5}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3, "total_num_steps": 100},
        },
    }
    cfg, ignored = mapped(decay)
    assert cfg.optimizer.lr == 1e-3 and cfg.scheduler.min_lr_ratio == pytest.approx(0.1)
    assert any(i.startswith("optimizer.params.lr=0.5") for i in ignored)
    one_cycle = {"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0}}}
    assert mapped(one_cycle)[1] == [
        "scheduler.type=OneCycle (zshard has WarmupLR, WarmupDecayLR, WarmupCosineLR)"
    ]


def test_precision_rules() -> None:
    assert mapped({"fp16": {"enabled": False}})[0].precision.dtype == "fp32"
    assert mapped({"bfloat16": {"enabled": True}})[0].precision.dtype == "bf16"
    static = {"fp16": {"enabled": True, "loss_scale": 128}}
    assert mapped(static)[1] == [
        "fp16.loss_scale=128 (static loss scaling; zshard scales dynamically)"
    ]
    grad32 = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    assert mapped(grad32)[0].precision.grad_accum_dtype == "fp32"
    with pytest.raises(ConfigError, match="both true"):
        from_deepspeed({"fp16": {"enabled": True}, "bf16": {"enabled": True}})


def test_bad_values_name_the_deepspeed_key() -> None:
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage: expected one of"):
        from_deepspeed({"zero_optimization": {"stage": 4}})
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        from_deepspeed({"train_micro_batch_size_per_gpu": "four"})
    with pytest.raises(ConfigError, match=r"world size 4 = 32"):
        from_deepspeed(
            {
                "train_batch_size": 64,
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2,
            },
            world_size=4,
        )


def test_prefetch_conversion() -> None:
    assert prefetch_modules(0, [10, 20]) == 0
    assert prefetch_modules(100, None) is None
    assert prefetch_modules(35, [10, 10, 10, 10]) == 4  # round(3.5)
    assert prefetch_modules(10**9, [10, 10]) == 2  # at most every module
    assert prefetch_modules(1, [1000]) == 1  # at least one


# -- merging into a zshard config ------------------------------------------------------------------


def test_precedence_defaults_ds_yaml_set(tmp_path: Path) -> None:
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(FULL_FP16))
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(
        yaml.safe_dump(
            {
                "deepspeed": "ds.json",  # relative to the YAML
                "zero": {"stage": 2},
                "optimizer": {"lr": 0.01},
                "train": {"steps": 5},
            }
        )
    )
    cfg, ignored = load_with_deepspeed(str(yaml_path), ["optimizer.lr=0.02"], world_size=4)
    assert cfg.zero.stage == 2  # the YAML beats DeepSpeed
    assert cfg.optimizer.lr == 0.02  # --set beats both
    assert cfg.zero.reduce_bucket_size == 500_000_000  # DeepSpeed beats the default
    assert cfg.precision.dtype == "fp16" and cfg.train.steps == 5
    assert "zero_optimization.stage (the zshard config sets zero.stage: 2)" in ignored
    assert any(i.startswith("scheduler.params.warmup_max_lr (the zshard config") for i in ignored)
    line = warning_line(ignored)
    assert "\n" not in line and line.startswith("zshard: warning: ")


def test_flag_replaces_the_yaml_key_and_batch_is_one_unit(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 32}))
    tree = {"deepspeed": {"zero_optimization": {"stage": 1}}, "train": {"micro_batch_size": 2}}
    merged, ignored = apply_deepspeed(tree, str(other), world_size=2)
    assert "deepspeed" not in merged
    cfg = load_config(merged)
    assert cfg.zero.stage == 3
    # The YAML set a batch size: DeepSpeed's are all dropped rather than mixed.
    assert cfg.train.global_batch_size is None and cfg.train.micro_batch_size == 2
    assert ignored == ["train_batch_size (the zshard config sets train.micro_batch_size)"]


def test_inline_mapping_and_precision_shorthand() -> None:
    tree = {"precision": "bf16", "deepspeed": {"fp16": {"enabled": True, "hysteresis": 4}}}
    merged, ignored = apply_deepspeed(tree, None, None)
    cfg = load_config(merged)
    assert cfg.precision.dtype == "bf16"  # the YAML's shorthand wins
    assert ignored == ["fp16.enabled (the zshard config sets precision.dtype: bf16)"]
    assert apply_deepspeed({"zero": {"stage": 1}}, None, None) == ({"zero": {"stage": 1}}, [])


def test_prefetch_from_the_configured_model() -> None:
    tree = {
        "model": {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "d_model": 32}},
        "data": {"seq_len": 16},
        "deepspeed": {
            "zero_optimization": {
                "stage": 3,
                "stage3_prefetch_bucket_size": 12000,
                "stage3_param_persistence_threshold": 1000,
            }
        },
    }
    merged, _ = apply_deepspeed(tree, None, 2)
    # Gathered modules of this GPT: 9 of 34,176 - 832 parameters, ~3,705 each on average.
    assert load_config(merged).zero.prefetch == 3


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        apply_deepspeed({}, str(tmp_path / "missing.json"), None)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        apply_deepspeed({}, str(bad), None)
    with pytest.raises(ConfigError, match="expected a path"):
        apply_deepspeed({"deepspeed": 3}, None, None)
