"""Helpers the fusion and backend tests share."""

from __future__ import annotations

import kompakt


def compile_for_gpu(model, pipeline, backend="reference", **options):
    """Compiles for target a100 with an explicit pipeline, quietly, without the latency run."""
    options.setdefault("estimate_latency", False)  # a model run per compile: not needed here
    return kompakt.compile(
        model, target="a100", pipeline=pipeline, backend=backend, progress=False, **options
    )


def first_output(out):
    """A compiled model's first output (it returns a tuple when the graph has several)."""
    return out[0] if isinstance(out, (tuple, list)) else out
