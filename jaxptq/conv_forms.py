"""Convolutions rewritten into the forms XLA:CPU runs fast.

XLA:CPU gives a convolution to YNNPACK only in NHWC/HWIO layout with more than 16
channels; anything else (every NCHW convolution of an ONNX model, LeNet's 1- and
6-channel layers) falls back to a slow loop, for `s8` operands an `s32` one. A dot has no
layout to miss. Measured here at batch 32 (2-core AVX-512 VM, jax 0.10.2):

- pointwise (1x1) NCHW convolutions as a dot over the channel axis: 1.3-1.7x faster in
  float32 (e.g. 96->24 on 56x56: 90 -> 53 ms) and 2-5x in int8 (38-52 -> 10-13 ms);
- EfficientNet's 3-channel stem as one dot over im2col patches: 128 -> 81 ms float32,
  122 -> 73 ms int8;
- depthwise convolutions as shifted slices (`jaxptq.depthwise`): 73 -> 1.1 ms.

Every form sums the same products, so integer results are identical; float ones differ
only in summation order. Other platforms keep `conv_general_dilated` (cuDNN on XLA:GPU),
except depthwise, which is faster everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxptq import depthwise

Params = dict[str, Any]

# Below this many input channels a convolution is not YNNPACK's, and the patches of an
# im2col dot (kernel taps x channels wide) stay small.
_FEW_INPUT_CHANNELS = 16


def _is_plain(params: Params) -> bool:
    """One group, no input dilation: a convolution that is a sum over taps and channels."""
    return (
        params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
        and all(d == 1 for d in (params.get("lhs_dilation") or ()))
    )


def is_pointwise(params: Params, lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]) -> bool:
    """A 1x1 kernel without padding: a dot over the channel axis of (strided) pixels."""
    rhs_spec = params["dimension_numbers"][1]
    return (
        _is_plain(params)
        and all(rhs_shape[a] == 1 for a in rhs_spec[2:])
        and all(p == (0, 0) for p in params["padding"])
    )


def has_few_input_channels(
    params: Params, lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]
) -> bool:
    lhs_spec = params["dimension_numbers"][0]
    return _is_plain(params) and lhs_shape[lhs_spec[1]] <= _FEW_INPUT_CHANNELS


def _channels_last(x: Any, spec: tuple[int, ...]) -> Any:
    """`x` as (batch, spatial..., feature), from a spec listing (batch, feature, spatial...)."""
    return jnp.transpose(x, (spec[0], *spec[2:], spec[1]))


def _from_channels_last(y: Any, out_spec: tuple[int, ...]) -> Any:
    """Inverse of `_channels_last` for the output spec."""
    logical = (0, *range(2, y.ndim), 1)  # the logical dim held by each axis of `y`
    perm = [logical.index(out_spec.index(axis)) for axis in range(y.ndim)]
    return jnp.transpose(y, perm)


def _dot(patches: Any, w_matrix: Any, params: Params) -> Any:
    """`patches[..., K] @ w_matrix[K, O]` with the convolution's precision and dtype."""
    return lax.dot_general(
        patches,
        w_matrix,
        (((patches.ndim - 1,), (0,)), ((), ())),
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
    )


def pointwise_conv(x: Any, w: Any, params: Params, pad_value: Any = 0) -> Any:
    del pad_value  # no padding: `is_pointwise`
    # Channels last, whatever the layout: (pixels, I) @ (I, O). Computing (O, I) @ (I, pixels)
    # per image instead skips the transposes but measured 25% slower on EfficientNet-Lite0,
    # whose depthwise producers then write in a slower order.
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    x = _channels_last(x, lhs_spec)
    strides = params["window_strides"]
    if any(s > 1 for s in strides):
        x = x[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]
    w_matrix = jnp.transpose(w, (rhs_spec[1], rhs_spec[0], *rhs_spec[2:]))
    w_matrix = w_matrix.reshape(w_matrix.shape[0], w_matrix.shape[1])  # (I, O)
    return _from_channels_last(_dot(x, w_matrix, params), out_spec)


