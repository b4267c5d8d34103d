"""The packed weight layout the dequant-matmul kernels (Triton and CUDA C) read.

The IR holds a quantized weight the way ONNX says it: ``W = (q - z) * s`` with ``q: [K, N]``
(MatMul orientation, ``y = x @ W``), scales and zero points per ``group_size`` rows of K. Kernels
want 4-bit values packed and the zero point ready to subtract, so `pack` turns that into:

    qweight  int32 [ceil(K/8), N]    4-bit: nibble j (bits 4j..4j+3) of qweight[r, n] = q[8r + j, n]
             int8  [K, N]            8-bit: q itself (stored as signed, see below)
    scales   fp16/fp32 [G, N]        G = ceil(K / group_size); one row per group of K
    zeros    same dtype [G, N]       the zero point as a float, in the stored q's domain

            n ->                           K rows 8r..8r+7 of column n share one int32:
        +--------+--------+--           bits  31..28  27..24  ...  7..4   3..0
    r=0 | q0..q7 | q0..q7 |                   q[8r+7] q[8r+6] ...  q[8r+1] q[8r]
    r=1 | q8..q15| ...    |
        +--------+--------+--

4-bit values are stored unsigned (0..15): a signed int4 ``q`` is stored as ``q + 8`` and its zero
point shifted by 8 too, so ``(stored - zero) * scale`` is the same number. 8-bit values are stored
signed (-128..127): a uint8 ``q`` is stored as ``q - 128`` with its zero point shifted likewise.
K is padded with zero rows up to a multiple of 8 (4-bit) and of the group size; padded rows get
scale 0, so they add nothing whatever x holds there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kompakt.errors import CodegenError


@dataclass(frozen=True)
class PackedWeight:
    """A quantized [K, N] weight in the kernels' layout (see the module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    k: int  # logical K (before padding)
    n: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def to(self, device: str | torch.device) -> PackedWeight:
        return PackedWeight(
            self.qweight.to(device),
            self.scales.to(device),
            self.zeros.to(device),
            self.bits,
            self.group_size,
            self.k,
            self.n,
        )


def pack(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float16,
) -> PackedWeight:
    """Packs ONNX-style blocked quantization (axis 0) into the kernels' layout.

    Args:
        q: Integer values [K, N] (int4/uint4 held in int8/uint8, or int8/uint8).
        scale: [ceil(K / group_size), N]; a [N] per-channel scale is taken as one group.
        zero_point: Same shape as ``scale`` (or None for symmetric, i.e. zero point 0).
        bits: 4 or 8.
        group_size: Rows of K per scale; K itself (or more) for per-channel.
        dtype: Dtype of the packed scales and zeros (the activation dtype the kernel runs in).
    """
    if bits not in (4, 8):
        raise CodegenError(f"dequant-matmul packs 4- or 8-bit weights, not {bits}-bit")
    if q.dim() != 2:
        raise CodegenError(f"quantized weight must be 2-D [K, N], got shape {list(q.shape)}")
    k, n = q.shape
    if scale.dim() == 1:
        scale = scale.reshape(1, n)
        zero_point = None if zero_point is None else zero_point.reshape(1, n)
        group_size = max(group_size, k)
    groups = -(-k // group_size)
    if tuple(scale.shape) != (groups, n):
        raise CodegenError(
            f"scale shape {list(scale.shape)} does not match weight [{k}, {n}] with "
            f"group size {group_size} (expected [{groups}, {n}])"
        )
    if groups == 1:  # per channel: one group spanning the padded K keeps a single scale row
        group_size = _round_up(k, 8 if bits == 4 else 1)
    values = q.to(torch.int32)
    zeros = torch.zeros(groups, n) if zero_point is None else zero_point.to(torch.float32)
    unsigned = not q.dtype.is_signed
    if bits == 4 and not unsigned:
        values, zeros = values + 8, zeros + 8
    if bits == 8 and unsigned:
        values, zeros = values - 128, zeros - 128
    padded_k = _round_up(_round_up(k, 8 if bits == 4 else 1), group_size)
    padded_groups = padded_k // group_size
    if padded_k != k:
        values = torch.cat([values, torch.zeros(padded_k - k, n, dtype=torch.int32)])
    scales = scale.to(torch.float32)
    if padded_groups != groups:  # only when group_size does not divide the padding to 8
        extra = padded_groups - groups
        scales = torch.cat([scales, torch.zeros(extra, n)])
        zeros = torch.cat([zeros, torch.zeros(extra, n)])
    if bits == 4:
        nibbles = values.reshape(padded_k // 8, 8, n)
        shifts = (4 * torch.arange(8, dtype=torch.int32)).reshape(1, 8, 1)
        qweight = (nibbles << shifts).sum(dim=1, dtype=torch.int64)
        qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)
    else:
        qweight = values.to(torch.int8)
    return PackedWeight(
        qweight.contiguous(),
        scales.to(dtype).contiguous(),
        zeros.to(dtype).contiguous(),
        bits,
        group_size,
        k,
        n,
    )


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The float weight [K, N] (fp32) that ``packed`` stands for; what the reference multiplies."""
    if packed.bits == 4:
        shifts = (4 * torch.arange(8, dtype=torch.int32, device=packed.qweight.device)).reshape(
            1, 8, 1
        )
        q = (packed.qweight.unsqueeze(1) >> shifts) & 0xF
        q = q.reshape(-1, packed.n)
    else:
        q = packed.qweight.to(torch.int32)
    rows = q.shape[0]
    scales = packed.scales.float().repeat_interleave(packed.group_size, dim=0)[:rows]
    zeros = packed.zeros.float().repeat_interleave(packed.group_size, dim=0)[:rows]
    return ((q.float() - zeros) * scales)[: packed.k]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
