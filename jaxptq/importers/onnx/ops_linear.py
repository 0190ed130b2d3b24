"""Conv, ConvTranspose, Gemm and MatMul: the quantization sites, weights kept as constants.

Weight transforms (Gemm's transB, ConvTranspose's regrouping and flip) run in numpy when the
weight is static, so the `dot_general`/`conv_general_dilated` rhs is a plain jaxpr constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from jax import lax

from jaxptq.importers.onnx._registry import Inputs, Node, Value, register
from jaxptq.importers.onnx._values import for_jax, lift, xp

_SPATIAL = {1: "H", 2: "HW", 3: "DHW"}


def conv_specs(nsp: int) -> tuple[str, str, str]:
    """lax dimension numbers for an ONNX N-D conv: NC..., OI..., NC..."""
    if nsp not in _SPATIAL:
        raise NotImplementedError(f"{nsp}-D convolution; supported: 1-D, 2-D, 3-D")
    s = _SPATIAL[nsp]
    return f"NC{s}", f"OI{s}", f"NC{s}"


def window_pads(
    node: Node, in_spatial: Sequence[int], k_eff: Sequence[int], strides: Sequence[int]
) -> list[tuple[int, int]]:
    """Explicit (begin, end) padding per spatial axis from `pads` or `auto_pad`."""
    n = len(in_spatial)
    auto = node.attr("auto_pad", "NOTSET")
    if auto == "NOTSET":
        p = node.attr("pads", [0] * 2 * n)
        return list(zip(p[:n], p[n:], strict=True))
    if auto == "VALID":
        return [(0, 0)] * n
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(
            f"`auto_pad` is {auto!r}; expected NOTSET, VALID, SAME_UPPER or SAME_LOWER"
        )
    out = []
    for size, k, s in zip(in_spatial, k_eff, strides, strict=True):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return out


def _geometry(node: Node, w: Value) -> tuple[int, list[int], list[int], list[int]]:
    nsp = np.ndim(w) - 2
    kernel = list(node.attr("kernel_shape", np.shape(w)[2:]))
    strides = list(node.attr("strides", [1] * nsp))
    dil = list(node.attr("dilations", [1] * nsp))
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    return nsp, strides, dil, k_eff


def _add_bias(y: Value, b: Value | None, nsp: int) -> Value:
    if b is None:
        return y
    return y + for_jax(b).reshape((-1,) + (1,) * nsp)


@register("Conv")
def conv(node: Node, inputs: Inputs) -> Value:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nsp, strides, dil, k_eff = _geometry(node, w)
    pads = window_pads(node, np.shape(x)[2:], k_eff, strides)
    y = lax.conv_general_dilated(
        for_jax(x),
        for_jax(w),
        strides,
        pads,
        rhs_dilation=dil,
        dimension_numbers=conv_specs(nsp),
        feature_group_count=node.attr("group", 1),
    )
    return _add_bias(y, b, nsp)


@register("ConvTranspose")
def conv_transpose(node: Node, inputs: Inputs) -> Value:
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nsp, strides, dil, k_eff = _geometry(node, w)
    g = node.attr("group", 1)
    out_pad = list(node.attr("output_padding", [0] * nsp))
    in_sp = np.shape(x)[2:]
    full = [
        s * (i - 1) + op + k for s, i, op, k in zip(strides, in_sp, out_pad, k_eff, strict=True)
    ]
    auto = node.attr("auto_pad", "NOTSET")
    target = node.attr("output_shape", None)
    if target is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [i * s for i, s in zip(in_sp, strides, strict=True)]
    if target is not None:
        target = list(target)[-nsp:]
        totals = [f - t for f, t in zip(full, target, strict=True)]
        upper = auto == "SAME_UPPER"
        pads = [(t // 2, t - t // 2) if upper else (t - t // 2, t // 2) for t in totals]
    elif auto == "VALID":
        pads = [(0, 0)] * nsp
    else:
        p = node.attr("pads", [0] * 2 * nsp)
        pads = list(zip(p[:nsp], p[nsp:], strict=True))
    # As a conv over the stride-dilated input with the kernel regrouped to OI... and flipped.
    m = xp(w)
    c_in, c_out_g, k = np.shape(w)[0], np.shape(w)[1], tuple(np.shape(w)[2:])
    wt = w.reshape((g, c_in // g, c_out_g) + k)
    wt = m.swapaxes(wt, 1, 2).reshape((g * c_out_g, c_in // g) + k)
    wt = m.flip(wt, axis=tuple(range(2, 2 + nsp)))
    conv_pads = [
        (ke - 1 - pb, ke - 1 - pe + op)
        for ke, (pb, pe), op in zip(k_eff, pads, out_pad, strict=True)
    ]
    y = lax.conv_general_dilated(
        for_jax(x),
        for_jax(wt),
        [1] * nsp,
        conv_pads,
        lhs_dilation=strides,
        rhs_dilation=dil,
        dimension_numbers=conv_specs(nsp),
        feature_group_count=g,
    )
    return _add_bias(y, b, nsp)


@register("Gemm")
def gemm(node: Node, inputs: Inputs) -> Value:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if node.attr("transA", 0):
        a = xp(a).swapaxes(a, 0, 1)
    if node.attr("transB", 0):
        b = xp(b).swapaxes(b, 0, 1)  # numpy for a constant weight: the site sees plain B^T
    m, (a, b) = lift(a, b)
    y = m.matmul(a, b)
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * np.asarray(alpha, y.dtype)
    if c is not None:
        c = for_jax(c) if m is not np else c
        y = y + (c if beta == 1.0 else c * np.asarray(beta, y.dtype))
    return y


@register("MatMul")
def matmul(node: Node, inputs: Inputs) -> Value:
    m, (a, b) = lift(inputs[0], inputs[1])
    return m.matmul(a, b)
