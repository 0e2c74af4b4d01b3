"""Training configuration: types, ranges, unknown keys, overrides, batch arithmetic (pure)."""

from __future__ import annotations

import re

import pytest

from zshard.errors import ConfigError
from zshard.train import TrainConfig, ZeroConfig, ZshardConfig, load_config


def test_defaults_round_trip_through_dict() -> None:
    cfg = load_config()
    assert cfg == ZshardConfig()
    assert load_config(cfg.to_dict()) == cfg
    assert cfg.to_dict()["checkpoint"]["async"] is False  # YAML key, not the field name


def test_yaml_file_and_overrides(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "zero: {stage: 2, reduce_bucket_size: 5e8}\n"
        "precision: bf16\n"
        "checkpoint: {dir: s3://bucket/run, async: true}\n"
        "model: {name: gpt, args: {n_layer: 2}}\n"
    )
    cfg = load_config(path, ["zero.stage=3", "optimizer.betas=[0.9, 0.95]", "precision.dtype=fp16"])
    assert cfg.zero.stage == 3
    assert cfg.zero.reduce_bucket_size == 500_000_000  # YAML 1.1 reads 5e8 as a string
    assert cfg.precision.dtype == "fp16"
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.checkpoint.async_save is True
    assert cfg.checkpoint.dir == "s3://bucket/run"
    assert cfg.model.args == {"n_layer": 2}
    assert load_config(cfg) == cfg


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"zero": {"stage": 5}}, "zero.stage: expected one of 0, 1, 2, 3, got 5"),
        ({"zero": {"stage": True}}, "zero.stage: expected one of 0, 1, 2, 3, got True"),
        ({"zero": {"stages": 1}}, "zero.stages: unknown key; expected one of"),
        ({"train": {"steps": "ten"}}, "train.steps: expected int, got 'ten'"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size: expected a number > 0"),
        ({"optimizer": {"name": "lion"}}, "optimizer.name: expected one of adamw, adam, sgd"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas: expected a list of 2 numbers"),
        ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas[1]: expected a number in [0, 1)"),
        ({"optimizer": {"name": "sgd", "nesterov": True}}, "optimizer.nesterov"),
        ({"precision": {"dtype": "fp8"}}, "precision.dtype: expected one of fp32, bf16, fp16"),
        ({"precision": {"loss_scale": {"window": 0}}}, "precision.loss_scale.window"),
        ({"scheduler": {"min_lr_ratio": 2}}, "scheduler.min_lr_ratio"),
        (
            {"checkpoint": {"asynch": True}},
            "checkpoint.asynch: unknown key; expected one of async,",
        ),
        ({"dist": {"backend": "nccl", "device": "cpu"}}, "dist.backend"),
        ({"model": {"name": "pkg.mod:"}}, "model.name"),
        ({"grad_clip": -1}, "grad_clip: expected a number >= 0"),
        ({"zero": 3}, "zero: expected a mapping"),
        ({"nonsense": 1}, "nonsense: unknown key"),
    ],
)
def test_bad_values_name_the_key(source: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(source)
    assert message in str(e.value)


def test_bad_override_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match=re.escape("dotted.key=value")):
        load_config(None, ["zero.stage"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["zero.prefetch=[1"])
    with pytest.raises(ConfigError, match=re.escape("zero.prefetch: expected int, got 'two'")):
        load_config(None, ["zero.prefetch=two"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_dataclasses_validate_on_construction() -> None:
    with pytest.raises(ConfigError, match=re.escape("zero.stage")):
        ZeroConfig(stage=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ZeroConfig(3)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    ("kwargs", "world", "want"),
    [
        ({"micro_batch_size": 2, "grad_accum": 3}, 4, (2, 3, 24)),
        ({"micro_batch_size": 2, "global_batch_size": 12}, 3, (2, 2, 12)),
        ({"grad_accum": 2, "global_batch_size": 12}, 3, (2, 2, 12)),
        ({"global_batch_size": 12}, 3, (4, 1, 12)),
        ({"micro_batch_size": 5}, 2, (5, 1, 10)),
        ({"micro_batch_size": 2, "grad_accum": 2, "global_batch_size": 12}, 3, (2, 2, 12)),
        ({}, 2, (8, 1, 16)),
    ],
)
def test_batch_arithmetic(kwargs: dict, world: int, want: tuple[int, int, int]) -> None:
    assert TrainConfig(**kwargs).resolve_batch(world) == want


def test_batch_arithmetic_errors() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("not divisible by train.micro_batch_size=2 x world size 4")
    ):
        TrainConfig(micro_batch_size=2, global_batch_size=12).resolve_batch(4)
    with pytest.raises(
        ConfigError, match=re.escape("!= train.micro_batch_size=2 x train.grad_accum=2")
    ):
        TrainConfig(micro_batch_size=2, grad_accum=2, global_batch_size=12).resolve_batch(2)
    with pytest.raises(ConfigError, match="not a multiple"):
        TrainConfig(micro_batch_size=5, grad_accum=2, global_batch_size=12)
