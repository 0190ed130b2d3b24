"""Pooling handlers (MaxPool, AveragePool, global pools) on `lax.reduce_window`."""

from __future__ import annotations

import math

import numpy as np
from jax import lax

from jaxptq.importers.onnx._registry import Inputs, Node, Value, register
from jaxptq.importers.onnx._values import for_jax, xp
from jaxptq.importers.onnx.ops_linear import window_pads


def _geometry(node: Node, x: Value):
    """(kernel, strides, dilations, explicit pads, extra end pads from ceil_mode)."""
    in_sp = np.shape(x)[2:]
    nsp = len(in_sp)
    kernel = list(node.attr("kernel_shape"))
    strides = list(node.attr("strides", [1] * nsp))
    dil = list(node.attr("dilations", [1] * nsp))
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    pads = window_pads(node, in_sp, k_eff, strides)
    extra = []
    for size, k, s, (pb, pe) in zip(in_sp, k_eff, strides, pads, strict=True):
        span = size + pb + pe - k
        out = (math.ceil(span / s) if node.attr("ceil_mode", 0) else span // s) + 1
        if (out - 1) * s >= size + pb:  # the last window must start inside input or begin pad
            out -= 1
        extra.append(max((out - 1) * s + k - (size + pb + pe), 0))
    return kernel, strides, dil, pads, extra


def _window(x: Value, init, op, kernel, strides, dil, pads, extra) -> Value:
    x = for_jax(x)
    return lax.reduce_window(
        x,
        np.asarray(init, x.dtype),
        op,
        (1, 1, *kernel),
        (1, 1, *strides),
        [(0, 0), (0, 0)] + [(pb, pe + e) for (pb, pe), e in zip(pads, extra, strict=True)],
        window_dilation=(1, 1, *dil),
    )


@register("MaxPool")
def max_pool(node: Node, inputs: Inputs) -> Value:
    if node.num_outputs > 1:
        raise NotImplementedError("MaxPool's `Indices` output is not supported")
    x = for_jax(inputs[0])
    kernel, strides, dil, pads, extra = _geometry(node, x)
    dt = np.dtype(x.dtype)
    init = -np.inf if np.issubdtype(dt, np.floating) else np.iinfo(dt).min
    return _window(x, init, lax.max, kernel, strides, dil, pads, extra)


def _counts(
    size: int, k: int, s: int, d: int, pad: tuple[int, int], extra: int, include_pad: bool
) -> np.ndarray:
    """How many window taps fall inside the counted region, per output position (one axis)."""
    pb, pe = pad
    out = (size + pb + pe + extra - ((k - 1) * d + 1)) // s + 1
    taps = np.arange(out)[:, None] * s - pb + np.arange(k)[None, :] * d
    lo, hi = (-pb, size + pe) if include_pad else (0, size)
    return ((taps >= lo) & (taps < hi)).sum(axis=1)


@register("AveragePool")
def average_pool(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    kernel, strides, dil, pads, extra = _geometry(node, x)
    total = _window(x, 0, lax.add, kernel, strides, dil, pads, extra)
    include = bool(node.attr("count_include_pad", 0))
    count = np.ones((), np.float32)
    for i, size in enumerate(np.shape(x)[2:]):
        c = _counts(size, kernel[i], strides[i], dil[i], pads[i], extra[i], include)
        count = np.multiply.outer(count, c.astype(np.float32))
    return total / count.astype(np.dtype(x.dtype))


@register("GlobalAveragePool")
def global_average_pool(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    return xp(x).mean(x, axis=tuple(range(2, np.ndim(x))), keepdims=True)


@register("GlobalMaxPool")
def global_max_pool(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    return xp(x).max(x, axis=tuple(range(2, np.ndim(x))), keepdims=True)
