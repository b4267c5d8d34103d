"""Loading .onnx files and ModelProtos: external data, old opsets, and broken files."""

import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kompakt
from kompakt import CaptureError
from kompakt.lowering import load_onnx


def _linear_model(opset: int = 21, k: int = 32, n: int = 16) -> onnx.ModelProto:
    torch.manual_seed(0)
    weight = numpy_helper.from_array(torch.randn(k, n).numpy(), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="/model/fc/MatMul")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_model_proto_and_path_load_the_same(tmp_path):
    proto = _linear_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    a, b = load_onnx(proto), load_onnx(path)
    assert [n.op_type for n in a.graph] == [n.op_type for n in b.graph] == ["MatMul"]


def test_legacy_node_names_give_module_paths():
    model = load_onnx(_linear_model())
    assert kompakt.ir.module_of(next(iter(model.graph))) == "model.fc"


def test_old_opset_is_upgraded():
    # Opset 11 gives Squeeze/Unsqueeze their axes as attributes; 13+ as inputs.
    proto = _linear_model(opset=11)
    proto.graph.node.insert(0, helper.make_node("Unsqueeze", ["x"], ["x3"], axes=[0]))
    proto.graph.node.insert(1, helper.make_node("Squeeze", ["x3"], ["x2"], axes=[0]))
    proto.graph.node[2].input[0] = "x2"
    model = load_onnx(proto)
    assert model.opset_imports[""] == 21
    squeeze = next(n for n in model.graph if n.op_type == "Squeeze")
    assert len(squeeze.inputs) == 2 and "axes" not in squeeze.attributes
    compiled = kompakt.compile(proto, target="cpu", backend="reference")
    x = torch.randn(3, 32)
    expected = x @ torch.from_numpy(numpy_helper.to_array(proto.graph.initializer[0]))
    torch.testing.assert_close(compiled(x), expected)


def test_external_data_is_read(tmp_path):
    proto = _linear_model(k=256, n=128)
    weight = torch.from_numpy(numpy_helper.to_array(proto.graph.initializer[0]).copy())
    path = tmp_path / "big.onnx"  # onnx.save below rewrites the proto to point at the file
    onnx.save(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="big.data",
        size_threshold=0,
    )
    assert (tmp_path / "big.data").exists()
    compiled = kompakt.compile(path, target="cpu")
    x = torch.randn(2, 256)
    torch.testing.assert_close(compiled(x), x @ weight, rtol=1e-4, atol=1e-4)


def test_missing_external_data_names_the_file(tmp_path):
    path = tmp_path / "big.onnx"
    onnx.save(
        _linear_model(), path, save_as_external_data=True, location="w.data", size_threshold=0
    )
    (tmp_path / "w.data").unlink()
    with pytest.raises(CaptureError, match="w.data.*does not exist"):
        load_onnx(path)


def test_truncated_external_data(tmp_path):
    path = tmp_path / "big.onnx"
    onnx.save(
        _linear_model(), path, save_as_external_data=True, location="w.data", size_threshold=0
    )
    data = tmp_path / "w.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CaptureError, match="truncated"):
        load_onnx(path)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_file_is_refused_clearly(tmp_path, cut):
    path = tmp_path / "m.onnx"
    raw = _linear_model(k=64, n=64).SerializeToString()
    path.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(CaptureError, match="truncated or corrupt"):
        load_onnx(path)


def test_garbage_file_is_refused_clearly(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"this is not a protobuf \x00\xff\x13" * 50)
    with pytest.raises(CaptureError, match="junk.onnx"):
        load_onnx(path)


def test_missing_file(tmp_path):
    with pytest.raises(CaptureError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")


def test_too_new_opset_is_refused():
    with pytest.raises(CaptureError, match="opset 24 is newer"):
        load_onnx(_linear_model(opset=24))


def test_ir_model_input_is_not_modified():
    model = ir.serde.deserialize_model(_linear_model())
    nodes = [n.op_type for n in model.graph]
    kompakt.compile(model, target="cpu-w8", backend="reference")
    assert [n.op_type for n in model.graph] == nodes
    assert "W" in model.graph.initializers


def test_ir_model_with_old_opset_is_upgraded_per_op():
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x"], ["y"], axes=[0])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    )
    compiled = kompakt.compile(model, target="cpu", backend="reference")
    assert compiled.ir.opset_imports[""] == 21
    unsqueeze = next(n for n in compiled.ir.graph if n.op_type == "Unsqueeze")
    assert len(unsqueeze.inputs) == 2 and not unsqueeze.attributes
    torch.testing.assert_close(
        compiled(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([[1.0, 2.0, 3.0]])
    )


def test_latency_shapes_for_an_onnx_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_linear_model(k=64, n=32), path)
    given = kompakt.compile(path, example_inputs=(torch.randn(7, 64),), target="cpu-w8")
    assert given.report().latency_after.shapes == "example inputs x[7, 64]"
    assumed = kompakt.compile(path, example_inputs=(), target="cpu-w8")  # covers no input
    assert "symbolic dims assumed 1" in assumed.report().latency_after.shapes
    matmul = next(c for c in assumed.report().latency_after.nodes if c.op == "MatMul")
    assert matmul.flops == 2 * 1 * 64 * 32
