"""fuse-quantized-matmul and the scaled_matmul binder: W8A8 / fp8 QDQ MatMuls as one GEMM."""

from __future__ import annotations

import collections
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import EXAMPLE_SHAPE, OTHER_SHAPE, tokens
from fusion_helpers import compile_for_gpu, first_output
from onnx import TensorProto, helper, numpy_helper

import kompakt
import kompakt.passes.fuse.fuse_quantized_matmul  # noqa: F401  (registers fuse-quantized-matmul)
from kompakt.errors import CodegenError
from kompakt.ir.fused import body_of, is_fused, pattern_of
from kompakt.ir.tensors import to_torch
from kompakt.runtime.plan import ExecutionPlan

FUSE = "fuse-quantized-matmul"
PLAIN = "canonicalize,infer-shapes"
# W8A8 as the w8a8 targets write it: symmetric int8 weights, one scale per output channel.
W8 = PLAIN + ",quantize-weights{bits=8,group-size=-1,symmetric=true}"
PIPELINES = {
    "int8-dynamic": W8 + ",quantize-activations{dynamic=true}",
    "int8-static": W8 + ",quantize-activations{dynamic=false}",
    "fp8-static": PLAIN + ",fp8",
    "fp8-dynamic": PLAIN + ",fp8{dynamic=true}",
}
# Llama, 2 layers x (q, k, v, o, gate, up, down) = 14 groups. Dynamic and fp8 quantize q/k/v's
# and gate/up's shared input once, outside (5 per layer); static int8 gives each MatMul its own
# Q/DQ pair, so every group quantizes inside.
EXPECTED = {  # name -> (kind, act_scale, groups quantizing inside)
    "int8-dynamic": ("int8", "per_token", 4),
    "int8-static": ("int8", "static", 14),
    "fp8-static": ("fp8", "static", 4),
    "fp8-dynamic": ("fp8", "per_token", 4),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U = 2.0**-24  # fp32 unit roundoff


def _compile(captured, name, fused=True, backend="reference"):
    pipeline = PIPELINES[name] + ("," + FUSE if fused else "")
    return compile_for_gpu(
        captured("llama"), pipeline, backend=backend, device=DEVICE if backend == "triton" else "cpu",
        calibration=[(tokens(EXAMPLE_SHAPE),)] if "static" in name else None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def compiled(captured):
    cache = {}

    def get(name, fused=True, backend="reference"):
        key = (name, fused, backend)
        if key not in cache:
            cache[key] = _compile(captured, name, fused, backend)
        return cache[key]

    return get


def _groups(model):
    return [n for n in model.graph if is_fused(n) and pattern_of(n) == "scaled_matmul"]


def _notes(cm):
    return [note for r in cm.report().passes if r.name == FUSE for note in r.result.notes]


@pytest.mark.parametrize("name", list(PIPELINES))
def test_groups_are_found_and_compute_exactly_what_the_unfused_model_does(compiled, name):
    cm = compiled(name)
    groups = _groups(cm.ir)
    kind, act_scale, inside = EXPECTED[name]
    assert len(groups) == 14
    assert {n.attributes["kind"].as_string() for n in groups} == {kind}
    assert {n.attributes["act_scale"].as_string() for n in groups} == {act_scale}
    assert sum(n.attributes["act_quantize"].value for n in groups) == inside
    for node in groups:
        roles = list(node.attributes["roles"].as_strings())
        assert {"wq", "w_scale"} <= set(roles) and len(roles) == len(node.inputs)
        assert ("x" in roles) == bool(node.attributes["act_quantize"].value) != ("xq" in roles)
    # every activation DequantizeLinear went into a group (shared ones as one copy per MatMul)
    assert not [n for n in cm.ir.graph if n.op_type == "DequantizeLinear"]
    plain = compiled(name, fused=False)
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE):
        ids = tokens(shape)
        assert torch.equal(first_output(cm(ids)), first_output(plain(ids)))


def _bound(node, x_dq, w_dq, want, u, per_term=None):
    """|kernel - body| per output, in the model's unit roundoff u. The body rounds each
    dequantized operand (2) and sums K products (K, in any order); the kernel converts an int32
    sum (1 past 2**24) and scales it (2), or first sums exact e4m3 products in fp32 (K more).
    Both round the output and add the bias (2 |y| + 2 |b|)."""
    k = w_dq.shape[0]
    terms = k + 5 if node.attributes["kind"].as_string() == "int8" else 2 * k + 4
    roles = list(node.attributes["roles"].as_strings())
    bias = to_torch(node.inputs[roles.index("bias")].const_value) if "bias" in roles else 0
    edge = 2 * u * (want.abs() + torch.as_tensor(bias).double().abs())
    return (per_term or terms * u) * (x_dq.abs() @ w_dq.abs()) + edge


@pytest.mark.parametrize(
    "name, paths",
    [  # how each group gets its codes: given (shared, outside), quantize kernel, body's ops
        ("int8-dynamic", {"given": 10, "kernel": 4}),
        ("fp8-static", {"given": 10, "body": 4}),
        ("int8-static", {"body": 14}),
    ],
)
def test_each_kernel_is_its_body_up_to_float_rounding(compiled, name, paths):
    from kompakt.codegen.scaled_matmul.bind import bind

    gen = torch.Generator().manual_seed(3)
    used = collections.Counter()
    for node in _groups(compiled(name).ir):
        kernel = bind(node, torch.device(DEVICE))
        used[kernel.quantize] += 1
        for lead in ((1, 1), (3, 5)):
            inputs = _random_inputs(node, lead, gen)
            got = kernel(*(t.to(DEVICE) for t in inputs)).cpu()
            want, x_dq, w_dq = _run_body(node, inputs)
            assert ((got - want).abs() <= _bound(node, x_dq, w_dq, want, U)).all(), node.name
    assert used == paths


@pytest.mark.parametrize("name", list(PIPELINES))
def test_triton_backend_matches_the_reference(compiled, name):
    triton, reference = compiled(name, backend="triton"), compiled(name)
    summary = triton._backend.summary()
    assert "scaled_matmul x14" in summary and "fell back" not in summary
    for shape in (EXAMPLE_SHAPE, OTHER_SHAPE, (1, 1)):
        ids = tokens(shape)
        got, want = first_output(triton(ids)).cpu(), first_output(reference(ids))
        # Per layer the kernels differ from the bodies by float rounding (~1e-7 relative, see
        # above); through 2 layers the logits (|y| < 1) agree to ~2e-7. A downstream dynamic
        # quantization could in principle round one code the other way (x / s within 1e-7 of a
        # tie), moving a logit by ~|w| s ~ 1e-4: the tolerance allows that, not a wrong scale.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)


def test_kernels_quantize_exactly_like_the_graph(compiled):
    """The dynamic fp32 groups use the family's quantize kernel: its codes and per-token scales
    must be the graph's bit for bit, or the outputs would differ by whole quantization steps."""
    from kompakt.codegen.scaled_matmul.launch import quantize_rows

    gen = torch.Generator().manual_seed(5)
    for name, code in (("int8-dynamic", torch.int8), ("fp8-dynamic", torch.float8_e4m3fn)):
        node = next(n for n in _groups(compiled(name).ir) if n.attributes["act_quantize"].value)
        k = _k(node)
        # rows of every magnitude, many values per row
        x = torch.randn(3, 5, k, generator=gen) * torch.logspace(-3, 2, 15).reshape(3, 5, 1)
        x[0, 0] = 0  # an all-zero row: scale tiny in the graph, 1 in the kernel; codes 0 both
        graph_codes, graph_scale = _run_body(node, _random_inputs(node, (3, 5), gen, x), True)
        codes, scale = quantize_rows(x.to(DEVICE), code, per_row=True)
        assert torch.equal(codes.cpu().view(torch.int8), graph_codes.view(torch.int8))
        assert torch.equal(scale.cpu().flatten()[1:], graph_scale.flatten()[1:])


@pytest.mark.parametrize(
    "pipeline, reason",
    [  # the defaults: asymmetric uint8, 128-row groups (K = 64 here: one group)
        (PLAIN + ",quantize-weights{bits=8},quantize-activations{dynamic=false}", "UINT8 weights"),
        (
            PLAIN + ",quantize-weights{bits=4,group-size=-1,symmetric=true},quantize-activations",
            "INT4 weights",
        ),
    ],
)
def test_patterns_the_kernels_cannot_take_are_left_alone(captured, pipeline, reason):
    cm = compile_for_gpu(
        captured("llama"), pipeline + "," + FUSE, calibration=[(tokens(EXAMPLE_SHAPE),)]
    )
    assert not _groups(cm.ir)
    notes = _notes(cm)
    assert len(notes) == 14 and all(reason in n for n in notes), notes


@pytest.mark.parametrize("name", ["int8-static", "fp8-dynamic"])
def test_export_is_standard_onnx_that_onnxruntime_runs(compiled, tmp_path, name):
    cm = compiled(name)
    path = cm.export_onnx(tmp_path / "m.onnx")
    proto = onnx.load(path)
    assert not any(n.domain == "kompakt" for n in proto.graph.node)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["DequantizeLinear"] == 28 and ops["MatMul"] >= 14  # 14 weights + 14 activations
    options = ort.SessionOptions()
    # ORT 1.31 would fuse float8 Q/DQ + MatMul into MatMulIntegerToFloat, which rejects float8
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ids = tokens(EXAMPLE_SHAPE)
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    # ORT's float kernels sum in other orders: float rounding, plus a possible code flip
    torch.testing.assert_close(torch.from_numpy(got), first_output(cm(ids)), rtol=1e-4, atol=2e-4)


# Hand-built graphs: what the quantize passes do not write, and the binder's choices.
K, N = 40, 24  # not multiples of any block
HAND = "infer-shapes," + FUSE  # the code types come from shape inference


def _qdq_model(kind="int8", scale="per_token", fp16=False, zero=0, bias=True, k=K, n=N):
    """y = MatMul(DQ(Q(x, s[, zero])), DQ(Wq, s_w, axis=1)) [+ b], x [b, s, k], Wq [k, n]."""
    ft, dtype = (TensorProto.FLOAT16, torch.float16) if fp16 else (TensorProto.FLOAT, torch.float32)
    code, qmax = (TensorProto.INT8, 127.0) if kind == "int8" else (TensorProto.FLOAT8E4M3FN, 448.0)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(k, n, generator=gen)
    ws = w.abs().amax(0) / qmax
    codes = (w / ws).round().to(torch.int8) if kind == "int8" else (w / ws).to(torch.float8_e4m3fn)

    def const(name, t, cast=dtype):
        return numpy_helper.from_array(torch.as_tensor(t).to(cast).numpy(), name)

    def coded(name, t):  # int8 / float8 from raw bytes (numpy has no float8)
        raw = t.to(codes.dtype).view(torch.uint8).numpy().tobytes()
        return helper.make_tensor(name, code, list(t.shape), raw, raw=True)

    b = 0.1 * torch.randn(n, generator=gen)
    inits = [coded("wq", codes), const("ws", ws), const("b", b), const("qmax", qmax)]
    inits += [const("floor", torch.finfo(dtype).tiny), const("axes", [-1], torch.int64)]
    q_attrs, q_inputs = {"output_dtype": code}, ["x", "s"]
    if scale == "static":
        inits += [const("s", 0.02), coded("zp", torch.tensor(float(zero)))]
        q_inputs, q_attrs = ["x", "s", "zp"], {}
        nodes = []
    else:
        per_token = scale == "per_token"
        nodes = [
            helper.make_node("Abs", ["x"], ["a"]),
            helper.make_node("ReduceMax", ["a", "axes"] if per_token else ["a"], ["m"],
                             keepdims=int(per_token)),
            helper.make_node("Div", ["m", "qmax"], ["r"]),
            helper.make_node("Max", ["r", "floor"], ["s"]),
        ]  # fmt: skip
        if per_token:
            q_attrs.update(axis=-1, block_size=k)
    dq_attrs = {a: v for a, v in q_attrs.items() if a != "output_dtype"}
    nodes += [
        helper.make_node("QuantizeLinear", q_inputs, ["xq"], **q_attrs),
        helper.make_node("DequantizeLinear", ["xq", *q_inputs[1:]], ["xd"], **dq_attrs),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["mm" if bias else "y"]),
    ]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"]))
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", ft, ["b", "s", k])],
        [helper.make_tensor_value_info("y", ft, ["b", "s", n])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize(
    "kwargs, act_scale, quantize",
    [
        ({"scale": "per_tensor"}, "per_tensor_dynamic", "kernel"),  # amax pass, then quantize
        ({"kind": "fp8", "scale": "per_tensor", "bias": False}, "per_tensor_dynamic", "kernel"),
        ({"fp16": True}, "per_token", "body"),  # the body computes its scale in fp16
        ({"kind": "fp8", "scale": "static", "fp16": True}, "static", "body"),
    ],
)
def test_hand_built_groups_fuse_and_run_on_triton(kwargs, act_scale, quantize):
    from kompakt.codegen.scaled_matmul.bind import bind

    model = _qdq_model(**kwargs)
    cm = compile_for_gpu(model, HAND)
    (node,) = _groups(cm.ir)
    assert bind(node, torch.device(DEVICE)).quantize == quantize
    assert node.attributes["act_scale"].as_string() == act_scale
    assert node.attributes["act_quantize"].value == 1
    assert node.attributes["has_bias"].value == int(kwargs.get("bias", True))
    triton = compile_for_gpu(model, HAND, backend="triton", device=DEVICE)
    assert "scaled_matmul x1" in triton._backend.summary()
    fp16 = kwargs.get("fp16", False)
    u = 2.0**-11 if fp16 else U  # the model's unit roundoff
    gen = torch.Generator().manual_seed(4)
    for lead in ((1, 1), (3, 7)):
        x = torch.randn(*lead, K, generator=gen).to(torch.float16 if fp16 else torch.float32)
        want, x_dq, w_dq = _run_body(node, _random_inputs(node, lead, gen, x))
        assert torch.equal(want, cm(x))
        got, want = triton(x.to(DEVICE)).cpu().double(), want.double()
        assert ((got - want).abs() <= _bound(node, x_dq, w_dq, want, u)).all()


def test_asymmetric_zero_point_falls_back_to_torch():
    model = _qdq_model(scale="static", zero=3)
    cm = compile_for_gpu(model, HAND)
    assert len(_groups(cm.ir)) == 1  # the body is exact whatever the zero point
    triton = compile_for_gpu(model, HAND, backend="triton", device=DEVICE)
    summary = triton._backend.summary()
    assert "triton kernels: none" in summary and "act_zero 'zp' is non-zero" in summary
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(6))
    assert torch.equal(triton(x.to(DEVICE)).cpu(), cm(x))


