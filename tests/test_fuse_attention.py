"""fuse-attention and the attention binder: what is grouped, that nothing changes, the kernel."""

from __future__ import annotations

import math

import onnx_ir as ir
import pytest
import torch
from conftest import EXAMPLE_SHAPE, OTHER_SHAPE, tokens
from fusion_helpers import (
    assert_exports_standard_onnx,
    assert_same_as_unfused,
    compile_for_gpu,
    first_output,
)
from onnx import TensorProto, helper, numpy_helper

import kompakt
import kompakt.passes.fuse.fuse_attention  # noqa: F401  (registers fuse-attention)
from kompakt.errors import CodegenError
from kompakt.ir.fused import body_of, is_fused, pattern_of

PLAIN = "canonicalize,infer-shapes"
ATTN = PLAIN + ",fuse-attention"
ALL = PLAIN + ",quantize-weights{bits=4,group-size=16},fuse-dequant-matmul,fuse-norm,fuse-attention"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Per model: query heads and kv heads as the kernel sees them. Llama/Qwen2 are GQA (4 query heads
# on 2 kv heads): the Unsqueeze/Expand/Reshape repeat of k and v is inside the group.
HEADS = {"llama": (4, 2), "qwen2": (4, 2), "bert": (4, 4), "gpt2": (4, 4)}


def _groups(model):
    return [n for n in model.graph if is_fused(n) and pattern_of(n) == "attention"]


def _notes(cm):
    return [n for r in cm.report().passes if r.name == "fuse-attention" for n in r.result.notes]


def _input(node, role):
    roles = list(node.attributes["roles"].as_strings())
    return node.inputs[roles.index(role)]


@pytest.mark.parametrize("name", list(HEADS))
def test_one_group_per_layer_computing_exactly_what_the_unfused_model_does(captured, name):
    cm = compile_for_gpu(captured(name), ATTN)
    groups = _groups(cm.ir)
    assert len(groups) == 2  # two layers
    for node in groups:
        roles = list(node.attributes["roles"].as_strings())
        assert {"q", "k", "v", "mask", "zero", "scale"} <= set(roles) <= {*roles, "shape"}
        assert "other" not in roles
        assert node.attributes["scale"].as_float() == pytest.approx(1 / math.sqrt(16))
        assert node.attributes["causal"].value == 0 and node.attributes["has_mask"].value == 1
        heads = (_input(node, "q").shape[1], _input(node, "k").shape[1])
        assert heads == HEADS[name] and _input(node, "v").shape[1] == heads[1]
        assert list(_input(node, "mask").shape)[1] == 1  # [batch, 1, sequence, sequence]
    assert not [n.op_type for n in cm.ir.graph if n.op_type in ("Softmax", "IsNaN")]
    plain = compile_for_gpu(captured(name), PLAIN)
    assert_same_as_unfused(cm, plain, (EXAMPLE_SHAPE, OTHER_SHAPE))


def test_export_is_standard_onnx_that_onnxruntime_runs(captured, tmp_path):
    cm = compile_for_gpu(captured("llama"), ATTN)
    assert_exports_standard_onnx(cm, tmp_path, tokens(OTHER_SHAPE))


@pytest.mark.parametrize(
    "name, pipeline",
    [("llama", ATTN), ("qwen2", ATTN), ("bert", ATTN), ("gpt2", ATTN), ("llama", ALL),
     ("bert", ALL)],
)  # fmt: skip
def test_triton_backend_runs_the_attention_kernel(captured, name, pipeline):
    pytest.importorskip("triton")
    triton = compile_for_gpu(captured(name), pipeline, backend="triton", device=DEVICE)
    reference = compile_for_gpu(captured(name), pipeline, device=DEVICE)
    for shape in (EXAMPLE_SHAPE, (1, 1)):  # batch 1, sequence 1: one query, one key
        ids = tokens(shape)
        got, want = first_output(triton(ids)), first_output(reference(ids))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    summary = triton._backend.summary()
    assert "attention x2" in summary and "fell back" not in summary, summary
    if pipeline == ALL:
        assert "dequant_matmul x" in summary and "norm x5" in summary


# Hand-built: multi-query attention (k, v have one head, MatMul broadcasts it) as older exporters
# write it: Transpose(k, [0, 1, 3, 2]), the scores divided by sqrt(D), an input mask.
def _mqa_model(
    *, head_dim=16, mask=True, guard=True, scale_after_mask=False, probs_out=False, axis=-1
):
    ft = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array(torch.tensor(math.sqrt(head_dim)).numpy(), "root_d"),
        numpy_helper.from_array(torch.tensor(0.0).numpy(), "zero"),
    ]
    inputs = [
        helper.make_tensor_value_info("q", ft, ["b", 4, "s", head_dim]),
        helper.make_tensor_value_info("k", ft, ["b", 1, "t", head_dim]),
        helper.make_tensor_value_info("v", ft, ["b", 1, "t", head_dim]),
    ]
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
    ]
    scores = "qk"
    if not scale_after_mask:
        nodes.append(helper.make_node("Div", ["qk", "root_d"], ["scaled"]))
        scores = "scaled"
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", ft, ["b", 1, "s", "t"]))
        nodes.append(helper.make_node("Add", [scores, "mask"], ["masked"]))
        scores = "masked"
    if scale_after_mask:
        nodes.append(helper.make_node("Div", [scores, "root_d"], ["scaled"]))
        scores = "scaled"
    nodes.append(helper.make_node("Softmax", [scores], ["p"], axis=axis))
    weights = "p"
    if guard:
        nodes.append(helper.make_node("IsNaN", ["p"], ["nan"]))
        nodes.append(helper.make_node("Where", ["nan", "zero", "p"], ["pw"]))
        weights = "pw"
    nodes.append(helper.make_node("MatMul", [weights, "v"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", ft, ["b", 4, "s", head_dim])]
    if probs_out:
        outputs.append(helper.make_tensor_value_info("p", ft, ["b", 4, "s", "t"]))
    graph = helper.make_graph(nodes, "mqa", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _mqa_feeds(head_dim=16, seq_q=5, seq_kv=7):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, seq_q, head_dim, generator=gen)
    k, v = (torch.randn(2, 1, seq_kv, head_dim, generator=gen) for _ in range(2))
    mask = torch.zeros(2, 1, seq_q, seq_kv).masked_fill(torch.rand(2, 1, seq_q, seq_kv) < 0.3, -1e9)
    mask[1, 0, 2] = float("-inf")  # a row the mask hides entirely: 0 through the NaN guard
    return [t.to(DEVICE) for t in (q, k, v, mask)]


def test_mqa_with_a_hidden_row_runs_on_triton():
    pytest.importorskip("triton")
    model = _mqa_model()
    cm = compile_for_gpu(model, ATTN)
    (node,) = _groups(cm.ir)
    assert node.attributes["scale"].as_float() == pytest.approx(0.25)
    assert list(node.attributes["roles"].as_strings()) == ["k", "q", "scale", "mask", "zero", "v"]
    triton = compile_for_gpu(model, ATTN, backend="triton", device=DEVICE)
    feeds = _mqa_feeds()
    got, want = triton(*feeds), cm(*feeds)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    assert torch.all(want[1, :, 2] == 0)
    assert "attention x1" in triton._backend.summary()


def test_a_head_dim_the_kernel_lacks_falls_back_to_torch():
    pytest.importorskip("triton")
    model = _mqa_model(head_dim=24)
    triton = compile_for_gpu(model, ATTN, backend="triton", device=DEVICE)
    assert len(_groups(triton.ir)) == 1  # fused: the body is still the meaning
    feeds = _mqa_feeds(head_dim=24)
    got, want = triton(*feeds), compile_for_gpu(model, PLAIN)(*feeds)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-6, atol=1e-6)
    summary = triton._backend.summary()
    assert "FusedKernel[attention] x1" in summary and "head dims" in summary


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"scale_after_mask": True}, "not MatMul(q, k^T)"),
        ({"probs_out": True}, "'p' is read outside"),
        ({"axis": 2}, "Softmax over axis 2"),
    ],
)
def test_patterns_that_cannot_be_proven_equal_are_left_alone(kwargs, reason):
    cm = compile_for_gpu(_mqa_model(**kwargs), ATTN)
    assert not _groups(cm.ir)
    assert any(reason in note for note in _notes(cm)), _notes(cm)


