"""DeepSpeed ZeRO checkpoints, the files: finding the tag, listing and loading its pickles.

A DeepSpeed save directory holds ``latest`` (the newest tag) and one directory per tag::

    mp_rank_00_model_states.pt                      stages 1-2: module state dict (model dtype),
                                                    param_shapes, frozen params, shared_params,
                                                    buffer_names, global_steps, ds_config
    zero_pp_rank_<r>_mp_rank_00_model_states.pt     stage 3: the same per data-parallel rank,
                                                    frozen params as per-rank fragments
    [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt
        optimizer_state_dict:
          stages 1-2: single_partition_of_fp32_groups[g]  rank r's slice of flat group g (fp32)
                      base_optimizer_state.state[g]        exp_avg, exp_avg_sq, step of that slice
                      param_alignment_paddings[g][i]       gap after parameter i of group g
          stage 3:    fp32_flat_groups[s]                  rank r's sub-group s; each parameter
                      optimizer_state_dict.state[s]        contributes ceil(numel / world) elements
                                                           to every rank, in param_shapes order

The ``*.pt`` pickles are opened with ``weights_only=True`` on the meta device
(:mod:`~zshard.convert.pickles`); the few DeepSpeed objects inside them (loss scaler, ZeRO stage
enum, fragment addresses) are built as inert stand-ins, never imported from DeepSpeed. What the
files mean as logical tensors is :mod:`zshard.convert.deepspeed`.
"""

from __future__ import annotations

import re
from typing import Any

from zshard.convert.pickles import open_binary, torch_load_meta
from zshard.errors import InvalidArgumentError, NotACheckpointError, ZshardError
from zshard.store import dtypes
from zshard.store.storage import Storage, open_storage

MODEL_STATES = "mp_rank_00_model_states.pt"
_RANK_FILE = re.compile(
    r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_(?P<mp>\d+)_(?P<what>optim|model)_states\.pt$"
)


class DeepSpeedFormatError(ZshardError, ValueError):
    """A DeepSpeed checkpoint is incomplete, inconsistent or of an unsupported kind."""


# -- inert stand-ins for the DeepSpeed objects inside the pickles -------------------------------


class _Inert:
    """Built by the weights-only unpickler in place of a DeepSpeed class: attributes only."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class LossScalerState(_Inert):
    """deepspeed.runtime.fp16.loss_scaler.(Dynamic)LossScaler: ``cur_scale``, ``cur_iter``..."""


class FragmentAddress(_Inert):
    """deepspeed.utils.tensor_fragment.fragment_address: ``numel``, ``start``."""


def _zero_stage(value: Any) -> int:
    """deepspeed.runtime.zero.config.ZeroStageEnum(value) -> the plain stage number."""
    return int(value)


STAND_INS: list[tuple[Any, str]] = [
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.LossScalerBase"),
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


# -- finding the tag directory ------------------------------------------------------------------


def _has_model_states(storage: Storage) -> bool:
    return storage.exists(MODEL_STATES) or storage.exists(
        "zero_pp_rank_0_mp_rank_00_model_states.pt"
    )


def is_deepspeed(storage: Storage) -> bool:
    """A tag directory, or a save directory whose ``latest`` (or some child) is one."""
    if _has_model_states(storage):
        return True
    if storage.exists("latest") and not storage.isdir("latest"):
        tag = _read_latest(storage)
        if tag and _safe_name(tag) and _has_model_states(storage.child(tag)):
            return True
    return any(_has_model_states(storage.child(n)) for n in _child_dirs(storage))


def _child_dirs(storage: Storage) -> list[str]:
    return [n for n in storage.listdir("") if _safe_name(n) and storage.isdir(n)][:1000]


def _safe_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _read_latest(storage: Storage) -> str:
    raw = storage.read("latest")
    try:
        return raw.decode().strip()
    except UnicodeDecodeError:
        return ""


def resolve_tag(src: str, tag: str | None) -> tuple[Storage, str]:
    """The tag directory of ``src`` (a save directory or a tag directory) and its tag."""
    storage = open_storage(src)
    if tag is not None:
        if (
            not _safe_name(tag)
            or not storage.isdir(tag)
            or not _has_model_states(storage.child(tag))
        ):
            tags = sorted(n for n in _child_dirs(storage) if _has_model_states(storage.child(n)))
            raise InvalidArgumentError(
                f"{src}: DeepSpeed tag {tag!r} does not exist (tags here: "
                f"{', '.join(tags) or 'none'})"
            )
        return storage.child(tag), tag
    if _has_model_states(storage):
        return storage, src.rstrip("/").rpartition("/")[2]
    if storage.exists("latest"):
        latest = _read_latest(storage)
        if not _safe_name(latest) or not _has_model_states(storage.child(latest)):
            raise DeepSpeedFormatError(
                f"{src}/latest names tag {latest!r}, which is not a DeepSpeed tag directory here; "
                "pass --tag"
            )
        return storage.child(latest), latest
    tags = sorted(n for n in _child_dirs(storage) if _has_model_states(storage.child(n)))
    if tags:
        raise InvalidArgumentError(
            f"{src}: no 'latest' file; choose a tag with --tag ({', '.join(tags)})"
        )
    raise NotACheckpointError(f"{src}: not a DeepSpeed checkpoint directory")


# -- the files of a tag -------------------------------------------------------------------------


def rank_files(storage: Storage) -> dict[str, dict[int, str]]:
    """The data-parallel rank files of a tag directory: ``{"optim": {rank: name}, "model": {...}}``
    (``model`` only at stage 3); refuses mixture-of-experts and model-parallel saves."""
    found: dict[str, dict[int, str]] = {"optim": {}, "model": {}}
    for name in storage.listdir(""):
        if name.startswith("expp_rank_") or "_expert_" in name:
            raise DeepSpeedFormatError(
                f"{storage.url}/{name}: mixture-of-experts checkpoints are not supported"
            )
        m = _RANK_FILE.match(name)
        if not m:
            if re.match(r"^mp_rank_(\d+)_model_states\.pt$", name) and name != MODEL_STATES:
                raise DeepSpeedFormatError(
                    f"{storage.url}/{name}: tensor/pipeline-parallel checkpoints "
                    "(model-parallel rank > 0) are not supported; convert with DeepSpeed's "
                    "ds_to_universal first"
                )
            continue
        if int(m["mp"]) != 0:
            raise DeepSpeedFormatError(
                f"{storage.url}/{name}: tensor/pipeline-parallel checkpoints "
                "(model-parallel rank > 0) are not supported"
            )
        what = "optim" if m["what"] == "optim" else "model"
        rank = int(m["rank"])
        if rank in found[what]:
            raise DeepSpeedFormatError(
                f"{storage.url}: two {what} state files for rank {rank} "
                f"({found[what][rank]}, {name})"
            )
        found[what][rank] = name
    return found


def load_states(storage: Storage, key: str, trust_pickle: bool) -> Any:
    """One ``*_states.pt`` file, opened without its data (tensors on ``meta``)."""
    where = f"{storage.url}/{key}"
    with open_binary(storage, key) as f:
        obj = torch_load_meta(f, where, trust_pickle=trust_pickle, stand_ins=STAND_INS)
    if not isinstance(obj, dict):
        raise DeepSpeedFormatError(f"{where}: not a DeepSpeed state file (no dict inside)")
    return obj


def check_model_states(model0: dict[str, Any], where: str) -> None:
    """Model states of a ZeRO checkpoint without model parallelism, or a one-line error."""
    for key in ("module", "param_shapes", "buffer_names"):
        if key not in model0:
            raise DeepSpeedFormatError(f"{where}: model states have no {key!r}; not ZeRO")
    if model0["param_shapes"] is None:
        raise DeepSpeedFormatError(
            f"{where}: a checkpoint without ZeRO (no param_shapes); its module state dict in "
            f"{MODEL_STATES} is a plain torch state dict"
        )
    if int(model0.get("mp_world_size") or 1) != 1:
        raise DeepSpeedFormatError(
            f"{where}: model-parallel world size {model0['mp_world_size']} is not supported"
        )


# -- fields of the loaded states ----------------------------------------------------------------


def required(d: Any, key: str, where: str) -> Any:
    """``d[key]``, or an error saying the file is not a ZeRO state file."""
    if not isinstance(d, dict) or key not in d:
        raise DeepSpeedFormatError(f"{where}: no {key!r}; not a DeepSpeed ZeRO state file")
    return d[key]


def positive_int(v: Any, what: str, where: str) -> int:
    """``v`` if it is an integer >= 1 (a world size), else an error."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DeepSpeedFormatError(f"{where}: bad {what} {v!r} in the model states")
    return v


