"""QuantizeLinear and DequantizeLinear, so that QDQ models (jaxptq's own exports included)
import as float programs with the quantization rounding in place."""

from __future__ import annotations

import numpy as np

from jaxptq.importers.onnx._registry import Inputs, Node, Value, register
from jaxptq.importers.onnx._values import for_jax, xp


def _per_axis(node: Node, v: Value, ndim: int) -> Value:
    """A 1-D scale or zero point laid along `axis`; a scalar broadcasts as it is."""
    if np.ndim(v) == 0 or ndim == 0:
        return v
    if node.attr("block_size", 0):
        raise NotImplementedError("blocked quantization (`block_size`)")
    shape = [1] * ndim
    shape[node.attr("axis", 1) % ndim] = -1
    return v.reshape(shape)


@register("QuantizeLinear", since=10)
def quantize_linear(node: Node, inputs: Inputs) -> Value:
    x, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 else None
    dtype = np.dtype(np.uint8) if zp is None else np.dtype(zp.dtype)
    ndim = np.ndim(x)
    m = xp(x, scale, zp)
    scale = _per_axis(node, for_jax(scale), ndim)
    q = m.round(for_jax(x) / scale)
    if zp is not None:
        q = q + _per_axis(node, np.asarray(zp).astype(np.float32), ndim)
    info = np.iinfo(dtype)
    return m.clip(q, info.min, info.max).astype(dtype)


@register("DequantizeLinear", since=10)
def dequantize_linear(node: Node, inputs: Inputs) -> Value:
    q, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 else None
    ndim = np.ndim(q)
    x = q.astype(np.float32)
    if zp is not None:
        x = x - _per_axis(node, np.asarray(zp).astype(np.float32), ndim)
    return x * _per_axis(node, for_jax(scale), ndim)
