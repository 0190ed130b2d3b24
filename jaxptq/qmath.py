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
