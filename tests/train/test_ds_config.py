"""DeepSpeed config compatibility: one rule for every key (honoured, refused, or a warning only
where the result cannot change), configs shaped like DeepSpeed's documented examples, merging
under a zshard YAML, and a DeepSpeed config whose lr, warm-up, clipping and buckets take effect
in a real engine."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import zshard.train as zt
from zshard.errors import ConfigError
from zshard.train.config import (
    RULES,
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
        "consecutive_hysteresis": False,
        "min_loss_scale": 1,
    },
    "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8},
}


def mapped(ds: dict[str, Any], world_size: int | None = None) -> tuple[Any, list[str]]:
    tree, notes = from_deepspeed(ds, world_size)
    return load_config(tree), notes


def test_basic_example() -> None:
    cfg, notes = mapped(BASIC, world_size=8)
    assert cfg.zero.stage == 1  # `"zero_optimization": true` is DeepSpeed's stage 1
    assert cfg.optimizer.name == "adamw"  # "Adam" means AdamW unless adam_w_mode is false
    assert cfg.optimizer.lr == 0.00015
    assert cfg.precision.dtype == "fp16"
    assert cfg.train.resolve_batch(8) == (1, 1, 8)
    assert notes == []


def test_zero2_example() -> None:
    cfg, notes = mapped(ZERO2)
    assert cfg.zero.stage == 2 and cfg.zero.overlap_comm is True
    assert cfg.zero.reduce_bucket_size == cfg.zero.allgather_bucket_size == 500_000_000
    assert notes == []


def test_zero3_offload_example_maps_sub_group_size() -> None:
    tree, notes = from_deepspeed(ZERO3_OFFLOAD, stage3_modules=[2_000_000] * 40)
    z = load_config(tree).zero
    assert z.stage == 3 and z.reduce_bucket_size == 10_000_000
    assert z.param_persistence_threshold == 100_000
    assert z.prefetch == 5  # 1e7 elements ahead = 5 modules of 2M parameters
    assert z.offload_optimizer == OffloadOptimizerConfig(device="cpu", sub_group_size=10**9)
    assert z.offload_param == OffloadParamConfig(device="cpu")
    keys = sorted(n.partition("=")[0] for n in notes)
    assert keys == [
        "zero_optimization.stage3_max_live_parameters",  # memory only: a warning
        "zero_optimization.stage3_max_reuse_distance",
        "zero_optimization.stage3_param_persistence_threshold",  # applied per module: said so
    ]
    # Without the model the prefetch bucket cannot be converted: said so, not dropped silently.
    tree, notes = from_deepspeed(ZERO3_OFFLOAD)
    assert load_config(tree).zero.prefetch == 2
    assert any(
        n.startswith("zero_optimization.stage3_prefetch_bucket_size=10000000 (the model could")
        for n in notes
    )


def test_nvme_offload_maps_max_in_cpu() -> None:
    cfg, notes = mapped(NVME)
    assert cfg.zero.offload_param == OffloadParamConfig(
        device="nvme", path="/local_nvme", pin_memory=True, buffer_count=5, max_in_memory=10**9
    )
    assert cfg.zero.offload_optimizer == OffloadOptimizerConfig(
        device="nvme", path="/local_nvme", buffer_count=4
    )
    assert [n.partition(" ")[0] for n in notes] == ["aio"]
    tree, _ = from_deepspeed({"zero_optimization": {"offload_optimizer": {"device": "none"}}})
    assert load_config(tree).zero.offload_optimizer is None


def test_offload_ratio_is_refused_in_json_as_in_yaml() -> None:
    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}}
    with pytest.raises(ConfigError, match=r"offload_optimizer\.ratio=0\.3 is not supported"):
        from_deepspeed(ds)
    with pytest.raises(ConfigError, match="ratio: partial offload is not supported"):
        load_config({"zero": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}})
    ok = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 1}}}
    assert from_deepspeed(ok)[1] == []


def test_hf_auto_template_reports_what_auto_became() -> None:
    cfg, notes = mapped(HF_AUTO)
    default = load_config({})
    assert cfg.precision.dtype == "fp32"  # fp16/bf16 "auto": zshard decides
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == default.optimizer.lr
    assert cfg.scheduler.name == "warmup_lr"
    assert cfg.scheduler.params == {"warmup_max_lr": None}  # "auto": optimizer.lr
    assert cfg.train.micro_batch_size is None and cfg.train.global_batch_size is None
    assert cfg.grad_clip == 0.0 and cfg.train.log_every == 2000
    assert cfg.zero.stage == 3 and cfg.checkpoint.save_16bit is True
    # fp16 "auto": its loss-scale keys still apply if the zshard config picks fp16.
    assert cfg.precision.loss_scale.hysteresis == 2
    text = "; ".join(notes)
    assert f"optimizer.params.lr=auto (zshard's optimizer.lr = {default.optimizer.lr})" in text
    assert "fp16.enabled=auto (zshard's precision.dtype = fp32)" in text
    assert "scheduler.params.warmup_num_steps=auto (DeepSpeed's default 1000)" in text
    assert "train_batch_size=auto (zshard's train.global_batch_size = derived" in text


def test_full_fp16_example() -> None:
    cfg, notes = mapped(FULL_FP16, world_size=4)
    assert cfg.train.resolve_batch(4) == (4, 4, 64)
    assert cfg.grad_clip == 1.0 and cfg.train.log_every == 10
    assert cfg.optimizer.betas == (0.8, 0.999) and cfg.optimizer.weight_decay == 3e-7
    s = cfg.scheduler
    assert s.name == "warmup_decay_lr" and s.params["total_num_steps"] == 10000
    ls = cfg.precision.loss_scale
    assert (ls.initial_scale_power, ls.window, ls.hysteresis, ls.min_scale) == (16, 1000, 2, 1.0)
    assert ls.consecutive_hysteresis is False and ls.static_scale == 0
    assert cfg.zero.stage == 1
    assert notes == []


# -- optimizers and schedules: honoured or refused, never a silent AdamW --------------------------


def test_optimizers_map_with_deepspeed_defaults() -> None:
    adam = {"optimizer": {"type": "Adam", "params": {"adam_w_mode": False, "torch_adam": True}}}
    cfg = mapped(adam)[0]
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("adam", 0.001)  # FusedAdam's default lr
    torch_adamw = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    assert mapped(torch_adamw)[0].optimizer.weight_decay == 0.01  # torch.optim.AdamW's
    sgd = {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}}
    cfg, notes = mapped(sgd)
    o = cfg.optimizer
    assert (o.name, o.lr, o.momentum, o.nesterov) == ("sgd", 0.1, 0.9, True) and notes == []
    lamb = {
        "optimizer": {
            "type": "Lamb",
            "params": {"lr": 0.1, "max_coeff": 0.3, "min_coeff": 0.02, "eps_inside_sqrt": True},
        }
    }
    o = mapped(lamb)[0].optimizer
    assert (o.name, o.lr, o.max_coeff, o.min_coeff, o.eps_inside_sqrt) == (
        "lamb",
        0.1,
        0.3,
        0.02,
        True,
    )


@pytest.mark.parametrize(
    ("ds", "message"),
    [
        ({"optimizer": {"type": "OneBitAdam"}}, r"optimizer\.type=OneBitAdam is not supported"),
        ({"optimizer": {"type": "RMSprop"}}, r"optimizer\.type=RMSprop is not supported"),
        (
            {"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}},
            r"optimizer\.params\.amsgrad=true is not supported: AMSGrad",
        ),
        (
            {"optimizer": {"type": "SGD", "params": {"betas": [0.9, 0.9]}}},
            r"optimizer\.params\.betas=\[0\.9, 0\.9\] is not supported: not a parameter of SGD",
        ),
        (
            {"optimizer": {"type": "Lamb", "params": {"max_grad_norm": 1.0}}},
            "use gradient_clipping",
        ),
        ({"optimizer": {"type": "AdamW", "params": {"frobnicate": 1}}}, "not a DeepSpeed key"),
        ({"scheduler": {"type": "StepLR"}}, r"scheduler\.type=StepLR is not supported"),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"cycle_min_lr": 0.1}}},
            "not a parameter of DeepSpeed's WarmupLR",
        ),
        (
            {"scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": 0.1}}},
            "cycle_min_lr: DeepSpeed's OneCycle requires it",
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"last_batch_iteration": 5}}},
            "resumes the schedule from its checkpoint",
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}},
            "warmup_num_steps: expected a number > 0",
        ),
    ],
)
def test_unsupported_optimizers_and_schedules_are_refused(ds: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_deepspeed(ds)


def test_schedules_map_verbatim() -> None:
    one_cycle = {
        "optimizer": {"type": "Adam", "params": {"lr": 0.01}},
        "scheduler": {
            "type": "OneCycle",
            "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_first_step_size": 10},
        },
    }
    cfg, notes = mapped(one_cycle)
    assert cfg.scheduler.name == "one_cycle" and notes == []
    assert cfg.scheduler.params["cycle_first_step_size"] == 10
    rt = {"scheduler": {"type": "LRRangeTest", "params": {"lr_range_test_staircase": True}}}
    assert mapped(rt)[0].scheduler.params == {"lr_range_test_staircase": True}
    warm = {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.01}}}
    cfg, notes = mapped(warm)
    # DeepSpeed's log warm-up and 1000 steps are honoured, not reported as approximated.
    assert cfg.scheduler.name == "warmup_lr" and notes == []
    with pytest.raises(ConfigError, match="only DeepSpeed's schedules"):
        load_config({"scheduler": {"name": "cosine", "params": {"x": 1}}})


# -- precision ------------------------------------------------------------------------------------


def test_precision_rules() -> None:
    assert mapped({"fp16": {"enabled": False}})[0].precision.dtype == "fp32"
    assert mapped({"bfloat16": {"enabled": True}})[0].precision.dtype == "bf16"
    static = mapped({"fp16": {"enabled": True, "loss_scale": 128}})[0].precision.loss_scale
    assert static.static_scale == 128.0
    both = {"fp16": {"enabled": True, "consecutive_hysteresis": True, "min_loss_scale": 0.25}}
    ls = mapped(both)[0].precision.loss_scale
    assert ls.consecutive_hysteresis is True and ls.min_scale == 0.25
    raise_off = {"fp16": {"enabled": True, "raise_error_at_min_scale": False}}
    assert mapped(raise_off)[0].precision.loss_scale.raise_error_at_min_scale is False
    grad32 = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    assert mapped(grad32)[0].precision.grad_accum_dtype == "fp32"
    with pytest.raises(ConfigError, match="both true"):
        from_deepspeed({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match="check_grad_overflow=false is not supported"):
        from_deepspeed({"bf16": {"enabled": True, "check_grad_overflow": False}})
    with pytest.raises(ConfigError, match="module dtype"):
        from_deepspeed({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp16"}})
    with pytest.raises(ConfigError, match=r"fp16\.hysteresis: expected a number >= 1"):
        from_deepspeed({"fp16": {"enabled": True, "hysteresis": 0}})
    # A disabled block's values change nothing, but its unknown keys are still refused.
    assert mapped({"fp16": {"enabled": False, "loss_scale": 64}})[1] == []
    with pytest.raises(ConfigError, match=r"fp16\.bogus: not a DeepSpeed key"):
        from_deepspeed({"fp16": {"enabled": False, "bogus": 1}})


# -- the one rule ---------------------------------------------------------------------------------


def _other(value: Any) -> Any:
    """A value unlike ``value``, for a rule's non-quiet branch."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 7
    if value is None:
        return 3
    return "something-else"


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    tree: Any = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return tree


