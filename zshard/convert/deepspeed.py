"""DeepSpeed ZeRO checkpoints (stages 1-3) as a :class:`~zshard.convert.sources.TensorSource`.

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

Placement follows DeepSpeed's own ``zero_to_fp32.py`` (stages 1-2: a group's rank slices laid
end to end hold its parameters in ``param_shapes`` order, each followed by its alignment
padding; stage 3: every parameter is split evenly over the ranks, the last rank padded). Here
it yields pieces (file, byte offset, element range) instead of tensors: nothing is loaded, and
consolidation streams. The ``*.pt`` pickles are opened with ``weights_only=True`` on the meta
device; the few DeepSpeed objects inside them (loss scaler, ZeRO stage enum, fragment
addresses) are built as inert stand-ins, never imported from DeepSpeed.
"""

from __future__ import annotations

import math
import re
from typing import Any

from zshard.convert.sources import (
    Piece,
    PieceSource,
    SourceTensor,
    check_pieces,
    open_binary,
    read_scalar,
    storage_offset,
    torch_load_meta,
)
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


# -- the source ---------------------------------------------------------------------------------


class DeepSpeedSource(PieceSource):
    """Every logical tensor of one DeepSpeed tag: ``master`` (fp32), the optimizer state kinds,
    ``param`` (model dtype), frozen parameters (``param`` only) and ``buffer`` s."""

    format = "deepspeed"

    def __init__(self, src: str, *, tag: str | None = None, trust_pickle: bool = False) -> None:
        storage, self.tag = resolve_tag(src, tag)
        super().__init__(storage, src)
        self.trust_pickle = trust_pickle
        files = self._rank_files()
        model0 = self._load(MODEL_STATES if storage.exists(MODEL_STATES) else files["model"][0])
        self._check_model_states(model0)
        self.world_size = _int(model0.get("dp_world_size"), "dp_world_size", storage.url)
        optim_keys = files["optim"]
        missing = [r for r in range(self.world_size) if r not in optim_keys]
        if missing:
            raise DeepSpeedFormatError(
                f"{storage.url}: optimizer state of data-parallel rank(s) {missing} is missing "
                f"(expected {self.world_size} *_optim_states.pt files, found ranks "
                f"{sorted(optim_keys) or 'none'}); the save was incomplete"
            )
        extra = sorted(r for r in optim_keys if r >= self.world_size)
        if extra:
            raise DeepSpeedFormatError(
                f"{storage.url}: optimizer files for ranks {extra} beyond the saved world size "
                f"{self.world_size}; files from two saves are mixed"
            )
        optims = [self._load(optim_keys[r]) for r in range(self.world_size)]
        osds = [_get(o, "optimizer_state_dict", optim_keys[r]) for r, o in enumerate(optims)]
        self.zero_stage = _zero_stage_of(osds[0], model0)
        self.model_dtype = _model_dtype(model0)
        self._shared: dict[str, str] = {
            str(k): str(v) for k, v in (model0.get("shared_params") or {}).items()
        }
        if self.zero_stage <= 2:
            self._stage12(model0, osds, optim_keys)
        else:
            missing = [r for r in range(self.world_size) if r not in files["model"]]
            if missing:
                raise DeepSpeedFormatError(
                    f"{storage.url}: model states of data-parallel rank(s) {missing} are "
                    "missing; the save was incomplete"
                )
            models = [model0] + [self._load(files["model"][r]) for r in range(1, self.world_size)]
            self._stage3(models, osds, optim_keys, files["model"])
        self._buffers(model0, MODEL_STATES if storage.exists(MODEL_STATES) else files["model"][0])
        self._unlisted_frozen(model0)
        names = {t.name for t in self.tensors}
        self.ties = {a: t for a, t in self._shared.items() if t in names and a not in names}
        for t in self.tensors:
            check_pieces(t, storage.url)
        self._state(model0, osds, optim_keys)

    # -- files ------------------------------------------------------------------------------

    def _rank_files(self) -> dict[str, dict[int, str]]:
        found: dict[str, dict[int, str]] = {"optim": {}, "model": {}}
        for name in self.storage.listdir(""):
            if name.startswith("expp_rank_") or "_expert_" in name:
                raise DeepSpeedFormatError(
                    f"{self.storage.url}/{name}: mixture-of-experts checkpoints are not supported"
                )
            m = _RANK_FILE.match(name)
            if not m:
                if re.match(r"^mp_rank_(\d+)_model_states\.pt$", name) and name != MODEL_STATES:
                    raise DeepSpeedFormatError(
                        f"{self.storage.url}/{name}: tensor/pipeline-parallel checkpoints "
                        "(model-parallel rank > 0) are not supported; convert with DeepSpeed's "
                        "ds_to_universal first"
                    )
                continue
            if int(m["mp"]) != 0:
                raise DeepSpeedFormatError(
                    f"{self.storage.url}/{name}: tensor/pipeline-parallel checkpoints "
                    "(model-parallel rank > 0) are not supported"
                )
            what = "optim" if m["what"] == "optim" else "model"
            rank = int(m["rank"])
            if rank in found[what]:
                raise DeepSpeedFormatError(
                    f"{self.storage.url}: two {what} state files for rank {rank} "
                    f"({found[what][rank]}, {name})"
                )
            found[what][rank] = name
        return found

    def _load(self, key: str) -> Any:
        where = f"{self.storage.url}/{key}"
        with open_binary(self.storage, key) as f:
            obj = torch_load_meta(f, where, trust_pickle=self.trust_pickle, stand_ins=STAND_INS)
        if not isinstance(obj, dict):
            raise DeepSpeedFormatError(f"{where}: not a DeepSpeed state file (no dict inside)")
        return obj

    def _check_model_states(self, model0: dict[str, Any]) -> None:
        where = self.storage.url
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

    def _piece(self, key: str, t: Any, rel_start: int, start: int, length: int) -> Piece:
        """Elements ``[rel_start, rel_start + length)`` of file tensor ``t``, holding logical
        elements from ``start``."""
        if rel_start < 0 or rel_start + length > t.numel():
            raise DeepSpeedFormatError(
                f"{self.storage.url}/{key}: a flat buffer of {t.numel()} elements is too short "
                f"for the parameters in param_shapes; the checkpoint is inconsistent"
            )
        return Piece(key, storage_offset(t, key) + rel_start * t.element_size(), start, length)

    # -- stages 1 and 2 ---------------------------------------------------------------------

    def _stage12(self, model0: dict[str, Any], osds: list[Any], keys: dict[int, str]) -> None:
        world = self.world_size
        shapes = _param_shapes(model0, self.storage.url)
        parts = [_get(o, "single_partition_of_fp32_groups", keys[r]) for r, o in enumerate(osds)]
        paddings = osds[0].get("param_alignment_paddings")
        states = [
            _group_states(o, "base_optimizer_state", len(parts[r]), keys[r])
            for r, o in enumerate(osds)
        ]
        module = model0["module"]
        frozen = model0.get("frozen_param_fragments") or {}
        for name, shape in (model0.get("frozen_param_shapes") or {}).items():
            t = frozen.get(name)
            if t is None:
                raise DeepSpeedFormatError(f"{self.storage.url}: frozen parameter {name!r} missing")
            self._add(
                name,
                "param",
                shape,
                dtypes.from_torch(t.dtype).name,
                [self._piece(MODEL_STATES, t, 0, 0, math.prod(shape))],
            )
        for g, group_shapes in enumerate(shapes):
            if any(len(p) != len(shapes) for p in parts):
                raise DeepSpeedFormatError(
                    f"{self.storage.url}: ranks disagree on the number of parameter groups"
                )
            sizes = [parts[r][g].numel() for r in range(world)]
            starts = [sum(sizes[:r]) for r in range(world)]
            pads = paddings[g] if paddings is not None else [0] * len(group_shapes)
            kinds = _state_kinds([states[r][g] for r in range(world)], sizes)
            offset = 0
            for i, (name, shape) in enumerate(group_shapes.items()):
                numel = math.prod(shape)
                by_kind: dict[str, list[Piece]] = {"master": []}
                by_kind.update({k: [] for k in kinds})
                for r in range(world):
                    lo, hi = max(offset, starts[r]), min(offset + numel, starts[r] + sizes[r])
                    if lo >= hi:
                        continue
                    rel, start = lo - starts[r], lo - offset
                    by_kind["master"].append(self._piece(keys[r], parts[r][g], rel, start, hi - lo))
                    for k in kinds:
                        t = states[r][g][k]
                        by_kind[k].append(self._piece(keys[r], t, rel, start, hi - lo))
                self._add_trainable(name, tuple(shape), by_kind, module.get(name))
                offset += numel + int(pads[i] if i < len(pads) else 0)
            # zero_to_fp32's check: what the parameters use matches the saved slices, up to
            # DeepSpeed's alignment of each group to 2 * world size elements.
            align = 2 * world
            if math.ceil(offset / align) != math.ceil(sum(sizes) / align):
                raise DeepSpeedFormatError(
                    f"{self.storage.url}: parameter group {g} uses {offset} elements but the ranks "
                    f"saved {sum(sizes)}; the checkpoint is inconsistent"
                )

    # -- stage 3 ----------------------------------------------------------------------------

    def _stage3(
        self,
        models: list[dict[str, Any]],
        osds: list[Any],
        keys: dict[int, str],
        model_keys: dict[int, str],
    ) -> None:
        world = self.world_size
        shapes: dict[str, Any] = {}
        for d in _param_shapes(models[0], self.storage.url):
            shapes.update(d)
        subs = [_get(o, "fp32_flat_groups", keys[r]) for r, o in enumerate(osds)]
        states = [
            _group_states(o, "optimizer_state_dict", len(subs[r]), keys[r])
            for r, o in enumerate(osds)
        ]
        for name, shape in (models[0].get("frozen_param_shapes") or {}).items():
            numel = math.prod(shape)
            per = math.ceil(numel / world)
            pieces, dtype = [], "float32"
            for r in range(world):
                n = max(0, min(per, numel - r * per))
                frag = (models[r].get("frozen_param_fragments") or {}).get(name)
                if frag is None:
                    raise DeepSpeedFormatError(
                        f"{self.storage.url}/{model_keys[r]}: frozen parameter {name!r} missing"
                    )
                dtype = dtypes.from_torch(frag.dtype).name
                if n:
                    pieces.append(self._piece(model_keys[r], frag, 0, r * per, n))
            self._add(name, "param", tuple(shape), dtype, pieces)
        for r in range(1, world):
            if [s.numel() for s in subs[r]] != [s.numel() for s in subs[0]]:
                raise DeepSpeedFormatError(
                    f"{self.storage.url}: rank {r}'s fp32 sub-groups differ in size from rank 0's"
                )
        sub_sizes = [s.numel() for s in subs[0]]
        sub_starts = [sum(sub_sizes[:k]) for k in range(len(sub_sizes))]
        kinds = _state_kinds(
            [st[k] for st in states for k in range(len(sub_sizes))],
            [n for _ in range(world) for n in sub_sizes],
        )
        offset = 0  # position in each rank's sub-groups laid end to end
        for name, shape in shapes.items():
            numel = math.prod(shape)
            per = math.ceil(numel / world)
            by_kind: dict[str, list[Piece]] = {"master": [], **{k: [] for k in kinds}}
            for r in range(world):
                n = max(0, min(per, numel - r * per))
                pos = offset
                while n > 0:
                    k = _sub_group_at(sub_starts, sub_sizes, pos, self.storage.url)
                    take = min(n, sub_starts[k] + sub_sizes[k] - pos)
                    start = r * per + (pos - offset)
                    rel = pos - sub_starts[k]
                    by_kind["master"].append(self._piece(keys[r], subs[r][k], rel, start, take))
                    for kind in kinds:
                        t = states[r][k][kind]
                        by_kind[kind].append(self._piece(keys[r], t, rel, start, take))
                    pos, n = pos + take, n - take
            for ps in by_kind.values():
                ps.sort(key=lambda p: p.start)
            self._add_trainable(name, tuple(shape), by_kind, None)
            offset += per
        if offset != sum(sub_sizes):
            raise DeepSpeedFormatError(
                f"{self.storage.url}: parameters use {offset} elements per rank but each rank "
                f"saved {sum(sub_sizes)}; the checkpoint is inconsistent"
            )

    # -- logical tensors --------------------------------------------------------------------

    def _add(
        self,
        name: str,
        kind: str,
        shape: Any,
        dtype: str,
        pieces: list[Piece],
        stored: str | None = None,
    ) -> None:
        self.tensors.append(
            SourceTensor(name, kind, tuple(int(s) for s in shape), dtype, tuple(pieces), stored)
        )

    def _add_trainable(
        self, name: str, shape: tuple[int, ...], by_kind: dict[str, list[Piece]], module_t: Any
    ) -> None:
        model = self.model_dtype
        master = by_kind.pop("master")
        if model == "float32":
            # As in zshard's own fp32 checkpoints, the fp32 master *is* the parameter.
            self._add(name, "param", shape, "float32", master)
        else:
            if module_t is not None and module_t.numel() == math.prod(shape):
                # Stages 1-2 save the model-dtype parameters whole in the module state dict.
                self._add(
                    name,
                    "param",
                    shape,
                    dtypes.from_torch(module_t.dtype).name,
                    [self._piece(MODEL_STATES, module_t, 0, 0, module_t.numel())]
                    if module_t.numel()
                    else [],
                )
            else:
                # Stage 3 saves no model-dtype copy: it is the master rounded, as DeepSpeed does.
                self._add(name, "param", shape, model, master, stored="float32")
            self._add(name, "master", shape, "float32", master)
        for kind, pieces in by_kind.items():
            self._add(name, kind, shape, "float32", pieces)

    def _buffers(self, model0: dict[str, Any], key: str) -> None:
        module = model0["module"]
        for name in model0.get("buffer_names") or []:
            t = module.get(name)
            if t is None:
                continue  # non-persistent buffers are not in the state dict
            pieces = [self._piece(key, t, 0, 0, t.numel())] if t.numel() else []
            self._add(name, "buffer", tuple(t.shape), dtypes.from_torch(t.dtype).name, pieces)

    def _unlisted_frozen(self, model0: dict[str, Any]) -> None:
        """Stage 1 records frozen parameters nowhere but in the module state dict (DeepSpeed
        saves ``frozen_param_shapes`` from stage 2 on, so zero_to_fp32 drops them)."""
        if self.zero_stage == 3:
            return  # stage 3 module tensors are empty placeholders
        known = {t.name for t in self.tensors} | set(self._shared)
        for name, t in model0["module"].items():
            if name in known or not hasattr(t, "untyped_storage"):
                continue
            pieces = [self._piece(MODEL_STATES, t, 0, 0, t.numel())] if t.numel() else []
            self._add(name, "param", tuple(t.shape), dtypes.from_torch(t.dtype).name, pieces)

    def _state(self, model0: dict[str, Any], osds: list[Any], keys: dict[int, str]) -> None:
        """Step counters, optimizer hyperparameters and loss scale, in the engine's terms."""
        self.step = int(model0.get("global_steps") or 0)
        base_key = "base_optimizer_state" if self.zero_stage <= 2 else "optimizer_state_dict"
        base = osds[0].get(base_key)
        opt: dict[str, Any] = {}
        if isinstance(base, dict):
            groups = base.get("param_groups") or [{}]
            pg = groups[0] if isinstance(groups[0], dict) else {}
            if "betas" in pg:
                opt["name"] = "adamw" if pg.get("decoupled_weight_decay", True) else "adam"
            elif "momentum" in pg:
                opt["name"] = "sgd"
            for k in ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov"):
                if isinstance(pg.get(k), (int, float, bool, tuple, list)):
                    v = pg[k]
                    opt[k] = list(v) if isinstance(v, tuple) else v
            for st in (base.get("state") or {}).values():
                if isinstance(st, dict) and "step" in st:
                    s = st["step"]
                    opt["step"] = (
                        int(read_scalar(self.storage, keys[0], s))
                        if hasattr(s, "untyped_storage")
                        else int(s)
                    )
                    break
        scaler = osds[0].get("loss_scaler")
        scale = getattr(scaler, "cur_scale", None)
        ds_config = model0.get("ds_config")
        cfg = ds_config if isinstance(ds_config, dict) else {}
        accum = cfg.get("gradient_accumulation_steps")
        train: dict[str, Any] = {
            "global_step": self.step,
            "micro_steps": self.step * (accum if isinstance(accum, int) and accum > 0 else 1),
            "skipped_steps": int(model0.get("skipped_steps") or 0),
            "optimizer": opt,
        }
        if isinstance(scale, (int, float)):
            train["loss_scaler"] = {"scale": float(scale), "overflows_in_row": 0, "good_steps": 0}
        self.state = {
            "train": train,
            "source": {
                "format": "deepspeed",
                "path": self.url,
                "tag": self.tag,
                "zero_stage": self.zero_stage,
                "world_size": self.world_size,
                "dtype": self.model_dtype,
                "ds_version": str(model0.get("ds_version") or ""),
                "ds_config": _jsonable(ds_config) if isinstance(ds_config, dict) else None,
            },
        }


