"""Targeted tests of the reference runtime's op table, beyond ONNX's conformance cases.

ONNX Runtime is the oracle for MatMulNBits (its own contrib op) and for the attribute forms of
old opsets, which ONNX's node tests no longer exercise. Edge cases of the dtype handling
(uint64, int4, float8) are checked against values computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kompakt.errors import UnsupportedOpError
from kompakt.runtime.plan import ExecutionPlan

MS = "com.microsoft"


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int, list[int | str] | None]],
    outputs: list[tuple[str, int]],
    opset: int = 21,
    initializers: list[TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
        initializer=list(initializers),
    )
    imports = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    # ORT 1.31 rejects IR versions above 13.
    return helper.make_model(graph, opset_imports=imports, ir_version=10)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    plan = ExecutionPlan(ir.from_proto(model))
    outputs = plan.run({k: torch.from_numpy(np.array(v)) for k, v in feeds.items()})
    return [t.numpy() for t in outputs]


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# --- MatMulNBits against ONNX Runtime ---------------------------------------------------------


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (uint8, last axis) packed two per byte, low nibble first, for 4 bits."""
    if bits == 8:
        return codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros_like(codes[..., :1])], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


# ORT runs float zero points only for 4 bits.
@pytest.mark.parametrize(
    ("bits", "zero_points"),
    [(4, "none"), (4, "packed"), (4, "float"), (8, "none"), (8, "packed")],
)
@pytest.mark.parametrize(("k", "block_size"), [(64, 32), (48, 32), (96, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_nbits_matches_onnxruntime(
    bits: int, zero_points: str, k: int, block_size: int, bias: bool
) -> None:
    rng = np.random.default_rng(bits * 1000 + k + block_size)
    m, n = 5, 12
    n_blocks = math.ceil(k / block_size)
    codes = rng.integers(0, 2**bits, size=(n, n_blocks, block_size), dtype=np.uint8)
    b = _pack(codes, bits)  # [N, n_blocks, blob_size]
    scales = rng.uniform(0.01, 0.1, size=n * n_blocks).astype(np.float32)
    inits = [
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(scales, "scales"),
    ]
    names = ["A", "B", "scales"]
    if zero_points == "packed":
        zp = rng.integers(0, 2**bits, size=(n, n_blocks), dtype=np.uint8)
        inits.append(numpy_helper.from_array(_pack(zp, bits).reshape(-1), "zp"))
        names.append("zp")
    elif zero_points == "float":
        zp = rng.uniform(0, 2**bits - 1, size=n * n_blocks).astype(np.float32)
        inits.append(numpy_helper.from_array(zp, "zp"))
        names.append("zp")
    if bias:
        names += [""] * (4 - len(names)) + ["", "bias"]  # g_idx stays omitted
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"))
    node = helper.make_node(
        "MatMulNBits", names, ["Y"], domain=MS, K=k, N=n, bits=bits, block_size=block_size
    )
    model = _model(
        [node], [("A", TensorProto.FLOAT, [m, k])], [("Y", TensorProto.FLOAT)], initializers=inits
    )
    a = rng.standard_normal((m, k)).astype(np.float32)
    (want,) = _ort(model, {"A": a})
    (got,) = _run(model, {"A": a})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_matmul_nbits_rejects_g_idx_and_odd_bits() -> None:
    def model(bits: int, with_g_idx: bool) -> onnx.ModelProto:
        inputs = ["A", "B", "scales", "", "g_idx"] if with_g_idx else ["A", "B", "scales"]
        node = helper.make_node(
            "MatMulNBits", inputs, ["Y"], domain=MS, K=32, N=4, bits=bits, block_size=32
        )
        ins = [
            ("A", TensorProto.FLOAT, [1, 32]),
            ("B", TensorProto.UINT8, [4, 1, 32 * bits // 8]),
            ("scales", TensorProto.FLOAT, [4]),
            ("g_idx", TensorProto.INT32, [32]),
        ]
        return _model([node], ins, [("Y", TensorProto.FLOAT)])

    with pytest.raises(UnsupportedOpError, match="g_idx"):
        ExecutionPlan(ir.from_proto(model(4, with_g_idx=True)))
    with pytest.raises(UnsupportedOpError, match="bits=2"):
        ExecutionPlan(ir.from_proto(model(2, with_g_idx=False)))


# --- quantization -----------------------------------------------------------------------------


def test_blocked_int4_dequantize_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    rows, cols, block = 3, 7, 3  # the last block along axis 1 is short
    blocks = math.ceil(cols / block)
    x = rng.integers(-8, 8, size=(rows, cols)).astype(np.int8)
    scale = rng.uniform(0.1, 1.0, size=(rows, blocks)).astype(np.float32)
    zp = rng.integers(-8, 8, size=(rows, blocks)).astype(np.int8)
    node = helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["y"], axis=1, block_size=block)
    model = _model(
        [node],
        [
            ("x", TensorProto.INT4, [rows, cols]),
            ("s", TensorProto.FLOAT, [rows, blocks]),
            ("zp", TensorProto.INT4, [rows, blocks]),
        ],
        [("y", TensorProto.FLOAT)],
    )
    (got,) = _run(model, {"x": x, "s": scale, "zp": zp})
    want = np.empty((rows, cols), dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            b = c // block
            want[r, c] = (int(x[r, c]) - int(zp[r, b])) * scale[r, b]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_quantize_int4_rounds_half_to_even_and_saturates() -> None:
    node = helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"])
    model = _model(
        [node],
        [("x", TensorProto.FLOAT, [8]), ("s", TensorProto.FLOAT, []), ("zp", TensorProto.INT4, [])],
        [("y", TensorProto.INT4)],
    )
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 100.0, -100.0], dtype=np.float32)
    (got,) = _run(model, {"x": x, "s": np.float32(1.0), "zp": np.int8(0)})
    assert got.dtype == np.int8  # int4 is held unpacked
    assert got.tolist() == [0, 2, 2, 0, -2, -2, 7, -8]


def test_cast_to_float8_e4m3fn_without_saturation_gives_nan() -> None:
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN, saturate=0)
    model = _model([node], [("x", TensorProto.FLOAT, [5])], [("y", TensorProto.FLOAT8E4M3FN)])
    x = np.array([448.0, 464.0, 465.0, np.inf, -1e6], dtype=np.float32)
    plan = ExecutionPlan(ir.from_proto(model))
    (got,) = plan.run({"x": torch.from_numpy(x)})
    values = got.float().tolist()
    assert values[:2] == [448.0, 448.0]  # 464 is halfway and rounds to the even 448
    assert all(math.isnan(v) for v in values[2:])


# --- unsupported inputs fail at build time ----------------------------------------------------


def test_unsupported_dtype_raises_when_the_plan_is_built() -> None:
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E8M0)
    model = _model([node], [("x", TensorProto.FLOAT, [3])], [("y", TensorProto.FLOAT8E8M0)])
    with pytest.raises(UnsupportedOpError, match="FLOAT8E8M0") as err:
        ExecutionPlan(ir.from_proto(model))
    assert err.value.op == "Cast"


def test_random_dropout_is_rejected_but_inference_dropout_runs() -> None:
    train = helper.make_node("Dropout", ["x", "r", "t"], ["y"])
    model = _model(
        [train],
        [("x", TensorProto.FLOAT, [3]), ("r", TensorProto.FLOAT, []), ("t", TensorProto.BOOL, [])],
        [("y", TensorProto.FLOAT)],
    )
    with pytest.raises(UnsupportedOpError, match="training_mode"):
        ExecutionPlan(ir.from_proto(model))
    infer = helper.make_node("Dropout", ["x"], ["y", "mask"])
    model = _model(
        [infer],
        [("x", TensorProto.FLOAT, [3])],
        [("y", TensorProto.FLOAT), ("mask", TensorProto.BOOL)],
    )
    y, mask = _run(model, {"x": np.arange(3, dtype=np.float32)})
    assert y.tolist() == [0.0, 1.0, 2.0] and mask.all()


# --- uint64 arithmetic beyond int64 -----------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "fn"),
    [
        ("Div", lambda a, b: a // b),
        ("Mod", lambda a, b: a % b),
        ("Add", lambda a, b: (a + b) % 2**64),
        ("Sub", lambda a, b: (a - b) % 2**64),
        ("Max", max),
        ("Less", lambda a, b: a < b),
    ],
)
def test_uint64_ops_are_exact_above_2_63(op: str, fn) -> None:
    a = [2**64 - 1, 2**63 + 5, 7, 2**63, 12345678901234567890, 3]
    b = [3, 2**63 + 1, 2**64 - 2, 1, 2**63 - 1, 2**64 - 1]
    out_type = TensorProto.BOOL if op == "Less" else TensorProto.UINT64
    node = helper.make_node(op, ["a", "b"], ["y"])
    model = _model(
        [node],
        [("a", TensorProto.UINT64, [6]), ("b", TensorProto.UINT64, [6])],
        [("y", out_type)],
    )
    (got,) = _run(model, {"a": np.array(a, dtype=np.uint64), "b": np.array(b, dtype=np.uint64)})
    assert [bool(v) if op == "Less" else int(v) for v in got] == [
        fn(x, y) for x, y in zip(a, b, strict=True)
    ]


# --- attribute forms of old opsets, against ONNX Runtime --------------------------------------

_F = TensorProto.FLOAT
_OLD_FORMS = [
    # (name, opset, node, inputs, extra initializers)
    ("softmax_flattens_before_13", 11, helper.make_node("Softmax", ["x"], ["y"], axis=1), []),
    ("logsoftmax_flattens_before_13", 11, helper.make_node("LogSoftmax", ["x"], ["y"]), []),
    ("hardmax_flattens_before_13", 11, helper.make_node("Hardmax", ["x"], ["y"], axis=1), []),
    (
        "slice_attributes_before_10",
        9,
        helper.make_node("Slice", ["x"], ["y"], starts=[1, -3], ends=[100, -1], axes=[0, 2]),
        [],
    ),
    ("squeeze_axes_attribute", 11, helper.make_node("Squeeze", ["x1"], ["y"], axes=[1]), []),
    ("unsqueeze_axes_attribute", 11, helper.make_node("Unsqueeze", ["x"], ["y"], axes=[0, -1]), []),
    ("split_attribute", 11, helper.make_node("Split", ["x"], ["y", "z"], axis=2, split=[2, 3]), []),
    (
        "reduce_mean_axes_attribute",
        13,
        helper.make_node("ReduceMean", ["x"], ["y"], axes=[0, 2], keepdims=0),
        [],
    ),
    (
        "reduce_sum_axes_input",
        13,
        helper.make_node("ReduceSum", ["x", "axes"], ["y"]),
        [numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")],
    ),
    ("reduce_l2_attribute", 11, helper.make_node("ReduceL2", ["x"], ["y"], axes=[1]), []),
    (
        "clip_attributes_before_11",
        6,
        helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.25),
        [],
    ),
    (
        "pad_attributes_before_11",
        2,
        helper.make_node("Pad", ["x"], ["y"], pads=[0, 1, 0, 0, 2, 1], mode="reflect"),
        [],
    ),
    ("topk_attribute_before_10", 9, helper.make_node("TopK", ["x"], ["y", "i"], k=2, axis=1), []),
    (
        "reshape_zero_copies_the_dim",
        14,
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
        [numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape")],
    ),
    (
        "cumsum_reverse_exclusive",
        14,
        helper.make_node("CumSum", ["x", "axis"], ["y"], exclusive=1, reverse=1),
        [numpy_helper.from_array(np.array(2, dtype=np.int64), "axis")],
    ),
    (
        "layernorm_axis_1_with_stats",
        17,
        helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean", "inv"], axis=1),
        [
            numpy_helper.from_array(
                np.linspace(0.5, 1.5, 20).astype(np.float32).reshape(4, 5), "scale"
            )
        ],
    ),
    ("gelu_tanh", 20, helper.make_node("Gelu", ["x"], ["y"], approximate="tanh"), []),
]


@pytest.mark.parametrize(
    ("opset", "node", "inits"), [c[1:] for c in _OLD_FORMS], ids=[c[0] for c in _OLD_FORMS]
)
def test_matches_onnxruntime(opset: int, node: onnx.NodeProto, inits: list) -> None:
    rng = np.random.default_rng(1)
    feeds = {
        "x": rng.standard_normal((3, 4, 5)).astype(np.float32),
        "x1": rng.standard_normal((3, 1, 5)).astype(np.float32),
    }
    used = [name for name in node.input if name in feeds]
    model = _model(
        [node],
        [(name, _F, list(feeds[name].shape)) for name in used],
        [(name, _F if name != "i" else TensorProto.INT64) for name in node.output],
        opset=opset,
        initializers=inits,
    )
    feeds = {name: feeds[name] for name in used}
    for got, want in zip(_run(model, feeds), _ort(model, feeds), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_matmul_nbits_float16_matches_onnxruntime() -> None:
    rng = np.random.default_rng(7)
    m, n, k, block_size = 3, 8, 64, 32
    codes = rng.integers(0, 16, size=(n, k // block_size, block_size), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=n * k // block_size).astype(np.float16)
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "s"], ["Y"], domain=MS, K=k, N=n, bits=4, block_size=block_size
    )
    model = _model(
        [node],
        [("A", TensorProto.FLOAT16, [m, k])],
        [("Y", TensorProto.FLOAT16)],
        initializers=[
            numpy_helper.from_array(_pack(codes, 4), "B"),
            numpy_helper.from_array(scales, "s"),
        ],
    )
    a = rng.standard_normal((m, k)).astype(np.float16)
    (want,) = _ort(model, {"A": a})
    (got,) = _run(model, {"A": a})
    assert got.dtype == np.float16
    np.testing.assert_allclose(
        got.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize(
    ("zp_type", "axis", "block_size", "scale_shape"),
    [
        (TensorProto.UINT8, 1, 0, []),  # per tensor
        (TensorProto.INT8, 1, 0, [6]),  # per axis
        (TensorProto.INT4, 1, 4, [4, 2]),  # blocked, the last block short
        (TensorProto.UINT4, 0, 3, [2, 6]),
        (TensorProto.INT16, 0, 0, [4]),
    ],
)
def test_opset21_quantize_then_dequantize_match_onnxruntime(
    zp_type: int, axis: int, block_size: int, scale_shape: list[int]
) -> None:
    rng = np.random.default_rng(3)
    scale = rng.uniform(0.02, 0.2, size=scale_shape).astype(np.float32)
    unsigned = zp_type in (TensorProto.UINT8, TensorProto.UINT4)
    values = rng.integers(0 if unsigned else -2, 3, size=scale_shape)
    zp = helper.make_tensor("zp", zp_type, scale_shape, values.reshape(-1).tolist())
    attrs = {"axis": axis, "block_size": block_size} if block_size else {"axis": axis}
    quant = helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs)
    dequant = helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)
    model = _model(
        [quant, dequant],
        [("x", TensorProto.FLOAT, [4, 6])],
        [("y", TensorProto.FLOAT)],
        opset=21,
        initializers=[numpy_helper.from_array(scale, "s"), zp],
    )
    x = (rng.standard_normal((4, 6)) * 2).astype(np.float32)
    (want,) = _ort(model, {"x": x})
    (got,) = _run(model, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
