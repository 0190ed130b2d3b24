"""Exporting a quantized function: ONNX (QDQ / QOperator, per target) and StableHLO."""

from jaxptq.export.onnx_export import export_onnx as export_onnx
from jaxptq.export.stablehlo import StableHLOFunction as StableHLOFunction
from jaxptq.export.stablehlo import export_stablehlo as export_stablehlo
from jaxptq.export.stablehlo import load_stablehlo as load_stablehlo

__all__ = [
    "StableHLOFunction",
    "export_onnx",
    "export_stablehlo",
    "load_stablehlo",
]
