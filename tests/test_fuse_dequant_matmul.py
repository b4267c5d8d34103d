"""fuse-dequant-matmul and the FusedKernel node: what it groups, and that nothing changes."""

from __future__ import annotations

import collections

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import EXAMPLE_SHAPE, tokens
from fusion_helpers import compile_for_gpu, first_output

import kompakt
from kompakt.ir.fused import body_of, inline_fused, is_fused
from kompakt.ir.verify import VerificationError, verify

QUANT = "canonicalize,infer-shapes,quantize-weights{bits=4,group-size=16}"


def _compile(captured, name, pipeline, backend="reference"):
    return kompakt.compile(
        captured(name), target="a100", pipeline=pipeline, backend=backend, progress=False
    )


def _fused(model):
    return [n for n in model.graph if is_fused(n)]


def test_llama_layers_fuse_with_their_epilogues(captured):
    cm = _compile(captured, "llama", QUANT + ",fuse-dequant-matmul")
    fused = _fused(cm.ir)
    # 2 layers x (q, k, v, o, gate, up, down); lm_head stays float
    assert len(fused) == 14
    acts = collections.Counter(n.attributes["act"].as_string() for n in fused)
    assert acts == {"none": 12, "silu": 2}  # gate_proj takes the SiLU
    residual = [n for n in fused if n.attributes["has_residual"].value]
    assert len(residual) == 4  # o_proj and down_proj add the residual stream
    for node in fused:
        roles = list(node.attributes["roles"].value)
        assert roles[:3] == ["q", "scale", "zero"] and "x" in roles
        assert not any(n.op_type == "DequantizeLinear" and not is_fused(n) for n in cm.ir.graph)
        assert body_of(node).num_nodes() >= 2
    assert "kompakt" in cm.ir.opset_imports


def test_fused_model_computes_exactly_what_the_unfused_one_does(captured):
    ids = tokens(EXAMPLE_SHAPE)
    plain = first_output(_compile(captured, "llama", QUANT)(ids))
    fused = _compile(captured, "llama", QUANT + ",fuse-dequant-matmul")
    assert torch.equal(first_output(fused(ids)), plain)


def test_merged_gate_up_takes_its_swiglu_into_the_epilogue(captured):
    """After merge-projections, gate/up is one GEMM whose output is Split and gated: the GEMM
    node takes the Split and silu(gate) * up (act glu_silu, F columns out), computes exactly
    what the unfused graph does, and the Triton kernel (columns interleaved by the binder)
    matches it; glu=false leaves the GLU to fuse-glu."""
    merged = QUANT + ",merge-projections"
    cm = _compile(captured, "llama", merged + ",fuse-dequant-matmul")
    gated = [n for n in _fused(cm.ir) if n.attributes["act"].as_string() == "glu_silu"]
    assert len(gated) == 2  # one per layer
    for node in gated:
        assert [n.op_type for n in body_of(node)][-4:] == ["Split", "Sigmoid", "Mul", "Mul"]
        assert node.outputs[0].shape[-1] * 2 == node.inputs[0].const_value.shape[1]
    assert not [n for n in cm.ir.graph if n.op_type == "Sigmoid"]
    splits = [n.name for n in cm.ir.graph if n.op_type == "Split"]
    assert len(splits) == 2 and all("q_proj_k_proj_v_proj" in name for name in splits)
    ids = tokens(EXAMPLE_SHAPE)
    plain = first_output(_compile(captured, "llama", merged)(ids))
    assert torch.equal(first_output(cm(ids)), plain)
    pytest.importorskip("triton")
    triton = compile_for_gpu(captured("llama"), merged + ",fuse-dequant-matmul", backend="triton")
    assert "fell back" not in triton._backend.summary()
    torch.testing.assert_close(first_output(triton(ids)).cpu(), plain, rtol=1e-4, atol=1e-4)
    kept = _compile(captured, "llama", merged + ",fuse-dequant-matmul{glu=false}")
    assert not [n for n in _fused(kept.ir) if n.attributes["act"].as_string() == "glu_silu"]


@pytest.mark.parametrize("name, act", [("bert", "gelu"), ("opt", "relu")])
def test_bias_and_activation_epilogues(captured, name, act):
    cm = _compile(captured, name, QUANT + ",fuse-dequant-matmul")
    fused = _fused(cm.ir)
    with_act = [n for n in fused if n.attributes["act"].as_string() == act]
    assert len(with_act) == 2  # one MLP up-projection per layer
    assert any(n.attributes["has_bias"].value for n in fused)
    if name == "bert":  # the intermediate dense: bias, then GELU, in the kernel
        assert all(n.attributes["has_bias"].value for n in with_act)
    ids = tokens(EXAMPLE_SHAPE)
    plain = first_output(_compile(captured, name, QUANT)(ids))
    assert torch.equal(first_output(cm(ids)), plain)


