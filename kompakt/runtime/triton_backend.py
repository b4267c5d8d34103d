"""The Triton backend: one generated kernel per fused group, torch for everything else.

The plan is the reference runtime's `ExecutionPlan` (built once: buffers numbered and freed
after their last use) with a different kernel builder: a ``kompakt::FusedKernel`` node whose
pattern has a kernel family is bound to that family's Triton kernel (weights packed once, here);
any other node, and any fused node the family cannot take, runs through the reference's torch
ops. `TritonBackend.summary` lists both, and the report shows it.

On a CUDA device, each new set of input shapes is run once eagerly and then captured in a CUDA
graph that later calls replay: one launch instead of hundreds, which is most of the decode time
of a small batch. Without a GPU the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``), which is how the test suite checks them.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping

import onnx_ir as ir
import torch

from kompakt.codegen.registry import binder_for
from kompakt.errors import CodegenError, KompaktError
from kompakt.ir.fused import is_fused, pattern_of
from kompakt.runtime.plan import ExecutionPlan
from kompakt.runtime.reference.registry import Kernel, build_kernel


def triton_available(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device``; else the reason they cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install 'kompakt[gpu]')"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU is available"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        f"Triton kernels need a CUDA GPU (device '{device}'); to run them on the CPU for testing, "
        "set TRITON_INTERPRET=1 before importing kompakt"
    )


class TritonBackend:
    """Runs a compiled IR with Triton kernels for fused groups.

    Args:
        model: The IR, usually after the fusion passes.
        device: ``"cuda"`` (or ``"cpu"`` under ``TRITON_INTERPRET=1``).
        cuda_graphs: Capture a CUDA graph per input shape on CUDA devices.
    """

    name = "triton"

    def __init__(
        self, model: ir.Model, device: str | torch.device = "cuda", cuda_graphs: bool = True
    ) -> None:
        self.device = torch.device(device)
        problem = triton_available(self.device)
        if problem:
            raise KompaktError(f"the triton backend cannot run: {problem}")
        self.launched: collections.Counter[str] = collections.Counter()
        self.through_torch: collections.Counter[str] = collections.Counter()
        self.fallbacks: list[str] = []
        self.plan = ExecutionPlan(model, self.device, kernel_builder=self._build)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple, _Captured] = {}

    def _build(self, node: ir.Node, opset: int) -> Kernel:
        if is_fused(node):
            pattern = pattern_of(node)
            binder = binder_for(pattern)
            if binder is not None:
                try:
                    kernel = binder(node, self.device)
                except CodegenError as err:
                    self.fallbacks.append(f"{node.name} ({pattern}): {err}")
                else:
                    self.launched[pattern] += 1
                    return kernel
            self.through_torch[f"FusedKernel[{pattern}]"] += 1
        elif not (node.op_type == "Constant" and not node.inputs):
            self.through_torch[node.op_type] += 1
        return build_kernel(node, opset)

    def summary(self) -> str:
        """Which fused groups run as Triton kernels and which ops run through torch."""
        lines = [
            "triton kernels: "
            + (", ".join(f"{p} x{c}" for p, c in sorted(self.launched.items())) or "none")
        ]
        torch_ops = sorted(self.through_torch.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(
            "through torch: " + (", ".join(f"{op} x{c}" for op, c in torch_ops) or "nothing")
        )
        lines.extend(f"fell back to torch: {reason}" for reason in self.fallbacks)
        return "\n".join(lines)

    def run(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        feeds = {k: v.to(self.device) for k, v in feeds.items()}
        if not self.cuda_graphs:
            return self.plan.run(feeds)
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(feeds.items()))
        captured = self._graphs.get(key)
        if captured is None:
            outputs = self.plan.run(feeds)  # eager first: compiles kernels, warms allocators
            try:
                self._graphs[key] = _Captured(self.plan, feeds)
            except RuntimeError as err:  # an op that syncs with the host cannot be captured
                self.fallbacks.append(f"CUDA graph capture failed, running eagerly: {err}")
                self.cuda_graphs = False
            return outputs
        return captured.replay(feeds)


class _Captured:
    """One CUDA graph of the whole plan for one set of input shapes, with static buffers."""

    def __init__(self, plan: ExecutionPlan, feeds: Mapping[str, torch.Tensor]) -> None:
        self.inputs = {k: v.clone() for k, v in feeds.items()}
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            plan.run(self.inputs)  # warm-up on the side stream, as capture requires
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self.graph):
            self.outputs = plan.run(self.inputs)

    def replay(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        for name, tensor in feeds.items():
            self.inputs[name].copy_(tensor)
        self.graph.replay()
        return [o.clone() for o in self.outputs]