def zero_stage_of(osd: Any, model0: dict[str, Any]) -> int:
    """The ZeRO stage (1-3) the optimizer states of rank 0 were saved at."""
    stage = osd.get("zero_stage") if isinstance(osd, dict) else None
    if stage is None:
        if "single_partition_of_fp32_groups" in osd:
            stage = 1  # DeepSpeed's BF16_Optimizer: ZeRO-1 layout without the stage field
        else:
            cfg = model0.get("ds_config") or {}
            stage = (cfg.get("zero_optimization") or {}).get("stage")
    if stage not in (1, 2, 3):
        raise DeepSpeedFormatError(f"unsupported ZeRO stage {stage!r} (1, 2 or 3 are supported)")
    return int(stage)


def model_dtype(model0: dict[str, Any]) -> str:
    """The logical dtype the model trained in (its parameters, else the config's precision)."""
    module = model0["module"]
    for shapes in model0["param_shapes"]:
        for name in shapes:
            t = module.get(name)
            if t is not None and t.is_floating_point():
                return dtypes.from_torch(t.dtype).name
    cfg = model0.get("ds_config") or {}
    if (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled"):
        return "bfloat16"
    if (cfg.get("fp16") or {}).get("enabled"):
        return "float16"
    return "float32"


def param_shapes(model0: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Per parameter group, its trainable parameters' names and shapes in flat order."""
    shapes = model0["param_shapes"]
    if isinstance(shapes, dict):
        shapes = [shapes]
    if not isinstance(shapes, list) or not all(isinstance(s, dict) for s in shapes):
        raise DeepSpeedFormatError(f"{where}: param_shapes is not a list of name -> shape maps")
    return shapes


def group_states(osd: dict[str, Any], key: str, groups: int, where: str) -> list[dict[str, Any]]:
    """Per flat group (stages 1-2) or sub-group (stage 3): the torch optimizer state of its one
    flat parameter."""
    base = osd.get(key)
    if isinstance(base, list):  # older DeepSpeed: one state dict per group
        return [b if isinstance(b, dict) else {} for b in base][:groups] + [{}] * (
            groups - len(base)
        )
    if not isinstance(base, dict):
        return [{} for _ in range(groups)]
    state = base.get("state") or {}
    order: list[Any] = []
    for pg in base.get("param_groups") or []:
        order.extend(pg.get("params") or [])
    if len(order) != groups:
        order = list(range(groups))
    out = [state.get(pid, {}) for pid in order]
    return [s if isinstance(s, dict) else {} for s in out]