# -- helpers ------------------------------------------------------------------------------------


def _get(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise DeepSpeedFormatError(f"{where}: no {key!r}; not a DeepSpeed ZeRO state file")
    return d[key]


def _int(v: Any, what: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DeepSpeedFormatError(f"{where}: bad {what} {v!r} in the model states")
    return v


def _zero_stage_of(osd: Any, model0: dict[str, Any]) -> int:
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


def _model_dtype(model0: dict[str, Any]) -> str:
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


def _param_shapes(model0: dict[str, Any], where: str) -> list[dict[str, Any]]:
    shapes = model0["param_shapes"]
    if isinstance(shapes, dict):
        shapes = [shapes]
    if not isinstance(shapes, list) or not all(isinstance(s, dict) for s in shapes):
        raise DeepSpeedFormatError(f"{where}: param_shapes is not a list of name -> shape maps")
    return shapes


def _group_states(osd: dict[str, Any], key: str, groups: int, where: str) -> list[dict[str, Any]]:
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


def _state_kinds(states: list[dict[str, Any]], sizes: list[int]) -> list[str]:
    """Optimizer state keys holding one value per element (``exp_avg``...), in every group."""
    common: list[str] | None = None
    for st, n in zip(states, sizes):
        keys = [
            k
            for k, v in st.items()
            # The last rank's state covers its padded slice: it may be longer than the master.
            if isinstance(k, str) and hasattr(v, "numel") and v.dim() == 1 and v.numel() >= n
        ]
        common = keys if common is None else [k for k in common if k in keys]
    return common or []


def _sub_group_at(starts: list[int], sizes: list[int], pos: int, where: str) -> int:
    for k, (s, n) in enumerate(zip(starts, sizes)):
        if s <= pos < s + n:
            return k
    raise DeepSpeedFormatError(f"{where}: parameters run past the saved fp32 sub-groups")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    return str(obj)
