"""Conformance of the reference runtime with ONNX's backend node test cases.

Every case of ``onnx.backend.test.case.node`` whose ops are all in `supported_ops()` (the
``_expanded`` cases included, whose function bodies are spelled out in primitive ops) runs
through `ExecutionPlan`; each output must have the declared dtype, the expected shape, and the
expected values within the case's own tolerances. Cases that need what the runtime deliberately
leaves out are listed in `NOT_SUPPORTED`; for those, building the plan must raise
`UnsupportedOpError`, so they can never produce a wrong result silently.
"""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper
from onnx.backend.test.case.node import collect_testcases

from kompakt.errors import UnsupportedOpError
from kompakt.ir.tensors import ONNX_TO_TORCH
from kompakt.runtime.plan import ExecutionPlan
from kompakt.runtime.reference import supported_ops

# Every op that models exported with torch.onnx (dynamo, opset 20/21) produce.
REQUIRED_OPS = [
    "Add",
    "And",
    "Cast",
    "Concat",
    "Cos",
    "CumSum",
    "Equal",
    "Expand",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gelu",
    "Gemm",
    "GreaterOrEqual",
    "IsNaN",
    "LayerNormalization",
    "LessOrEqual",
    "MatMul",
    "Max",
    "Mul",
    "Neg",
    "Not",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Sin",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Where",
    "DequantizeLinear",
    "QuantizeLinear",
    "Constant",
    "ConstantOfShape",
    "Identity",
    "Div",
    "Erf",
    "Exp",
    "Log",
    "Abs",
    "Less",
    "Greater",
    "Or",
    "Xor",
    "Min",
    "Sum",
    "Mean",
    "Clip",
    "Flatten",
    "Tile",
    "Trilu",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ArgMax",
    "Size",
    "Softplus",
    "Einsum",
    "ScatterND",
    "Pad",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Mod",
    "CastLike",
    "Dropout",
    "IsInf",
    "LogSoftmax",
    "TopK",
    "MatMulInteger",
    "DynamicQuantizeLinear",
]

_FLOAT4 = "float4e2m1 has no torch dtype"
_INT2 = "2-bit integers have no torch dtype"
_E8M0 = "float8e8m0 has no torch dtype"
_STRING = "string tensors are not numeric; torch has no string dtype"
_SEQUENCE = "sequence and optional values are not supported"
_RANDOM = "training-mode Dropout is random; the reference runtime runs inference"

NOT_SUPPORTED: dict[str, str] = {
    **{
        f"test_{op}_{case}{suffix}": _FLOAT4
        for op, suffix in (("cast", ""), ("castlike", ""), ("castlike", "_expanded"))
        for case in (
            "FLOAT4E2M1_to_FLOAT",
            "FLOAT4E2M1_to_FLOAT16",
            "FLOAT_to_FLOAT4E2M1",
            "FLOAT16_to_FLOAT4E2M1",
        )
    },
    **{
        f"test_{op}_{case}{suffix}": _INT2
        for op, suffix in (("cast", ""), ("castlike", ""), ("castlike", "_expanded"))
        for case in (
            "FLOAT_to_UINT2",
            "FLOAT16_to_UINT2",
            "FLOAT_to_INT2",
            "FLOAT16_to_INT2",
            "UINT2_to_FLOAT",
            "UINT2_to_FLOAT16",
            "UINT2_to_UINT8",
            "INT2_to_FLOAT",
            "INT2_to_FLOAT16",
            "INT2_to_INT8",
        )
    },
    **{
        f"test_cast_e8m0_{case}": _E8M0
        for case in (
            "FLOAT_to_FLOAT8E8M0",
            "FLOAT16_to_FLOAT8E8M0",
            "FLOAT8E8M0_to_FLOAT",
            "FLOAT8E8M0_to_FLOAT16",
        )
    },
    "test_dequantizelinear_float4e2m1": _FLOAT4,
    "test_quantizelinear_float4e2m1": _FLOAT4,
    "test_dequantizelinear_int2": _INT2,
    "test_dequantizelinear_uint2": _INT2,
    "test_quantizelinear_int2": _INT2,
    "test_quantizelinear_uint2": _INT2,
    "test_equal_string": _STRING,
    "test_equal_string_broadcast": _STRING,
    "test_identity_sequence": _SEQUENCE,
    "test_identity_opt": _SEQUENCE,
    "test_training_dropout": _RANDOM,
    "test_training_dropout_default": _RANDOM,
    "test_training_dropout_default_mask": _RANDOM,
    "test_training_dropout_mask": _RANDOM,
    "test_training_dropout_zero_ratio": _RANDOM,
    "test_training_dropout_zero_ratio_mask": _RANDOM,
}


