"""ExecutionPlan: the IR lowered once into a flat list of steps that the reference runtime runs.

Building the plan resolves every node to a kernel (failing early, with the op and node named,
if one is missing), numbers every value with a slot, loads constants once, and computes where
each intermediate buffer can be freed. Running it is a loop over steps.

Shape arithmetic (`kompakt.runtime.host_values`) runs on CPU tensors, once per input signature:
the first run with given feed shapes and dtypes records the host steps' results, and later runs
with that signature skip those steps. So on a GPU a steady-state run (a decode step) reads no
device value on the host, unless `host_syncs` lists one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError, UnsupportedOpError
from kompakt.ir.metadata import module_of
from kompakt.ir.tensors import to_torch
from kompakt.runtime.host_values import SHAPE_OPS, HostAnalysis, analyse
from kompakt.runtime.in_place import donatable_updates
from kompakt.runtime.reference._common import moves_data
from kompakt.runtime.reference.ops_index import scatter_nd_in_place
from kompakt.runtime.reference.registry import Kernel, build_kernel

Observer = Callable[[ir.Node, Sequence[torch.Tensor | None], Sequence[torch.Tensor | None]], None]
"""Called after each step with the node, its inputs and its outputs (calibration, profiling)."""

_NONE = -1


_SIGNATURES_KEPT = 32  # input signatures whose host values a plan remembers


@dataclass(frozen=True)
class Step:
    node: ir.Node
    kernel: Kernel
    inputs: tuple[int, ...]  # slots, _NONE for an omitted optional input
    outputs: tuple[int, ...]  # slots, _NONE for an unused optional output
    free: tuple[int, ...] = ()  # slots whose last use is this step
    host: bool = False  # a host step: CPU tensors in and out (host_values)
    uploads: tuple[tuple[int, int], ...] = ()  # (CPU slot, device slot) copied after the step
    in_place: Kernel | None = None  # the kernel of a run that donates its feeds (in_place)


class ExecutionPlan:
    """Runs an IR model's main graph with torch ops on one device.

    Args:
        model: The model (or a subgraph, such as a fused node's body); topologically sorted.
        device: Where constants live and kernels run ("cpu", "cuda", ...).
        opset_imports: The opsets of a subgraph's nodes (a model carries its own).
        kernel_builder: Makes the kernel of each node; the reference op table by default. Other
            backends pass their own, falling back to the reference for what they do not run.
        host_inputs: Graph inputs that only feed shape arithmetic (a fused node's body gets its
            axes and target shapes so); they count as host values, and their values join the
            signature under which host results are remembered.
    """

    def __init__(
        self,
        model: ir.Model | ir.Graph,
        device: str | torch.device = "cpu",
        opset_imports: Mapping[str, int] | None = None,
        kernel_builder: Callable[[ir.Node, int], Kernel] = build_kernel,
        host_inputs: Collection[str] = (),
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
        constant_values: dict[int, ir.Value] = {}
        for value in graph.initializers.values():
            if id(value) not in slots:  # initializers that are also inputs are fed by the caller
                self._constants[slot(value)] = to_torch(value.const_value).to(self.device)
                constant_values[id(value)] = value

        problems: list[UnsupportedOpError] = []
        steps: list[Step] = []
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
                constant_values[id(node.outputs[0])] = node.outputs[0]
                continue
            ins = tuple(_NONE if v is None else self._use(slots, v, node) for v in node.inputs)
            outs = tuple(slot(v) if v.name or v.uses() else _NONE for v in node.outputs)
            steps.append(Step(node, kernel, ins, outs))
        if problems:
            raise problems[0] if len(problems) == 1 else _many_unsupported(problems)
        donatable = donatable_updates(graph)
        self.donatable = tuple(sorted({name for names in donatable.values() for name in names}))
        """Graph inputs a run with ``donate=True`` may overwrite (the KV caches)."""

        self._output_slots = [self._use(slots, v, None) for v in graph.outputs]
        self.output_names = [v.name for v in graph.outputs]
        self.num_slots = len(slots)
        self.step_seconds: list[float] = []
        sizes = {key: self._constants[slots[key]].numel() for key in constant_values}
        given = [v for v in graph.inputs if v.name in set(host_inputs)]
        host = analyse([step.node for step in steps], graph.inputs, sizes, given)
        self.host_syncs: list[str] = host.syncs
        """Host reads of data-derived device values left in a steady-state run (see module)."""
        steps, cached = self._split_host_steps(steps, host, slots)
        steps = [
            replace(step, in_place=_in_place_kernel(step)) if id(step.node) in donatable else step
            for step in steps
        ]
        keep = set(self._constants) | set(self._output_slots) | cached
        self.steps = self._with_frees(steps, keep)
        self._cached_slots = sorted(cached)
        self._remembered_outputs = [i for i, s in enumerate(self._output_slots) if s in cached]
        self._device_steps = (
            self._with_frees([step for step in steps if not step.host], keep)
            if host.host_steps
            else None
        )
        self._host_results: dict[tuple, list[torch.Tensor]] = {}

    def host_values_for(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The remembered host values (and their device copies) a run on ``feeds`` uses; empty
        when it uses none or the signature has not been run yet. A CUDA graph captured over the
        plan holds on to them: it reads their memory at every replay, and the plan forgets old
        signatures."""
        if self._device_steps is None:
            return []
        signature = self._signature([feeds[name] for name in self.input_names])
        return list(self._host_results.get(signature, ()))

    def _signature(self, inputs: Sequence[torch.Tensor]) -> tuple:
        """What host results are remembered under: every input's shape and dtype (in order),
        and the values of the inputs that only feed shape arithmetic (``host_inputs``)."""
        shapes = tuple((tuple(t.shape), t.dtype) for t in inputs)
        values = tuple(tuple(inputs[i].reshape(-1).tolist()) for i in self._host_input_positions)
        return shapes + values

    def _split_host_steps(self, steps: list[Step], host: HostAnalysis, slots: dict[int, int]):
        """Rewires host steps to CPU copies of their values (new slots) and device steps to read
        those copies where they read on the host; returns the steps (with a host flag and the
        uploads each host step makes) and the slots a steady-state run takes from the cache."""
        cpu: dict[int, int] = {}  # device slot -> its CPU copy's slot

        def cpu_slot(s: int) -> int:
            if s not in cpu:
                cpu[s] = self.num_slots
                self.num_slots += 1
                if s in self._constants:
                    self._constants[cpu[s]] = self._constants[s].cpu()
            return cpu[s]

        host_slot = {slots[key] for key in host.host_values if key in slots}
        produced = {s for i in host.host_steps for s in steps[i].outputs if s != _NONE}
        needed_on_device: set[int] = set(self._output_slots) & produced
        rewired: list[Step] = []
        for index, step in enumerate(steps):
            ins, outs, kernel = step.inputs, step.outputs, step.kernel
            if index in host.host_steps:
                if step.node.op_type in SHAPE_OPS and not all(s in host_slot for s in ins):
                    kernel = _on_stand_in(kernel)  # of a device value: reads its shape only
                else:
                    ins = tuple(cpu_slot(s) if s in host_slot else s for s in ins)
                outs = tuple(_NONE if s == _NONE else cpu_slot(s) for s in outs)
            else:
                reads = host.host_reads.get(index, ())
                ins = tuple(cpu_slot(s) if i in reads else s for i, s in enumerate(ins))
                needed_on_device.update(s for s in ins if s in produced)
            host_step = index in host.host_steps
            rewired.append(replace(step, kernel=kernel, inputs=ins, outputs=outs, host=host_step))
        cached = set(needed_on_device)
        back = {c: s for s, c in cpu.items()}
        for i, step in enumerate(rewired):
            if step.host:  # its results that device steps read as data are copied there
                uploads = tuple(
                    (c, back[c]) for c in step.outputs if c != _NONE and back[c] in needed_on_device
                )
                rewired[i] = replace(step, uploads=uploads)
            else:
                cached.update(s for s in step.inputs if s in back and s not in self._constants)
        self._host_inputs = [(s, cpu[s]) for s in self._input_slots if s in cpu]
        self._host_input_positions = [self._input_slots.index(s) for s, _ in self._host_inputs]
        self.host_slots = frozenset(cpu.values())
        """Slots holding CPU tensors (host values); every other slot holds device tensors."""
        return rewired, cached

    def _use(self, slots: dict[int, int], value: ir.Value, node: ir.Node | None) -> int:
        if id(value) not in slots:
            where = f"node '{node.name}' ({node.op_type})" if node is not None else "graph output"
            raise KompaktError(
                f"{where} uses value '{value.name}' before it is produced; "
                "the graph is not topologically sorted"
            )
        return slots[id(value)]

    def _with_frees(self, steps: list[Step], keep: set[int]) -> list[Step]:
        """``steps`` each freeing the slots (not in ``keep``) whose last use it is."""
        last_use: dict[int, int] = {}
        for index, step in enumerate(steps):
            for s in (*step.inputs, *step.outputs, *(d for _, d in step.uploads)):
                if s != _NONE:
                    last_use[s] = index
        frees: dict[int, list[int]] = {}
        for s, index in last_use.items():
            if s not in keep:
                frees.setdefault(index, []).append(s)
        return [replace(step, free=tuple(frees.get(i, ()))) for i, step in enumerate(steps)]

    def run(
        self,
        feeds: Mapping[str, torch.Tensor],
        observer: Observer | None = None,
        clock: Callable[[], float] | None = None,
        donate: bool = False,
    ) -> list[torch.Tensor]:
        """Runs the graph on ``feeds`` (every graph input by name); returns outputs in order.

        With ``clock`` (seconds; it must wait for the device on a GPU), each step is timed and
        `step_seconds` holds the times of this run, one per step. With ``donate``, the feeds
        named in `donatable` may be overwritten and outputs may share their memory
        (kompakt.runtime.in_place).
        """
        if clock is not None:
            self.step_seconds = []
        env: list[torch.Tensor | None] = [None] * self.num_slots
        for s, tensor in self._constants.items():
            env[s] = tensor
        for name, s in zip(self.input_names, self._input_slots, strict=True):
            env[s] = feeds[name]
        steps = self.steps
        signature = None
        for s, c in self._host_inputs:
            env[c] = env[s].cpu()
        if self._device_steps is not None:
            signature = self._signature([env[s] for s in self._input_slots])
            remembered = self._host_results.pop(signature, None)
            if remembered is not None:
                self._host_results[signature] = remembered  # most recently used: evicted last
            if remembered is not None and observer is None and clock is None:
                steps, signature = self._device_steps, None
                for s, tensor in zip(self._cached_slots, remembered, strict=True):
                    env[s] = tensor
        donate = donate and self._may_overwrite(feeds)
        for step in steps:
            args = [None if s == _NONE else env[s] for s in step.inputs]
            started = clock() if clock is not None else 0.0
            kernel = step.in_place if donate and step.in_place is not None else step.kernel
            try:
                result = kernel(*args)
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
            for c, d in step.uploads:
                env[d] = env[c].to(self.device)
            if observer is not None:
                observer(step.node, args, results)
            for s in step.free:
                env[s] = None
        if signature is not None:
            if signature not in self._host_results and len(self._host_results) >= _SIGNATURES_KEPT:
                del self._host_results[next(iter(self._host_results))]
            self._host_results[signature] = [env[s] for s in self._cached_slots]
        outputs = [env[s] for s in self._output_slots]
        for i in self._remembered_outputs:  # the caller may write into what it gets back
            outputs[i] = outputs[i].clone()
        return outputs

    def _may_overwrite(self, feeds: Mapping[str, torch.Tensor]) -> bool:
        """Whether a donating run can write into the donatable feeds: each is its own memory
        (not shared with another feed, not broadcast with a zero stride)."""
        if not self.donatable:
            return False
        owners: dict[int, int] = {}
        for tensor in feeds.values():
            key = tensor.untyped_storage().data_ptr()
            owners[key] = owners.get(key, 0) + 1
        for name in self.donatable:
            tensor = feeds[name]
            if owners[tensor.untyped_storage().data_ptr()] > 1:
                return False
            if any(st == 0 and n > 1 for st, n in zip(tensor.stride(), tensor.shape, strict=True)):
                return False
        return True


def _on_stand_in(kernel: Kernel) -> Kernel:
    """A Shape or Size kernel given a CPU tensor of its input's shape that holds no data, so
    that its result is made on the CPU whatever device the input is on."""
    return lambda x: kernel(torch.empty((), dtype=torch.bool).expand(x.shape))


def _in_place_kernel(step: Step) -> Kernel | None:
    """What a donating run executes for a node `donatable_updates` found: ScatterND in place, or
    a fused cache writer's ``in_place`` kernel (None: it runs out of place, as its body does)."""
    if step.node.op_type == "ScatterND":
        return moves_data(scatter_nd_in_place)
    return getattr(step.kernel, "in_place", None)


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