def _context(key: str, ds: dict[str, Any]) -> dict[str, Any]:
    """What a key needs around it: an enabled precision block, an optimizer type, a device."""
    if key.startswith(("fp16.", "bf16.", "bfloat16.")):
        ds[key.split(".")[0]]["enabled"] = True
    if ".offload_" in key:
        section = key.split(".")[1]
        ds["zero_optimization"][section]["device"] = "cpu"
    if key.startswith("optimizer.params."):
        ds["optimizer"]["type"] = "AdamW"
    if key.startswith("scheduler.params."):
        ds["scheduler"]["type"] = "WarmupLR"
    return ds


@pytest.mark.parametrize(
    "rule",
    [r for r in RULES.values() if r.ok and r.treatment in ("refused", "warn")],
    ids=lambda r: r.key,
)
def test_every_rule_refuses_or_warns_as_documented(rule: Any) -> None:
    quiet = _context(rule.key, _nested(rule.key, rule.ok[0]))
    assert from_deepspeed(quiet)[1] == [], rule.key  # zshard does this already: silent
    loud = _context(rule.key, _nested(rule.key, _other(rule.ok[0])))
    if rule.treatment == "refused":
        with pytest.raises(ConfigError, match=rule.key.replace(".", r"\.") + ".* not supported"):
            from_deepspeed(loud)
    else:
        assert any(n.startswith(rule.key) for n in from_deepspeed(loud)[1]), rule.key


