"""quantize-weights: the grid math, the IR it writes, which layers it touches, and ORT fusion."""

import json

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kompakt import KompaktError, Pipeline
from kompakt.ir.tensors import to_torch
from kompakt.passes.base import CompileContext
from kompakt.passes.manager import PassManager
from kompakt.passes.quantize.emit import QUANT_KEY
from kompakt.passes.quantize.grid import Grid, quantize_rtn
from kompakt.runtime.plan import ExecutionPlan


def linear_model(k=256, n=64, weights=None, names=("fc",), lm_head=False) -> ir.Model:
    """x -> MatMul(fc) [-> MatMul(lm_head)]; node names carry module paths like torch's exporter."""
    torch.manual_seed(0)
    nodes, inits, prev = [], [], "x"
    layers = list(names) + (["lm_head"] if lm_head else [])
    for i, name in enumerate(layers):
        w = (
            weights
            if (weights is not None and i == 0)
            else torch.randn(k if i == 0 else n, n) * 0.05
        )
        inits.append(numpy_helper.from_array(w.numpy(), f"{name}.weight"))
        nodes.append(
            helper.make_node(
                "MatMul", [prev, f"{name}.weight"], [f"{name}_out"], name=f"/{name}/MatMul"
            )
        )
        prev = f"{name}_out"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["m", n])],
        inits,
    )
    from kompakt.lowering import load_onnx

    return load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def quantize(model: ir.Model, options: str = "") -> list:
    text = "canonicalize,quantize-weights" + (f"{{{options}}}" if options else "")
    return PassManager(Pipeline.parse(text)).run(model, CompileContext(progress=False))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [-1, 32])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric, group):
    torch.manual_seed(bits)
    w = torch.randn(96, 24)
    grid = Grid(bits, group, symmetric)
    qw = quantize_rtn(w, grid)
    assert int(qw.q.min()) >= grid.qmin and int(qw.q.max()) <= grid.qmax
    rows = grid.rows_per_group(96)
    step = qw.scale.repeat_interleave(rows, 0)[:96]
    # values clipped at the symmetric grid's negative end can be off by more; exclude them
    err = (qw.dequantize() - w).abs()
    assert (err <= step / 2 + 1e-6).float().mean() > 0.99


def test_zero_and_constant_weights_stay_finite_and_exact():
    w = torch.zeros(64, 8)
    w[:, 3] = 0.25  # a constant column
    for symmetric in (True, False):
        qw = quantize_rtn(w, Grid(4, 32, symmetric))
        assert torch.isfinite(qw.scale).all()
        torch.testing.assert_close(qw.dequantize(), w)


def test_nan_weight_is_refused_with_the_layer_name():
    w = torch.randn(64, 16)
    w[3, 3] = float("nan")
    model = linear_model(k=64, n=16, weights=w, names=("model.bad",))
    with pytest.raises(KompaktError, match="model.bad.*NaN"):
        quantize(model)


def test_ir_form_blocked_int4():
    model = linear_model()
    quantize(model, "bits=4,group-size=64")
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes["axis"].value == 0 and dq.attributes["block_size"].value == 64
    q, scale, zero = dq.inputs
    assert (q.dtype, scale.dtype, zero.dtype) == (
        ir.DataType.UINT4,
        ir.DataType.FLOAT,
        ir.DataType.UINT4,
    )
    assert list(q.shape) == [256, 64] and list(scale.shape) == [4, 64]
    assert json.loads(dq.metadata_props[QUANT_KEY]) == {
        "bits": 4,
        "group_size": 64,
        "symmetric": False,
        "method": "rtn",
    }
    assert "fc.weight" not in model.graph.initializers  # the float weight is gone
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.inputs[1] is dq.outputs[0]


def test_ir_form_per_channel_int8():
    model = linear_model()
    quantize(model, "bits=8,group-size=-1,symmetric=true")
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes["axis"].value == 1 and "block_size" not in dq.attributes
    assert len(dq.inputs) == 2 and dq.inputs[0].dtype == ir.DataType.INT8
    assert list(dq.inputs[1].shape) == [64]


def test_reference_runtime_computes_x_times_dequantized_weight():
    model = linear_model(k=100, n=48)  # K not a multiple of the group: short last group
    w = to_torch(model.graph.initializers["fc.weight"].const_value).clone()
    records = quantize(model, "bits=4,group-size=32")
    assert any("last group has 4 rows" in note for note in records[-1].result.notes)
    x = torch.randn(5, 100)
    (y,) = ExecutionPlan(model).run({"x": x})
    expected = x @ quantize_rtn(w, Grid(4, 32, False)).dequantize()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "bits"),
    [
        ("bits=4,group-size=128", 4),
        ("bits=8,group-size=-1,symmetric=true", 8),
        ("bits=8,group-size=64", 8),
    ],
)
def test_onnxruntime_fuses_to_matmulnbits(tmp_path, options, bits):
    model = linear_model(k=256, n=128)
    quantize(model, options)
    path = tmp_path / "q.onnx"
    from kompakt.lowering import export_onnx

    export_onnx(model, path)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    fused = [n for n in optimized.graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == 1
    assert (
        helper.get_attribute_value(next(a for a in fused[0].attribute if a.name == "bits")) == bits
    )
    x = torch.randn(3, 256)
    (ref,) = ExecutionPlan(model).run({"x": x})
    (out,) = session.run(None, {"x": x.numpy()})
    # ORT's default accuracy level quantizes activations to int8 inside MatMulNBits
    torch.testing.assert_close(
        torch.from_numpy(out), ref, rtol=0.02, atol=0.02 * ref.abs().max().item()
    )


def test_exclude_globs_and_lm_head():
    model = linear_model(
        k=64, n=64, names=("model.layers.0.q_proj", "model.layers.0.down_proj"), lm_head=True
    )
    (_, record) = quantize(model, "exclude=[*.down_proj]")
    assert (record.result.stats["quantized"], record.result.stats["kept"]) == (1, 2)
    assert record.result.stats["weight_bytes_before"] == 64 * 64 * 4
    kept = set(model.graph.initializers)
    assert {"model.layers.0.down_proj.weight", "lm_head.weight"} <= kept
    assert any("lm_head: kept in float" in n for n in record.result.notes)


def test_lm_head_quantized_on_request():
    model = linear_model(k=64, n=64, lm_head=True)
    (_, record) = quantize(model, "keep-lm-head=false")
    assert record.result.stats["quantized"] == 2


def test_weight_with_a_non_matmul_use_is_left_alone():
    model = linear_model(k=64, n=64)
    weight = model.graph.initializers["fc.weight"]
    other = ir.val("other", ir.DataType.FLOAT, [64, 64])
    model.graph.inputs.append(other)
    extra = ir.node("Mul", [weight, other], name="tied_use")  # depends on an input: not foldable
    extra.outputs[0].name = "weight_times_other"
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    (_, record) = quantize(model)
    assert record.result.stats["quantized"] == 0
    assert "also used outside MatMul" in record.result.notes[0]


def test_int3_values_live_in_an_int4_container():
    model = linear_model(k=64, n=32)
    quantize(model, "bits=3,group-size=32")
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    q = to_torch(dq.inputs[0].const_value)
    assert dq.inputs[0].dtype == ir.DataType.UINT4
    assert int(q.min()) >= 0 and int(q.max()) <= 7
