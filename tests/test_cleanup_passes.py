"""Canonicalization passes: each rewrite is checked numerically, before vs after."""

import copy

import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kompakt.passes.base import CompileContext
from kompakt.passes.cleanup.canonicalize import Canonicalize
from kompakt.passes.cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressions
from kompakt.passes.cleanup.fold_constants import FoldConstants
from kompakt.passes.cleanup.gemm_to_matmul import GemmToMatMul
from kompakt.passes.cleanup.infer_shapes import InferShapes
from kompakt.passes.cleanup.remove_dead_code import RemoveDeadCode
from kompakt.runtime.plan import ExecutionPlan


def run(model: ir.Model, **feeds) -> list[torch.Tensor]:
    return ExecutionPlan(model).run(feeds)


def gemm_model(trans_a=0, trans_b=0, alpha=1.0, beta=1.0, with_c=True, const_b=True) -> ir.Model:
    torch.manual_seed(0)
    m, k, n = 3, 8, 5
    a_shape = [k, m] if trans_a else [m, k]
    b = torch.randn(n, k) if trans_b else torch.randn(k, n)
    inits = [numpy_helper.from_array(torch.randn(n).numpy(), "c")] if with_c else []
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)]
    if const_b:
        inits.append(numpy_helper.from_array(b.numpy(), "b"))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b.shape)))
    node = helper.make_node(
        "Gemm",
        ["a", "b"] + (["c"] if with_c else []),
        ["y"],
        name="fc",
        alpha=alpha,
        beta=beta,
        transA=trans_a,
        transB=trans_b,
    )
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits
    )
    return ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"trans_b": 1},
        {"trans_a": 1},
        {"alpha": 0.5, "beta": 2.0},
        {"trans_b": 1, "alpha": 3.0, "with_c": False},
        {"const_b": False, "trans_b": 1, "alpha": 2.0},
        {"beta": 0.0},
    ],
)
def test_gemm_to_matmul_is_exact(kwargs):
    model = gemm_model(**kwargs)
    feeds = {v.name: torch.randn([int(d) for d in v.shape]) for v in model.graph.inputs}
    (before,) = run(model, **feeds)
    GemmToMatMul().run(model, CompileContext())
    assert "Gemm" not in {n.op_type for n in model.graph}
    (after,) = run(model, **feeds)
    torch.testing.assert_close(after, before)
    assert model.graph.outputs[0].name == "y"


def test_gemm_weight_becomes_k_by_n_constant():
    model = gemm_model(trans_b=1)
    GemmToMatMul().run(model, CompileContext())
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.inputs[1].const_value is not None
    assert list(matmul.inputs[1].const_value.shape) == [8, 5]
    assert len(model.graph.initializers) == 2  # the transposed weight replaced the original


def test_gpt2_linear_layers_become_matmuls(captured, tiny):
    model = captured("gpt2").clone()
    assert any(n.op_type == "Gemm" for n in model.graph)
    Canonicalize().run(model, CompileContext())
    assert not any(n.op_type == "Gemm" for n in model.graph)
    weights = [
        n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
    ]
    assert len(weights) >= 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp.c_proj per layer, and lm_head


def test_fold_constants_folds_shape_math_but_not_dequantize():
    x = ir.val("x", ir.DataType.FLOAT, [2, 4])
    q = ir.Value(name="q", const_value=ir.Tensor(torch.ones(4, 4, dtype=torch.int8).numpy()))
    s = ir.Value(name="s", const_value=ir.Tensor(torch.tensor(0.5).numpy()))
    one = ir.Value(name="one", const_value=ir.Tensor(torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy()))
    dq = ir.node("DequantizeLinear", [q, s], name="dq")
    added = ir.node("Add", [one, one], name="const_add")
    mm = ir.node("MatMul", [x, dq.outputs[0]], name="mm")
    out = ir.node("Add", [mm.outputs[0], added.outputs[0]], name="out")
    for i, node in enumerate((dq, added, mm, out)):
        node.outputs[0].name = f"v{i}"
    graph = ir.Graph(
        [x],
        [out.outputs[0]],
        nodes=[dq, added, mm, out],
        initializers=[q, s, one],
        opset_imports={"": 21},
    )
    model = ir.Model(graph, ir_version=10)
    feeds = {"x": torch.randn(2, 4)}
    (before,) = run(model, **feeds)
    FoldConstants().run(model, CompileContext())
    ops = [n.op_type for n in model.graph]
    assert "DequantizeLinear" in ops, "folding must not decompress weights"
    assert ops.count("Add") == 1, "the constant Add should be folded"
    (after,) = run(model, **feeds)
    torch.testing.assert_close(after, before)


def test_remove_dead_code_and_cse():
    x = ir.val("x", ir.DataType.FLOAT, [3])
    a = ir.node("Relu", [x], name="a")
    b = ir.node("Relu", [x], name="b")  # duplicate of a
    dead = ir.node("Sigmoid", [x], name="dead")
    y = ir.node("Add", [a.outputs[0], b.outputs[0]], name="y")
    for node in (a, b, dead, y):
        node.outputs[0].name = node.name + "_out"
    model = ir.Model(
        ir.Graph([x], [y.outputs[0]], nodes=[a, b, dead, y], opset_imports={"": 21}), ir_version=10
    )
    feeds = {"x": torch.tensor([-1.0, 0.5, 2.0])}
    (before,) = run(model, **feeds)
    assert RemoveDeadCode().run(model, CompileContext()).stats["nodes_removed"] == 1
    assert EliminateCommonSubexpressions().run(model, CompileContext()).stats["merged"] == 1
    assert [n.op_type for n in model.graph] == ["Relu", "Add"]
    (after,) = run(model, **feeds)
    torch.testing.assert_close(after, before)


def test_infer_shapes_fills_in_unknown_shapes():
    model = gemm_model()
    GemmToMatMul().run(model, CompileContext())
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    matmul.outputs[0].shape = None
    InferShapes().run(model, CompileContext())
    assert list(matmul.outputs[0].shape) == [3, 5]


def test_canonicalize_keeps_tiny_llama_exact(captured):
    from conftest import EXAMPLE_SHAPE, tokens

    model = copy.copy(captured("llama")).clone()
    ids = tokens(EXAMPLE_SHAPE, seed=3)
    (before,) = run(model, input_ids=ids)
    Canonicalize().run(model, CompileContext())
    (after,) = run(model, input_ids=ids)
    torch.testing.assert_close(after, before)
