"""Backends: what executes a compiled IR. Each takes named torch tensors, returns a list.

- ``reference``: kompakt's own torch op table (CPU or CUDA); the semantic definition.
- ``onnxruntime``: the IR serialized and run by an ONNX Runtime session (CPU); the default for
  ``cpu*`` targets, where ORT fuses quantized MatMuls into MatMulNBits.
- ``triton``: fused groups as Triton kernels, other ops through torch, CUDA graphs on the GPU;
  the default for GPU targets when a GPU is present (runtime/triton_backend.py).
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir
import torch

from kompakt.errors import KompaktError
from kompakt.ir.builder import IR_VERSION
from kompakt.runtime.plan import ExecutionPlan

BACKENDS = ("reference", "onnxruntime", "triton")

# A protobuf message cannot exceed 2 GiB; bigger models go to ORT through a file.
_IN_MEMORY_LIMIT = 1_800_000_000


_FLOAT8 = frozenset(
    {
        ir.DataType.FLOAT8E4M3FN,
        ir.DataType.FLOAT8E4M3FNUZ,
        ir.DataType.FLOAT8E5M2,
        ir.DataType.FLOAT8E5M2FNUZ,
    }
)


class Backend(Protocol):
    name: str

    def run(self, feeds: Mapping[str, torch.Tensor], donate: bool = False) -> list[torch.Tensor]:
        """Graph outputs in order for ``feeds`` (every input by name). ``donate``: the caller
        will not read the feeds again, so the backend may overwrite them (in_place), and the
        updated caches it returns may be the backend's own buffers, which the next call with
        the same shapes overwrites (`generate` feeds them straight back)."""
        ...


class ReferenceBackend:
    """Runs the IR with the reference runtime on ``device``."""

    name = "reference"

    def __init__(self, model: ir.Model, device: str | torch.device = "cpu") -> None:
        self.plan = ExecutionPlan(model, device)
        self.device = self.plan.device

    def run(self, feeds: Mapping[str, torch.Tensor], donate: bool = False) -> list[torch.Tensor]:
        return self.plan.run({k: v.to(self.device) for k, v in feeds.items()}, donate=donate)


class OnnxRuntimeBackend:
    """Runs the IR in an ONNX Runtime CPU session.

    Args:
        model: The IR (not modified).
        threads: intra-op threads; ORT's default (one per physical core) when None.
    """

    name = "onnxruntime"

    def __init__(self, model: ir.Model, threads: int | None = None) -> None:
        import onnxruntime as ort

        model = lower_for_onnxruntime(model)
        self.op_counts = collections.Counter(
            (f"{n.domain}::{n.op_type}" if n.domain else n.op_type) for n in model.graph
        )  # what ORT is given (after lowering), for tests and reports
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only; ORT's warnings are not the user's business
        if any(
            n.op_type == "QuantizeLinear" and n.outputs[0].dtype in _FLOAT8 for n in model.graph
        ):
            # ORT 1.31 fuses Q/DQ around a MatMul into MatMulIntegerToFloat, which rejects float8
            # inputs and fails the load; its plain float8 Q/DQ kernels run such models correctly.
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        self._tmp: tempfile.TemporaryDirectory | None = None
        folder = _external_data_folder(model)
        if folder is not None:
            # Weights mapped from a saved model stay on disk; tell ORT where they are, since a
            # model given as bytes has no folder of its own.
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", folder
            )
        try:
            source = self._serialize(model)
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise KompaktError(f"onnxruntime cannot load this model: {_first_line(err)}") from err
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _serialize(self, model: ir.Model) -> bytes | str:
        saved = model.ir_version
        model.ir_version = IR_VERSION  # ORT 1.31 rejects IR > 13
        try:
            weight_bytes = sum(
                v.const_value.nbytes
                for v in model.graph.initializers.values()
                if v.const_value is not None
            )
            if weight_bytes < _IN_MEMORY_LIMIT:
                return ir.to_proto(model).SerializeToString()
            self._tmp = tempfile.TemporaryDirectory(prefix="kompakt-ort-")
            path = Path(self._tmp.name) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return str(path)
        finally:
            model.ir_version = saved

    def run(self, feeds: Mapping[str, torch.Tensor], donate: bool = False) -> list[torch.Tensor]:
        inputs = {name: _to_numpy(name, t) for name, t in feeds.items()}  # copies: donate moot
        try:
            outputs = self.session.run(None, inputs)
        except Exception as err:
            raise KompaktError(f"onnxruntime failed: {_first_line(err)}") from err
        return [torch.from_numpy(np.asarray(o)) for o in outputs]


def lower_for_onnxruntime(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with fused groups inlined and quantized MatMuls as MatMulNBits.

    Tensors are shared, not copied.
    """
    from kompakt.ir.fused import inline_fused
    from kompakt.passes.base import CompileContext
    from kompakt.passes.lower.lower_to_matmulnbits import LowerToMatMulNBits

    inlined = inline_fused(model)
    if not any(n.op_type == "DequantizeLinear" for n in inlined.graph):
        return inlined
    lowered = inlined.clone() if inlined is model else inlined
    LowerToMatMulNBits().run(lowered, CompileContext(progress=False))
    return lowered


def _external_data_folder(model: ir.Model) -> str | None:
    folders = {
        tensor.base_dir
        for value in model.graph.initializers.values()
        if isinstance(tensor := value.const_value, ir.ExternalTensor)
    }
    if len(folders) > 1:
        raise KompaktError(
            f"the model's external weights live in several folders ({sorted(map(str, folders))})"
        )
    return str(folders.pop()) if folders else None


def _to_numpy(name: str, tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        raise KompaktError(f"input '{name}': the onnxruntime backend cannot take bfloat16 tensors")
    return tensor.detach().cpu().contiguous().numpy()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def make_backend(name: str, model: ir.Model, device: str | torch.device = "cpu") -> Backend:
    if name == "reference":
        return ReferenceBackend(model, device)
    if name == "onnxruntime":
        if torch.device(device).type != "cpu":
            raise KompaktError(
                "the onnxruntime backend runs on the CPU only; use backend='reference'"
            )
        return OnnxRuntimeBackend(model)
    if name == "triton":
        from kompakt.runtime.triton_backend import TritonBackend

        return TritonBackend(model, device)
    raise KompaktError(f"unknown backend '{name}'; backends: {', '.join(BACKENDS)}")
