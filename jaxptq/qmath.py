"""Quantization arithmetic: integer ranges, scales, zero points, (de)quantize, bit packing.

Everything here is pure array code that works on NumPy and JAX arrays alike (through
`xp`), so the plan builder (NumPy, eager) and the quantized program (jnp, traced) share
one definition of every formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # np.ndarray or jax.Array

# Scales below this are treated as an all-zero tensor: avoids 0/0 while keeping zero exact.
_TINY = np.float32(1e-30)


def _xp(x: Array) -> Any:
    return jnp if isinstance(x, jax.Array) else np


def signed_range(bits: int) -> tuple[int, int]:
    """Two's complement range of a `bits`-wide integer."""
    if not 1 <= bits <= 16:
        raise ValueError(f"`bits` must be in 1..16, got {bits}.")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def symmetric_range(bits: int) -> tuple[int, int]:
    """The narrow signed range weights use, so that +max and -max are both representable.

    One bit has no symmetric narrow range; it keeps the two's complement pair {-1, 0}.
    """
    lo, hi = signed_range(bits)
    return (lo + 1, hi) if bits > 1 else (lo, hi)


def storage_dtype(bits: int) -> np.dtype:
    """The smallest NumPy integer dtype that holds a signed `bits`-wide value."""
    return np.dtype(np.int8) if bits <= 8 else np.dtype(np.int16)


def reduce_axes(ndim: int, keep: Sequence[int]) -> tuple[int, ...]:
    keep_set = {a % ndim for a in keep}
    return tuple(a for a in range(ndim) if a not in keep_set)


def symmetric_scale(w: Array, bits: int, keep_axes: Sequence[int] = ()) -> np.ndarray:
    """Per-channel (over `keep_axes`) symmetric scale: max |w| maps to the largest level."""
    w = np.asarray(w, np.float32)
    absmax = np.max(np.abs(w), axis=reduce_axes(w.ndim, keep_axes), keepdims=True)
    lo, hi = symmetric_range(bits)
    levels = max(hi, -lo)
    return np.maximum(absmax / np.float32(levels), _TINY).astype(np.float32)


def quantize(x: Array, scale: Array, zero_point: Array, qmin: int, qmax: int, dtype: Any) -> Array:
    """q = clip(round(x / scale) + zero_point); round half to even, as XLA and NumPy do."""
    xp = _xp(x)
    q = xp.round(x / scale) + zero_point
    return xp.clip(q, qmin, qmax).astype(dtype)


def dequantize(q: Array, scale: Array, zero_point: Array = 0) -> Array:
    xp = _xp(q)
    return (q.astype(xp.float32) - zero_point) * scale


def affine_params(lo: float, hi: float, bits: int = 8) -> tuple[np.float32, np.int32]:
    """Asymmetric scale and zero point of an activation range, widened to include 0.

    Zero must be exactly representable: zero padding and ReLU outputs are exact zeros.
    """
    qmin, qmax = signed_range(bits)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32(max((hi - lo) / (qmax - qmin), float(_TINY)))
    zero_point = np.int32(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    return scale, zero_point


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Packs signed `bits`-wide integers densely into bytes (little-endian bit order).

    Each value is stored as its `bits` low two's complement bits; `unpack` sign-extends.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"packing is defined for 1..8 bits, got {bits}.")
    flat = np.asarray(q).astype(np.int64).ravel()
    codes = (flat & ((1 << bits) - 1)).astype(np.uint8)
    bit_matrix = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bit_matrix.ravel(), bitorder="little")


def unpack(packed: Array, bits: int, count: int) -> Array:
    """Inverse of `pack`, as traceable jnp code so unpacking happens inside the program."""
    xp = _xp(packed)
    shifts = xp.arange(8, dtype=xp.uint8)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    fields = stream.reshape(count, bits).astype(xp.int32)
    codes = (fields << xp.arange(bits, dtype=xp.int32)).sum(axis=1)
    sign = 1 << (bits - 1)
    return ((codes ^ sign) - sign).astype(xp.int8)


