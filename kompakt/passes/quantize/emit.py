"""Writing a quantized weight into the IR as standard ONNX.

    W: f32[K, N]  ->  DequantizeLinear(q: int4/uint4/int8/uint8 [K, N], scale, zero_point)

- group-wise: ``axis=0, block_size=g``, scale/zero point [ceil(K/g), N] (opset 21 blocked form);
- per-channel: ``axis=1``, scale/zero point [N].
ONNX Runtime fuses both forms with the MatMul into MatMulNBits on CPU.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from kompakt.ir.builder import constant, first_in_graph
from kompakt.ir.metadata import set_module
from kompakt.passes.quantize.grid import QuantizedWeight
from kompakt.passes.quantize.layers import WeightSite

QUANT_KEY = "kompakt.quant"
"""DequantizeLinear metadata: JSON with bits, group_size, symmetric, method (what the int4
container alone does not say, e.g. that it holds 3-bit values)."""

KEEP_FLOAT_WEIGHTS = "kompakt.keep_float_weights"
"""In-memory graph flag (``graph.meta``, never serialized), set by the keep-float-weights pass:
while set, every weight DequantizeLinear remembers the float weight it replaced, for passes that
need the rounding error W - Ŵ later (lowrank-compensation)."""

FLOAT_WEIGHT = "kompakt.float_weight"
"""In-memory DequantizeLinear metadata (``node.meta``): the float weight it replaced."""


def remember_float_weight(graph: ir.Graph, node: ir.Node, weight: ir.TensorProtocol) -> None:
    """Keeps ``weight`` on the DequantizeLinear ``node`` if the graph asks for float weights."""
    if graph.meta.get(KEEP_FLOAT_WEIGHTS):
        node.meta[FLOAT_WEIGHT] = weight


def replace_with_dequantized(
    graph: ir.Graph, site: WeightSite, qw: QuantizedWeight, method: str
) -> ir.Node:
    """Feeds the site's MatMuls from a DequantizeLinear of ``qw``; drops the float weight."""
    grid = qw.grid
    base = site.weight.name or "weight"
    inputs = [constant(graph, qw.q, f"{base}_quantized", dtype=grid.storage_dtype)]
    per_channel = qw.scale.shape[0] == 1 and grid.group_size == -1
    scale = qw.scale[0] if per_channel else qw.scale
    inputs.append(constant(graph, scale, f"{base}_scale"))
    if qw.zero_point is not None:
        zero = qw.zero_point[0] if per_channel else qw.zero_point
        inputs.append(constant(graph, zero, f"{base}_zero_point", dtype=grid.storage_dtype))
    attributes = (
        {"axis": 1}
        if per_channel
        else {"axis": 0, "block_size": grid.rows_per_group(qw.q.shape[0])}
    )
    node = ir.node(
        "DequantizeLinear",
        inputs,
        attributes=attributes,
        name=f"{site.label}/dequantize_weight",
    )
    set_module(node, site.module)
    node.metadata_props[QUANT_KEY] = json.dumps(
        {
            "bits": grid.bits,
            "group_size": grid.group_size,
            "symmetric": grid.symmetric,
            "method": method,
        },
        sort_keys=True,
    )
    remember_float_weight(graph, node, site.weight.const_value)
    out = node.outputs[0]
    out.name = f"{base}_dequantized"
    out.type = site.weight.type
    out.shape = site.weight.shape
    graph.insert_before(first_in_graph(graph, site.matmuls), node)
    for matmul in site.matmuls:
        matmul.replace_input_with(1, out)
    if not site.weight.uses() and site.weight.name in graph.initializers:
        graph.initializers.pop(site.weight.name)
        # The site object may outlive this call (a pass's list of sites); the float weight must
        # not: freeing it as each weight is quantized keeps a pass's memory per layer.
        site.weight.const_value = None
    return node
