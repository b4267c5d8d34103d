"""The CUDA kernel replayed in torch, block by block, with the kernel's own index arithmetic.

Each block of the grid is a loop iteration here and its threads a tensor dimension; every global
access goes through the same flat offset the CUDA source computes (``x[m * K + k]``,
``qweight[row * N + col]``, ``partial[(s * M + m) * N + col]``), the nibbles are decoded with the
same 2^23 mantissa trick on the same prescaled x, and the sums run in the kernel's order (per
step, per split, then the split reduction). Comparing this with the reference on small shapes
(K not a multiple of the group, the step or the split) checks the index math on a CPU. It differs
from the kernel only in rounding: torch rounds a * b + c twice where CUDA fuses it.
"""

from __future__ import annotations

import torch

from kompakt.codegen.cuda_gemv.spec import Config
from kompakt.codegen.dequant_matmul.layout import PackedWeight

MAGIC = 0x4B000000  # the bits of 2.0**23


def emulate(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """What `launch_cuda_gemv` computes, on any device; ``out_dtype=torch.float32`` skips the
    final fp16 cast so the sums can be compared tightly."""
    from kompakt.codegen.cuda_gemv.build import check_inputs

    x2, config = check_inputs(x, packed, bias, config, "sm_90")
    m_total, k_total = x2.shape
    n_total = packed.n
    xf = x2.reshape(-1).float()  # the kernel converts each fp16 x with __half2float
    qf = packed.qweight.reshape(-1)
    sf, zf = packed.scales.reshape(-1).float(), packed.zeros.reshape(-1).float()
    c = config
    tile_rows = c.k_tile // 8
    rows_total = (k_total + 7) // 8
    chunk = c.chunk_rows(k_total)
    partial = torch.zeros(c.split_k * m_total * n_total)
    y = torch.zeros(m_total * n_total)
    grid_x, grid_y, grid_z = c.grid(m_total, n_total)
    tid = torch.arange(c.threads)
    # 2^(-4 (b % 4)) for b = 0..7: the shared-memory prescale of x
    prescale = torch.tensor([2.0 ** (-4 * (b % 4)) for b in range(8)])

    for bz in range(grid_z):
        m0 = bz * c.m_tile
        mi_rows = m0 + torch.arange(c.m_tile)
        for split in range(grid_y):
            row_begin = split * chunk
            row_end = min(rows_total, row_begin + chunk)
            for bx in range(grid_x):
                col0 = bx * (c.threads * c.cols) + tid
                cols = col0[None, :] + c.threads * torch.arange(c.cols)[:, None]  # [COLS, T]
                ok = cols < n_total
                safe = torch.where(ok, cols, 0)
                acc = torch.zeros(c.m_tile, c.cols, c.threads)
                for tile in range(row_begin, row_end, tile_rows):
                    tile_end = min(row_end, tile + tile_rows)
                    k_end = min(k_total, tile_end * 8)
                    xs, wsum = _stage(xf, mi_rows, tile, tile_rows, k_end, m_total, k_total)
                    xs = xs * prescale.repeat(tile_rows)
                    for row0 in range(tile, tile_end, c.unroll):
                        g = row0 * 8 // c.group_size
                        s = torch.where(ok, sf[g * n_total + safe], 0.0)
                        z = torch.where(ok, zf[g * n_total + safe], 0.0)
                        words = []
                        for u in range(c.unroll):
                            live = ok & (row0 + u < tile_end)
                            off = torch.where(live, (row0 + u) * n_total + safe, 0)
                            words.append(torch.where(live, qf[off], 0))
                        dot = torch.zeros(c.m_tile, c.cols, c.threads)
                        for u in range(c.unroll):
                            r = row0 - tile + u
                            for h in range(2):
                                # unsigned w >> 16: the arithmetic shift's sign bits masked off
                                bits = (words[u] >> 16) & 0xFFFF if h else words[u]
                                for nib in range(4):
                                    q = _nibble_times_16c(bits, nib)
                                    xv = xs[:, r * 8 + 4 * h + nib]
                                    dot = dot + xv[:, None, None] * q[None]
                        xsum = torch.zeros(c.m_tile)
                        for u in range(c.unroll):
                            xsum = xsum + wsum[:, row0 - tile + u]
                        acc = acc + s[None] * (dot - z[None] * xsum[:, None, None])
                _write(acc, mi_rows, cols, ok, split, m_total, n_total, c, partial, y, bias)
    if c.split_k > 1:  # the reduce kernel: sum the splits in order, then the bias
        i = torch.arange(m_total * n_total)
        y = torch.zeros(m_total * n_total)
        for split in range(c.split_k):
            y = y + partial[split * m_total * n_total + i]
        if bias is not None:
            y = y + bias.float()[i % n_total]
    lead = x.shape[:-1]
    return y.reshape(*lead, n_total).to(out_dtype or x.dtype)


def _stage(xf, mi_rows, tile, tile_rows, k_end, m_total, k_total):
    """Items (mi, r): x of packed row tile + r, zero past M, K or the split; and its sum."""
    r = torch.arange(tile_rows)
    k = (tile + r)[:, None] * 8 + torch.arange(8)[None, :]  # [TILE_ROWS, 8]
    live = (mi_rows[:, None, None] < m_total) & (k[None] < k_end)
    off = torch.where(live, mi_rows[:, None, None] * k_total + k[None], 0)
    v = torch.where(live, xf[off], 0.0)  # [M_TILE, TILE_ROWS, 8]
    wsum = torch.zeros(v.shape[:2])
    for b in range(8):  # the kernel's sequential `sum += v`
        wsum = wsum + v[..., b]
    return v.reshape(len(mi_rows), -1), wsum


def _nibble_times_16c(bits: torch.Tensor, nib: int) -> torch.Tensor:
    """float(2^23 | (bits & (0xF << 4 nib))) - 2^23 = q * 16^nib, as the kernel decodes it."""
    field = bits & (0xF << (4 * nib))
    return (field | MAGIC).to(torch.int32).view(torch.float32) - 8388608.0


def _write(acc, mi_rows, cols, ok, split, m_total, n_total, c, partial, y, bias):
    for mi in range(c.m_tile):
        m = int(mi_rows[mi])
        if m >= m_total:
            break
        col = cols[ok]
        if c.split_k == 1:
            b = bias.float()[col] if bias is not None else 0.0
            y[m * n_total + col] = acc[mi][ok] + b
        else:
            partial[(split * m_total + m) * n_total + col] = acc[mi][ok]