def test_epilogues_can_be_left_out(captured):
    cm = _compile(captured, "llama", QUANT + ",fuse-dequant-matmul{epilogues=false}")
    for node in _fused(cm.ir):
        assert sorted(n.op_type for n in body_of(node)) == ["DequantizeLinear", "MatMul"]
    assert "fuse-dequant-matmul{epilogues=false}" in cm.pipeline


def test_export_inlines_fused_groups_back_to_standard_onnx(captured, tmp_path):
    cm = _compile(captured, "llama", QUANT + ",fuse-dequant-matmul")
    path = cm.export_onnx(tmp_path / "m.onnx")
    proto = onnx.load(path)
    assert not any(n.domain == "kompakt" for n in proto.graph.node)
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == 14
    assert any(is_fused(n) for n in cm.ir.graph)  # the compiled model itself is untouched
    ids = tokens(EXAMPLE_SHAPE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), first_output(cm(ids)), rtol=1e-3, atol=2e-2)


def test_save_writes_standard_onnx_and_load_fuses_again(captured, tmp_path):
    cm = _compile(captured, "llama", QUANT + ",fuse-dequant-matmul")
    cm.save(tmp_path / "saved")
    onnx.checker.check_model(str(tmp_path / "saved" / "model.onnx"))
    saved = onnx.load(str(tmp_path / "saved" / "model.onnx"), load_external_data=False)
    assert not any(n.domain == "kompakt" for n in saved.graph.node)
    loaded = kompakt.load(tmp_path / "saved", backend="reference")
    assert len(_fused(loaded.ir)) == 14
    ids = tokens(EXAMPLE_SHAPE)
    assert torch.equal(first_output(loaded(ids)), first_output(cm(ids)))


def test_inline_restores_the_graph(captured):
    cm = _compile(captured, "llama", QUANT + ",fuse-dequant-matmul")
    inlined = inline_fused(cm.ir)
    verify(inlined)
    plain = _compile(captured, "llama", QUANT)
    assert collections.Counter(n.op_type for n in inlined.graph) == collections.Counter(
        n.op_type for n in plain.ir.graph
    )
    assert [v.name for v in inlined.graph.outputs] == [v.name for v in plain.ir.graph.outputs]


def test_quantized_activations_are_left_to_the_int8_path(captured):
    pipeline = (
        "canonicalize,infer-shapes,quantize-weights{bits=8},quantize-activations{dynamic=false},"
        "fuse-dequant-matmul"
    )
    cm = kompakt.compile(
        captured("llama"),
        target="a100",
        pipeline=pipeline,
        calibration=[(tokens(EXAMPLE_SHAPE),)],
        progress=False,
        backend="reference",
    )
    assert not _fused(cm.ir)
    records = [r for r in cm.report().passes if r.name == "fuse-dequant-matmul"]
    notes = [n for r in records for n in r.result.notes]
    assert notes and all("quantized too" in n for n in notes)


def test_verifier_rejects_a_fused_node_whose_body_does_not_match(captured):
    cm = _compile(captured, "llama", QUANT + ",fuse-dequant-matmul")
    model = cm.ir.clone()
    node = _fused(model)[0]
    body = body_of(node)
    body.inputs.append(ir.Value(name="extra"))
    with pytest.raises(VerificationError, match="body takes"):
        verify(model)


def test_a_residual_that_is_the_input_itself_has_both_roles():
    """y = x + proj(x): one value is the MatMul's input and the residual."""
    from onnx import TensorProto, helper, numpy_helper

    from kompakt.runtime.backends import make_backend

    w = numpy_helper.from_array((torch.randn(32, 32) * 0.1).numpy(), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["p"], name="/proj/MatMul"),
            helper.make_node("Add", ["p", "x"], ["y"], name="/add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 32])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    cm = compile_for_gpu(model, QUANT + ",fuse-dequant-matmul")
    (node,) = _fused(cm.ir)
    assert "x+residual" in list(node.attributes["roles"].as_strings())
    x = torch.randn(3, 32)
    want = cm(x)
    pytest.importorskip("triton")
    backend = make_backend("triton", cm.ir, "cuda" if torch.cuda.is_available() else "cpu")
    assert "dequant_matmul x1" in backend.summary()
    got = backend.run({"x": x.to(backend.device)})[0]
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
