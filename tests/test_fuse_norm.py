"""fuse-norm and the norm binder: what is grouped, that nothing changes, and the Triton kernel."""

from __future__ import annotations

import onnx
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
import kompakt.passes.fuse.fuse_norm  # noqa: F401  (registers fuse-norm)
from kompakt.codegen.norm.bind import bind
from kompakt.errors import CodegenError
from kompakt.ir.fused import body_of, is_fused, pattern_of

PLAIN = "canonicalize,infer-shapes"
NORM = PLAIN + ",fuse-norm"
QUANT = PLAIN + ",quantize-weights{bits=4,group-size=16},fuse-dequant-matmul"
# Per model: (kind, norms, norms whose group took the residual Add, of those with two outputs).
# Llama/Qwen2: 2 per layer + the final norm; all but the first read x = h + r, and every sum but
# the last is the next block's residual. BERT (post-LN): the layers' 4 sums feed only the norm;
# the embeddings' Add broadcasts position embeddings [1, s, D], so it is no residual. OPT
# (pre-LN): only the first norm reads an Add directly (the others read a Reshape of one).
EXPECTED = {
    "llama": ("rms", 5, 4, 3),
    "qwen2": ("rms", 5, 4, 3),
    "bert": ("layer", 5, 4, 0),
    "opt": ("layer", 5, 1, 1),
}


def _norms(model):
    return [n for n in model.graph if is_fused(n) and pattern_of(n) == "norm"]


def _notes(cm):
    return [note for r in cm.report().passes if r.name == "fuse-norm" for note in r.result.notes]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_norms_are_found_and_compute_exactly_what_the_unfused_model_does(captured, name):
    kind, count, with_residual, two_outputs = EXPECTED[name]
    cm = compile_for_gpu(captured(name), NORM)
    norms = _norms(cm.ir)
    assert len(norms) == count
    assert {n.attributes["kind"].as_string() for n in norms} == {kind}
    residual = [n for n in norms if n.attributes["has_residual"].value]
    assert len(residual) == with_residual
    assert sum(len(n.outputs) == 2 for n in norms) == two_outputs
    for node in norms:
        roles = list(node.attributes["roles"].as_strings())
        assert roles[0] == "x" and "weight" in roles and len(roles) == len(node.inputs)
        assert ("residual" in roles) == bool(node.attributes["has_residual"].value)
        assert ("bias" in roles) == (kind == "layer")
        outputs = list(node.attributes["output_roles"].as_strings())
        assert sorted(outputs) == (["out", "summed"] if len(node.outputs) == 2 else ["out"])
        eps = node.attributes["eps"].as_float()
        assert eps == pytest.approx(1e-6 if kind == "rms" else (1e-12 if name == "bert" else 1e-5))
    leftover = {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "LayerNormalization"}
    assert not [n.op_type for n in cm.ir.graph if n.op_type in leftover]
    plain = compile_for_gpu(captured(name), PLAIN)
    assert_same_as_unfused(cm, plain, (EXAMPLE_SHAPE, OTHER_SHAPE))


def test_export_when_a_norm_writes_a_graph_output(captured, tmp_path):
    cm = compile_for_gpu(captured("bert"), NORM)  # last_hidden_state is the last LayerNorm's output
    assert any(v.producer() in _norms(cm.ir) for v in cm.ir.graph.outputs)
    proto = onnx.load(cm.export_onnx(tmp_path / "m.onnx"))
    assert not any(n.domain == "kompakt" for n in proto.graph.node)


def test_groups_stay_convex_and_sorted(captured):
    cm = compile_for_gpu(captured("llama"), NORM)
    produced = {id(v) for v in cm.ir.graph.inputs} | {
        id(v) for v in cm.ir.graph.initializers.values()
    }
    for node in cm.ir.graph:  # a group with a path out and back in could not be ordered
        assert all(v is None or id(v) in produced for v in node.inputs), node.name
        produced.update(id(v) for v in node.outputs)


def test_residual_can_be_left_out(captured):
    cm = compile_for_gpu(captured("llama"), NORM + "{residual=false}")
    norms = _norms(cm.ir)
    assert len(norms) == 5
    assert not any(n.attributes["has_residual"].value for n in norms)
    assert all(body_of(n).num_nodes() == 7 for n in norms)  # Pow ... Mul(weight), no Add(h, r)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_export_is_standard_onnx_that_onnxruntime_runs(captured, tmp_path, name):
    cm = compile_for_gpu(captured(name), NORM)
    assert_exports_standard_onnx(cm, tmp_path, tokens(OTHER_SHAPE))