def im2col_conv(x: Any, w: Any, params: Params, pad_value: Any = 0) -> Any:
    """One dot over patches (taps x channels wide): cheap to build when channels are few."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    x = _channels_last(x, lhs_spec)
    spatial = range(1, x.ndim - 1)
    config = [(0, 0, 0)] * x.ndim
    for axis, (lo, hi) in zip(spatial, params["padding"], strict=True):
        config[axis] = (lo, hi, 0)
    x = lax.pad(x, jnp.asarray(pad_value, x.dtype), config)
    w = jnp.transpose(w, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (k..., I, O)
    kernel = w.shape[:-2]
    strides = params["window_strides"]
    dilation = params.get("rhs_dilation") or (1,) * len(kernel)
    out_sizes = [
        (x.shape[a] - (k - 1) * d - 1) // s + 1
        for a, k, d, s in zip(spatial, kernel, dilation, strides, strict=True)
    ]
    taps = []
    for offsets in np.ndindex(*kernel):
        start = [0] * x.ndim
        limit = list(x.shape)
        step = [1] * x.ndim
        for a, o, d, s, n in zip(spatial, offsets, dilation, strides, out_sizes, strict=True):
            start[a] = o * d
            limit[a] = o * d + (n - 1) * s + 1
            step[a] = s
        taps.append(lax.slice(x, start, limit, step))
    patches = jnp.concatenate(taps, axis=-1)  # tap-major, then channel: w's order below
    w_matrix = w.reshape(-1, w.shape[-1])
    return _from_channels_last(_dot(patches, w_matrix, params), out_spec)


def generic_conv(x: Any, w: Any, params: Params, pad_value: Any = 0) -> Any:
    """XLA's convolution; a nonzero `pad_value` is padded explicitly and the conv made VALID."""
    if pad_value == 0 or all(p == (0, 0) for p in params["padding"]):
        return lax.conv_general_dilated_p.bind(x, w, **params)
    config = [(0, 0, 0)] * x.ndim
    for axis, (lo, hi) in zip(params["dimension_numbers"][0][2:], params["padding"], strict=True):
        config[axis] = (lo, hi, 0)
    x = lax.pad(x, jnp.asarray(pad_value, x.dtype), config)
    params = dict(params, padding=tuple((0, 0) for _ in params["padding"]))
    return lax.conv_general_dilated_p.bind(x, w, **params)


def _depthwise_conv(x: Any, w: Any, params: Params, pad_value: Any = 0) -> Any:
    acc = params.get("preferred_element_type") or jnp.result_type(x.dtype, w.dtype)
    return depthwise.depthwise_conv(x, w, params, acc, pad_value)


Applies = Callable[[Params, tuple[int, ...], tuple[int, ...]], bool]
Lowering = Callable[..., Any]  # (x, w, params, pad_value) -> output

# First match wins; XLA:CPU only. Elsewhere depthwise is the one rewrite.
CPU_FORMS: tuple[tuple[Applies, Lowering], ...] = (
    (depthwise.is_depthwise, _depthwise_conv),
    (is_pointwise, pointwise_conv),
    (has_few_input_channels, im2col_conv),
)


def _lowering(
    forms: tuple[tuple[Applies, Lowering], ...], x: Any, w: Any, params: Params
) -> Lowering:
    for applies, lowering in forms:
        if applies(params, x.shape, w.shape):
            return lowering
    return generic_conv


def conv(x: Any, w: Any, params: Params, pad_value: Any = 0) -> Any:
    """`conv_general_dilated_p.bind(x, w, **params)` in the fastest form for the platform,
    with the padding filled with `pad_value` (an activation's zero-point code) instead of 0.
    """
    on_cpu = _lowering(CPU_FORMS, x, w, params)
    elsewhere = _lowering(CPU_FORMS[:1], x, w, params)
    if on_cpu is elsewhere:
        return on_cpu(x, w, params, pad_value)
    return lax.platform_dependent(
        x,
        w,
        cpu=lambda x, w: on_cpu(x, w, params, pad_value),
        default=lambda x, w: elsewhere(x, w, params, pad_value),
    )
