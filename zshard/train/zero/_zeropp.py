"""ZeRO++ for stage 3 (Wang et al., 2023): quantized weight all-gather (qwZ), hierarchical
partitioning (hpZ) and quantized gradient reduction (qgZ).

Nodes. ``N`` ranks form ``M`` nodes of ``L`` consecutive ranks: ``L`` is ``zero.hpz_partition_size``
when set (> 1), else the ranks torch's launcher started together (``LOCAL_WORLD_SIZE``). Rank
``r`` is local rank ``r % L`` of node ``r // L``; its *peers* are the ranks with the same local
rank on the other nodes. :class:`Hierarchy` holds the two subgroups a rank belongs to (its node,
its peers), created once at start-up.

- **qwZ**: a training gather (forward, or backward without hpZ) sends each rank's partition as
  an int8 record with one fp32 scale per block of ``zero.quantization_block_size`` elements
  (``_quant``) and dequantizes every rank's record, its own included, into the module dtype: all
  ranks compute with the same weights. The fp32 master and the optimizer state are untouched,
  and gathers outside training (``gathered_parameters``, ``save_16bit_model``) stay exact.
- **hpZ**: the first training gather of a module in a micro step also keeps this rank's
  ``1/L`` slice of the gathered (module-dtype) parameters, its *secondary partition*; until the
  end of that backward, gathers of the module are all-gathers of the secondary partitions inside
  the node. Extra memory: ``padded_numel / L`` elements per gathered module (``2Ψ/L`` bytes in
  bf16), allocated once.
- **qgZ**: a module's gradient (N chunks of P elements, chunk c owned by rank c) is reduced by
  two all-to-alls of block-quantized records (int8, or int4 two per byte). Hop 1, inside the
  node: each rank sends to local rank l the chunks owned by local rank l of every node (chunks
  ``m*L + l``), receives those of its own local rank from every rank of the node, and sums them
  in fp32. Hop 2, across nodes among peers: it sends to the peer on node m its partial sum of
  chunk ``m*L + l``, receives every node's partial sum of its own chunk, and sums them in fp32:
  this rank's reduced partition, as a reduce-scatter gives it. A hop over one rank is a local
  copy, never quantized. Hop 2 starts when hop 1 is waited for.

Every collective goes through :class:`Comm` (subgroups share the main group's counters; cross-node
bytes are counted by the launcher's nodes, so an hpZ group smaller than a node stays inside it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zshard.errors import ConfigError
from zshard.train.zero._comm import Comm, Handle
from zshard.train.zero._flat import FlatParamGroup
from zshard.train.zero._quant import DEFAULT_BLOCK, Codec
from zshard.train.zero._slots import SlotPool

_ALIGN = 16  # bytes: every carved view starts aligned for any dtype


@dataclass(frozen=True, kw_only=True)
class ZeroPPOptions:
    """The ZeRO++ part of ``ZeroConfig``."""

    quantized_weights: bool = False
    quantized_gradients: bool = False
    gradient_bits: int = 8  # 8 or 4
    hpz_partition_size: int = 1  # 1 = off
    block: int = DEFAULT_BLOCK

    @property
    def enabled(self) -> bool:
        return self.quantized_weights or self.quantized_gradients or self.hpz_partition_size > 1

    @classmethod
    def from_config(cls, zero: Any) -> ZeroPPOptions | None:
        """From a ``ZeroConfig``; None when no ZeRO++ option is on."""
        opts = cls(
            quantized_weights=zero.quantized_weights,
            quantized_gradients=zero.quantized_gradients,
            gradient_bits=zero.quantized_gradients_bits,
            hpz_partition_size=zero.hpz_partition_size,
            block=zero.quantization_block_size,
        )
        return opts if opts.enabled else None

    def describe(self) -> str:
        parts = []
        if self.quantized_weights:
            parts.append(f"qwZ int8 weights (blocks of {self.block})")
        if self.hpz_partition_size > 1:
            parts.append(f"hpZ secondary partitions over {self.hpz_partition_size} ranks")
        if self.quantized_gradients:
            parts.append(f"qgZ int{self.gradient_bits} gradients (blocks of {self.block})")
        return "ZeRO++: " + ", ".join(parts)


def node_size(opts: ZeroPPOptions, world_size: int, local_world_size: int) -> int:
    """Ranks per ZeRO++ node (``L``); a :class:`ConfigError` when the options do not fit."""
    h = opts.hpz_partition_size
    if h > 1:
        if h > local_world_size:
            raise ConfigError(
                f"zero.hpz_partition_size: {h} exceeds the {local_world_size} ranks of a node "
                "(LOCAL_WORLD_SIZE)"
            )
        if world_size % h:
            raise ConfigError(
                f"zero.hpz_partition_size: {h} does not divide the world size {world_size}"
            )
        if local_world_size % h:
            raise ConfigError(
                f"zero.hpz_partition_size: {h} does not divide the {local_world_size} ranks of "
                "a node (LOCAL_WORLD_SIZE): its groups would straddle nodes"
            )
        return h
    lws = max(1, min(local_world_size, world_size))
    if world_size % lws:
        raise ConfigError(
            f"ZeRO++: nodes of {lws} ranks (LOCAL_WORLD_SIZE) do not divide the world size "
            f"{world_size}; set zero.hpz_partition_size to a divisor of both"
        )
    return lws


def check_zeropp(zero: Any, world_size: int, local_world_size: int) -> None:
    """Launch-time check of a ``ZeroConfig``'s ZeRO++ options against the planned ranks."""
    opts = ZeroPPOptions.from_config(zero)
    if opts is not None and world_size > 1:
        node_size(opts, world_size, local_world_size)


