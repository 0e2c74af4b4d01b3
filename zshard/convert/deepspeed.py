"""DeepSpeed ZeRO checkpoints (stages 1-3) as a :class:`~zshard.convert.tensor_source.TensorSource`:
what the files of one tag (:mod:`~zshard.convert.deepspeed_files`, which also describes them)
hold as logical tensors.

Placement follows DeepSpeed's own ``zero_to_fp32.py`` (stages 1-2: a group's rank slices laid
end to end hold its parameters in ``param_shapes`` order, each followed by its alignment
padding; stage 3: every parameter is split evenly over the ranks, the last rank padded). Here
it yields pieces (file, byte offset, element range) instead of tensors: nothing is loaded, and
consolidation streams.
"""

from __future__ import annotations

import math
from typing import Any

from zshard.convert.deepspeed_files import (
    MODEL_STATES,
    DeepSpeedFormatError,
    check_model_states,
    group_states,
    load_states,
    model_dtype,
    param_shapes,
    positive_int,
    rank_files,
    required,
    resolve_tag,
    zero_stage_of,
)
from zshard.convert.pickles import read_scalar, storage_offset
from zshard.convert.tensor_source import Piece, PieceSource, SourceTensor, check_pieces
from zshard.store import dtypes

# -- the source ---------------------------------------------------------------------------------


class DeepSpeedSource(PieceSource):
    """Every logical tensor of one DeepSpeed tag: ``master`` (fp32), the optimizer state kinds,
    ``param`` (model dtype), frozen parameters (``param`` only) and ``buffer`` s."""

    format = "deepspeed"

    def __init__(self, src: str, *, tag: str | None = None, trust_pickle: bool = False) -> None:
        storage, self.tag = resolve_tag(src, tag)
        super().__init__(storage, src)
        self.trust_pickle = trust_pickle
        files = rank_files(storage)
        model0 = self._load(MODEL_STATES if storage.exists(MODEL_STATES) else files["model"][0])
        check_model_states(model0, storage.url)
        self.world_size = positive_int(model0.get("dp_world_size"), "dp_world_size", storage.url)
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
        osds = [required(o, "optimizer_state_dict", optim_keys[r]) for r, o in enumerate(optims)]
        self.zero_stage = zero_stage_of(osds[0], model0)
        self.model_dtype = model_dtype(model0)
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

    def _load(self, key: str) -> Any:
        return load_states(self.storage, key, self.trust_pickle)

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
        shapes = param_shapes(model0, self.storage.url)
        parts = [
            required(o, "single_partition_of_fp32_groups", keys[r]) for r, o in enumerate(osds)
        ]
        paddings = osds[0].get("param_alignment_paddings")
        states = [
            group_states(o, "base_optimizer_state", len(parts[r]), keys[r])
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
        for d in param_shapes(models[0], self.storage.url):
            shapes.update(d)
        subs = [required(o, "fp32_flat_groups", keys[r]) for r, o in enumerate(osds)]
        states = [
            group_states(o, "optimizer_state_dict", len(subs[r]), keys[r])
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
