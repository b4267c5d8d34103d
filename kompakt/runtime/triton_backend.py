"""The Triton backend: one generated kernel per fused group, torch for everything else.

The plan is the reference runtime's `ExecutionPlan` (built once: buffers numbered and freed
after their last use) with a different kernel builder: a ``kompakt::FusedKernel`` node whose
pattern has a kernel family is bound to that family's Triton kernel (weights packed once, here);
any other node, and any fused node the family cannot take, runs through the reference's torch
ops. `TritonBackend.summary` lists both, and the report shows it.

On a CUDA device, a set of input shapes met a second time (a decode step) is captured in a CUDA
graph that later calls replay: one launch instead of hundreds, which is most of the decode time
of a small batch. Capture needs a run that never waits for the GPU on the host: the plan's shape
arithmetic runs on CPU tensors once per input signature (`kompakt.runtime.host_values`), and a
graph that still reads a data-derived device value on the host (`ExecutionPlan.host_syncs`) is
not captured; the backend then runs eagerly and the summary says why. None of this has run on a
GPU yet. Without a GPU the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``), which is how the test suite checks them.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping

import onnx_ir as ir
import torch

from kompakt.codegen.registry import binder_for
from kompakt.errors import CodegenError, KompaktError
from kompakt.ir.fused import is_fused, pattern_of
from kompakt.ir.tensors import to_torch
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
        self.graph_notes: list[str] = []
        self._unread: dict[int, frozenset[int]] = {}  # id(node) -> inputs its kernel never reads
        self.plan = ExecutionPlan(model, self.device, kernel_builder=self._build)
        self._drop_unread_constants()
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        if self.cuda_graphs and self.plan.host_syncs:
            more = len(self.plan.host_syncs) - 1
            self.graph_notes.append(
                f"no CUDA graphs: {self.plan.host_syncs[0]}" + (f" (+{more} more)" if more else "")
            )
            self.cuda_graphs = False
        self._seen: collections.Counter[tuple] = collections.Counter()
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    def _build(self, node: ir.Node, opset: int) -> Kernel:
        if is_fused(node):
            pattern = pattern_of(node)
            binder = binder_for(pattern)
            if binder is not None:
                try:
                    kernel = binder(node, self.device)
                except Exception as err:  # a binder bug must not cost the model: run the body
                    reason = (
                        err if isinstance(err, CodegenError) else f"{type(err).__name__}: {err}"
                    )
                    self.fallbacks.append(f"{node.name} ({pattern}): {reason}")
                else:
                    self.launched[pattern] += 1
                    self._unread[id(node)] = frozenset(getattr(kernel, "unread_inputs", ()))
                    return self._guarded(node, opset, pattern, kernel)
            self.through_torch[f"FusedKernel[{pattern}]"] += 1
        elif not (node.op_type == "Constant" and not node.inputs):
            self.through_torch[node.op_type] += 1
        return build_kernel(node, opset)

    def _guarded(self, node: ir.Node, opset: int, pattern: str, kernel: Kernel) -> Kernel:
        """The kernel, switching for good to the node's body when a call is refused (a dtype or
        shape the family checks only at run time); the summary says so."""
        state = {"run": kernel, "in_place": getattr(kernel, "in_place", None)}

        def guard(which: str):
            def run(*inputs):
                try:
                    return state[which](*inputs)
                except Exception as err:
                    # a family's run-time check, or Triton itself (a kernel this Triton version
                    # or this GPU cannot compile or fit); anything else is a real error
                    if not isinstance(err, CodegenError) and not _from_triton(err):
                        raise
                    self.fallbacks.append(f"{node.name} ({pattern}) at run time: {err}")
                    self.launched[pattern] -= 1
                    self.through_torch[f"FusedKernel[{pattern}]"] += 1
                    body = self._with_constants(node, build_kernel(node, opset))
                    state["run"] = state["in_place"] = body  # the body writes out of place
                    return body(*inputs)

            return run

        run = guard("run")
        if state["in_place"] is not None:  # a cache writer's donating variant (runtime.in_place)
            run.in_place = guard("in_place")
        return run

    def _with_constants(self, node: ir.Node, kernel: Kernel) -> Kernel:
        """``kernel`` with the constants `_drop_unread_constants` freed loaded again."""
        unread = self._unread.pop(id(node), frozenset())
        constants = {
            i: to_torch(node.inputs[i].const_value).to(self.device)
            for i in unread
            if node.inputs[i] is not None and node.inputs[i].const_value is not None
        }

        def run(*inputs):
            return kernel(*(constants.get(i, x) if x is None else x for i, x in enumerate(inputs)))

        return run

    def _drop_unread_constants(self) -> None:
        """Frees constants only bound kernels' unread inputs referred to (a quantized weight's
        unpacked integers and scales, once the binder holds its packed copy): on a GPU they
        would otherwise stay resident beside the packed weight."""
        read: set[int] = set()
        for step in self.plan.steps:
            unread = self._unread.get(id(step.node), frozenset())
            read.update(slot for i, slot in enumerate(step.inputs) if i not in unread)
        for slot in [s for s in self.plan._constants if s not in read]:
            if slot not in self.plan._output_slots:
                del self.plan._constants[slot]

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
        lines.extend(self.graph_notes)
        return "\n".join(lines)

    def run(self, feeds: Mapping[str, torch.Tensor], donate: bool = False) -> list[torch.Tensor]:
        feeds = {k: v.to(self.device) for k, v in feeds.items()}
        if not self.cuda_graphs:
            return self.plan.run(feeds, donate=donate)
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(feeds.items()))
        captured = self._graphs.get(key)
        if captured is not None:
            return captured.replay(feeds, donate)
        self._seen[key] += 1
        outputs = self.plan.run(feeds, donate=donate)  # eager: compiles kernels, warms allocators
        if self._seen[key] >= 2:  # a shape met twice (a decode step) is worth a graph
            try:
                self._graphs[key] = _Captured(self.plan, feeds, self._pool)
                self.graph_notes.append(f"CUDA graph captured for inputs {_shapes(feeds)}")
            except (RuntimeError, KompaktError) as err:  # an op that syncs with the host
                self.graph_notes.append(f"CUDA graph capture failed, running eagerly: {err}")
                self.cuda_graphs = False
        return outputs


def _from_triton(err: Exception) -> bool:
    return type(err).__module__.split(".")[0] == "triton"


def _shapes(feeds: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())


class _Captured:
    """One CUDA graph of the whole plan for one set of input shapes, with static buffers.

    The static inputs are the graph's own copies, so the plan runs donating them: KV caches are
    updated in place (kompakt.runtime.in_place). A caller that donates gets the updated caches
    back as views of those static inputs, not copies; fed back at the next step they are already
    in place and are not copied again. So a decode step moves no cache memory besides the new
    rows. Graphs share one memory pool (``pool``), so several shapes do not each hold their own.
    """

    def __init__(self, plan: ExecutionPlan, feeds: Mapping[str, torch.Tensor], pool) -> None:
        self.inputs = {k: v.clone() for k, v in feeds.items()}
        self.outputs, self._replay = capture_cuda_graph(
            lambda: plan.run(self.inputs, donate=True), pool
        )
        self._host_values = plan.host_values_for(self.inputs)  # replays read their memory
        storages = {t.untyped_storage().data_ptr() for t in self.inputs.values()}
        self._aliased = [o.untyped_storage().data_ptr() in storages for o in self.outputs]

    def replay(self, feeds: Mapping[str, torch.Tensor], donate: bool) -> list[torch.Tensor]:
        for name, tensor in feeds.items():
            static = self.inputs[name]
            if not _same_memory(tensor, static):
                static.copy_(tensor)
        self._replay()
        return [
            o if donate and aliased else o.clone()
            for o, aliased in zip(self.outputs, self._aliased, strict=True)
        ]


def capture_cuda_graph(
    run: Callable[[], list[torch.Tensor]], pool
) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Warms ``run`` up on a side stream, captures it in a CUDA graph and returns the outputs it
    wrote (the same memory at every replay) and the graph's replay. The tests put an eager
    stand-in with the same contract here to check the backend's logic without a GPU."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up on the side stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return outputs, graph.replay


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b``'s memory seen the same way (a static buffer fed back)."""
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape
