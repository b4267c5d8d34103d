"""Helpers shared by the benchmark scripts: timing, ONNX Runtime sessions, table output."""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from kompakt.timing import median_ms  # noqa: F401  (re-exported for the scripts)


def ort_session(model: onnx.ModelProto | str, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with ORT's defaults (all graph optimizations)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_runner(session: ort.InferenceSession, feeds: dict[str, torch.Tensor]) -> Callable[[], list]:
    numpy_feeds = {k: v.numpy() for k, v in feeds.items()}
    return lambda: session.run(None, numpy_feeds)


def ort_output(session: ort.InferenceSession, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(ort_runner(session, feeds)()[0]))


def machine() -> str:
    return (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {torch.get_num_threads()} threads"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