def test_binder_refuses_what_the_device_cannot_run(monkeypatch):
    from kompakt.codegen.scaled_matmul import bind as binder

    (node,) = _groups(compile_for_gpu(_qdq_model(kind="fp8"), HAND).ir)
    monkeypatch.setattr(binder, "exact_arch", lambda device: "sm_80")
    with pytest.raises(CodegenError, match=r"fp8 matmul needs sm_89\+, the device is sm_80"):
        binder.bind(node, torch.device("cpu"))


def test_binder_module_does_not_import_triton():
    code = "import sys, kompakt.codegen.scaled_matmul.bind; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gpu_real_sizes_match_the_body(kind):
    major, minor = torch.cuda.get_device_capability()
    if kind == "fp8" and 10 * major + minor < 89:
        pytest.skip("fp8 needs sm_89+")
    from kompakt.codegen.scaled_matmul.bind import bind

    gen = torch.Generator().manual_seed(7)
    k = n = 2048
    (node,) = _groups(compile_for_gpu(_qdq_model(kind=kind, k=k, n=n), HAND).ir)
    kernel = bind(node, torch.device("cuda"))
    for m in (1, 48, 512):  # one per M regime of the tiling
        inputs = _random_inputs(node, (m,), gen)
        got = kernel(*(t.cuda() for t in inputs)).cpu().double()
        want, x_dq, w_dq = _run_body(node, inputs)
        # int8: as on the CPU. fp8: Hopper's fp8 MMA keeps ~14 bits of the running sum, so
        # bound by 2**-10 of the magnitudes, as tests/codegen/_gemm_cases.py does.
        per_term = None if kind == "int8" else 2.0**-10
        assert ((got - want).abs() <= _bound(node, x_dq, w_dq, want.double(), U, per_term)).all()


