"""ONNX importer: an ONNX model as a named, traceable pure-JAX function.

Example:
    >>> from jaxptq.importers.onnx import import_onnx
    >>> fn = import_onnx("model.onnx")
    >>> y = jax.jit(fn)(x)
    >>> jaxpr = jax.make_jaxpr(fn)(x)  # weights are constvars; each eqn's name_stack
    ...                                # holds its ONNX node name
"""

# Importing the ops_* modules fills the op table.
from jaxptq.importers.onnx import (  # noqa: F401
    ops_linear,
    ops_math,
    ops_norm,
    ops_pool,
    ops_quant,
    ops_reduce,
    ops_resize,
    ops_shape,
)
from jaxptq.importers.onnx._errors import OnnxImportError as OnnxImportError
from jaxptq.importers.onnx._errors import OnnxNodeError as OnnxNodeError
from jaxptq.importers.onnx._errors import UnsupportedOnnxError as UnsupportedOnnxError
from jaxptq.importers.onnx._function import InputSpec as InputSpec
from jaxptq.importers.onnx._function import OnnxFunction as OnnxFunction
from jaxptq.importers.onnx._function import import_onnx as import_onnx
from jaxptq.importers.onnx._loader import MAX_OPSET as MAX_OPSET
from jaxptq.importers.onnx._loader import MIN_OPSET as MIN_OPSET
from jaxptq.importers.onnx._registry import supported_op_types as supported_op_types

__all__ = [
    "MAX_OPSET",
    "MIN_OPSET",
    "InputSpec",
    "OnnxFunction",
    "OnnxImportError",
    "OnnxNodeError",
    "UnsupportedOnnxError",
    "import_onnx",
    "supported_op_types",
]
