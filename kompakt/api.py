"""`kompakt.compile` and `kompakt.load`: the public entry points. Orchestration only."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import onnx
import onnx_ir as ir
import torch

from kompakt.errors import KompaktError, did_you_mean
from kompakt.ir.metadata import PIPELINE_KEY, TARGET_KEY
from kompakt.lowering import capture_module, load_onnx
from kompakt.lowering.kv_cache import capture_with_cache, with_empty_caches
from kompakt.lowering.normalize import normalize
from kompakt.passes.base import CompileContext
from kompakt.passes.calibrate.batches import missing_calibration
from kompakt.passes.instruments import DumpIRInstrument
from kompakt.passes.manager import PassManager
from kompakt.passes.pipeline import Pipeline
from kompakt.progress import status
from kompakt.report import LatencyEstimate, Report, SizeStats
from kompakt.runtime.backends import BACKENDS
from kompakt.runtime.compiled_model import CompiledModel
from kompakt.runtime.profile import observed_shapes, synthetic_feeds
from kompakt.runtime.triton_backend import triton_available
from kompakt.targets.cost_model import CostModel
from kompakt.targets.overrides import apply_overrides
from kompakt.targets.target import Target

OPTIONS = {
    "dynamic_shapes": "which input dims stay symbolic (see kompakt.lowering.from_torch.DynamicSpec)",
    "device": "where the reference backend runs ('cpu', 'cuda')",
    "dump_ir": "folder to write the IR after every pass",
    "verify": "verify the IR after every pass (default: env KOMPAKT_VERIFY)",
    "progress": "show progress bars on long passes (default True)",
    "seed": "seed for anything random (default 0)",
    "estimate_latency": "run the model once at the example shapes to predict its time (default True)",
    "kv_cache": "capture a causal LM with a static KV cache of this many positions, for "
    "CompiledModel.generate",
}


def compile(  # noqa: A001  (the name users expect: kompakt.compile)
    model: torch.nn.Module | str | os.PathLike | onnx.ModelProto | ir.Model,
    example_inputs: Any = None,
    target: str | Target = "cpu",
    calibration: Any = None,
    pipeline: str | Pipeline | None = None,
    backend: str | None = None,
    overrides: Mapping[str, str | None] | None = None,
    **options: Any,
) -> CompiledModel:
    """Compiles a model for a target.

    Args:
        model: An ``nn.Module`` (captured with torch.export), a path to an ``.onnx`` file, an
            ``onnx.ModelProto``, or an ``onnx_ir.Model`` (copied, not modified).
        example_inputs: Inputs to capture a module with (a tensor, tuple or dict); for ONNX
            inputs, optional shapes for the latency estimate.
        target: ``"<device>[-<recipe tokens>]"``, e.g. ``"cpu-w4"``; see `Target.parse`.
        calibration: Calibration batches for passes that need them.
        pipeline: Overrides the target's default pipeline (a pipeline string).
        backend: ``"reference"``, ``"onnxruntime"`` or ``"triton"``; default: onnxruntime for
            the cpu device, triton for GPU targets on a machine with a GPU, else reference.
        overrides: Per-layer recipes by module-path glob, e.g. ``{"*.down_proj": "w8",
            "lm_head": None}`` (None keeps the layers in float); see `kompakt.targets.overrides`.
        **options: See `OPTIONS`.

    Raises:
        KompaktError: with the op, node, option, file or token at fault.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise KompaktError(
            f"unknown option '{unknown[0]}'{did_you_mean(unknown[0], OPTIONS)}; options: {', '.join(OPTIONS)}"
        )
    target = Target.parse(target)
    pipeline = _pipeline(pipeline, target, calibration is not None)
    if overrides:
        pipeline = apply_overrides(pipeline, overrides, target, calibration is not None)
    manager = PassManager(pipeline, verify=options.get("verify"))
    needing = [p.name for p in pipeline.passes if p.uses_calibration]
    if calibration is None and needing:
        raise missing_calibration(needing[0])
    if calibration is not None and not needing:
        warnings.warn(
            f"kompakt: calibration data was given, but no pass in '{pipeline}' uses it",
            stacklevel=2,
        )
    device = options.get("device") or (
        "cuda" if target.device.kind == "gpu" and torch.cuda.is_available() else "cpu"
    )
    backend = backend or _default_backend(target, device)
    if backend not in BACKENDS:
        raise KompaktError(
            f"unknown backend '{backend}'{did_you_mean(backend, BACKENDS)}; backends: {', '.join(BACKENDS)}"
        )

    show = options.get("progress", True)
    status(f"capturing {_describe(model)} ...", show)
    kv_cache = options.get("kv_cache")
    if kv_cache is not None:
        captured, spec = _capture_with_cache(model, example_inputs, kv_cache)
        if calibration is not None:
            calibration = with_empty_caches(spec, calibration)
    else:
        captured = _capture(model, example_inputs, options.get("dynamic_shapes"))
    feeds, shapes_note = _example_feeds(captured, example_inputs)
    cost = CostModel(target.device)
    estimate = options.get("estimate_latency", True)
    before_size = SizeStats.of(captured)
    latency_before = _estimate(cost, captured, feeds, shapes_note) if estimate else None

    ctx = CompileContext(
        target=target,
        cost_model=cost,
        calibration=calibration,
        seed=options.get("seed", 0),
        progress=show,
    )
    if options.get("dump_ir"):
        ctx.instruments.append(DumpIRInstrument(options["dump_ir"]))
    status(f"running {pipeline} ...", show)
    records = manager.run(captured, ctx)
    captured.metadata_props[PIPELINE_KEY] = str(pipeline)
    captured.metadata_props[TARGET_KEY] = str(target)

    report = Report(
        target=str(target),
        device=target.device.description,
        backend=backend,
        pipeline=str(pipeline),
        passes=records,
        size_before=before_size,
        size_after=SizeStats.of(captured),
    )
    if estimate:
        report.latency_before = latency_before
        report.latency_after = _estimate(cost, captured, feeds, shapes_note)
    return CompiledModel(
        captured,
        target=target,
        pipeline=str(pipeline),
        backend=backend,
        device=device,
        report=report,
    )