@pytest.mark.parametrize(
    "name, pipeline",
    [("llama", NORM), ("qwen2", NORM), ("bert", NORM), ("opt", NORM),
     ("llama", QUANT + ",fuse-norm"), ("bert", QUANT + ",fuse-norm")],
)  # fmt: skip
def test_triton_backend_runs_the_norm_kernel(captured, name, pipeline):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton = compile_for_gpu(captured(name), pipeline, backend="triton", device=device)
    reference = compile_for_gpu(captured(name), pipeline, device=device)
    for shape in (EXAMPLE_SHAPE, (1, 1)):  # batch 1, sequence 1: one row
        ids = tokens(shape)
        got, want = first_output(triton(ids)), first_output(reference(ids))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    summary = triton._backend.summary()
    assert "norm x5" in summary and "fell back" not in summary
    if "quantize" in pipeline:  # the residual Adds went into the dequant_matmul epilogues
        assert "dequant_matmul x" in summary
        if name == "llama":
            assert not any(n.attributes["has_residual"].value for n in _norms(triton.ir))


# Hand-built graphs: HF's fp16 RMSNorm (with Casts, Div) and the patterns that must stay alone.
D = 24  # not a power of two: the kernel's block is masked


def _rms_model(
    *, exponent=2.0, axes=(-1,), weight_input=False, fp16=False, square="pow", inverse="div_x"
):
    """x = h + r; y = w * cast(x32 / sqrt(mean(x32^exponent, axes) + eps)); outputs (y, x).

    ``square``: Pow(x, exponent) or Mul(x, x); ``inverse``: Div(x, root), Reciprocal(root) or
    Div(1, root), the last two times x.
    """
    ft, np_type = (TensorProto.FLOAT16, "float16") if fp16 else (TensorProto.FLOAT, "float32")
    gen = torch.Generator().manual_seed(0)
    w = (1 + 0.1 * torch.randn(D, generator=gen)).numpy().astype(np_type)
    inits = [
        numpy_helper.from_array(torch.tensor(exponent).numpy(), "two"),
        numpy_helper.from_array(torch.tensor(axes, dtype=torch.int64).numpy(), "axes"),
        numpy_helper.from_array(torch.tensor(1e-5).numpy(), "eps"),
        numpy_helper.from_array(torch.tensor(1.0).numpy(), "one"),
    ]
    inputs = [helper.make_tensor_value_info(n, ft, ["b", "s", D]) for n in ("h", "r")]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w", ft, [D]))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes = [helper.make_node("Add", ["h", "r"], ["x"])]
    x32 = "x"
    if fp16:
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
        x32 = "x32"
    nodes += [
        helper.make_node("Pow", [x32, "two"], ["sq"])
        if square == "pow"
        else helper.make_node("Mul", [x32, x32], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"]),
        helper.make_node("Sqrt", ["ms_eps"], ["root"]),
    ]
    if inverse == "div_x":
        nodes.append(helper.make_node("Div", [x32, "root"], ["n32"]))
    else:
        if inverse == "reciprocal":
            nodes.append(helper.make_node("Reciprocal", ["root"], ["inv"]))
        else:
            nodes.append(helper.make_node("Div", ["one", "root"], ["inv"]))
        nodes.append(helper.make_node("Mul", [x32, "inv"], ["n32"]))
    normed = "n32"
    if fp16:
        nodes.append(helper.make_node("Cast", ["n32"], ["n"], to=TensorProto.FLOAT16))
        normed = "n"
    nodes.append(helper.make_node("Mul", ["w", normed], ["y"]))
    outputs = [helper.make_tensor_value_info(n, ft, ["b", "s", D]) for n in ("y", "x")]
    graph = helper.make_graph(nodes, "rms", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return model, w


def _feeds(dtype, shape=(2, 3)):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, D, generator=gen).to(dtype) for _ in range(2)]


