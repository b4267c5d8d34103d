"""Conversions between onnx_ir tensors and torch tensors, and the dtype table between them.

The reference runtime and the compression passes work on torch tensors; the IR stores
`ir.TensorProtocol`s. Sub-byte types (int4/uint4) are held unpacked in torch as int8/uint8.
"""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from kompakt.errors import KompaktError

_D = ir.DataType
ONNX_TO_TORCH: dict[ir.DataType, torch.dtype] = {
    _D.FLOAT: torch.float32,
    _D.FLOAT16: torch.float16,
    _D.BFLOAT16: torch.bfloat16,
    _D.DOUBLE: torch.float64,
    _D.INT8: torch.int8,
    _D.INT16: torch.int16,
    _D.INT32: torch.int32,
    _D.INT64: torch.int64,
    _D.UINT8: torch.uint8,
    _D.UINT16: torch.uint16,
    _D.UINT32: torch.uint32,
    _D.UINT64: torch.uint64,
    _D.BOOL: torch.bool,
    _D.FLOAT8E4M3FN: torch.float8_e4m3fn,
    _D.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    _D.FLOAT8E5M2: torch.float8_e5m2,
    _D.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    _D.COMPLEX64: torch.complex64,
    _D.COMPLEX128: torch.complex128,
    # Sub-byte integers are unpacked to one element per byte.
    _D.INT4: torch.int8,
    _D.UINT4: torch.uint8,
}

TORCH_TO_ONNX: dict[torch.dtype, ir.DataType] = {
    t: o for o, t in ONNX_TO_TORCH.items() if o not in (_D.INT4, _D.UINT4)
}

# numpy views used to move ml_dtypes arrays into torch without a copy.
_NUMPY_VIEW: dict[ir.DataType, np.dtype] = {
    _D.BFLOAT16: np.dtype(np.uint16),
    _D.FLOAT8E4M3FN: np.dtype(np.uint8),
    _D.FLOAT8E4M3FNUZ: np.dtype(np.uint8),
    _D.FLOAT8E5M2: np.dtype(np.uint8),
    _D.FLOAT8E5M2FNUZ: np.dtype(np.uint8),
}


def torch_dtype(dtype: ir.DataType, what: str = "tensor") -> torch.dtype:
    """Maps an ONNX dtype to the torch dtype that holds it; raises for ones torch cannot hold."""
    try:
        return ONNX_TO_TORCH[dtype]
    except KeyError:
        raise KompaktError(f"{what}: dtype {dtype.name} has no torch equivalent") from None


def onnx_dtype(dtype: torch.dtype) -> ir.DataType:
    """Maps a torch dtype to its ONNX dtype."""
    try:
        return TORCH_TO_ONNX[dtype]
    except KeyError:
        raise KompaktError(f"torch dtype {dtype} has no ONNX equivalent") from None


def to_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    """Returns the tensor's data as a torch tensor (CPU), sharing memory where possible.

    The result must be treated as read-only: it may alias an mmap'd file or a user's tensor.
    """
    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        return raw.detach()
    dtype = tensor.dtype
    target = torch_dtype(dtype, f"tensor '{tensor.name}'")
    array = tensor.numpy()
    if dtype in (_D.INT4, _D.UINT4):
        array = array.astype(np.int8 if dtype == _D.INT4 else np.uint8)
    elif dtype in _NUMPY_VIEW:
        array = array.view(_NUMPY_VIEW[dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only numpy buffers; we never write
        result = torch.from_numpy(np.ascontiguousarray(array).reshape(array.shape))
    return result.view(target) if result.dtype != target else result


def from_torch(
    data: torch.Tensor, name: str | None = None, dtype: ir.DataType | None = None
) -> ir.Tensor:
    """Wraps a torch tensor as an IR tensor; ``dtype=INT4/UINT4`` packs int8/uint8 data."""
    data = data.detach().cpu().contiguous()
    if dtype in (_D.INT4, _D.UINT4):
        np_type = ml_dtypes.int4 if dtype == _D.INT4 else ml_dtypes.uint4
        return ir.Tensor(data.numpy().astype(np_type), dtype=dtype, name=name)
    return ir.tensor_adapters.TorchTensor(data, name=name)


def storage_bytes(dtype: ir.DataType, numel: int) -> float:
    """Bytes a tensor of this dtype occupies in storage (sub-byte types are packed)."""
    return numel * dtype.bitwidth / 8


def numel(shape: ir.Shape | None) -> int | None:
    """Number of elements of a static shape, or None when any dim is symbolic."""
    if shape is None or not shape.is_static():
        return None
    count = 1
    for dim in shape.dims:
        count *= int(dim)
    return count