def _collect() -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # collection prints RuntimeWarnings of numpy overflows
        return {case.name: case for case in collect_testcases(None)}


CASES = _collect()
SUPPORTED = supported_ops()


def _ops(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {("" if n.domain == "ai.onnx" else n.domain, n.op_type) for n in model.graph.node}


ELIGIBLE = sorted(name for name, case in CASES.items() if _ops(case.model) <= SUPPORTED)

_D = ir.DataType
_INT4 = {_D.INT4: np.int8, _D.UINT4: np.uint8}
_ML_FLOATS = {  # ml_dtypes arrays become torch tensors through a same-width integer view
    np.dtype(ml_dtypes.bfloat16): np.uint16,
    np.dtype(ml_dtypes.float8_e4m3fn): np.uint8,
    np.dtype(ml_dtypes.float8_e4m3fnuz): np.uint8,
    np.dtype(ml_dtypes.float8_e5m2): np.uint8,
    np.dtype(ml_dtypes.float8_e5m2fnuz): np.uint8,
}


def _array(value: object) -> np.ndarray:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def _to_torch(value: object, dtype: ir.DataType) -> torch.Tensor:
    array = _array(value)
    if dtype in _INT4:
        array = array.astype(_INT4[dtype])
    elif array.dtype in _ML_FLOATS:
        array = array.view(_ML_FLOATS[array.dtype])
    tensor = torch.from_numpy(np.array(array, order="C", copy=True))  # writable, keeps 0-d
    target = ONNX_TO_TORCH[dtype]
    return tensor.view(target) if tensor.dtype != target else tensor


def _comparable(array: np.ndarray) -> np.ndarray:
    if array.dtype in _ML_FLOATS or array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        return array.astype(np.int8 if array.dtype == ml_dtypes.int4 else np.uint8)
    return array


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


@pytest.mark.parametrize("name", ELIGIBLE)
def test_conformance(name: str) -> None:
    case = CASES[name]
    model = ir.from_proto(case.model)
    if name in NOT_SUPPORTED:
        with pytest.raises(UnsupportedOpError):
            ExecutionPlan(model)
        return
    plan = ExecutionPlan(model)
    graph_inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    for inputs, expected in case.data_sets:
        feeds = {v.name: _to_torch(x, v.dtype) for v, x in zip(graph_inputs, inputs, strict=False)}
        outputs = plan.run(feeds)
        assert len(outputs) == len(expected)
        for value, got, want in zip(model.graph.outputs, outputs, expected, strict=True):
            want = _comparable(_array(want))
            assert got.dtype == ONNX_TO_TORCH[value.dtype], f"{value.name}: dtype {got.dtype}"
            assert tuple(got.shape) == want.shape, f"{value.name}: shape {tuple(got.shape)}"
            got_np = _numpy(got)
            if want.dtype.kind == "f":
                np.testing.assert_allclose(
                    got_np, want, rtol=case.rtol, atol=case.atol, equal_nan=True, err_msg=value.name
                )
            else:  # integers and booleans must match exactly
                np.testing.assert_array_equal(got_np, want, err_msg=value.name)


def test_required_ops_are_supported() -> None:
    missing = sorted(set(REQUIRED_OPS) - {op for domain, op in SUPPORTED if domain == ""})
    assert not missing


def test_not_supported_cases_exist() -> None:
    stale = sorted(set(NOT_SUPPORTED) - set(ELIGIBLE))
    assert not stale, f"NOT_SUPPORTED lists cases that do not exist or are not eligible: {stale}"
