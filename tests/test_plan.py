"""ExecutionPlan: built once, frees buffers after their last use, names what it cannot run."""

import onnx_ir as ir
import pytest
import torch

from kompakt import UnsupportedOpError
from kompakt.ir import set_module
from kompakt.runtime.plan import ExecutionPlan


def chain(ops, extra=None):
    x = ir.val("x", ir.DataType.FLOAT, [4])
    nodes, prev = [], x
    for i, op in enumerate(ops):
        node = ir.node(op, [prev], name=f"n{i}", domain=extra if op == "Mystery" else "")
        node.outputs[0].name = f"v{i}"
        nodes.append(node)
        prev = node.outputs[0]
    imports = {"": 21}
    if extra:
        imports[extra] = 1
    return ir.Model(ir.Graph([x], [prev], nodes=nodes, opset_imports=imports), ir_version=10)


def test_buffers_are_freed_after_last_use():
    plan = ExecutionPlan(chain(["Relu", "Neg", "Exp", "Neg"]))
    live = []
    plan.run({"x": torch.randn(4)}, observer=lambda node, ins, outs: live.append(node.name))
    assert live == ["n0", "n1", "n2", "n3"]
    freed = [s for step in plan.steps for s in step.free]
    # every intermediate (v0..v2) and the input are freed; the output (v3) is kept
    assert len(freed) == 4


def test_results_match_torch():
    x = torch.randn(4)
    (y,) = ExecutionPlan(chain(["Relu", "Neg", "Exp"])).run({"x": x})
    torch.testing.assert_close(y, torch.exp(-torch.relu(x)))


def test_unsupported_op_names_op_node_and_module():
    model = chain(["Relu", "Mystery"], extra="my.domain")
    set_module(list(model.graph)[1], "model.layers.3.mlp")
    with pytest.raises(
        UnsupportedOpError,
        match=r"'my.domain::Mystery' at node 'n1' \(from module 'model.layers.3.mlp'\)",
    ):
        ExecutionPlan(model)


def test_kernel_failure_names_the_node_and_shapes():
    a = ir.val("a", ir.DataType.FLOAT, [2, 3])
    b = ir.val("b", ir.DataType.FLOAT, [4, 5])
    node = ir.node("MatMul", [a, b], name="bad_mm")
    node.outputs[0].name = "y"
    model = ir.Model(
        ir.Graph([a, b], [node.outputs[0]], nodes=[node], opset_imports={"": 21}), ir_version=10
    )
    from kompakt import KompaktError

    with pytest.raises(
        KompaktError,
        match=r"op 'MatMul' at node 'bad_mm' failed on inputs \(float32\[2, 3\], float32\[4, 5\]\)",
    ):
        ExecutionPlan(model).run({"a": torch.randn(2, 3), "b": torch.randn(4, 5)})


def test_a_fused_body_runs_where_its_inputs_are():
    """A body's own Constant follows the inputs' device (on a GPU: CUDA, not the CPU); "meta"
    stands in for another device here."""
    from kompakt.ir.fused import fuse_nodes

    x = ir.val("x", ir.DataType.FLOAT, [2])
    const = ir.node(
        "Constant", [], attributes={"value": ir.tensor([1.0, 2.0], dtype=ir.DataType.FLOAT)}
    )
    add = ir.node("Add", [x, const.outputs[0]], name="add")
    add.outputs[0].name = "y"
    model = ir.Model(
        ir.Graph([x], [add.outputs[0]], nodes=[const, add], opset_imports={"": 21}), ir_version=10
    )
    fuse_nodes(model, [const, add], "test")
    fused = next(iter(model.graph))
    from kompakt.runtime.reference.registry import build_kernel

    kernel = build_kernel(fused, 21)
    (y,) = kernel(torch.zeros(2, device="meta"))
    assert y.device.type == "meta" and y.shape == (2,)
    assert kernel(torch.zeros(2))[0].tolist() == [1.0, 2.0]
