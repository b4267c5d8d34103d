"""Roofline cost model: the numbers it predicts follow from bytes, flops and the device."""

import pytest
from onnx import TensorProto, helper, numpy_helper

from kompakt.lowering import load_onnx
from kompakt.passes.base import CompileContext
from kompakt.passes.manager import PassManager
from kompakt.targets import CostModel, Target, get_device


def matmul_model(k=4096, n=4096):
    import numpy as np

    w = numpy_helper.from_array(np.zeros((k, n), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            helper.make_node("Reshape", ["y", "s"], ["z"], name="view"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [w, numpy_helper.from_array(np.array([-1], np.int64), "s")],
    )
    return load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_gemv_is_memory_bound_at_the_datasheet_bandwidth():
    spec = get_device("a100")
    costs = CostModel(spec).estimate(matmul_model(), {"x": (1, 4096), "y": (1, 4096), "z": (4096,)})
    mm, view = costs
    weight_bytes = 4096 * 4096 * 4
    assert mm.bound == "memory"
    assert mm.seconds == pytest.approx(
        weight_bytes / spec.memory_bandwidth + spec.launch_overhead, rel=0.01
    )
    assert view.seconds == 0 and view.bound == "free"


def test_large_m_becomes_compute_bound():
    spec = get_device("a100")
    m = 8192
    (mm, _) = CostModel(spec).estimate(
        matmul_model(), {"x": (m, 4096), "y": (m, 4096), "z": (m * 4096,)}
    )
    assert mm.bound == "compute"
    assert mm.flops == 2 * m * 4096 * 4096
    assert mm.seconds == pytest.approx(
        mm.flops / spec.peak("fp32") + spec.launch_overhead, rel=0.01
    )


def test_int4_weights_are_charged_their_packed_bytes():
    model = matmul_model()
    PassManager("canonicalize,quantize-weights{bits=4,group-size=128}").run(
        model, CompileContext(progress=False)
    )
    shapes = {"x": (1, 4096), "y": (1, 4096), "z": (4096,)}
    costs = {c.op: c for c in CostModel(get_device("h100")).estimate(model, shapes)}
    assert costs["DequantizeLinear"].seconds == 0  # fused into the MatMul
    groups = 4096 // 128
    packed = (
        4096 * 4096 / 2 + groups * 4096 * 4 + groups * 4096 / 2
    )  # uint4 q, f32 scale, uint4 zero
    activations = 4096 * 4 + 4096 * 4  # x read, y written
    assert costs["MatMul"].bytes == packed + activations


def test_a_fused_group_is_charged_its_inputs_and_outputs_and_its_bodys_flops():
    import kompakt.passes.builtin  # noqa: F401  (fuse-dequant-matmul)

    model = matmul_model()
    pipeline = "canonicalize,quantize-weights{bits=4,group-size=128},fuse-dequant-matmul"
    PassManager(pipeline).run(model, CompileContext(progress=False))
    shapes = {"x": (1, 4096), "y": (1, 4096), "z": (4096,)}
    costs = {c.op: c for c in CostModel(get_device("h100")).estimate(model, shapes)}
    fused = costs["FusedKernel[dequant_matmul]"]
    groups = 4096 // 128
    packed = 4096 * 4096 / 2 + groups * 4096 * 4 + groups * 4096 / 2
    assert fused.bytes == packed + 4096 * 4 + 4096 * 4  # as the unfused MatMul was charged
    # 2*M*N*K for the MatMul plus one operation per dequantized weight element
    assert fused.flops == 2 * 4096 * 4096 + 4096 * 4096


def test_faster_hardware_predicts_less_time():
    model = matmul_model()
    shapes = {"x": (1, 4096), "y": (1, 4096), "z": (4096,)}
    times = {
        d: CostModel(get_device(d)).total_seconds(CostModel(get_device(d)).estimate(model, shapes))
        for d in ("l4", "a100", "h100", "h200")
    }
    assert times["l4"] > times["a100"] > times["h100"] > times["h200"]


def test_target_carries_its_device():
    assert Target.parse("h200-w4").device.memory_bandwidth == 4800e9


def test_unknown_activation_shapes_still_charge_the_weights():
    spec = get_device("cpu")
    (mm, _) = CostModel(spec).estimate(matmul_model(), {})  # x's batch dim is symbolic
    weight_bytes = 4096 * 4096 * 4
    assert mm.bytes == weight_bytes
    assert mm.seconds == pytest.approx(weight_bytes / spec.memory_bandwidth + spec.launch_overhead)
