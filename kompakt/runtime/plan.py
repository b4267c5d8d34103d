"""ExecutionPlan: the IR lowered once into a flat list of steps that the reference runtime runs.

Building the plan resolves every node to a kernel (failing early, with the op and node named,
if one is missing), numbers every value with a slot, loads constants once, and computes where
each intermediate buffer can be freed. Running it is a loop over steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError, UnsupportedOpError
from kompakt.ir.metadata import module_of
from kompakt.ir.tensors import to_torch
from kompakt.runtime.reference.registry import Kernel, build_kernel

Observer = Callable[[ir.Node, Sequence[torch.Tensor | None], Sequence[torch.Tensor | None]], None]
"""Called after each step with the node, its inputs and its outputs (calibration, profiling)."""

_NONE = -1


@dataclass(frozen=True)
class Step:
    node: ir.Node
    kernel: Kernel
    inputs: tuple[int, ...]  # slots, _NONE for an omitted optional input
    outputs: tuple[int, ...]  # slots, _NONE for an unused optional output
    free: tuple[int, ...]  # slots whose last use is this step


class ExecutionPlan:
    """Runs an IR model's main graph with torch ops on one device.

    Args:
        model: The model (or a subgraph, such as a fused node's body); topologically sorted.
        device: Where constants live and kernels run ("cpu", "cuda", ...).
        opset_imports: The opsets of a subgraph's nodes (a model carries its own).
        kernel_builder: Makes the kernel of each node; the reference op table by default. Other
            backends pass their own, falling back to the reference for what they do not run.
    """

    def __init__(
        self,
        model: ir.Model | ir.Graph,
        device: str | torch.device = "cpu",
        opset_imports: Mapping[str, int] | None = None,
        kernel_builder: Callable[[ir.Node, int], Kernel] = build_kernel,
    ) -> None:
        graph = model.graph if isinstance(model, ir.Model) else model
        imports = model.opset_imports if isinstance(model, ir.Model) else (opset_imports or {})
        self.device = torch.device(device)
        self.input_names = [v.name for v in graph.inputs]
        slots: dict[int, int] = {}

        def slot(value: ir.Value) -> int:
            return slots.setdefault(id(value), len(slots))

        self._input_slots = [slot(v) for v in graph.inputs]
        self._constants: dict[int, torch.Tensor] = {}
        for value in graph.initializers.values():
            if id(value) not in slots:  # initializers that are also inputs are fed by the caller
                self._constants[slot(value)] = to_torch(value.const_value).to(self.device)

        problems: list[UnsupportedOpError] = []
        raw_steps = []
        for node in graph:
            domain = node.domain if node.domain != "ai.onnx" else ""
            opset = node.version or imports.get(domain, 1)
            try:
                kernel = kernel_builder(node, opset)
            except UnsupportedOpError as err:
                problems.append(err)
                continue
            if node.op_type == "Constant" and not node.inputs:
                # Evaluated once, here, and kept on the plan's device like an initializer.
                self._constants[slot(node.outputs[0])] = kernel().to(self.device)
                continue
            ins = tuple(_NONE if v is None else self._use(slots, v, node) for v in node.inputs)
            outs = tuple(slot(v) if v.name or v.uses() else _NONE for v in node.outputs)
            raw_steps.append((node, kernel, ins, outs))
        if problems:
            raise problems[0] if len(problems) == 1 else _many_unsupported(problems)

        self._output_slots = [self._use(slots, v, None) for v in graph.outputs]
        self.output_names = [v.name for v in graph.outputs]
        self.steps = self._with_frees(raw_steps)
        self.num_slots = len(slots)
        self.step_seconds: list[float] = []

    def _use(self, slots: dict[int, int], value: ir.Value, node: ir.Node | None) -> int:
        if id(value) not in slots:
            where = f"node '{node.name}' ({node.op_type})" if node is not None else "graph output"
            raise KompaktError(
                f"{where} uses value '{value.name}' before it is produced; "
                "the graph is not topologically sorted"
            )
        return slots[id(value)]

    def _with_frees(self, raw_steps) -> list[Step]:
        keep = set(self._constants) | set(self._output_slots)
        last_use: dict[int, int] = {}
        for index, (_, _, ins, outs) in enumerate(raw_steps):
            for s in (*ins, *outs):
                if s != _NONE:
                    last_use[s] = index
        frees: dict[int, list[int]] = {}
        for s, index in last_use.items():
            if s not in keep:
                frees.setdefault(index, []).append(s)
        return [
            Step(node, kernel, ins, outs, tuple(frees.get(i, ())))
            for i, (node, kernel, ins, outs) in enumerate(raw_steps)
        ]

    def run(
        self,
        feeds: Mapping[str, torch.Tensor],
        observer: Observer | None = None,
        clock: Callable[[], float] | None = None,
    ) -> list[torch.Tensor]:
        """Runs the graph on ``feeds`` (every graph input by name); returns outputs in order.

        With ``clock`` (seconds; it must wait for the device on a GPU), each step is timed and
        `step_seconds` holds the times of this run, one per step.
        """
        if clock is not None:
            self.step_seconds = []
        env: list[torch.Tensor | None] = [None] * self.num_slots
        for s, tensor in self._constants.items():
            env[s] = tensor
        for name, s in zip(self.input_names, self._input_slots, strict=True):
            env[s] = feeds[name]
        for step in self.steps:
            args = [None if s == _NONE else env[s] for s in step.inputs]
            started = clock() if clock is not None else 0.0
            try:
                result = step.kernel(*args)
            except KompaktError:
                raise
            except Exception as err:  # a torch error inside a kernel: say where it happened
                raise _kernel_failure(step.node, args, err) from err
            if clock is not None:
                self.step_seconds.append(clock() - started)
            results = (result,) if isinstance(result, torch.Tensor) else tuple(result)
            for s, tensor in zip(step.outputs, results, strict=False):
                if s != _NONE:
                    env[s] = tensor
            if observer is not None:
                observer(step.node, args, results)
            for s in step.free:
                env[s] = None
        return [env[s] for s in self._output_slots]


def _many_unsupported(problems: list[UnsupportedOpError]) -> UnsupportedOpError:
    by_op: dict[str, list[UnsupportedOpError]] = {}
    for p in problems:
        by_op.setdefault(p.op, []).append(p)
    parts = []
    for op, found in by_op.items():
        first = found[0]
        where = f" (from module '{first.module}')" if first.module else ""
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        reason = f" ({first.detail})" if first.detail else ""
        parts.append(f"'{op}' at node '{first.node}'{where}{more}{reason}")
    first = problems[0]
    message = (
        f"the reference runtime cannot run {len(by_op)} ops used by {len(problems)} nodes: "
        + "; ".join(parts)
    )
    return UnsupportedOpError(first.op, first.node, first.module, message=message)


def _kernel_failure(node: ir.Node, args: list, err: Exception) -> KompaktError:
    shapes = ", ".join(
        "None" if a is None else f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}"
        for a in args
    )
    module = module_of(node)
    where = f" (from module '{module}')" if module else ""
    return KompaktError(
        f"op '{node.op_type}' at node '{node.name}'{where} failed on inputs ({shapes}): "
        f"{type(err).__name__}: {err}"
    )
