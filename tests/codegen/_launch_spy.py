"""A stand-in for a @triton.jit kernel that records each launch, shared by the families' tests
of "one launch instead of two" (dequant-matmul's split-K, decode attention's merge)."""

from __future__ import annotations


class LaunchSpy:
    """``kernel[grid](...)`` through it appends ``grid`` to ``launched``, then launches."""

    def __init__(self, real, launched: list) -> None:
        self.real, self.launched = real, launched

    def __getitem__(self, grid):
        self.launched.append(grid)
        return self.real[grid]
