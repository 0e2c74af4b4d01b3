"""The committed DeepSpeed ZeRO fixtures (``tests/fixtures/deepspeed/``) and DeepSpeed's own
results for them, loadable without DeepSpeed.

``tools/make_deepspeed_fixtures.py`` makes them with real DeepSpeed on CPU and documents the
layout: per fixture a save directory ``ckpt/`` (``latest`` and two tags), DeepSpeed's
``zero_to_fp32`` result and its live engine's full optimizer state per tag, and ``job.json``
(the job, counters per tag and the loss of every step).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

import torch

from tests.convert._make_deepspeed import Job

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "deepspeed")
TIES = {"head.weight": "emb.weight"}


@dataclass(frozen=True)
class Fixture:
    name: str
    root: str  # the fixture directory (ckpt/ and DeepSpeed's results)
    world_size: int
    job: Job
    record: dict[str, Any]  # job.json

    @property
    def save_dir(self) -> str:
        """DeepSpeed's save directory: ``latest`` and one directory per tag."""
        return os.path.join(self.root, "ckpt")

    @property
    def tags(self) -> list[str]:
        """Every saved tag, oldest first."""
        return sorted(self.record["tags"], key=lambda t: self.record["tags"][t]["step"])

    @property
    def latest(self) -> str:
        with open(os.path.join(self.save_dir, "latest")) as f:
            return f.read().strip()

    def tag_dir(self, tag: str) -> str:
        return os.path.join(self.save_dir, tag)

    def counters(self, tag: str) -> dict[str, Any]:
        """``step``, ``optimizer_step``, ``skipped_steps``, ``loss_scale`` at ``tag``."""
        return self.record["tags"][tag]

    def losses_from(self, step: int) -> list[float]:
        """DeepSpeed's losses of steps ``step``, ``step + 1``, …: a resumed run's curve."""
        return self.record["losses_by_step"][step:]

    def zero_to_fp32(self, tag: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` of ``tag``, and which of its
        keys were one tensor with another (alias -> first name)."""
        from safetensors import safe_open

        path = os.path.join(self.root, f"{tag}.zero_to_fp32.safetensors")
        with safe_open(path, "pt") as f:
            shared = json.loads((f.metadata() or {}).get("shared", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, shared  # noqa: SIM118

    def optimizer(self, tag: str) -> dict[str, dict[str, torch.Tensor]]:
        """The live engine's full fp32 state at ``tag``: kind (``master``, ``exp_avg``,
        ``exp_avg_sq``) -> parameter name -> tensor."""
        from safetensors.torch import load_file

        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in load_file(os.path.join(self.root, f"{tag}.optim.safetensors")).items():
            kind, _, name = key.partition(".")
            out.setdefault(kind, {})[name] = t
        return out

    def files(self, tag: str, what: str) -> dict[int, str]:
        """Data-parallel rank -> path of its ``optim`` or ``model`` states file at ``tag``."""
        out = {}
        for n in os.listdir(self.tag_dir(tag)):
            parts = n.removeprefix("bf16_").split("_")
            if n.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")) and f"_{what}_" in n:
                out[int(parts[3])] = os.path.join(self.tag_dir(tag), n)
        return out

    def copy(self, dest: str) -> str:
        """A writable copy of the save directory at ``dest``; returns ``dest``."""
        shutil.copytree(self.save_dir, dest)
        return dest


def names() -> list[str]:
    return sorted(n for n in os.listdir(FIXTURES) if os.path.isfile(_job_json(n)))


def _job_json(name: str) -> str:
    return os.path.join(FIXTURES, name, "job.json")


@cache
def load(name: str) -> Fixture:
    with open(_job_json(name)) as f:
        record = json.load(f)
    args = {f.name: record[f.name] for f in fields(Job) if f.name in record}
    args["saves"] = tuple(args.get("saves", ()))
    return Fixture(name, os.path.join(FIXTURES, name), record["world_size"], Job(**args), record)


def load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A zshard output file: its tensors and ``zshard.ties`` (alias -> stored name)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        ties = json.loads((f.metadata() or {}).get("zshard.ties", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, ties  # noqa: SIM118


# -- reading DeepSpeed's pickles in the test, independently of zshard's reader ---------------------


class _Attrs:
    """Whatever DeepSpeed object a pickle holds (loss scaler, fragment address): its fields."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Attrs:
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):
            state = {k: v for part in state if isinstance(part, dict) for k, v in part.items()}
        self.__dict__.update(state or {})


def _enum_value(value: Any) -> Any:
    return value


_DS_GLOBALS = [
    (_Attrs, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Attrs, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Attrs, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_enum_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


def torch_load(path: str) -> dict[str, Any]:
    """A DeepSpeed ``*.pt`` file, weights-only, with its few DeepSpeed objects as plain
    attribute bags (no DeepSpeed needed)."""
    with torch.serialization.safe_globals(_DS_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def optimizer_step_in_files(fx: Fixture, tag: str) -> set[int]:
    """Every ``step`` counter in the tag's optimizer files (one per flat group and rank)."""
    steps = set()
    for path in fx.files(tag, "optim").values():
        osd = torch_load(path)["optimizer_state_dict"]
        base = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")
        for st in base["state"].values():
            steps.add(int(st["step"]))
    return steps
