"""The host allocator's policy while training on the CPU.

glibc serves a request of at least its *mmap threshold* from a mapping of its own, returned to
the system when freed; smaller requests come from the heap. The threshold starts at 128 KiB and
rises to the size of every mapped block freed, up to 32 MiB. A training step allocates and frees
hundreds of MiB of multi-MB tensors (activations, autograd's gradients, stage 3's gathered
parameters), so after the first step they all come from the heap, where freed memory stays
resident and, fragmented, cannot serve the next step's requests of other sizes: on the 57M bench
model (docs/benchmarks.md) this added 100-300 MiB to every stage's peak RSS, at stage 3 40% of
the ZeRO formula plus activations. Fixing the threshold (which also stops its rise) keeps such
tensors in their own mappings: 4 MiB measured the best trade there (1 MiB saved another 20 MiB
at stage 3 for ~20% more CPU time per step in page faults).

The forward's smaller temporaries (attention scores, MLP intermediates: below the threshold)
still leave the heap fragmented, its free chunks resident: each backward therefore starts by
returning the heap's free pages to the system (``malloc_trim(0)``, a few milliseconds), so that
the pages the backward does not reuse stop counting (on the bench model -21 MiB of stage 2's peak
RSS, -20 MiB of stage 3's; docs/benchmarks.md).

A user's own ``MALLOC_MMAP_THRESHOLD_`` (glibc's variable for the same setting) wins: it is left
alone, and so is every allocator but glibc's.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger("zshard.train")

MMAP_THRESHOLD = 4 << 20  # bytes
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_trim: Callable[[int], int] | None = None  # glibc's malloc_trim, set once the policy is applied


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (absent from musl and other libcs)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def apply_host_alloc_policy() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` once per process; True if it is set
    (now or before), False where it does not apply (another libc, or the user chose a value)."""
    global _trim
    if _trim is not None:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None or libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    _trim = trim
    log.debug("host allocator: glibc mmap threshold fixed at %d bytes", MMAP_THRESHOLD)
    return True


def release_free_heap() -> None:
    """Return the heap's free pages to the system, under the policy only (else a no-op)."""
    if _trim is not None:
        _trim(0)
