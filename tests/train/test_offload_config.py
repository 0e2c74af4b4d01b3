"""Offload configuration (pure): zshard and DeepSpeed spellings, stage rules, round trips."""

from __future__ import annotations

import logging
import re

import pytest

from zshard.errors import ConfigError
from zshard.train.config import (
    OffloadOptimizerConfig,
    OffloadParamConfig,
    ZeroConfig,
    load_config,
)


def zero(**kw: object) -> ZeroConfig:
    return load_config({"zero": kw}).zero


def test_blocks_build_frozen_dataclasses_and_round_trip() -> None:
    cfg = load_config(
        {
            "zero": {
                "stage": 3,
                "offload_optimizer": {
                    "device": "nvme",
                    "path": "s3://b/swap",
                    "sub_group_size": 1e6,
                },
                "offload_param": {"device": "cpu", "pin_memory": True},
            }
        }
    )
    z = cfg.zero
    assert z.offload_optimizer == OffloadOptimizerConfig(
        device="nvme", path="s3://b/swap", sub_group_size=1_000_000
    )
    assert z.offload_param == OffloadParamConfig(device="cpu", pin_memory=True)
    assert z.offload_param.buffer_count == 5 and z.offload_optimizer.buffer_count == 4
    with pytest.raises(AttributeError):
        z.offload_param.device = "nvme"  # type: ignore[misc]
    # The YAML shape survives: a nested mapping, loadable again.
    plain = cfg.to_dict()["zero"]
    assert plain["offload_optimizer"]["path"] == "s3://b/swap"
    assert load_config(cfg.to_dict()) == cfg


def test_shorthand_none_and_overrides() -> None:
    assert zero(stage=2, offload_optimizer="cpu").offload_optimizer == OffloadOptimizerConfig()
    assert zero(stage=2, offload_optimizer={"device": "none"}).offload_optimizer is None
    assert zero(stage=2, offload_optimizer="none").offload_optimizer is None
    cfg = load_config(
        None,
        [
            "zero.stage=3",
            "zero.offload_param=nvme",
            "zero.offload_param.path=/nvme/swap",
            "zero.offload_param.max_in_memory=1e6",
        ],
    )
    assert cfg.zero.offload_param == OffloadParamConfig(
        device="nvme", path="/nvme/swap", max_in_memory=1_000_000
    )
    # Constructing the dataclass directly accepts a mapping too.
    z = ZeroConfig(stage=1, offload_optimizer={"device": "cpu"})  # type: ignore[arg-type]
    assert z.offload_optimizer == OffloadOptimizerConfig()


def test_deepspeed_names_map_or_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="zshard.train"):
        z = zero(
            stage=3,
            offload_optimizer={
                "device": "nvme",
                "nvme_path": "/local_nvme",
                "pin_memory": True,
                "buffer_count": 8,
                "fast_init": True,
                "pipeline_read": True,
                "ratio": 1.0,
            },
            offload_param={
                "device": "nvme",
                "nvme_path": "/local_nvme",
                "buffer_size": 1e8,
                "max_in_cpu": 1e9,
            },
        )
    assert z.offload_optimizer == OffloadOptimizerConfig(
        device="nvme", path="/local_nvme", pin_memory=True, buffer_count=8
    )
    assert z.offload_param == OffloadParamConfig(
        device="nvme", path="/local_nvme", max_in_memory=1_000_000_000
    )
    warned = caplog.text
    for key in ("offload_optimizer.fast_init", "offload_optimizer.pipeline_read", "buffer_size"):
        assert key in warned


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"stage": 0, "offload_optimizer": "cpu"}, "zero.offload_optimizer: needs zero.stage 1"),
        ({"stage": 2, "offload_param": "cpu"}, "zero.offload_param: needs zero.stage 3"),
        (
            {"stage": 2, "offload_optimizer": {"device": "nvme"}},
            "zero.offload_optimizer.path: device 'nvme' needs a path",
        ),
        (
            {"stage": 2, "offload_optimizer": {"device": "disk"}},
            "zero.offload_optimizer.device: expected one of none, cpu, nvme, got 'disk'",
        ),
        (
            {"stage": 3, "offload_optimizer": {"ratio": 0.3}},
            "zero.offload_optimizer.ratio: partial offload is not supported",
        ),
        (
            {"stage": 3, "offload_param": {"max_in_gpu": 1}},
            "zero.offload_param.max_in_gpu: unknown key; expected one of",
        ),
        (
            {"stage": 3, "offload_param": {"path": "/a", "nvme_path": "/b"}},
            "zero.offload_param.nvme_path: give path or nvme_path",
        ),
        (
            {"stage": 3, "offload_optimizer": {"sub_group_size": 0}},
            "zero.offload_optimizer.sub_group_size: expected a number > 0",
        ),
        (
            {"stage": 3, "offload_param": {"buffer_count": 0}},
            "zero.offload_param.buffer_count: expected a number > 0",
        ),
        (
            {"stage": 3, "offload_param": {"max_in_memory": -1}},
            "zero.offload_param.max_in_memory: expected a number >= 0",
        ),
        ({"stage": 3, "offload_param": 5}, "zero.offload_param: expected a mapping"),
    ],
)
def test_bad_blocks_name_the_key(block: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        zero(**block)


def test_path_with_device_cpu_is_unused_and_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="zshard.train"):
        z = zero(stage=1, offload_optimizer={"device": "cpu", "path": "/nvme"})
    assert z.offload_optimizer is not None and z.offload_optimizer.device == "cpu"
    assert "only used with device 'nvme'" in caplog.text