# Candidate clipping ratios of max|w| for `mse_symmetric_scales`, widest last (ties keep it).
CLIP_RATIOS = np.linspace(0.5, 1.0, 26, dtype=np.float32)


@jax.jit
def _clip_errors(u: jax.Array, factors: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Squared error per (candidate, row) of `u` (rows scaled to max|u| = 1) on the grids
    `factors[n] * [lo[n], hi[n]]`; XLA fuses the candidates x weight temporaries away."""
    f, lo, hi = factors[:, None, None], lo[:, None, None], hi[:, None, None]
    q = jnp.clip(jnp.round(u[None] / f), lo, hi)
    return jnp.sum(jnp.square(u[None] - q * f), axis=2)


def mse_symmetric_scales(
    w: Array,
    bits: Sequence[int],
    keep_axes: Sequence[int] = (),
    ratios: Sequence[float] | np.ndarray = CLIP_RATIOS,
) -> np.ndarray:
    """Per-channel symmetric scales that minimise the weight's squared quantization error.

    Max-abs scales spend levels on the rare largest weights; at 4-7 bits clipping them
    (the top level at `ratio * max|w|`) lowers the error of all the others by more. Every
    (width, ratio) candidate is evaluated at once along a leading axis in one jitted
    program; each channel (over `keep_axes`) keeps its best ratio. Ratio 1 is a candidate
    and wins ties, so the result is never worse in squared error than `symmetric_scale`.

    Args:
        w: the float weight.
        bits: the widths to find scales for.
        keep_axes: axes with their own scale (`()`: one scale for the tensor).
        ratios: candidate clip ratios of max|w|, increasing.

    Returns:
        float32 array of shape `(len(bits), *scale_shape)`, `scale_shape` being that of
        `symmetric_scale(w, b, keep_axes)`.

    Example:
        >>> scale = mse_symmetric_scales(w, [4], keep_axes=(3,))[0]
    """
    w = np.asarray(w, np.float32)
    keep = sorted({a % w.ndim for a in keep_axes}) if w.ndim else []
    red = reduce_axes(w.ndim, keep)
    absmax = np.max(np.abs(w), axis=red, keepdims=True)
    rows = np.transpose(w, (*keep, *red)).reshape(int(np.prod(absmax.shape)), -1)
    row_max = np.transpose(absmax, (*keep, *red)).reshape(-1, 1)
    u = rows / np.maximum(row_max, _TINY)
    ranges = np.array([symmetric_range(b) for b in bits], np.float32)
    levels = np.maximum(ranges[:, 1], -ranges[:, 0])
    r = np.asarray(ratios, np.float32)
    factors = (r[None, :] / levels[:, None]).ravel()  # candidate (width, ratio) pairs
    err = _clip_errors(
        jnp.asarray(u),
        jnp.asarray(factors),
        jnp.asarray(np.repeat(ranges[:, 0], len(r))),
        jnp.asarray(np.repeat(ranges[:, 1], len(r))),
    )
    err = np.asarray(err).reshape(len(bits), len(r), -1)
    best = len(r) - 1 - np.argmin(err[:, ::-1], axis=1)  # reversed: ties keep the widest
    chosen = (r[best] / levels[:, None]).reshape(len(bits), *absmax.shape)
    return np.maximum(absmax[None] * chosen, _TINY).astype(np.float32)


def accumulator_scale(act_scale: Array, w_scale: Array) -> np.ndarray:
    """`s_x * s_w` in float32, the scale of an integer site's int32 accumulator: computed
    once here for the JAX program's rescale and requantize and for the exported int32 biases,
    so both round the same products."""
    return np.float32(act_scale) * np.asarray(w_scale, np.float32)


def bias_int32(bias: Array, acc_scale: Array) -> np.ndarray:
    """A float bias as int32 at the accumulator's scale `s_x * s_w` (float32, as
    onnxruntime's QLinearConv takes it): `round(bias / acc_scale)`, half to even, saturated.

    The JAX program and the exported models both use it, so an integer runtime adds the
    same integers the JAX program does."""
    scale = np.asarray(acc_scale, np.float32).astype(np.float64)
    q = np.round(np.asarray(bias, np.float32).astype(np.float64) / scale)
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32)