def test_unknown_keys_are_refused_naming_them() -> None:
    with pytest.raises(ConfigError, match=r"flux_capacitor: not a DeepSpeed key zshard supports"):
        from_deepspeed({"flux_capacitor": 1})
    with pytest.raises(ConfigError, match=r"zero_optimization\.turbo: .*takes .*stage"):
        from_deepspeed({"zero_optimization": {"turbo": True}})
    with pytest.raises(ConfigError, match=r"pipeline=.* is not supported: zshard is data parallel"):
        from_deepspeed({"pipeline": {"stages": 2}})
    with pytest.raises(ConfigError, match="fp16_master_weights_and_grads=true is not supported"):
        from_deepspeed({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}})


def test_monitors_warn_only_when_on() -> None:
    assert mapped({"tensorboard": {"enabled": False, "output_path": "x"}})[1] == []
    notes = mapped({"wandb": {"enabled": True, "project": "p"}, "wall_clock_breakdown": True})[1]
    assert [n.partition(" ")[0].partition("=")[0] for n in notes] == [
        "wandb",
        "wall_clock_breakdown",
    ]


def test_save_16bit_and_activation_checkpointing_map() -> None:
    ds = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    assert mapped(ds)[0].checkpoint.save_16bit is True
    ac = {"activation_checkpointing": {"number_checkpoints": 4, "cpu_checkpointing": True}}
    cfg, notes = mapped(ac)
    assert cfg.train.activation_checkpointing == {
        "enabled": True,
        "number_checkpoints": 4,
        "cpu_checkpointing": True,
    }
    assert notes == []
    with pytest.raises(ConfigError, match="partition_activations=true is not supported: it splits"):
        from_deepspeed({"activation_checkpointing": {"partition_activations": True}})
    # The zshard YAML's explicit `false` wins over the DeepSpeed section.
    merged, notes = apply_deepspeed(
        {"train": {"activation_checkpointing": False}, "deepspeed": ac}, None, None
    )
    assert load_config(merged).train.activation_checkpointing is False
    assert any("the zshard config sets train.activation_checkpointing" in n for n in notes)


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


