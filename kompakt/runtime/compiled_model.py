"""CompiledModel: what `kompakt.compile` returns. Call it, export it, save it, read its report."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kompakt.errors import InputError, KompaktError, did_you_mean
from kompakt.ir.tensors import torch_dtype
from kompakt.lowering.to_onnx import export_onnx
from kompakt.report import Report, render, render_kernel_times
from kompakt.runtime.backends import Backend, make_backend
from kompakt.targets.target import Target


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: torch.dtype
    dims: tuple[int | str | None, ...] | None  # ints are fixed; str/None are symbolic

    def describe(self) -> str:
        dims = (
            "?" if self.dims is None else ", ".join("?" if d is None else str(d) for d in self.dims)
        )
        return f"{self.name}: {str(self.dtype).replace('torch.', '')}[{dims}]"


class CompiledModel:
    """A compiled model: the IR after the pipeline, a backend to run it, and a report.

    Call it with torch tensors, positionally in graph-input order or by name; it returns a
    tensor, or a tuple when the graph has several outputs.
    """

    def __init__(
        self,
        model: ir.Model,
        *,
        target: Target,
        pipeline: str,
        backend: str,
        device: str | torch.device = "cpu",
        report: Report | None = None,
    ) -> None:
        self._model = model
        self.target = target
        self.pipeline = pipeline
        self.device = torch.device(device)
        self._backend: Backend = make_backend(backend, model, self.device)
        self._report = report or Report(str(target), target.device.description, backend, pipeline)
        summary = getattr(self._backend, "summary", None)
        # which groups run as generated kernels, which ops through torch (a loaded model's
        # report may come from another backend)
        self._report.backend = self._backend.name
        self._report.backend_notes = summary() if summary is not None else ""
        self.inputs = [_spec(v) for v in model.graph.inputs if not v.is_initializer()]
        self.output_names = [v.name for v in model.graph.outputs]

    @property
    def ir(self) -> ir.Model:
        """The compiled IR (an `onnx_ir.Model`). Treat it as read-only."""
        return self._model

    @property
    def backend(self) -> str:
        return self._backend.name

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feeds = self._feeds(args, kwargs)
        outputs = self._backend.run(feeds)
        device = next(iter(feeds.values())).device if feeds else self.device
        outputs = [o.to(device) if o.device != device else o for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _feeds(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        names = [s.name for s in self.inputs]
        if len(args) > len(names):
            raise InputError(
                f"got {len(args)} positional inputs; the model takes {len(names)}: {', '.join(names)}"
            )
        given = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name not in names:
                raise InputError(
                    f"unknown input '{name}'{did_you_mean(name, names)}; inputs: {', '.join(names)}"
                )
            if name in given:
                raise InputError(f"input '{name}' given both positionally and by name")
            given[name] = value
        missing = [n for n in names if n not in given]
        if missing:
            expected = "; ".join(s.describe() for s in self.inputs if s.name in missing)
            raise InputError(f"missing input(s): {expected}")
        return {spec.name: _check(spec, given[spec.name]) for spec in self.inputs}

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int = 20, **options: Any
    ) -> torch.Tensor:
        """Prefill the prompt, then decode one token at a time from the static KV cache.

        Needs a model compiled with ``kv_cache=<max length>``. Options: ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``eos_token_id``, ``pad_token_id``,
        meaning what they mean in Hugging Face's ``generate``; but the defaults are plain
        (greedy; no top-k, top-p or eos unless given), not the model's generation_config.
        Returns prompt and new tokens, ``[batch, S + new]``.
        """
        from kompakt.lowering.kv_cache import cache_spec_of
        from kompakt.runtime.generation import generate

        spec = cache_spec_of(self._model)
        if spec is None:
            raise InputError(
                "this model has no KV cache inputs; compile it with "
                "kompakt.compile(model, ..., kv_cache=<max length>) to generate"
            )
        run = functools.partial(self._backend.run, donate=True)  # caches are written in place
        return generate(run, spec, input_ids, max_new_tokens, **options)

    def profile(self, *args: Any, repeats: int = 3, **kwargs: Any) -> str:
        """Times every kernel of one run on ``args`` next to the cost model's prediction.

        Needs the reference or triton backend (ONNX Runtime runs the graph as one call). The rows
        go into the report (``print(cm.report())``); the returned text is that section.
        """
        from kompakt.runtime.kernel_times import measure

        plan = getattr(self._backend, "plan", None)
        if plan is None:
            raise KompaktError(
                f"per-kernel times need the reference or triton backend, not '{self.backend}'"
            )
        feeds = {k: v.to(self.device) for k, v in self._feeds(args, kwargs).items()}
        rows = measure(plan, feeds, self.target.device, self._model, repeats)
        interpreted = self.backend == "triton" and self.device.type == "cpu"
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        where = "Triton interpreter on the CPU" if interpreted else str(self.device)
        self._report.kernel_times = rows
        self._report.kernel_times_note = (
            f"{self.backend} backend on {where}, inputs {shapes}, median of {repeats}; "
            f"predicted for {self.target.device.name}"
        )
        return "\n".join(render_kernel_times(self._report, None)).strip()

    def export_onnx(
        self, path: str | os.PathLike, external_data: bool | None = None, matmulnbits: bool = False
    ) -> Path:
        """Writes ONNX checked by onnx.checker. By default standard ops only (quantized weights as
        DequantizeLinear); ``matmulnbits=True`` writes ONNX Runtime's MatMulNBits instead, as the
        onnxruntime backend runs it."""
        return export_onnx(self._model, path, external_data=external_data, matmulnbits=matmulnbits)

    def save(self, directory: str | os.PathLike) -> Path:
        """Saves to a folder (ONNX + safetensors + JSON); `kompakt.load` reads it back."""
        from kompakt.runtime.artifact import save_artifact

        return save_artifact(self, directory)

    def report(self) -> Report:
        """What the compile did; ``print()`` it, or ``render(verbose=True)`` for every row."""
        summary = getattr(self._backend, "summary", None)
        if summary is not None:  # run-time events (a fallback, a CUDA graph) since compile
            self._report.backend_notes = summary()
        return self._report

    def render_report(self, verbose: bool = False) -> str:
        return render(self._report, verbose=verbose)

    def __repr__(self) -> str:
        inputs = ", ".join(s.describe() for s in self.inputs)
        return f"CompiledModel(target='{self.target}', backend='{self.backend}', inputs=({inputs}), pipeline='{self.pipeline}')"


def _spec(value: ir.Value) -> InputSpec:
    dtype = torch_dtype(value.dtype) if value.dtype is not None else torch.float32
    dims = None
    if value.shape is not None:
        dims = tuple(
            d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
            for d in value.shape
        )
    return InputSpec(value.name, dtype, dims)


def _check(spec: InputSpec, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise InputError(f"input '{spec.name}' must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != spec.dtype:
        same_kind = value.dtype.is_floating_point == spec.dtype.is_floating_point and (
            value.dtype != torch.bool
        ) == (spec.dtype != torch.bool)
        if not same_kind:
            raise InputError(
                f"input '{spec.name}' must be {str(spec.dtype).replace('torch.', '')}, got "
                f"{str(value.dtype).replace('torch.', '')}"
            )
        value = value.to(spec.dtype)
    if spec.dims is not None:
        if value.dim() != len(spec.dims):
            raise InputError(
                f"input '{spec.name}' must have rank {len(spec.dims)} ({spec.describe()}), got shape {list(value.shape)}"
            )
        for index, (want, got) in enumerate(zip(spec.dims, value.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise InputError(
                    f"input '{spec.name}' dim {index} must be {want} ({spec.describe()}), got shape {list(value.shape)}"
                )
    return value
