"""lower-to-matmulnbits: exact repacking of every weight scheme, and ORT running the result."""

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from test_quantize_weights import linear_model, quantize

from kompakt import Pipeline
from kompakt.ir.builder import IR_VERSION
from kompakt.lowering import export_onnx
from kompakt.passes.base import CompileContext
from kompakt.passes.lower.lower_to_matmulnbits import LowerToMatMulNBits
from kompakt.runtime.plan import ExecutionPlan

SCHEMES = [
    "bits=4,group-size=32",
    "bits=4,group-size=128,symmetric=true",
    "bits=4,group-size=-1",
    "bits=8,group-size=-1,symmetric=true",
    "bits=8,group-size=64",
    "bits=3,group-size=16",
    "bits=2,group-size=64,symmetric=true",
]


def lowered_copy(model: ir.Model, **options) -> ir.Model:
    copy = model.clone()
    result = LowerToMatMulNBits(**options).run(copy, CompileContext(progress=False))
    assert result.stats["lowered"] >= 1
    return copy


def ort_session(model: ir.Model) -> ort.InferenceSession:
    proto = ir.to_proto(model)
    proto.ir_version = IR_VERSION
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k", [96, 100, 256])  # 100: ragged last block; 96: odd block count
@pytest.mark.parametrize("scheme", SCHEMES)
def test_repacking_is_exact(scheme, k):
    model = linear_model(k=k, n=40)
    quantize(model, scheme)
    lowered = lowered_copy(model)
    assert [n.op_type for n in lowered.graph] == ["MatMulNBits"]
    assert lowered.opset_imports["com.microsoft"] == 1
    x = torch.randn(3, k)
    (expected,) = ExecutionPlan(model).run({"x": x})
    (actual,) = ExecutionPlan(lowered).run({"x": x})
    # same weights, different BLAS layout (x @ W vs x @ Wᵀ): equal up to float rounding; a
    # packing error would be off by whole quantization steps (~1e-2 here)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_onnxruntime_agrees_at_float32_accuracy(scheme):
    model = linear_model(k=256, n=64)
    quantize(model, scheme)
    lowered = lowered_copy(model, accuracy_level=1)
    x = torch.randn(5, 256)
    (expected,) = ExecutionPlan(model).run({"x": x})
    (out,) = ort_session(lowered).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)


def test_eight_bit_uses_small_kernel_blocks():
    model = linear_model(k=256, n=64)
    quantize(model, "bits=8,group-size=128")
    (node,) = list(lowered_copy(model).graph)
    assert node.attributes["block_size"].value == 32
    (node,) = list(lowered_copy(model, block_size_8bit=64).graph)
    assert node.attributes["block_size"].value == 64


def test_relu_between_quantized_matmuls_is_lowered(tmp_path):
    """ORT 1.31 leaves DQ->MatMul->Relu->DQ->MatMul unfused on its own; the lowering does not."""
    model = linear_model(k=64, n=64, names=("fc1", "fc2"))
    fc1_out = next(n for n in model.graph if n.name == "/fc1/MatMul").outputs[0]
    relu = ir.node("Relu", [fc1_out], name="act")
    relu.outputs[0].name = "act_out"
    fc2 = next(n for n in model.graph if n.name == "/fc2/MatMul")
    model.graph.insert_before(fc2, relu)
    fc2.replace_input_with(0, relu.outputs[0])
    quantize(model)
    path = export_onnx(model, tmp_path / "m.onnx", matmulnbits=True)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops == ["MatMulNBits", "Relu", "MatMulNBits"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 64)
    (expected,) = ExecutionPlan(model).run({"x": x})
    (out,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(
        torch.from_numpy(out), expected, rtol=0.02, atol=0.02 * expected.abs().max().item()
    )


def test_float_matmuls_and_odd_blocks_are_left_alone():
    model = linear_model(k=64, n=64)
    result = LowerToMatMulNBits().run(model, CompileContext())
    assert result.stats["lowered"] == 0 and [n.op_type for n in model.graph] == ["MatMul"]


def test_pipeline_option_parsing():
    (p,) = Pipeline.parse("lower-to-matmulnbits{accuracy-level=1,block-size-8bit=64}").passes
    assert (p.accuracy_level, p.block_size_8bit) == (1, 64)