def test_the_docs_table_has_every_rule() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "deepspeed.md").read_text()
    for key in RULES:
        assert f"| `{key}` |" in text, key


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
    cfg, notes = load_with_deepspeed(str(yaml_path), ["optimizer.lr=0.02"], world_size=4)
    assert cfg.zero.stage == 2  # the YAML beats DeepSpeed
    assert cfg.optimizer.lr == 0.02  # --set beats both
    assert cfg.zero.reduce_bucket_size == 500_000_000  # DeepSpeed beats the default
    assert cfg.precision.dtype == "fp16" and cfg.train.steps == 5
    assert "zero_optimization.stage (the zshard config sets zero.stage: 2)" in notes
    line = warning_line(notes)
    assert "\n" not in line and line.startswith("zshard: warning: DeepSpeed config, ")


def test_flag_replaces_the_yaml_key_and_batch_is_one_unit(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 32}))
    tree = {"deepspeed": {"zero_optimization": {"stage": 1}}, "train": {"micro_batch_size": 2}}
    merged, notes = apply_deepspeed(tree, str(other), world_size=2)
    assert "deepspeed" not in merged
    cfg = load_config(merged)
    assert cfg.zero.stage == 3
    # The YAML set a batch size: DeepSpeed's are all dropped rather than mixed.
    assert cfg.train.global_batch_size is None and cfg.train.micro_batch_size == 2
    assert notes == ["train_batch_size (the zshard config sets train.micro_batch_size)"]


