"""Pooling windows as strided slices on XLA:CPU.

XLA:CPU hands `reduce-window` to YNNPACK, which measured 3-4x slower than combining the
window's taps as strided slices in one loop fusion (batch 32, 2x2 average pools after a
bias and ReLU; 2-core AVX-512 VM, jax 0.10.2): 32x8x8x6 38 -> 10 us, 32x4x4x16 13 -> 7 us,
32x112x112x32 4.4 -> 2.5 ms. LeNet-5's two pools were a quarter of its int8 program. A
`reduce` over a reshaped window went to YNNPACK too, and was slower still.

Taps are combined in row-major window order. For `max` and `min` the result is exactly the
primitive's; for `add` only the float summation order differs (as in `jaxptq.conv_forms`).
Other platforms keep the primitive.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxptq import depthwise, platforms

Params = dict[str, Any]

# Windows with more taps than this keep `reduce-window` (a global pool is a `reduce`).
MAX_TAPS = 16


def _identity(combine: Callable[[Any, Any], Any], dtype: Any) -> Any:
    """The value padding holds: what `combine` leaves unchanged."""
    if combine is lax.add:
        return np.zeros((), dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        low, high = -np.inf, np.inf
    else:
        low, high = jnp.iinfo(dtype).min, jnp.iinfo(dtype).max
    return np.asarray(low if combine is lax.max else high, dtype)


def applies(params: Params) -> bool:
    """A window of at most `MAX_TAPS` taps, without dilation."""
    return (
        math.prod(params["window_dimensions"]) <= MAX_TAPS
        and all(d == 1 for d in params["base_dilation"])
        and all(d == 1 for d in params["window_dilation"])
    )


def pool_by_slices(combine: Callable[[Any, Any], Any], x: Any, params: Params) -> Any:
    """`reduce_window` of `combine` as the combination of one strided slice per tap."""
    window, strides = params["window_dimensions"], params["window_strides"]
    config = [(lo, hi, 0) for lo, hi in params["padding"]]
    if any(lo or hi for lo, hi, _ in config):
        x = lax.pad(x, jnp.asarray(_identity(combine, x.dtype)), config)
    result = None
    for offsets in itertools.product(*(range(k) for k in window)):
        tap = x
        for axis, (o, k, s) in enumerate(zip(offsets, window, strides, strict=True)):
            if (k, s) != (1, 1):
                tap = depthwise.window_slice(tap, axis, o, k, 1, s)
        result = tap if result is None else combine(result, tap)
    return result


def rule(primitive: Any, combine: Callable[[Any, Any], Any]) -> Callable[[Any, Params], Any]:
    """A `graph.FAST_RULES` entry for one `reduce_window_*` primitive."""

    def apply(x: Any, params: Params) -> Any:
        if not applies(params):
            return primitive.bind(x, **params)
        return platforms.dependent(
            x,
            cpu=lambda x: pool_by_slices(combine, x, params),
            default=lambda x: primitive.bind(x, **params),
        )

    return apply


RULES: dict[Any, Callable[[Any, Params], Any]] = {
    lax.reduce_window_sum_p: rule(lax.reduce_window_sum_p, lax.add),
    lax.reduce_window_max_p: rule(lax.reduce_window_max_p, lax.max),
    lax.reduce_window_min_p: rule(lax.reduce_window_min_p, lax.min),
}
