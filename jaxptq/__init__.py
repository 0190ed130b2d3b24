"""jaxptq: post-training quantization of JAX, Flax and ONNX models to real int8 programs."""

from jaxptq.config import ConfigError as ConfigError
from jaxptq.config import QuantConfig as QuantConfig
from jaxptq.importers.onnx import import_onnx as import_onnx

__all__ = [
    "ConfigError",
    "QuantConfig",
    "import_onnx",
]
