"""Arrival counters for kernels whose last program finishes a reduction (no second launch).

A split-K GEMM or a split decode attention writes per-split partials; instead of a second kernel
that combines them, each program bumps a counter for its output tile after storing its partial,
and the program that arrives last reads every partial and writes the result, then sets the
counter back to zero. This module holds those counters: one zeroed int32 buffer per device,
allocated by the first such launch (eagerly, before any CUDA graph captures one) and never
replaced, so a graph keeps a valid address. Every such launch shares it: each leaves its
counters at zero, and kompakt runs its launches in order on one stream at a time (a CUDA graph's
warm-up and capture wait for the stream before them). Two such launches running concurrently on
two streams of one device would race. Triton is not imported here.
"""

from __future__ import annotations

import torch

MAX_COUNTED_TILES = 1 << 16
"""Tiles one launch may count (256 KiB of int32 per device); a launch with more falls back to
its second kernel."""

_COUNTERS: dict[str, torch.Tensor] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The zeroed counters for a launch of ``tiles`` output tiles on ``device``, or None when
    they do not fit `MAX_COUNTED_TILES`."""
    if tiles > MAX_COUNTED_TILES:
        return None
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_COUNTED_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[key]
