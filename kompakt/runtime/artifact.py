"""Saved compiled models: a folder with standard files, loadable without executing code.

    model.onnx          the compiled graph (runs in ONNX Runtime as it is)
    model.safetensors   its weights, referenced by model.onnx as external data
    kompakt.json        target, pipeline, backend, report

No pickle: loading parses JSON and ONNX and reads tensors; nothing in the folder is executed.
Fused groups (``kompakt::FusedKernel``) are saved inlined, as the standard ops they stand for, so
model.onnx stays standard ONNX; loading runs the pipeline's fusion passes again (they are
deterministic and cheap), which gives back the same fused graph.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx_ir as ir

from kompakt.errors import KompaktError
from kompakt.ir.fused import inline_fused
from kompakt.ir.verify import VerificationError, verify
from kompakt.report import Report
from kompakt.targets.target import Target

FORMAT = "kompakt-compiled-model"
FORMAT_VERSION = 1
_GRAPH, _WEIGHTS, _META = "model.onnx", "model.safetensors", "kompakt.json"


def save_artifact(compiled, directory: str | os.PathLike) -> Path:
    from kompakt import __version__

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise KompaktError(f"cannot save to '{directory}': it is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        standard = inline_fused(compiled.ir)
        ir.save_safetensors(standard, directory / _GRAPH, size_threshold_bytes=1024)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kompakt_version": __version__,
            "target": str(compiled.target),
            "pipeline": compiled.pipeline,
            "backend": compiled.backend,
            "report": compiled.report().to_dict(),
        }
        (directory / _META).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    except OSError as err:
        raise KompaktError(f"cannot save to '{directory}': {err}") from err
    return directory


def load_artifact(directory: str | os.PathLike, backend: str | None = None, device: str = "cpu"):
    from kompakt.runtime.compiled_model import CompiledModel

    directory = Path(directory)
    meta_path = directory / _META
    if not meta_path.is_file():
        raise KompaktError(f"'{directory}' is not a saved kompakt model (no {_META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise KompaktError(f"'{meta_path}' is unreadable: {err}") from err
    if meta.get("format") != FORMAT:
        raise KompaktError(f"'{meta_path}' is not a kompakt model description")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise KompaktError(
            f"'{directory}' was saved by a newer kompakt (format {meta['format_version']})"
        )
    try:
        model = ir.load(directory / _GRAPH)
        verify(model)
    except (OSError, VerificationError, Exception) as err:
        raise KompaktError(f"'{directory / _GRAPH}' could not be loaded: {err}") from err
    _fuse_again(model, meta.get("pipeline", ""))
    report = Report.from_dict(meta["report"]) if meta.get("report") else None
    return CompiledModel(
        model,
        target=Target.parse(meta["target"]),
        pipeline=meta["pipeline"],
        backend=backend or meta["backend"],
        device=device,
        report=report,
    )


def _fuse_again(model: ir.Model, pipeline: str) -> None:
    """Runs the fusion passes of ``pipeline`` (saved inlined) on the loaded model."""
    from kompakt.passes.base import CompileContext
    from kompakt.passes.pipeline import Pipeline

    try:
        passes = [p for p in Pipeline.parse(pipeline).passes if p.name.startswith("fuse-")]
    except KompaktError as err:
        raise KompaktError(f"the saved pipeline '{pipeline}' cannot be read: {err}") from err
    ctx = CompileContext(progress=False)
    for fusion in passes:
        fusion.run(model, ctx)
