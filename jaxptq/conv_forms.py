"""Convolutions rewritten into the forms XLA:CPU runs fast.

XLA:CPU gives a convolution to YNNPACK only in NHWC/HWIO layout with more than 16
channels; anything else (every NCHW convolution of an ONNX model, LeNet's 1- and
6-channel layers) falls back to a slower loop, for `s8` operands an `s32` one 5-20x slower
still. A dot has no layout to miss, and YNNPACK's `s8` dot is faster than its `s8`
convolution. Measured here at batch 32 (2-core AVX-512 VM, jax 0.10.2):

- pointwise (1x1) NCHW convolutions as a dot over the channel axis: 1.3-1.7x faster in
  float32 (e.g. 96->24 on 56x56: 90 -> 53 ms) and 2-5x in int8 (38-52 -> 10-13 ms);
- int8 convolutions as one dot over im2col patches: the convnet's NHWC 3x3 layers 10-40%
  faster than YNNPACK's int8 convolution (the 3-channel first layer 7.5 -> 1.9 ms), an
  NCHW 64-channel 3x3 layer 263 -> 14 ms; float32 only where YNNPACK would not take the
  convolution and channels are few (EfficientNet's stem 128 -> 81 ms), since XLA's float
  NCHW 3x3 convolution beats im2col 2-3x at 64 channels;
- depthwise convolutions as shifted slices (`jaxptq.depthwise`): 73 -> 1.1 ms.

Every form sums the same products, so integer results are identical; float ones differ
only in summation order. Other platforms keep `conv_general_dilated` (cuDNN on XLA:GPU),
except depthwise, which is faster everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import lax

from jaxptq import depthwise, platforms, u8s8

Params = dict[str, Any]

# At most this many input channels, a float convolution YNNPACK does not take is cheaper as
# one dot over patches (taps x channels wide).
_FEW_INPUT_CHANNELS = 16
# Larger patch matrices cost more memory than the dot saves (one 224x224x64 3x3 layer at
# batch 32 would need 925 MB in int8); those convolutions keep XLA's form.
_MAX_PATCH_BYTES = 256 << 20


def _is_plain(params: Params) -> bool:
    """One group, no input dilation: a convolution that is a sum over taps and channels."""
    return (
        params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
        and all(d == 1 for d in (params.get("lhs_dilation") or ()))
    )


def _is_depthwise(params: Params, x: Any, w: Any) -> bool:
    return depthwise.is_depthwise(params, x.shape, w.shape)


def is_pointwise(params: Params, x: Any, w: Any) -> bool:
    """A 1x1 kernel without padding: a dot over the channel axis of (strided) pixels."""
    rhs_spec = params["dimension_numbers"][1]
    return (
        _is_plain(params)
        and all(w.shape[a] == 1 for a in rhs_spec[2:])
        and all(p == (0, 0) for p in params["padding"])
    )


def _ynn_takes(params: Params, x: Any, w: Any) -> bool:
    """XLA:CPU's test for handing a float convolution to YNNPACK
    (`IsConvolutionOpSupportedByYnn`): 2D, NHWC in and out, HWIO, over 16 channels."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    nhwc = (0, 3, 1, 2)
    return (
        tuple(lhs_spec) == nhwc
        and tuple(out_spec) == nhwc
        and tuple(rhs_spec) == (3, 2, 0, 1)
        and max(x.shape[3], w.shape[3]) > 16
    )


def _patch_bytes(params: Params, x: Any, w: Any) -> int:
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    dilation = params.get("rhs_dilation") or (1,) * len(lhs_spec[2:])
    pixels = 1
    for a, k, (lo, hi), s, d in zip(
        lhs_spec[2:],
        rhs_spec[2:],
        params["padding"],
        params["window_strides"],
        dilation,
        strict=True,
    ):
        pixels *= (x.shape[a] + lo + hi - (w.shape[k] - 1) * d - 1) // s + 1
    taps = math.prod(w.shape[k] for k in rhs_spec[2:])
    return x.shape[lhs_spec[0]] * pixels * taps * x.shape[lhs_spec[1]] * x.dtype.itemsize


