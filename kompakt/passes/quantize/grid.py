"""Integer grids for weight quantization and round-to-nearest (RTN) onto them.

A weight W of shape [K, N] (as MatMul(x, W) stores it: K inputs, N outputs) is split along K
into groups of ``group_size`` rows; every group of every output column gets its own scale (and
zero point when asymmetric). ``group_size=-1`` means one group spanning K: per-channel.

    symmetric:  q = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1),     s = max|W| / (2^(b-1) - 1)
    asymmetric: q = clamp(round(W / s) + z, 0, 2^b - 1),            s = (max - min) / (2^b - 1)
    dequantized: W ≈ (q - z) * s

The range always contains 0 (min <= 0 <= max), so zero weights stay exactly zero. A group whose
weights are all zero gets scale 1 and q = z, never a division by zero. When K is not a multiple
of the group size the last group is shorter, as ONNX's blocked DequantizeLinear defines it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import torch

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Grid:
    """How a weight is quantized: bits, grouping and symmetry."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}; got {self.bits}"
            )
        if self.group_size != -1 and (
            self.group_size < 16 or self.group_size & (self.group_size - 1)
        ):
            raise ValueError(
                "group_size must be -1 (per-channel) or a power of two >= 16 (what ONNX Runtime's "
                f"MatMulNBits accepts); got {self.group_size}"
            )

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def storage_dtype(self) -> ir.DataType:
        """The ONNX type that stores q: 2- and 3-bit values live in a 4-bit container."""
        if self.bits <= 4:
            return ir.DataType.INT4 if self.symmetric else ir.DataType.UINT4
        return ir.DataType.INT8 if self.symmetric else ir.DataType.UINT8

    def groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else -(-k // self.group_size)

    def rows_per_group(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


@dataclass
class QuantizedWeight:
    """q [K, N] (int8/uint8 holding the grid's values), scale and zero point [groups, N]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    grid: Grid

    def dequantize(self) -> torch.Tensor:
        """W ≈ (q - z) * s in the scale's dtype, [K, N]."""
        k = self.q.shape[0]
        rows = self.grid.rows_per_group(k)
        scale = self.scale.float().repeat_interleave(rows, dim=0)[:k]
        q = self.q.float()
        if self.zero_point is not None:
            q = q - self.zero_point.float().repeat_interleave(rows, dim=0)[:k]
        return (q * scale).to(self.scale.dtype)


def group_view(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """[K, N] -> [groups, rows, N], zero-padding a short last group."""
    k, n = w.shape
    rows = grid.rows_per_group(k)
    groups = grid.groups(k)
    padded = groups * rows
    if padded != k:
        w = torch.cat([w, w.new_zeros(padded - k, n)])
    return w.reshape(groups, rows, n)


def scales_for(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scale and zero point [groups, N] (float32) from W's range."""
    g = group_view(w.float(), grid)
    if grid.symmetric:
        amax = g.abs().amax(dim=1)
        scale = amax / grid.qmax
        return torch.where(amax > 0, scale, torch.ones_like(scale)), None
    lo = g.amin(dim=1).clamp(max=0)
    hi = g.amax(dim=1).clamp(min=0)
    scale = (hi - lo) / grid.qmax
    scale = torch.where(hi > lo, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, grid.qmax)
    return scale, zero


def quantize_rtn(w: torch.Tensor, grid: Grid) -> QuantizedWeight:
    """Round-to-nearest of W [K, N] onto ``grid``; the scale keeps W's float dtype."""
    if w.dim() != 2:
        raise ValueError(f"expected a [K, N] weight, got shape {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf")
    scale, zero = scales_for(w, grid)
    q = round_to_grid(w, scale, zero, grid)
    storage = torch.int8 if grid.symmetric else torch.uint8
    zp = None if zero is None else zero.to(storage)
    return QuantizedWeight(q.to(storage), scale.to(w.dtype), zp, grid)


def round_to_grid(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: Grid
) -> torch.Tensor:
    """q = clamp(round(W / s) + z) for W [K, N] and per-group s, z [groups, N]; float result."""
    k = w.shape[0]
    rows = grid.rows_per_group(k)
    s = scale.float().repeat_interleave(rows, dim=0)[:k]
    q = torch.round(w.float() / s)
    if zero is not None:
        q = q + zero.float().repeat_interleave(rows, dim=0)[:k]
    return q.clamp(grid.qmin, grid.qmax)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    signal = ref.pow(2).sum()
    return float(10 * torch.log10(signal / noise)) if signal > 0 else float("-inf")