def _random_inputs(node, lead, gen, x=None):
    """Inputs for a fused node: constants as stored, x random, or codes and a per-token scale."""
    k, kind = _k(node), node.attributes["kind"].as_string()
    inputs = []
    for value, role in zip(node.inputs, node.attributes["roles"].as_strings(), strict=True):
        if value.const_value is not None:
            inputs.append(to_torch(value.const_value))
        elif role == "x":
            inputs.append(x if x is not None else torch.randn(*lead, k, generator=gen))
        elif role == "xq":
            xq = torch.randint(-127, 128, (*lead, k), generator=gen, dtype=torch.int8)
            inputs.append(xq if kind == "int8" else (xq.float() * 3.5).to(torch.float8_e4m3fn))
        else:  # a scale computed outside: per token [..., 1], or per tensor
            shape = (*lead, 1) if node.attributes["act_scale"].as_string() == "per_token" else ()
            inputs.append(torch.rand(shape, generator=gen) + 0.01)
    return inputs


def _k(node):
    return node.inputs[list(node.attributes["roles"].as_strings()).index("wq")].shape[0]


def _run_body(node, inputs, quantize=False):
    """The body's output and its MatMul's operands (or its QuantizeLinear's codes and scale)."""
    plan = ExecutionPlan(body_of(node), opset_imports={"": node.attributes["opset"].value})
    seen = {}

    def observe(inner, args, results):
        seen[inner.op_type] = (args, results)

    (out,) = plan.run(dict(zip(plan.input_names, inputs, strict=True)), observer=observe)
    if quantize:
        args, results = seen["QuantizeLinear"]
        return results[0], args[1]
    (x_dq, w_dq), _ = seen["MatMul"]
    return out, x_dq.double(), w_dq.double()
