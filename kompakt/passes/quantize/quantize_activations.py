"""quantize-activations: int8 inputs for MatMuls whose weights are already quantized (W8A8).

Written as standard ONNX QuantizeLinear -> DequantizeLinear in front of the MatMul, the "QDQ"
form ONNX Runtime recognises: measured with ORT 1.31 on CPU, a static per-tensor QDQ input and
an int8 DequantizeLinear weight are fused into QuantizeLinear + MatMulIntegerToFloat (an int8 x
int8 GEMM with a float output). The dynamic form (scales computed per token from the tensor at
run time) runs in ORT as written, as a blocked QuantizeLinear / DequantizeLinear pair, but is not
fused into an integer MatMul.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError
from kompakt.ir.builder import constant, first_in_graph, unique_name
from kompakt.ir.metadata import copy_module, module_of
from kompakt.ir.tensors import storage_bytes, to_torch, torch_dtype
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner
from kompakt.passes.quantize.emit import QUANT_KEY
from kompakt.passes.quantize.grid import sqnr_db
from kompakt.passes.quantize.smoothquant_math import (
    INT8_MAX,
    fake_quant_per_tensor,
    per_tensor_scale,
)
from kompakt.passes.registry import register_pass
from kompakt.progress import progress

ACT_QUANT_KEY = "kompakt.act_quant"
"""Activation DequantizeLinear metadata: JSON with bits, granularity, method."""
MIN_DYNAMIC_OPSET = 21  # blocked QuantizeLinear (one block per token) needs opset 21


@dataclass
class ActivationSite:
    """One activation read by MatMuls (as input 0) whose weights are dequantized constants."""

    input: ir.Value
    matmuls: list[ir.Node] = field(default_factory=list)

    @property
    def label(self) -> str:
        return module_of(self.matmuls[0]) or self.matmuls[0].name or self.input.name or "?"

    @property
    def k(self) -> int:
        return int(self.matmuls[0].inputs[1].producer().inputs[0].const_value.shape[0])


@register_pass
@dataclass(frozen=True)
class QuantizeActivations(Pass):
    """Quantize the inputs of MatMuls with quantized weights to int8 (symmetric, zero point 0).

    Static: one per-tensor scale per input, max|x| / 127 over the calibration data, measured
    block by block on the model as it is then (earlier blocks' activations already quantized).
    Dynamic: one scale per token (last axis), max|x| / 127, computed at run time; no calibration.
    A MatMul whose weight is still float (lm_head, by default) keeps a float input. With weights
    from quantize-weights{bits=8,group-size=-1,symmetric=true} this is W8A8; SmoothQuant before
    the weight quantization makes per-tensor scales work on LLMs (outlier channels).

    Before: y = MatMul(x, DequantizeLinear(Wq: i8[K, N], s_w: f32[N], axis=1))
    After:  y = MatMul(DequantizeLinear(QuantizeLinear(x, s_x, 0: i8), s_x, 0: i8),
                       DequantizeLinear(Wq: i8[K, N], s_w: f32[N], axis=1))
            static: s_x f32 scalar constant; dynamic: s_x = max(ReduceMax(|x|, -1) / 127, tiny),
            with QuantizeLinear/DequantizeLinear(axis=-1, block_size=K)

    Args:
        bits: Bits per activation; only 8 (int8) is supported.
        dynamic: Per-token scales computed at run time instead of per-tensor calibrated ones.
        exclude: Module-path globs (or weight names) whose MatMul inputs stay float.
    """

    name: ClassVar[str] = "quantize-activations"
    requires: ClassVar[frozenset[str]] = frozenset({"weights-quantized"})
    provides: ClassVar[frozenset[str]] = frozenset({"activations-quantized"})

    bits: int = 8
    dynamic: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise ValueError(
                f"bits must be 8 (int8 activations are the only ones supported); got {self.bits}"
            )

    @property
    def uses_calibration(self) -> bool:  # type: ignore[override]
        return not self.dynamic

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        # Checked first: static mode without data fails the same way as every calibrated pass.
        feeds = None if self.dynamic else calibration_feeds(model, ctx.calibration, self.name)
        sites, notes, kept_float = find_sites(model.graph, self.exclude)
        result = PassResult(changed=bool(sites), notes=notes)
        if self.dynamic:
            opset = model.opset_imports.get("", 0)
            if sites and opset < MIN_DYNAMIC_OPSET:
                raise KompaktError(
                    f"quantize-activations{{dynamic=true}} needs opset >= {MIN_DYNAMIC_OPSET} "
                    f"(blocked QuantizeLinear); the model is at opset {opset}"
                )
            for site in progress(sites, self.name, enabled=ctx.progress):
                insert_dynamic_qdq(model.graph, site)
                result.records += _records(site, "a8 dynamic per-token sym", None)
        else:
            self._static(model, feeds, sites, result, ctx)
        matmuls = sum(len(site.matmuls) for site in sites)
        result.stats.update(
            {"quantized_inputs": len(sites), "matmuls": matmuls, "kept_float": kept_float}
        )
        if feeds is not None:
            result.stats["calibration_batches"] = len(feeds)
        return result

    def _static(self, model: ir.Model, feeds, sites, result: PassResult, ctx) -> None:
        pending = {id(m): site for site in sites for m in site.matmuls}
        runner = BlockwiseRunner(model, feeds)
        for stage in progress(
            runner.stages(), self.name, enabled=ctx.progress, total=runner.num_stages()
        ):
            here: dict[int, ActivationSite] = {}
            for node in stage.nodes:  # a site whose consumers span stages is handled once
                site = pending.get(id(node))
                if site is not None:
                    here[id(site)] = site
            if not here:
                continue
            for site in here.values():
                for m in site.matmuls:
                    pending.pop(id(m), None)
            stats = stage.collect({id(site.input): {"absmax", "samples"} for site in here.values()})
            for site in here.values():
                stat = stats[id(site.input)]
                scale = per_tensor_scale(stat.absmax)
                samples = stat.samples
                error = sqnr_db(samples, fake_quant_per_tensor(samples, scale))
                insert_static_qdq(model.graph, site, scale)
                result.records += _records(site, "a8 static per-tensor sym", round(error, 2))


def find_sites(
    graph: ir.Graph, exclude: Sequence[str] = ()
) -> tuple[list[ActivationSite], list[str], int]:
    """Inputs to quantize (grouped by value, in graph order), notes on the MatMuls left alone,
    and how many MatMuls keep a float input."""
    sites: dict[int, ActivationSite] = {}
    notes: list[str] = []
    kept = 0
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        x, w = node.inputs
        label = module_of(node) or node.name
        dq = w.producer() if w is not None else None
        if x is None or x.const_value is not None:
            continue  # a constant input is not an activation
        if _is_activation_dq(x.producer()):
            continue  # already quantized (the pass ran before)
        if dq is None or not _is_weight_dq(dq):
            if w is not None and w.const_value is not None:
                notes.append(f"{label}: input kept in float (its weight is float)")
                kept += 1
            continue  # activation x activation (attention scores): not a weight MatMul
        names = {label, dq.inputs[0].name or ""}
        if any(fnmatch.fnmatchcase(n, p) for p in exclude for n in names if n):
            notes.append(f"{label}: input kept in float (excluded by pattern)")
            kept += 1
            continue
        sites.setdefault(id(x), ActivationSite(x)).matmuls.append(node)
    return list(sites.values()), notes, kept


def _is_weight_dq(node: ir.Node) -> bool:
    return (
        node.op_type == "DequantizeLinear"
        and node.inputs[0] is not None
        and node.inputs[0].const_value is not None
        and len(node.inputs[0].const_value.shape) == 2
    )


def _is_activation_dq(node: ir.Node | None) -> bool:
    return (
        node is not None
        and node.op_type == "DequantizeLinear"
        and ACT_QUANT_KEY in (node.metadata_props)
    )


def insert_static_qdq(graph: ir.Graph, site: ActivationSite, scale: float) -> None:
    """x -> QuantizeLinear(x, scale, 0: int8) -> DequantizeLinear -> MatMul, for each MatMul.

    The scale is the input's (q/k/v share it), but each MatMul gets its own pair with its own
    scale constant: ONNX Runtime 1.31 fuses Q -> DQ -> MatMul into MatMulIntegerToFloat only
    where the QuantizeLinear has one consumer, and merges identical Q nodes reading the same
    constants (measured; a shared pair leaves q/k/v and gate/up as float MatMuls)."""
    x = site.input
    dtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
    base = x.name or "activation"
    first = first_in_graph(graph, site.matmuls)
    for matmul in site.matmuls:
        label = module_of(matmul) or matmul.name
        s = constant(graph, torch.tensor(scale, dtype=torch_dtype(dtype)), f"{base}_act_scale")
        zero = constant(graph, torch.tensor(0, dtype=torch.int8), f"{base}_act_zero_point")
        quantize = ir.node("QuantizeLinear", [x, s, zero], name=f"{label}/quantize_input")
        dequantize = ir.node(
            "DequantizeLinear", [quantize.outputs[0], s, zero], name=f"{label}/dequantize_input"
        )
        _wire(graph, x, first, [quantize, dequantize], [matmul], "per-tensor static")


def insert_dynamic_qdq(graph: ir.Graph, site: ActivationSite) -> None:
    """x -> per-token scale s = max(max|x| / 127, tiny) -> blocked Q/DQ(x, s) -> MatMuls.
    One pair serves every MatMul of the input (ORT fuses none of them either way)."""
    x = site.input
    dtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
    base = x.name or "activation"
    torch_type = torch_dtype(dtype)
    axes = constant(graph, torch.tensor([-1], dtype=torch.int64), f"{base}_token_axis")
    levels = constant(graph, torch.tensor(INT8_MAX, dtype=torch_type), f"{base}_int8_max")
    # The floor keeps an all-zero token's scale positive (0 / 0 would be NaN).
    floor = constant(graph, torch.tensor(torch.finfo(torch_type).tiny), f"{base}_scale_floor")
    absolute = ir.node("Abs", [x], name=f"{site.label}/input_abs")
    top = ir.node("ReduceMax", [absolute.outputs[0], axes], attributes={"keepdims": 1})
    ratio = ir.node("Div", [top.outputs[0], levels])
    scale = ir.node("Max", [ratio.outputs[0], floor], name=f"{site.label}/input_scale")
    blocked = {"axis": -1, "block_size": site.k}  # one block per token
    quantize = ir.node(
        "QuantizeLinear",
        [x, scale.outputs[0]],
        attributes={**blocked, "output_dtype": int(ir.DataType.INT8)},
        name=f"{site.label}/quantize_input",
    )
    dequantize = ir.node(
        "DequantizeLinear",
        [quantize.outputs[0], scale.outputs[0]],
        attributes=blocked,
        name=f"{site.label}/dequantize_input",
    )
    token_shape = None if x.shape is None else ir.Shape([*list(x.shape)[:-1], 1])
    for node, shape in ((absolute, x.shape), (top, token_shape), (ratio, token_shape)):
        node.outputs[0].name = f"{base}_{node.op_type.lower()}"
        node.outputs[0].type, node.outputs[0].shape = x.type, shape
    scale.outputs[0].name = f"{base}_act_scale"
    scale.outputs[0].type, scale.outputs[0].shape = x.type, token_shape
    nodes = [absolute, top, ratio, scale, quantize, dequantize]
    _wire(graph, x, first_in_graph(graph, site.matmuls), nodes, site.matmuls, "per-token dynamic")


def _wire(
    graph: ir.Graph,
    x: ir.Value,
    before: ir.Node,
    nodes: list[ir.Node],
    matmuls: list[ir.Node],
    granularity: str,
) -> None:
    """Inserts ``nodes`` (ending in Q, DQ) before ``before`` and feeds ``matmuls`` from the DQ;
    other readers of x (a residual Add) keep the float value."""
    quantize, dequantize = nodes[-2], nodes[-1]
    base = x.name or "activation"
    quantize.outputs[0].name = unique_name(graph, f"{base}_int8")
    quantize.outputs[0].type = ir.TensorType(ir.DataType.INT8)
    quantize.outputs[0].shape = x.shape
    dequantize.outputs[0].name = unique_name(graph, f"{base}_fake_quantized")
    dequantize.outputs[0].type, dequantize.outputs[0].shape = x.type, x.shape
    dequantize.metadata_props[ACT_QUANT_KEY] = json.dumps(
        {
            "bits": 8,
            "granularity": granularity,
            "symmetric": True,
            "method": "quantize-activations",
        },
        sort_keys=True,
    )
    copy_module(matmuls[0], *nodes)
    for node in nodes:
        graph.insert_before(before, node)
    for matmul in matmuls:
        matmul.replace_input_with(0, dequantize.outputs[0])


def _records(site: ActivationSite, scheme: str, error_db: float | None) -> list[dict]:
    rows = []
    for matmul in site.matmuls:
        dq = matmul.inputs[1].producer()
        weight = to_torch(dq.inputs[0].const_value)
        k, n = weight.shape
        dtype = site.input.dtype if site.input.dtype is not None else ir.DataType.FLOAT
        rows.append(
            {
                "module": module_of(matmul) or matmul.name,
                "shape": [k, n],
                "scheme": f"{scheme}, weights {_weight_scheme(dq)}",
                # the MatMul's input, per token: float before, int8 after
                "bytes_before": int(storage_bytes(dtype, k)),
                "bytes_after": int(storage_bytes(ir.DataType.INT8, k)),
                # static: SQNR of the quantized input on the calibration data; dynamic: none
                # measured (each token's error is at most half a step, max|x_token| / 254)
                "input_sqnr_db": error_db,
            }
        )
    return rows


def _weight_scheme(dq: ir.Node) -> str:
    meta = dq.metadata_props.get(QUANT_KEY)
    if meta:
        info = json.loads(meta)
        group = "per-channel" if info.get("group_size") == -1 else f"g{info.get('group_size')}"
        return f"int{info.get('bits')} {group} {'sym' if info.get('symmetric') else 'asym'}"
    return dq.inputs[0].dtype.name.lower() if dq.inputs[0].dtype is not None else "?"