def _carve(buf: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Consecutive uint8 views of ``buf``, each of ``sizes[i]`` bytes, aligned to _ALIGN."""
    out, at = [], 0
    for s in sizes:
        out.append(buf[at : at + s])
        at += -(-s // _ALIGN) * _ALIGN
    return out


def _carved_nbytes(sizes: Sequence[int]) -> int:
    return sum(-(-s // _ALIGN) * _ALIGN for s in sizes)


class Hierarchy:
    """This rank's node and peer subgroups (collective to build: every rank, same order)."""

    def __init__(self, comm: Comm, node: int) -> None:
        n = comm.world_size
        self.world_size = n
        self.node_size = node
        self.nodes = n // node
        self.local_rank = comm.rank % node
        self.node_rank = comm.rank // node
        node_comm = peer_comm = None
        for m in range(self.nodes):
            c = comm.subgroup(range(m * node, (m + 1) * node))
            node_comm = c if m == self.node_rank else node_comm
        for lr in range(node):
            c = comm.subgroup(range(lr, n, node))
            peer_comm = c if lr == self.local_rank else peer_comm
        assert node_comm is not None and peer_comm is not None
        self.node: Comm = node_comm
        self.peers: Comm = peer_comm


def _completed() -> Handle:
    h = Handle(None, "local", [])
    h.wait()
    return h


class _TwoHops(Handle):
    """A collective of two hops: the second is started (``second()``) once the first has been
    waited for; waiting for this handle waits for both, then runs its own callbacks."""

    def __init__(self, first: Handle, second: Callable[[], Handle]) -> None:
        super().__init__(None, "all_to_all", [])
        self._first = first
        self._second = second

    def wait(self) -> bool:
        if self.done:
            return True
        self._first.wait()
        self._second().wait()
        return super().wait()


class HierarchicalReduceScatter:
    """qgZ's reduction: ``out (P,) += Σ_ranks full[rank*P:(rank+1)*P]`` by two all-to-alls
    (see the module doc). Buffers for ``slots`` reductions in flight, of up to ``max_partition``
    elements each, are allocated once; ``bits`` None sends values unquantized."""

    def __init__(
        self,
        hier: Hierarchy,
        *,
        bits: int | None,
        block: int,
        dtype: torch.dtype,
        max_partition: int,
        slots: int,
        device: torch.device,
    ) -> None:
        self.hier = hier
        self.hop1 = Codec(bits, block, dtype)  # gradients in the module (or grad) dtype
        self.hop2 = Codec(bits, block, torch.float32)  # fp32 partial sums
        self.dtype = dtype
        self.max_partition = max_partition
        self._pool = SlotPool(slots, _carved_nbytes(self._sizes(max_partition)), device)

    @property
    def nbytes(self) -> int:
        return self._pool.nbytes

    def _sizes(self, p: int) -> list[int]:
        lsz, m = self.hier.node_size, self.hier.nodes
        rec1, rec2 = self.hop1.nbytes(m * p), self.hop2.nbytes(p)
        return [lsz * rec1, lsz * rec1, 4 * m * p, m * rec2, m * rec2, 4 * p]

    def start(self, full: torch.Tensor, out: torch.Tensor) -> Handle:
        """Start reducing ``full`` (N*P,) into ``out`` (P,) (added to it). ``full`` may be reused
        once this returns (it is encoded at once); ``out`` is written when the handle completes.
        """
        hier = self.hier
        lsz, m = hier.node_size, hier.nodes
        p = out.numel()
        if p > self.max_partition or full.numel() != hier.world_size * p:
            raise ValueError(f"qgZ: partition of {p} elements does not fit its buffers")
        i = self._pool.take()
        own = i is None
        if own:  # every slot in flight (callers bound that): a buffer for this one only
            mem = torch.empty(_carved_nbytes(self._sizes(p)), dtype=torch.uint8, device=full.device)
        else:
            assert i is not None
            mem = self._pool.view(i, torch.uint8, self._pool.slot_bytes)
        send1, recv1, acc1_b, send2, recv2, acc2_b = _carve(mem, self._sizes(p))
        acc1 = acc1_b.view(torch.float32).view(m, p)  # partial sums of chunks m*L + local
        acc2 = acc2_b.view(torch.float32)
        rec1, rec2 = self.hop1.nbytes(m * p), self.hop2.nbytes(p)
        # Hop 1: row l of the send buffer is what local rank l reduces: chunks m*L + l.
        by_local = full.view(m, lsz, p).transpose(0, 1)  # (L, M, P)
        if lsz == 1:  # one rank per node: nothing to exchange inside it
            acc1.copy_(by_local[0])
            first = _completed()
        else:
            self.hop1.encode(by_local, send1.view(lsz, rec1))
            first = hier.node.all_to_all(recv1, send1, async_op=True)

            def sum_hop1() -> None:
                acc1.zero_()
                rows = recv1.view(lsz, rec1)
                for r in range(lsz):
                    self.hop1.decode(rows[r : r + 1], m * p, acc1.view(1, -1), accumulate=True)

            first.then(sum_hop1)

        def start_hop2() -> Handle:
            if m == 1:  # one node: nothing to exchange across nodes
                acc2.copy_(acc1[0])
                return _completed()
            self.hop2.encode(acc1, send2.view(m, rec2))
            h = hier.peers.all_to_all(recv2, send2, async_op=True)

            def sum_hop2() -> None:
                acc2.zero_()
                rows = recv2.view(m, rec2)
                for r in range(m):
                    self.hop2.decode(rows[r : r + 1], p, acc2.view(1, -1), accumulate=True)

            return h.then(sum_hop2)

        def finish() -> None:
            out.add_(acc2.to(out.dtype))
            if not own:
                assert i is not None
                self._pool.give(i)

        return _TwoHops(first, start_hop2).then(finish)


class ZeroPP:
    """The ZeRO++ side of :class:`Stage3`: training gathers (qwZ, hpZ) and gradient reduction
    (qgZ) of the flat groups, with their buffers allocated once."""

    def __init__(
        self,
        comm: Comm,
        groups: Sequence[FlatParamGroup],
        opts: ZeroPPOptions,
        device: torch.device,
        *,
        prefetch: int,
        slots: int,
    ) -> None:
        self.comm = comm
        self.opts = opts
        self.device = device
        node = node_size(opts, comm.world_size, comm.local_world_size)
        self.hier = Hierarchy(comm, node)
        n = comm.world_size
        gathered = [g for g in groups if not g.persistent and g.dtype.is_floating_point]
        self._applies = {g.name for g in gathered}
        # hpZ: this rank's slice of each gathered module, valid from its first training gather
        # of a micro step to the end of that backward.
        self.secondary: dict[str, torch.Tensor] = {}
        if opts.hpz_partition_size > 1:
            for g in gathered:
                self.secondary[g.name] = torch.empty(
                    g.padded_numel // node, dtype=g.dtype, device=device
                )
        self._valid: set[str] = set()
        # qwZ: send record + N received records per gather in flight.
        self._wcodec = Codec(8, opts.block) if opts.quantized_weights else None
        self._gpool: SlotPool | None = None
        if self._wcodec is not None and gathered:
            rec = max(self._wcodec.nbytes(g.partition_numel) for g in gathered)
            self._gpool = SlotPool(prefetch + 2, (n + 1) * rec, device)
        # qgZ: one set of reduction buffers per staging slot of Stage3.
        self.reducer: HierarchicalReduceScatter | None = None
        trainable = [g for g in groups if g.trainable]
        if opts.quantized_gradients and trainable:
            dtypes = {g.dtype for g in trainable}
            self.reducer = HierarchicalReduceScatter(
                self.hier,
                bits=opts.gradient_bits,
                block=opts.block,
                dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
                max_partition=max(g.partition_numel for g in trainable),
                slots=slots,
                device=device,
            )

    # -- accounting ----------------------------------------------------------------------------

    def buffer_bytes(self) -> int:
        """Staging buffers (qwZ records, qgZ hops), allocated once."""
        return (self._gpool.nbytes if self._gpool is not None else 0) + (
            self.reducer.nbytes if self.reducer is not None else 0
        )

    def secondary_bytes(self) -> int:
        """hpZ's secondary partitions."""
        return sum(t.numel() * t.element_size() for t in self.secondary.values())

    def info(self) -> dict[str, Any]:
        o = self.opts
        return {
            "node_size": self.hier.node_size,
            "nodes": self.hier.nodes,
            "quantized_weights": o.quantized_weights,
            "hpz_partition_size": o.hpz_partition_size,
            "quantized_gradients": o.gradient_bits if o.quantized_gradients else 0,
            "block": o.block,
        }

    # -- gathers -------------------------------------------------------------------------------

    def invalidate(self) -> None:
        """The end of a micro step (or new parameter values): no secondary partition is valid."""
        self._valid.clear()

    def start_gather(self, g: FlatParamGroup, part: torch.Tensor, buf: torch.Tensor) -> Handle:
        """A training gather of ``g`` into ``buf`` (N*P,): from the node's secondary partitions
        when valid (hpZ), else from every rank's ``part``, quantized with qwZ."""
        if g.name not in self._applies:
            return self.comm.all_gather(buf, part, async_op=True)
        sec = self.secondary.get(g.name)
        if sec is not None and g.name in self._valid:
            return self.hier.node.all_gather(buf, sec, async_op=True)
        h = self._gather_primary(part, buf)
        if sec is not None:
            lo = self.hier.local_rank * sec.numel()

            def keep() -> None:
                sec.copy_(buf[lo : lo + sec.numel()])
                self._valid.add(g.name)

            h.then(keep)
        return h

    def _gather_primary(self, part: torch.Tensor, buf: torch.Tensor) -> Handle:
        codec = self._wcodec
        if codec is None:
            return self.comm.all_gather(buf, part, async_op=True)
        n, world = part.numel(), self.comm.world_size
        rec = codec.nbytes(n)
        pool = self._gpool
        i = pool.take() if pool is not None else None
        if i is None:  # more gathers in flight than prefetch allows for: a one-off buffer
            mem = torch.empty((world + 1) * rec, dtype=torch.uint8, device=buf.device)
        else:
            assert pool is not None
            mem = pool.view(i, torch.uint8, (world + 1) * rec)
        send, recv = mem[:rec], mem[rec : (world + 1) * rec]
        codec.encode(part.view(1, n), send.view(1, rec))
        h = self.comm.all_gather(recv, send, async_op=True)

        def unpack() -> None:
            codec.decode(recv.view(world, rec), n, buf.view(world, n))
            if i is not None:
                assert pool is not None
                pool.give(i)

        return h.then(unpack)

    # -- gradients -----------------------------------------------------------------------------

    @property
    def reduces(self) -> bool:
        return self.reducer is not None

    def start_reduce(self, full: torch.Tensor, grad_part: torch.Tensor) -> Handle:
        """qgZ: ``grad_part (P,) += this rank's chunk of Σ_ranks full (N*P,)``."""
        assert self.reducer is not None
        return self.reducer.start(full, grad_part)


def zeropp_buffer_bytes(
    opts: ZeroPPOptions,
    *,
    world_size: int,
    node: int,
    max_partition: int,
    prefetch: int,
    slots: int,
) -> int:
    """The staging bytes :class:`ZeroPP` allocates (``zshard estimate``)."""
    total = 0
    if opts.quantized_weights:
        total += (prefetch + 2) * (world_size + 1) * Codec(8, opts.block).nbytes(max_partition)
    if opts.quantized_gradients:
        m = world_size // node
        rec1 = Codec(opts.gradient_bits, opts.block).nbytes(m * max_partition)
        rec2 = Codec(opts.gradient_bits, opts.block).nbytes(max_partition)
        sizes = [node * rec1, node * rec1, 4 * m * max_partition, m * rec2, m * rec2]
        total += slots * _carved_nbytes([*sizes, 4 * max_partition])
    return total


__all__ = [
    "HierarchicalReduceScatter",
    "Hierarchy",
    "ZeroPP",
    "ZeroPPOptions",
    "check_zeropp",
    "node_size",
    "zeropp_buffer_bytes",
]
