"""Block quantization for ZeRO++ communication (qwZ, qgZ): int8, or int4 packed two per byte.

A row of ``n`` elements is cut into blocks of ``block`` consecutive elements (the last one may be
shorter). Each block is quantized symmetrically with its own fp32 scale ``s = absmax / qmax``
(qmax 127 for int8, 7 for int4): ``q = round(x / s)`` in [-qmax, qmax], and dequantized as
``q * s``, so every element is within half a step (``s / 2``) of its input, up to fp32 rounding.
An all-zero block has scale 0 and dequantizes to exact zeros. A block holding inf or NaN gets
scale NaN and dequantizes to NaN in every element: a non-finite value stays non-finite through
the collective, as without quantization, so the optimizer's overflow check (fp16 loss scaling,
and the non-finite gradient check of every precision) still fires.

One quantized row is a *record* of bytes, sent as is by all-gather and all-to-all::

    [values: n int8 bytes, or ceil(n / 2) bytes of int4 pairs (element 2i in the low nibble)]
    [zero padding to a multiple of 4 bytes]
    [ceil(n / block) fp32 scales]

A :class:`Codec` with ``bits=None`` is the unquantized path with the same interface (the record is
the raw values in their dtype), used to check the collectives themselves.
"""

from __future__ import annotations

import math

import torch

QMAX = {8: 127, 4: 7}
DEFAULT_BLOCK = 2048


def _round4(n: int) -> int:
    return (n + 3) // 4 * 4


def value_bytes(numel: int, bits: int) -> int:
    """Bytes of the values part of a record (before the padding to 4)."""
    return numel if bits == 8 else (numel + 1) // 2


def record_nbytes(numel: int, block: int, bits: int) -> int:
    """Bytes of one quantized record of ``numel`` elements."""
    return _round4(value_bytes(numel, bits)) + 4 * math.ceil(numel / block)


class Codec:
    """Encode rows of ``numel`` elements into records, and back.

    ``bits`` 8 or 4 quantizes with blocks of ``block`` elements; ``None`` sends the values raw in
    ``dtype`` (``encode`` then casts to it).
    """

    def __init__(self, bits: int | None, block: int, dtype: torch.dtype = torch.float32) -> None:
        if bits is not None and bits not in QMAX:
            raise ValueError(f"quantization bits must be 8 or 4, got {bits}")
        if block < 1:
            raise ValueError(f"quantization block size must be >= 1, got {block}")
        self.bits = bits
        self.block = block
        self.dtype = dtype

    def nbytes(self, numel: int) -> int:
        """Bytes of one record of ``numel`` elements."""
        if self.bits is None:
            return _round4(numel * torch.empty((), dtype=self.dtype).element_size())
        return record_nbytes(numel, self.block, self.bits)

    def encode(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``x`` (rows, ...) -> ``out`` (rows, nbytes(n)) uint8, where n = x[0].numel().

        ``x`` may be any strided view (e.g. a permutation of chunks); it is read once.
        """
        rows = x.shape[0]
        n = x[0].numel() if rows else 0
        if self.bits is None:
            size = n * torch.empty((), dtype=self.dtype).element_size()
            out[:, :size].view(self.dtype).view(x.shape).copy_(x)
            return
        qmax = QMAX[self.bits]
        nb = math.ceil(n / self.block)
        xp = torch.zeros((rows, nb * self.block), dtype=torch.float32, device=x.device)
        xp[:, :n].view(x.shape).copy_(x)
        blocks = xp.view(rows, nb, self.block)
        finite = torch.isfinite(blocks).all(dim=-1)
        absmax = torch.where(finite, blocks.abs().amax(dim=-1), 0.0)
        scale = absmax / qmax
        divisor = torch.where(scale > 0, scale, 1.0)
        q = blocks.div_(divisor.unsqueeze(-1)).round_().clamp_(-qmax, qmax)
        q.masked_fill_(~finite.unsqueeze(-1), 0.0)
        q8 = q.view(rows, nb * self.block)[:, :n].to(torch.int8)
        vb = value_bytes(n, self.bits)
        if self.bits == 8:
            out[:, :vb].copy_(q8.view(torch.uint8))
        else:
            u = (q8 + 8).to(torch.uint8)  # 1..15
            if n % 2:
                u = torch.nn.functional.pad(u, (0, 1), value=8)
            out[:, :vb].copy_(u[:, 0::2] | (u[:, 1::2] << 4))
        start = _round4(vb)
        out[:, vb:start].zero_()
        scales = torch.where(finite, scale, math.nan)
        out[:, start : start + 4 * nb].view(torch.float32).copy_(scales)

    def decode(
        self, rec: torch.Tensor, numel: int, out: torch.Tensor, *, accumulate: bool = False
    ) -> None:
        """``rec`` (rows, nbytes(numel)) uint8 -> ``out`` (rows, numel) of any dtype (written, or
        added to when ``accumulate``; dequantized in fp32 either way)."""
        rows = rec.shape[0]
        if self.bits is None:
            size = numel * torch.empty((), dtype=self.dtype).element_size()
            raw = rec[:, :size].view(self.dtype)
            if accumulate:
                out.add_(raw.to(out.dtype))
            else:
                out.copy_(raw)
            return
        nb = math.ceil(numel / self.block)
        vb = value_bytes(numel, self.bits)
        start = _round4(vb)
        scales = rec[:, start : start + 4 * nb].view(torch.float32)
        qp = torch.zeros((rows, nb * self.block), dtype=torch.float32, device=rec.device)
        if self.bits == 8:
            qp[:, :numel].copy_(rec[:, :numel].view(torch.int8))
        else:
            packed = rec[:, :vb]
            pairs = torch.stack(((packed & 15), (packed >> 4)), dim=-1).view(rows, 2 * vb)
            qp[:, :numel].copy_(pairs[:, :numel]).sub_(8.0)
        deq = qp.view(rows, nb, self.block).mul_(scales.unsqueeze(-1)).view(rows, -1)[:, :numel]
        if accumulate:
            out.add_(deq)
        else:
            out.copy_(deq)

    def step(self, rec: torch.Tensor, numel: int) -> torch.Tensor:
        """Each element's quantization step (its block's scale), (rows, numel) fp32: for tests."""
        assert self.bits is not None
        nb = math.ceil(numel / self.block)
        start = _round4(value_bytes(numel, self.bits))
        scales = rec[:, start : start + 4 * nb].view(torch.float32)
        return scales.repeat_interleave(self.block, dim=1)[:, :numel]


__all__ = ["DEFAULT_BLOCK", "QMAX", "Codec", "record_nbytes", "value_bytes"]
