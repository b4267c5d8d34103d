"""fuse-glu and the glu binder: what is grouped, that nothing changes, the Triton kernel."""

from __future__ import annotations

import onnx_ir as ir
import pytest
import torch
from conftest import EXAMPLE_SHAPE, OTHER_SHAPE, tokens
from fusion_helpers import assert_exports_standard_onnx, compile_for_gpu, first_output

import kompakt
from kompakt.codegen.glu.bind import bind
from kompakt.errors import CodegenError
from kompakt.ir.fused import is_fused, pattern_of

PLAIN = "canonicalize,infer-shapes"
GLU = PLAIN + ",fuse-glu"
MERGED = (
    PLAIN
    + ",quantize-weights{bits=4,group-size=16},merge-projections,fuse-dequant-matmul{glu=false}"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _groups(model):
    return [n for n in model.graph if is_fused(n) and pattern_of(n) == "glu"]


def _notes(cm):
    return [n for r in cm.report().passes if r.name == "fuse-glu" for n in r.result.notes]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_one_swiglu_per_layer_computing_exactly_what_the_unfused_model_does(captured, name):
    cm = compile_for_gpu(captured(name), GLU)
    groups = _groups(cm.ir)
    assert len(groups) == 2
    for node in groups:
        assert node.attributes["kind"].as_string() == "silu"
        assert list(node.attributes["roles"].as_strings()) == ["gate", "up"]
        assert [n.op_type for n in node.attributes["body"].as_graph()] == ["Sigmoid", "Mul", "Mul"]
    assert not [n for n in cm.ir.graph if n.op_type == "Sigmoid"]
    plain = compile_for_gpu(captured(name), PLAIN)
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE):
        ids = tokens(shape)
        torch.testing.assert_close(first_output(cm(ids)), first_output(plain(ids)), rtol=0, atol=0)


def test_on_merged_gate_up_the_kernel_reads_the_split_halves(captured):
    """After merge-projections gate and up are Split views of one GEMM output; the glu kernel
    takes them as they are, and matches the reference."""
    triton = compile_for_gpu(
        captured("llama"), MERGED + ",fuse-glu", backend="triton", device=DEVICE
    )
    reference = compile_for_gpu(captured("llama"), MERGED + ",fuse-glu", device=DEVICE)
    for node in _groups(triton.ir):
        assert {v.producer().op_type for v in node.inputs} == {"Split"}
    summary = triton._backend.summary()
    assert "glu x2" in summary and "fell back" not in summary and "Sigmoid" not in summary
    ids = tokens(EXAMPLE_SHAPE)
    torch.testing.assert_close(
        first_output(triton(ids)).cpu(), first_output(reference(ids)).cpu(), rtol=1e-5, atol=1e-5
    )


def test_exports_standard_onnx(captured, tmp_path):
    cm = compile_for_gpu(captured("llama"), GLU)
    assert_exports_standard_onnx(cm, tmp_path, tokens(EXAMPLE_SHAPE))


def _gelu_model(approximate: str | None, up_shape=("n", 8), extra_use: bool = False) -> ir.Model:
    g = ir.val("g", ir.DataType.FLOAT, ir.Shape(["n", 8]))
    u = ir.val("u", ir.DataType.FLOAT, ir.Shape(list(up_shape)))
    attrs = {} if approximate is None else {"approximate": approximate}
    gelu = ir.node("Gelu", [g], attributes=attrs, name="gelu")
    gelu.outputs[0].name = "a"
    gelu.outputs[0].shape, gelu.outputs[0].dtype = ir.Shape(["n", 8]), ir.DataType.FLOAT
    mul = ir.node("Mul", [u, gelu.outputs[0]], name="gate_mul")
    mul.outputs[0].name = "y"
    mul.outputs[0].shape, mul.outputs[0].dtype = ir.Shape(["n", 8]), ir.DataType.FLOAT
    outputs = [mul.outputs[0], *([gelu.outputs[0]] if extra_use else [])]
    graph = ir.Graph([g, u], outputs, nodes=[gelu, mul], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("approximate", "kind"), [(None, "gelu"), ("tanh", "gelu_tanh")])
def test_geglu_runs_as_a_glu_kernel(approximate, kind):
    model = _gelu_model(approximate)
    pipeline = "fuse-glu"
    triton = kompakt.compile(
        model, target="a100", pipeline=pipeline, backend="triton", device=DEVICE, progress=False
    )
    reference = kompakt.compile(
        _gelu_model(approximate), target="a100", pipeline="", backend="reference", progress=False
    )
    (node,) = _groups(triton.ir)
    assert node.attributes["kind"].as_string() == kind
    assert list(node.attributes["roles"].as_strings()) == [
        "gate",
        "up",
    ]  # Mul(u, act): either order
    assert "glu x1" in triton._backend.summary()
    g, u = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(triton(g=g, u=u).cpu(), reference(g=g, u=u), rtol=1e-5, atol=1e-5)


def test_what_the_kernel_cannot_take_stays_unfused_and_says_why():
    broadcast = kompakt.compile(
        _gelu_model(None, up_shape=(1, 8)),
        target="a100",
        pipeline="fuse-glu",
        backend="reference",
        progress=False,
    )
    assert not _groups(broadcast.ir)
    assert _notes(broadcast) == ["gelu: gate [n,8] and up [1,8] are not proven the same shape"]
    shared = kompakt.compile(
        _gelu_model(None, extra_use=True),
        target="a100",
        pipeline="fuse-glu",
        backend="reference",
        progress=False,
    )
    assert not _groups(shared.ir) and not _notes(shared)  # the activation is read elsewhere


def test_the_binder_refuses_an_unknown_kind():
    cm = compile_for_gpu(_gelu_model(None), "fuse-glu")
    (node,) = _groups(cm.ir)
    node.attributes["kind"] = ir.AttrString("kind", "relu")
    with pytest.raises(
        CodegenError, match=r"kind must be one of silu, gelu, gelu_tanh, got 'relu'"
    ):
        bind(node, torch.device(DEVICE))
