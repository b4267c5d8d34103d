"""Host values: the shape arithmetic of a graph, computed once per input signature on the CPU.

Exported LLM graphs compute shapes at run time: ``Shape(x) -> Gather -> Concat -> Reshape``.
The reference kernels read those small tensors with ``.tolist()``. On a GPU every such read is
a device-to-host copy that waits for the GPU (a sync per Reshape), and a CUDA graph cannot be
captured at all while one happens.

But a value computed only from shapes and small constants depends on the graph inputs' shapes,
never on their contents, so for one input signature (shapes and dtypes of the feeds) it is a
constant. `analyse` finds those values statically:

- **shape-static** values: graph inputs, constants, and outputs of ops whose output shape
  follows from their inputs' shapes (and, for ops like Reshape, from inputs that are themselves
  host values). ``NonZero``, ``Compress`` and friends have data-dependent shapes and stop it.
- **host values**: small constants, ``Shape``/``Size`` of a shape-static value, and the outputs
  of shape-arithmetic ops (`HOST_OPS`) all of whose inputs are host values.

`ExecutionPlan` runs the host steps on CPU tensors the first time it meets a signature (copying to
the device only what a device op consumes as data), remembers the results, and on later runs
with that signature skips them: the device steps then never read a device value on the host.
What still does (a Reshape whose target shape comes from input data, say) is listed in
`HostAnalysis.syncs`; the Triton backend does not try to capture a CUDA graph over those.

A fused node's body computes shapes too: the inputs it uses only for that (`fused_host_reads`)
are host reads of the fused node, and its body runs as a plan with those inputs as host values,
remembered under their values as well as the shapes (they may come from data in the outer graph).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from kompakt.ir.fused import body_of, is_fused

HOST_CONSTANT_MAX_ELEMENTS = 64
"""Constants up to this many elements get a CPU copy that host steps and host reads use."""

HOST_READ_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
    "Slice": (1, 2, 3, 4),
    "Expand": (1,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "ConstantOfShape": (0,),
    "Pad": (1, 2, 3),
    "CenterCropPad": (1,),
    "OneHot": (1,),
    "Trilu": (1,),
    "TopK": (1,),
    "CumSum": (1,),
    "CumProd": (1,),
    "Dropout": (2,),
    **{
        op: (1,)
        for op in (
            "ReduceSum",
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceSumSquare",
        )
    },
}
"""Inputs that the reference kernels read as Python numbers (``.tolist()``, ``.item()``)."""

DATA_DEPENDENT_SHAPE = frozenset(
    {"NonZero", "Compress", "Unique", "NonMaxSuppression", "If", "Loop", "Scan"}
)
"""Ops whose output shape depends on input values: they always read the device on the host."""

SHAPE_OPS = frozenset({"Shape", "Size"})

HOST_OPS = frozenset(
    {
        *SHAPE_OPS,
        *("Identity", "Gather", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Slice"),
        *("Cast", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Sign", "Floor", "Ceil"),
        *("Max", "Min", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"),
        *("Not", "And", "Or", "Where", "Range", "ConstantOfShape", "Expand", "Tile"),
        *("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin"),
    }
)
"""Shape arithmetic: deterministic ops that run as host steps when every input is a host value."""


@dataclass
class HostAnalysis:
    """Which steps of a plan are host steps and which device reads remain.

    Attributes:
        host_steps: Indices (into the plan's step list) of the steps that run on the host.
        host_values: ids of the values those steps and the small constants hold.
        host_reads: For each remaining step index, the input positions it reads on the host
            whose values are host values (they get the CPU copy).
        syncs: Plain-language descriptions of host reads of values computed from data.
    """

    host_steps: set[int] = field(default_factory=set)
    host_values: set[int] = field(default_factory=set)
    host_reads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    syncs: list[str] = field(default_factory=list)


def fused_host_reads(node: ir.Node) -> tuple[int, ...]:
    """The inputs of a ``kompakt::FusedKernel`` that its body only computes shapes with: every
    use inside the body is a host read (`HOST_READ_INPUTS`), a Shape/Size, or shape arithmetic
    (`HOST_OPS`) whose results are in turn used only so. Kernel families take such inputs (axes,
    bounds, target shapes) at bind time and ignore them at run time."""
    return tuple(i for i, v in enumerate(body_of(node).inputs) if _only_on_host(v))


def _only_on_host(value: ir.Value) -> bool:
    uses = value.uses()
    if not uses or value.is_graph_output():
        return False
    for user, slot in uses:
        if user.domain not in ("", "ai.onnx"):
            return False
        if slot in HOST_READ_INPUTS.get(user.op_type, ()) or user.op_type in SHAPE_OPS:
            continue
        if user.op_type in HOST_OPS and all(_only_on_host(o) for o in user.outputs):
            continue
        return False
    return True


def analyse(
    nodes: Sequence[ir.Node],
    inputs: Sequence[ir.Value],
    constants: Mapping[int, int],
    host_inputs: Sequence[ir.Value] = (),
) -> HostAnalysis:
    """Classifies the steps ``nodes`` (in run order) of a graph with these inputs and
    ``constants`` (id of each constant value -> its number of elements); ``host_inputs`` are
    inputs given as host values (see `ExecutionPlan`)."""
    result = HostAnalysis()
    static: set[int] = {id(v) for v in inputs} | set(constants)
    result.host_values.update(
        key for key, count in constants.items() if count <= HOST_CONSTANT_MAX_ELEMENTS
    )
    result.host_values.update(id(v) for v in host_inputs)
    for index, node in enumerate(nodes):
        present = [v for v in node.inputs if v is not None]
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        reads = fused_host_reads(node) if is_fused(node) else HOST_READ_INPUTS.get(op, ())
        reads_data = [
            i
            for i in reads
            if i < len(node.inputs)
            and node.inputs[i] is not None
            and id(node.inputs[i]) not in result.host_values
        ]
        if op in SHAPE_OPS and all(id(v) in static for v in present):
            host = True
        else:
            host = op in HOST_OPS and all(id(v) in result.host_values for v in present)
        if host:
            result.host_steps.add(index)
            result.host_values.update(id(v) for v in node.outputs)
        else:
            host_positions = tuple(
                i
                for i in reads
                if i not in reads_data and i < len(node.inputs) and node.inputs[i] is not None
            )
            # A step that reads data on the host anyway runs as before, every input on the
            # device: a kernel like Range makes its output where its first input lives.
            if host_positions and not reads_data:
                result.host_reads[index] = host_positions
            for i in reads_data:
                result.syncs.append(
                    f"op '{node.op_type}' at node '{node.name}' reads input {i} "
                    f"('{node.inputs[i].name}') on the host, and it is computed from data"
                )
            if op in DATA_DEPENDENT_SHAPE:
                result.syncs.append(
                    f"op '{node.op_type}' at node '{node.name}' has a data-dependent output shape"
                )
        shape_follows = op not in DATA_DEPENDENT_SHAPE and not reads_data
        if host or (shape_follows and all(id(v) in static for v in present)):
            static.update(id(v) for v in node.outputs)
    return result
