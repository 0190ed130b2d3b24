"""Exporting a quantized function: ONNX (QDQ / QOperator, per target) and StableHLO."""

from jaxptq.export.onnx_export import export_onnx as export_onnx

__all__ = [
    "export_onnx",
]
