"""Reading a fused subgraph of elementwise ONNX ops into a `Chain`.

The fusion pass hands over a body graph: its inputs become the chain's inputs (role from shape:
the output's shape -> 'full', ``[D]`` -> 'row', one element -> 'scalar'), its nodes become steps
in order, its outputs the chain's outputs. Scalar constants inside the body (initializers or
``Constant`` nodes) become `Constant` steps. Composite forms need no pattern matching: the erf
GELU ``x*0.5*(1+Erf(x/sqrt2))`` and SiLU ``x*Sigmoid(x)`` are just their ops, fused anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx_ir as ir

from kompakt.codegen.pointwise.chain import POINTWISE_OPS, Chain, Operand, Step
from kompakt.errors import CodegenError

_SIMPLE = {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal"}
_SIMPLE |= {"Tanh", "Sigmoid", "Relu", "Erf", "Min", "Max", "Where"}
_CASTS = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16"}


def chain_from_graph(body: ir.Graph) -> Chain:
    """The chain computing ``body``; raises CodegenError naming the node for anything else."""
    out_shape = _output_shape(body)
    index: dict[ir.Value, int] = {}
    inputs = []
    for value in body.inputs:
        index[value] = len(inputs)
        inputs.append(Operand(_role(value, out_shape)))
    steps: list[Step] = []

    def emit(op: str, args: Sequence[int], attrs: dict | None = None) -> int:
        steps.append(Step(op, tuple(args), attrs or {}))
        return len(inputs) + len(steps) - 1

    def arg(value: ir.Value | None, where: str) -> int:
        if value is None:
            raise CodegenError(f"{where}: a required input is missing")
        if value not in index:
            constant = _scalar(value)
            if constant is None:
                raise CodegenError(
                    f"{where}: input '{value.name}' is not a body input, an earlier node's output"
                    " or a scalar constant"
                )
            index[value] = emit("Constant", (), {"value": constant})
        return index[value]

    for node in body:
        where = f"node '{node.name}' ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            raise CodegenError(f"{where}: domain '{node.domain}' is not supported")
        if len(node.outputs) != 1:
            raise CodegenError(f"{where}: pointwise nodes have one output")
        index[node.outputs[0]] = _step(node, where, emit, arg)

    outputs = tuple(arg(v, f"graph output '{v.name}'") for v in body.outputs)
    return Chain(inputs=tuple(inputs), steps=tuple(steps), outputs=outputs)


def _step(node: ir.Node, where: str, emit, arg) -> int:
    """Emits the steps of one node; returns the chain value holding its output."""
    op = node.op_type
    ins = list(node.inputs)
    if op in _SIMPLE:
        return emit(op, [arg(v, where) for v in ins])
    if op == "Identity":
        return arg(ins[0], where)
    if op == "Constant":
        tensor = node.attributes.get_tensor("value", None)
        number = tensor.numpy() if tensor is not None else _attr_number(node)
        value = _single(number)
        if value is None:
            raise CodegenError(f"{where}: only scalar constants fit a pointwise kernel")
        return emit("Constant", (), {"value": value})
    if op == "Gelu":
        approximate = node.attributes.get_string("approximate", "none")
        return emit("Gelu", [arg(ins[0], where)], {"approximate": approximate})
    if op == "Pow":
        exponent = _scalar(ins[1]) if len(ins) > 1 and ins[1] is not None else None
        if exponent is not None and math.isfinite(exponent):
            return emit("Pow", [arg(ins[0], where)], {"exponent": exponent})
        return emit("Pow", [arg(ins[0], where), arg(ins[1] if len(ins) > 1 else None, where)])
    if op == "Cast":
        to = ir.DataType(node.attributes.get_int("to", 0))
        if to not in _CASTS:
            raise CodegenError(f"{where}: Cast to {to.name} is not supported (fp32, fp16)")
        return emit("Cast", [arg(ins[0], where)], {"to": _CASTS[to]})
    if op == "Clip":
        return _clip(node, where, emit, arg)
    supported = ", ".join(sorted(set(POINTWISE_OPS) - {"Constant"} | {"Identity"}))
    raise CodegenError(f"{where}: op '{op}' is not supported in a pointwise kernel ({supported})")


def _clip(node: ir.Node, where: str, emit, arg) -> int:
    """Constant bounds become Clip attrs; bounds only known at run time become Max/Min."""
    ins = list(node.inputs) + [None, None]
    x = arg(ins[0], where)
    attrs: dict[str, float] = {}
    for name, value, fold in (("min", ins[1], "Max"), ("max", ins[2], "Min")):
        if name in node.attributes:  # opset < 11 kept the bounds as attributes
            attrs[name] = node.attributes.get_float(name)
        elif value is not None:
            constant = _scalar(value)
            if constant is None:
                x = emit(fold, [x, arg(value, where)])
            else:
                attrs[name] = constant
    return emit("Clip", [x], attrs) if attrs else x


def _scalar(value: ir.Value) -> float | None:
    """The value's constant when it is a one-element initializer or Constant output."""
    if value.const_value is not None:
        return _single(value.const_value.numpy())
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        tensor = producer.attributes.get_tensor("value", None)
        return _single(tensor.numpy() if tensor is not None else _attr_number(producer))
    return None


def _attr_number(node: ir.Node):
    for name in ("value_float", "value_int"):
        if name in node.attributes:
            return node.attributes[name].value
    return None


def _single(array) -> float | None:
    if array is None:
        return None
    size = getattr(array, "size", 1)
    if size != 1:
        return None
    return float(array.reshape(()) if hasattr(array, "reshape") else array)


def _output_shape(body: ir.Graph) -> tuple | None:
    shapes = [v.shape for v in body.outputs if v.shape is not None]
    if shapes:
        return _dims(shapes[0])
    known = [_dims(v.shape) for v in body.inputs if v.shape is not None]
    return max(known, key=len) if known else None


def _dims(shape: ir.Shape) -> tuple:
    """Ints for static dims, names (or None when unknown) for symbolic ones."""
    return tuple(d if isinstance(d, int) else d.value for d in shape)


def _role(value: ir.Value, out_shape: tuple | None) -> str:
    if value.shape is None:
        return "full"  # unknown: launch_chain checks the shape at run time
    dims = _dims(value.shape)
    if all(d == 1 for d in dims) and dims != out_shape:  # [] or [1]: not an unknown dim
        return "scalar"
    if out_shape is None or _same(dims, out_shape):
        return "full"
    if (
        out_shape
        and len(dims) <= len(out_shape)
        and all(d == 1 for d in dims[:-1])
        and _same(dims[-1:], out_shape[-1:])
    ):
        return "row"
    raise CodegenError(
        f"body input '{value.name}' has shape {list(dims)}: neither the output's {list(out_shape)},"
        " a row of its last dim nor one element"
    )


def _same(a: tuple, b: tuple) -> bool:
    # None is an unknown dim: it matches anything.
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b, strict=True)
    )
