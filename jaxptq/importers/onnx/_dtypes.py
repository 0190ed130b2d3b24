"""One table between ONNX element types and numpy dtypes, its inverse derived from it."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
from onnx import TensorProto

ONNX_TO_NP: dict[int, np.dtype] = {
    TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    TensorProto.BOOL: np.dtype(np.bool_),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.INT32: np.dtype(np.int32),
    TensorProto.INT64: np.dtype(np.int64),
    TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.UINT16: np.dtype(np.uint16),
    TensorProto.UINT32: np.dtype(np.uint32),
    TensorProto.UINT64: np.dtype(np.uint64),
}
NP_TO_ONNX: dict[np.dtype, int] = {v: k for k, v in ONNX_TO_NP.items()}


def np_dtype(elem_type: int, where: str) -> np.dtype:
    """Numpy dtype of an ONNX element type; `where` names the tensor for the error."""
    try:
        return ONNX_TO_NP[elem_type]
    except KeyError:
        known = elem_type in TensorProto.DataType.values()
        name = TensorProto.DataType.Name(elem_type) if known else elem_type
        raise NotImplementedError(
            f"{where}: ONNX element type {name} is not supported; "
            f"supported: {sorted(TensorProto.DataType.Name(t) for t in ONNX_TO_NP)}"
        ) from None


def canonical(dtype: np.dtype) -> np.dtype:
    """The dtype JAX uses for `dtype` (x64 off: int64 -> int32, float64 -> float32)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))
