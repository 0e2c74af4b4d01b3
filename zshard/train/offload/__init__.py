"""Offload (ZeRO-Offload / ZeRO-Infinity) through the store: optimizer state and stage-3
parameters kept in host memory or as store shards under any fsspec path, streamed in sub-groups.

``preflight`` checks every path before launch; the engine drives :class:`Offload`; swap files are
store shards (``_swap``), so checkpoints copy them byte for byte.
"""

from zshard.train.offload._preflight import check_path, offload_bytes, preflight
from zshard.train.offload._runtime import Offload, any_rank
from zshard.train.offload._stream import HostArray, OffloadError
from zshard.train.offload._swap import SwapArray

__all__ = [
    "HostArray",
    "Offload",
    "OffloadError",
    "SwapArray",
    "any_rank",
    "check_path",
    "offload_bytes",
    "preflight",
]