def im2col_pays(params: Params, x: Any, w: Any) -> bool:
    """Integer convolutions always (YNNPACK's s8 dot beats its s8 convolution, and NCHW s8
    falls to an s32 loop); float ones with few channels that YNNPACK would not take."""
    if not _is_plain(params) or _patch_bytes(params, x, w) > _MAX_PATCH_BYTES:
        return False
    if jnp.issubdtype(x.dtype, jnp.integer):
        return True
    lhs_spec = params["dimension_numbers"][0]
    return x.shape[lhs_spec[1]] <= _FEW_INPUT_CHANNELS and not _ynn_takes(params, x, w)


def channels_last_order(spec: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of an operand laid out by `spec` (batch, feature, spatial...), reordered
    as (batch, spatial..., feature)."""
    return (spec[0], *spec[2:], spec[1])


def channels_last(x: Any, spec: tuple[int, ...]) -> Any:
    """`x` as (batch, spatial..., feature), from a spec listing (batch, feature, spatial...)."""
    return jnp.transpose(x, channels_last_order(spec))


def _from_channels_last(y: Any, out_spec: tuple[int, ...]) -> Any:
    """Inverse of `channels_last` for the output spec."""
    logical = (0, *range(2, y.ndim), 1)  # the logical dim held by each axis of `y`
    perm = [logical.index(out_spec.index(axis)) for axis in range(y.ndim)]
    return jnp.transpose(y, perm)


def _dot(patches: Any, w_matrix: Any, params: Params, pad_value: Any, w_sum: Any) -> Any:
    """`patches[..., K] @ w_matrix[K, O]` with the convolution's precision and dtype; uint8
    codes count from `pad_value` (`conv_codes`)."""
    if w_matrix.dtype == jnp.int8 and patches.dtype == jnp.uint8:
        return u8s8.dot_codes(patches, w_matrix, w_sum, pad_value - 128)
    if patches.dtype == w_matrix.dtype == jnp.int8:
        return u8s8.dot(patches, w_matrix, w_sum)
    return lax.dot_general(
        patches,
        w_matrix,
        (((patches.ndim - 1,), (0,)), ((), ())),
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
    )


def pointwise_conv(x: Any, w: Any, params: Params, pad_value: Any = 0, w_sum: Any = None) -> Any:
    # No padding (`is_pointwise`); `pad_value` only matters to uint8 codes (`conv_codes`).
    # Channels last, whatever the layout: (pixels, I) @ (I, O). Computing (O, I) @ (I, pixels)
    # per image instead skips the transposes but measured 25% slower on EfficientNet-Lite0,
    # whose depthwise producers then write in a slower order.
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    x = channels_last(x, lhs_spec)
    strides = params["window_strides"]
    if any(s > 1 for s in strides):
        x = x[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]
    w_matrix = jnp.transpose(w, (rhs_spec[1], rhs_spec[0], *rhs_spec[2:]))
    w_matrix = w_matrix.reshape(w_matrix.shape[0], w_matrix.shape[1])  # (I, O)
    return _from_channels_last(_dot(x, w_matrix, params, pad_value, w_sum), out_spec)


def im2col_conv(x: Any, w: Any, params: Params, pad_value: Any = 0, w_sum: Any = None) -> Any:
    """One dot over patches, taps x channels wide, tap-major as `w` is reshaped."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    x = channels_last(x, lhs_spec)
    w = jnp.transpose(w, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (k..., I, O)
    w_matrix = w.reshape(-1, w.shape[-1])
    patches = _patches(x, w.shape[:-2], params, pad_value)
    return _from_channels_last(_dot(patches, w_matrix, params, pad_value, w_sum), out_spec)


def _patches(x: Any, kernel: tuple[int, ...], params: Params, pad_value: Any) -> Any:
    """Channels-last `x` as (N, out spatial..., taps x C), tap-major as `w` is reshaped.

    The taps of one axis are stacked, then those of the next: a few fusions. Concatenating
    all taps at once became one fusion per tap plus a concatenate in XLA:CPU (LeNet's 5x5
    layers at batch 32: 26 ops, 44-97 us, against 5 ops, 18-21 us)."""
    x = depthwise.pad_spatial(x, params, pad_value)
    spatial = x.ndim - 2
    for i, (k, d, s) in enumerate(depthwise.window_params(params, kernel)):
        taps = [depthwise.window_slice(x, 1 + i, o, k, d, s) for o in range(k)]
        x = jnp.stack(taps, axis=1 + spatial + i)  # (N, spatial..., k_0..k_i, C)
    return x.reshape(*x.shape[: 1 + spatial], -1)


def generic_conv(x: Any, w: Any, params: Params, pad_value: Any = 0, w_sum: Any = None) -> Any:
    """XLA's convolution; a nonzero `pad_value` is padded explicitly and the conv made VALID."""
    del w_sum  # only the dot forms use it
    if pad_value == 0 or all(p == (0, 0) for p in params["padding"]):
        return lax.conv_general_dilated_p.bind(x, w, **params)
    config = [(0, 0, 0)] * x.ndim
    for axis, (lo, hi) in zip(params["dimension_numbers"][0][2:], params["padding"], strict=True):
        config[axis] = (lo, hi, 0)
    x = lax.pad(x, jnp.asarray(pad_value, x.dtype), config)
    params = dict(params, padding=tuple((0, 0) for _ in params["padding"]))
    return lax.conv_general_dilated_p.bind(x, w, **params)


def _depthwise_conv(x: Any, w: Any, params: Params, pad_value: Any = 0, w_sum: Any = None) -> Any:
    del w_sum  # only the dot forms use it
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    acc = params.get("preferred_element_type") or jnp.result_type(x.dtype, w.dtype)
    w = jnp.transpose(w, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))[..., 0, :]  # (k..., O)
    y = depthwise.depthwise_conv(channels_last(x, lhs_spec), w, params, acc, pad_value)
    return _from_channels_last(y, out_spec)


Applies = Callable[[Params, Any, Any], bool]  # (params, x, w): arrays or tracers
Lowering = Callable[..., Any]  # (x, w, params, pad_value, w_sum) -> output

# First match wins. Depthwise as shifted slices pays on every platform; the dot forms are
# for XLA:CPU, whose convolutions miss YNNPACK (above); XLA:GPU keeps cuDNN for the rest.
EVERYWHERE: tuple[tuple[Applies, Lowering], ...] = ((_is_depthwise, _depthwise_conv),)
CPU_FORMS: tuple[tuple[Applies, Lowering], ...] = (
    *EVERYWHERE,
    (is_pointwise, pointwise_conv),
    (im2col_pays, im2col_conv),
)


def _lowering(
    forms: tuple[tuple[Applies, Lowering], ...], x: Any, w: Any, params: Params
) -> Lowering:
    for applies, lowering in forms:
        if applies(params, x, w):
            return lowering
    return generic_conv


def takes_codes(params: Params, x: Any, w: Any) -> bool:
    """Whether XLA:CPU's form of this int8 convolution is a dot, which can read uint8 codes
    (`conv_codes`)."""
    return _lowering(CPU_FORMS, x, w, params) in (pointwise_conv, im2col_conv)


def conv_codes(codes: Any, w: Any, params: Params, zero_point: int, w_sum: Any = None) -> Any:
    """`sum_k (q - zero_point) w` of an int8 activation given as uint8 codes `q + 128`,
    exactly, as int32, on XLA:CPU where `takes_codes`.

    The codes go into the patches and the `u8 x s8` dot as they are, the padding holds the
    zero point's code (so it adds nothing), and the code offset and the zero point are one
    subtraction of `w_sum` (`u8s8.dot_codes`): no flip of the patches from int8 to uint8
    (LeNet-5's two were 35 us of a 235 us call) and no zero-point term.
    """
    return _lowering(CPU_FORMS, codes, w, params)(codes, w, params, zero_point + 128, w_sum)


def conv(x: Any, w: Any, params: Params, pad_value: Any = 0, w_sum: Any = None) -> Any:
    """`conv_general_dilated_p.bind(x, w, **params)` in the fastest form for the platform,
    with the padding filled with `pad_value` (an activation's zero-point code) instead of 0.
    `w_sum`, the int32 sum of an int8 `w` per output channel, spares the dot forms that
    reduction.
    """
    on_cpu = _lowering(CPU_FORMS, x, w, params)
    elsewhere = _lowering(EVERYWHERE, x, w, params)
    if on_cpu is elsewhere:
        return on_cpu(x, w, params, pad_value, w_sum)
    return platforms.dependent(
        x,
        w,
        w_sum,
        cpu=lambda x, w, w_sum: on_cpu(x, w, params, pad_value, w_sum),
        default=lambda x, w, w_sum: elsewhere(x, w, params, pad_value, w_sum),
    )
