"""Arrival counters for kernels whose last program finishes a reduction (no second launch).

A split-K GEMM or a split decode attention writes per-split partials; instead of a second kernel
that combines them, each program bumps a counter for its output tile after storing its partial,
and the program that arrives last reads every partial and writes the result, then sets the
counter back to zero. This module holds those counters: one zeroed int32 buffer per device and
stream, allocated once and never replaced (a CUDA graph keeps the address it captured), shared by
every such launch, since each leaves its counters at zero and launches on one stream run in
order. Triton is not imported here.
"""

from __future__ import annotations

import torch

MAX_COUNTED_TILES = 1 << 16
"""Tiles one launch may count (256 KiB of int32 per device and stream); a launch with more
falls back to its second kernel."""

_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The zeroed counters for a launch of ``tiles`` output tiles on ``device``'s current
    stream, or None when they do not fit `MAX_COUNTED_TILES`."""
    if tiles > MAX_COUNTED_TILES:
        return None
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_COUNTED_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[key]
