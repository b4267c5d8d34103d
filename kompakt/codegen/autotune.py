"""Autotune cache: the launch configuration measured fastest, per device, kernel and shape bucket.

Filled on a GPU (`tune`: time every candidate, keep the fastest) and read everywhere else, so the
choice a kernel family makes offline is the one a measurement made. One JSON file per device:

    $KOMPAKT_CACHE_DIR/autotune/<device>.json   (default ~/.cache/kompakt/autotune/)
    {"format": 1, "device": "NVIDIA H100 80GB HBM3",
     "entries": {"dequant_matmul|m=1|n=4096|k=4096|g=128|b=4": {
         "config": {...}, "seconds": 1.2e-05, "candidates": 9}}}

Shape buckets: M rounds up to a power of two (what the regimes split on); N, K, group and bits are
exact (they fix the weight). Files are written atomically; a corrupt file is reported, not used.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kompakt.errors import CodegenError

FORMAT = 1


def cache_dir() -> Path:
    root = os.environ.get("KOMPAKT_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "kompakt"
    return base / "autotune"


def bucket(kernel: str, **shape: int) -> str:
    """The cache key: ``kernel|m=<pow2>|...`` with M rounded up to a power of two."""
    parts = [kernel]
    for name in sorted(shape):
        value = int(shape[name])
        if name == "m":
            value = 1 << max(0, (value - 1).bit_length())
        parts.append(f"{name}={value}")
    return "|".join(parts)


@dataclass
class AutotuneCache:
    """The measured choices for one device."""

    device: str
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def for_device(cls, device: str, directory: Path | None = None) -> AutotuneCache:
        """Loads the device's file (an empty cache if there is none yet)."""
        directory = directory or cache_dir()
        path = directory / f"{_safe(device)}.json"
        if not path.exists():
            return cls(device, {}, path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CodegenError(f"autotune cache '{path}' is unreadable: {err}") from err
        if data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise CodegenError(f"autotune cache '{path}' has an unknown format")
        return cls(device, data["entries"], path)

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self.entries.get(key)
        return None if entry is None else dict(entry["config"])

    def put(self, key: str, config: dict[str, Any], seconds: float, candidates: int) -> None:
        self.entries[key] = {"config": config, "seconds": seconds, "candidates": candidates}

    def save(self) -> Path:
        if self.path is None:
            raise CodegenError("this autotune cache has no file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "device": self.device, "entries": self.entries}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        return self.path


def tune(
    cache: AutotuneCache,
    key: str,
    candidates: Iterable[Any],
    run: Callable[[Any], None],
    timer: Callable[[Callable[[], None]], float],
) -> Any:
    """Times ``run(config)`` for each candidate with ``timer``; stores and returns the fastest.

    A candidate that fails (a kernel that does not compile or fit: Triton's OutOfResources, a
    CodegenError) is skipped; if all fail, `CodegenError` names the last failure. ``timer`` returns seconds (CUDA events on a GPU; tests pass their own).
    """
    best, best_seconds, tried, last_error = None, float("inf"), 0, None
    for config in candidates:
        tried += 1
        try:
            seconds = timer(lambda config=config: run(config))
        except Exception as err:  # a tile that does not fit or compile: skip it, keep tuning
            last_error = err
            continue
        if seconds < best_seconds:
            best, best_seconds = config, seconds
    if best is None:
        raise CodegenError(f"no candidate configuration ran for {key}: {last_error}")
    cache.put(key, best if isinstance(best, dict) else asdict(best), best_seconds, tried)
    return best


L2_FLUSH_BYTES = 256 * 2**20
"""Written before each timed call: 5x the 50 MiB L2 of H100/H200 (A100: 40 MiB), so a weight that
fits in L2 is still read from memory, as it is in a model whose other layers evict it."""
SPIN_CYCLES = 200_000
"""GPU spin before each timed call (~0.1 ms at ~1.9 GHz), longer than one launch from Python: the
CPU queues the call while the GPU waits, so the time is the kernel's, as under CUDA graphs."""


def cuda_median_seconds(
    fn: Callable[[], None], repeats: int, flush: Any = None, warmup: int = 3
) -> float:
    """Median CUDA-event time of ``fn()`` in seconds; before each call ``flush`` (a device
    tensor, or None) is overwritten to empty L2 and the GPU spins (see `SPIN_CYCLES`)."""
    import torch

    for _ in range(warmup):
        fn()
    events = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        if flush is not None:
            flush.zero_()
        if hasattr(torch.cuda, "_sleep"):  # private but long-standing; without it, time is looser
            torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def cuda_timer(repeats: int = 20, flush_l2: bool = True) -> Callable[[Callable[[], None]], float]:
    """A `tune` timer: `cuda_median_seconds` with L2 flushed before each call (one flush buffer
    for the timer's life)."""
    import torch

    flush = None
    if flush_l2:
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    return lambda fn: cuda_median_seconds(fn, repeats, flush)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "device"