def test_inline_mapping_and_shorthands() -> None:
    tree = {"precision": "bf16", "deepspeed": {"fp16": {"enabled": True, "hysteresis": 4}}}
    merged, notes = apply_deepspeed(tree, None, None)
    cfg = load_config(merged)
    assert cfg.precision.dtype == "bf16"  # the YAML's shorthand wins
    assert notes == ["fp16.enabled (the zshard config sets precision.dtype: bf16)"]
    tree = {
        "zero": {"stage": 3, "offload_param": "cpu"},
        "deepspeed": {"zero_optimization": {"offload_param": {"device": "nvme", "max_in_cpu": 9}}},
    }
    merged, notes = apply_deepspeed(tree, None, None)
    z = load_config(merged).zero
    assert z.offload_param == OffloadParamConfig(device="cpu", max_in_memory=9)
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
    tree["model"] = {"name": "no_such_module:model"}
    merged, notes = apply_deepspeed(tree, None, 2)
    assert "zero" not in merged or "prefetch" not in merged["zero"]
    assert any("could not be counted" in n for n in notes)


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        apply_deepspeed({}, str(tmp_path / "missing.json"), None)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        apply_deepspeed({}, str(bad), None)
    with pytest.raises(ConfigError, match="expected a path"):
        apply_deepspeed({"deepspeed": 3}, None, None)


# -- a DeepSpeed config takes effect in the engine ------------------------------------------------

TRAIN_DS = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.05,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.1}},
    "scheduler": {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.001,
            "warmup_max_lr": 0.02,
            "warmup_num_steps": 3,
            "warmup_type": "linear",
        },
    },
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 100, "allgather_bucket_size": 60},
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def _ds_lr(t: int) -> float:
    """DeepSpeed's WarmupLR (linear) as update t runs it: the rate at last_batch_iteration t-1
    (the warm-up is max(2, 3) = 3 steps; update 0 runs at warmup_min_lr)."""
    it = t - 1
    if it < 0:
        return 0.001
    gamma = it / 3 if it < 3 else 1.0
    return 0.001 + (0.02 - 0.001) * gamma


def test_a_deepspeed_config_takes_effect_in_the_engine() -> None:
    cfg = load_config(from_deepspeed(TRAIN_DS, world_size=1)[0])
    model = _model()
    engine = zt.initialize(model, cfg)

    ref = _model()
    opt = torch.optim.AdamW(ref.parameters(), lr=1.0, weight_decay=0.1)
    lrs, norms, ref_norms = [], [], []
    for step in range(5):
        x, y = _batch(step)
        lrs.append(engine.lr)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        assert engine.step()
        norms.append(engine.grad_norm)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        for group in opt.param_groups:
            group["lr"] = _ds_lr(step)
        opt.step()
    # The warm-up, read back from the engine: DeepSpeed's clock and formula.
    assert lrs == pytest.approx([_ds_lr(t) for t in range(5)], rel=1e-12)
    # Clipping was active (every norm above 0.05) and the engine's norm is the reference's.
    assert min(ref_norms) > 0.05
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    got = dict(engine.module.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.allclose(got[name], p, rtol=1e-5, atol=1e-6), name
    # Buckets: the reducer cut each flat group into reduce_bucket_size pieces.
    buckets = engine._sink.buckets  # type: ignore[attr-defined]
    sizes = [b.stop - b.start for b in buckets]
    assert max(sizes) == 100 and len(buckets) == sum(
        math.ceil(g.numel / 100) for g in engine.groups
    )
    assert engine.config.zero.allgather_bucket_size == 60
    engine.close()