def test_fp16_rms_with_casts_and_div_runs_on_triton():
    pytest.importorskip("triton")
    model, _ = _rms_model(fp16=True)
    cm = compile_for_gpu(model, NORM)
    (node,) = _norms(cm.ir)
    assert sorted(n.op_type for n in body_of(node)).count("Cast") == 2
    assert list(node.attributes["roles"].as_strings())[:2] == ["x", "residual"]
    assert list(node.attributes["output_roles"].as_strings()) == ["summed", "out"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton = compile_for_gpu(model, NORM, backend="triton", device=device)
    for shape in ((2, 3), (1, 1)):
        h, r = (t.to(device) for t in _feeds(torch.float16, shape))
        (y, x), (y_ref, x_ref) = triton(h, r), cm(h, r)
        assert torch.equal(x.cpu(), x_ref.cpu())  # the residual sum is exact
        # HF rounds the normalized value before the weight; the kernel rounds once: <= 1 ulp.
        torch.testing.assert_close(y.cpu(), y_ref.cpu(), rtol=2e-3, atol=2e-3)
    assert "norm x1" in triton._backend.summary()


@pytest.mark.parametrize(
    "square, inverse, roles",
    [
        ("mul", "reciprocal", ["axes", "eps", "weight"]),
        ("pow", "div_one", ["exponent", "axes", "eps", "one", "weight"]),
    ],
)
def test_rms_spellings_fuse_and_run_on_triton(square, inverse, roles):
    pytest.importorskip("triton")
    model, _ = _rms_model(square=square, inverse=inverse)
    cm = compile_for_gpu(model, NORM)
    (node,) = _norms(cm.ir)
    assert list(node.attributes["roles"].as_strings()) == ["x", "residual", *roles]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton = compile_for_gpu(model, NORM, backend="triton", device=device)
    h, r = (t.to(device) for t in _feeds(torch.float32))
    for got, want in zip(triton(h, r), cm(h, r), strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"weight_input": True}, "weight is not a constant"),
        ({"axes": (1,)}, "axes [1]"),
        ({"axes": (1, 2)}, "axes [1, 2]"),
        ({"exponent": 3.0}, "Pow(x, 3.0)"),
    ],
)
def test_rms_patterns_the_kernel_cannot_take_are_left_alone(kwargs, reason):
    model, _ = _rms_model(**kwargs)
    cm = compile_for_gpu(model, NORM)
    assert not _norms(cm.ir)
    assert any(reason in note for note in _notes(cm)), _notes(cm)


def _layer_norm_model(axis, same_weight_and_bias=False):
    shape = [2, 5, D]
    gen = torch.Generator().manual_seed(0)
    param_shape = shape[axis:]
    inits = [numpy_helper.from_array(torch.randn(param_shape, generator=gen).numpy(), "g")]
    if not same_weight_and_bias:
        inits.append(numpy_helper.from_array(torch.randn(param_shape, generator=gen).numpy(), "b"))
    bias = "g" if same_weight_and_bias else "b"
    node = helper.make_node("LayerNormalization", ["x", "g", bias], ["y"], axis=axis, epsilon=1e-5)
    graph = helper.make_graph(
        [node],
        "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_layer_norm_over_other_axes_is_left_alone():
    cm = compile_for_gpu(_layer_norm_model(axis=1), NORM)
    assert not _norms(cm.ir)
    assert any("over axis 1" in note for note in _notes(cm))


def test_one_constant_as_weight_and_bias_binds():
    pytest.importorskip("triton")
    model = _layer_norm_model(axis=-1, same_weight_and_bias=True)
    cm = compile_for_gpu(model, NORM)
    (node,) = _norms(cm.ir)
    assert list(node.attributes["roles"].as_strings()) == ["x", "weight+bias"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton = compile_for_gpu(model, NORM, backend="triton", device=device)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(triton(x.to(device)).cpu(), cm(x), rtol=1e-5, atol=1e-5)


def _mutated(captured, edit):
    model = compile_for_gpu(captured("llama"), NORM).ir.clone()
    node = next(n for n in _norms(model) if len(n.outputs) == 2)
    edit(node)
    return node


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda n: n.attributes.__setitem__("kind", ir.AttrString("kind", "group")),
            "kind 'group'",
        ),
        (lambda n: n.attributes.pop("eps"), "eps must be"),
        (lambda n: _set_roles(n, {"eps": "bias"}), "takes no bias"),
        (lambda n: _set_roles(n, {"weight": "scale"}), "unknown role 'scale'"),
        (lambda n: _set_roles(n, {"x": "eps"}), "no input has the role 'x'"),
        (lambda n: n.attributes.pop("roles"), "'roles' must name"),
        # new type objects: a clone shares its values' type objects with the original, so
        # setting .dtype in place would change the session's captured model too
        (
            lambda n: setattr(n.outputs[1], "type", ir.TensorType(ir.DataType.FLOAT16)),
            "the kernel writes",
        ),
        (lambda n: setattr(n.inputs[0], "type", ir.TensorType(ir.DataType.INT64)), "x '"),
    ],
)
def test_binder_rejects_what_the_kernel_cannot_take(captured, edit, message):
    pytest.importorskip("triton")
    node = _mutated(captured, edit)
    with pytest.raises(CodegenError, match=message.replace("(", r"\(")):
        bind(node, torch.device("cpu"))


def _set_roles(node, renames):
    roles = [renames.get(r, r) for r in node.attributes["roles"].as_strings()]
    node.attributes["roles"] = ir.AttrStrings("roles", roles)
