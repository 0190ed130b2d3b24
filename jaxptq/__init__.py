"""jaxptq: post-training quantization of JAX, Flax and ONNX models to real int8 programs."""

from jaxptq.accuracy_control import AccuracyControlResult as AccuracyControlResult
from jaxptq.accuracy_control import ptq_with_accuracy_control as ptq_with_accuracy_control
from jaxptq.config import ConfigError as ConfigError
from jaxptq.config import QuantConfig as QuantConfig
from jaxptq.importers.onnx import import_onnx as import_onnx

__all__ = [
    "AccuracyControlResult",
    "ConfigError",
    "QuantConfig",
    "import_onnx",
    "ptq_with_accuracy_control",
]