def load(
    directory: str | os.PathLike, backend: str | None = None, device: str = "cpu"
) -> CompiledModel:
    """Loads a model saved with `CompiledModel.save` (ONNX + safetensors + JSON; no pickle)."""
    from kompakt.runtime.artifact import load_artifact

    return load_artifact(directory, backend=backend, device=device)


def _default_backend(target: Target, device: str) -> str:
    """ONNX Runtime for CPU targets; Triton kernels on a GPU; else the reference runtime."""
    if target.device.kind == "cpu":
        return "onnxruntime"
    if torch.device(device).type == "cuda" and triton_available(torch.device(device)) is None:
        return "triton"
    return "reference"


def _pipeline(pipeline: str | Pipeline | None, target: Target, calibrated: bool) -> Pipeline:
    if pipeline is None:
        return target.default_pipeline(calibrated)
    if isinstance(pipeline, Pipeline):
        return pipeline
    if isinstance(pipeline, str):
        return Pipeline.parse(pipeline)
    raise KompaktError(f"pipeline must be a pipeline string, got {type(pipeline).__name__}")


def _describe(model: Any) -> str:
    """One line naming what is being compiled, for status messages."""
    if isinstance(model, torch.nn.Module):
        return type(model).__name__
    if isinstance(model, onnx.ModelProto):
        return f"ModelProto '{model.graph.name}'"
    if isinstance(model, ir.Model):
        return f"onnx_ir.Model '{model.graph.name}'"
    return f"'{model}'"


def _capture(model: Any, example_inputs: Any, dynamic_shapes: Any) -> ir.Model:
    if isinstance(model, torch.nn.Module):
        return capture_module(model, example_inputs, dynamic_shapes)
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        return load_onnx(model)
    if isinstance(model, ir.Model):
        return normalize(model.clone(), source=f"ir.Model '{model.graph.name or '?'}'")
    raise KompaktError(
        "model must be a torch.nn.Module, a path to an .onnx file, an onnx.ModelProto or an "
        f"onnx_ir.Model; got {type(model).__name__}"
    )


def _capture_with_cache(model: Any, example_inputs: Any, max_length: Any):
    if not isinstance(model, torch.nn.Module):
        raise KompaktError(
            "kv_cache= captures a PyTorch causal LM; ONNX models bring their own cache inputs"
        )
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise KompaktError(f"kv_cache must be the cache length (an int >= 1), got {max_length!r}")
    ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if isinstance(example_inputs, Mapping):
        ids = example_inputs.get("input_ids")
    batch = int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 1
    return capture_with_cache(model, batch=batch, max_length=max_length)


def _example_feeds(captured: ir.Model, example_inputs: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Inputs to measure shapes with: the examples when they cover every graph input, else
    synthetic ones (symbolic dims = 1), with a note saying which."""
    names = [v.name for v in captured.graph.inputs]
    if example_inputs is None:
        return synthetic_feeds(captured)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        tensors = {
            k: v for k, v in example_inputs.items() if isinstance(v, torch.Tensor) and k in names
        }
    else:
        given = [t for t in example_inputs if isinstance(t, torch.Tensor)]
        tensors = dict(zip(names, given, strict=False))
    if set(tensors) != set(names):
        return synthetic_feeds(captured)
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in tensors.items())
    return tensors, f"example inputs {shapes}"


def _estimate(cost: CostModel, graph: ir.Model, feeds, note: str) -> LatencyEstimate | None:
    try:
        shapes = observed_shapes(graph, feeds)
    except KompaktError:
        shapes = {}  # the reference runtime cannot run it: static shapes only
        note += " (static shapes only: the reference runtime could not run the model)"
    nodes = cost.estimate(graph, shapes)
    return LatencyEstimate(shapes=note, seconds=cost.total_seconds(nodes), nodes=nodes)