def test_an_unguarded_masked_softmax_keeps_its_nan_rows_on_triton():
    """Without Where(IsNaN(p), 0, p) a row masked whole is NaN in the graph (softmax of -inf
    everywhere), and the fused kernel must give the same, not the guarded 0."""
    pytest.importorskip("triton")
    model = _mqa_model(guard=False)
    cm = compile_for_gpu(model, ATTN)
    (node,) = _groups(cm.ir)
    assert node.attributes["nan_rows"].value == 1
    triton = compile_for_gpu(model, ATTN, backend="triton", device=DEVICE)
    feeds = _mqa_feeds()
    got, want = triton(*feeds).cpu(), compile_for_gpu(model, PLAIN)(*feeds).cpu()
    assert torch.isnan(want[1, :, 2]).all() and torch.isnan(got[1, :, 2]).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert "attention x1" in triton._backend.summary()


def test_without_a_mask_the_guard_is_not_needed():
    cm = compile_for_gpu(_mqa_model(mask=False, guard=False), ATTN)
    (node,) = _groups(cm.ir)
    assert node.attributes["has_mask"].value == 0
    assert [n.op_type for n in body_of(node)] == ["Transpose", "MatMul", "Div", "Softmax", "MatMul"]


def _gqa_model(axis):
    """q [2, 4, 5, 16]; k, v [2, 2, 7, 16] repeated to 4 heads through Unsqueeze(axis) -> Expand
    -> Reshape. axis 2 repeats each head in place (h reads kv head h // 2, as the kernel does);
    axis 1 repeats the block of heads (h reads h % 2): that repeat must stay outside the kernel."""
    ft = TensorProto.FLOAT
    const = {
        "axes": [axis],
        "rep": [2, 2, 2, 7, 16],
        "heads4": [2, 4, 7, 16],
    }
    inits = [numpy_helper.from_array(torch.tensor(v).numpy(), k) for k, v in const.items()]
    inits.append(numpy_helper.from_array(torch.tensor(0.25).numpy(), "scale"))
    nodes = []
    for t in "kv":
        nodes += [
            helper.make_node("Unsqueeze", [t, "axes"], [f"{t}_u"]),
            helper.make_node("Expand", [f"{t}_u", "rep"], [f"{t}_e"]),
            helper.make_node("Reshape", [f"{t}_e", "heads4"], [f"{t}_r"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k_r"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v_r"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("q", ft, [2, 4, 5, 16])]
    inputs += [helper.make_tensor_value_info(t, ft, [2, 2, 7, 16]) for t in "kv"]
    outputs = [helper.make_tensor_value_info("y", ft, [2, 4, 5, 16])]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("axis, kernel_heads", [(2, 2), (1, 4)], ids=["in-place", "blocked"])
def test_gqa_repeat_joins_the_group_only_when_heads_repeat_in_place(axis, kernel_heads):
    pytest.importorskip("triton")
    model = _gqa_model(axis)
    cm = compile_for_gpu(model, ATTN)
    (node,) = _groups(cm.ir)
    assert _input(node, "k").shape[1] == _input(node, "v").shape[1] == kernel_heads
    triton = compile_for_gpu(model, ATTN, backend="triton", device=DEVICE)
    q, k, v = _mqa_feeds()[:3]
    k, v = (torch.cat([t, t.flip(-1)], dim=1) for t in (k, v))  # two different kv heads
    torch.testing.assert_close(triton(q, k, v).cpu(), cm(q, k, v).cpu(), rtol=1e-5, atol=1e-5)
    assert "attention x1" in triton._backend.summary()


def _mutated(edit):
    node = _groups(compile_for_gpu(_mqa_model(), ATTN).ir.clone())[0]
    edit(node)
    return node


def _set_role(node, old, new):
    roles = [new if r == old else r for r in node.attributes["roles"].as_strings()]
    node.attributes["roles"] = ir.AttrStrings("roles", roles)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda n: setattr(_input(n, "mask"), "shape", ir.Shape(["b", 3, "s", "t"])), "broadcast"),
        (lambda n: setattr(_input(n, "mask"), "dtype", ir.DataType.INT32), "not fp16/fp32/bool"),
        (lambda n: setattr(_input(n, "q"), "dtype", ir.DataType.BFLOAT16), "q 'q' is BFLOAT16"),
        (lambda n: setattr(_input(n, "k"), "shape", ir.Shape(["b", 3, "t", 16])), "Hq=4 .* Hkv=3"),
        (lambda n: _set_role(n, "zero", "bias"), "unknown role 'bias'"),
        (lambda n: _set_role(n, "v", "shape"), "no input has the role 'v'"),
        (lambda n: n.attributes.pop("scale"), "scale must be"),
        (lambda n: n.attributes.__setitem__("has_mask", ir.AttrInt64("has_mask", 0)), "has_mask"),
    ],
)
def test_binder_rejects_what_the_kernel_cannot_take(edit, message):
    pytest.importorskip("triton")
    from kompakt.codegen.attention.bind import bind

    with pytest.raises(CodegenError, match=message):
        bind(_mutated(edit), torch.device(DEVICE))
