"""Histogram observers with exact integer counts over a power-of-two range that grows as
larger values arrive: one pass, no range needed first. Of |x| over `[0, top]` (KL) or of
x over `[-top, top]` (REMOVAL_OUTLIER)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxptq.calibrate.observers import Observer, SiteBatch, batch_extremes

# Counts are int32, not float32: float32 counts stop being exact past 2**24, and then the
# totals would depend on how rows were split into batches. int32 is exact to 2**31 - 1;
# the caller drains counts to host int64 before a site can pass that (see `max_elements`).
COUNT_DTYPE = jnp.int32
MAX_COUNT = int(np.iinfo(np.int32).max)


_ONE_BIN_PER_VALUE = lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
)


def _count(
    bin_of: Callable[[jax.Array], jax.Array],
    batch: SiteBatch,
    num_bins: int,
    axis_name: str | None,
) -> jax.Array:
    """Counts of `bin_of(row)` (bins in `[0, num_bins)`) over the valid rows.

    Row by row (`lax.scan`) because of how XLA:CPU scatters: the bins of a whole batch
    became one flattened scatter operand, whose fusion recomputed the activation's
    producer (a depthwise convolution, say) per value through flat-index arithmetic,
    about 3x the cost of the producer itself. A row reads the activation once, as
    materialised for the loop (EfficientNet-Lite0, a 16x112x112x32 site: 48 -> 18 ms).
    A padding row adds 0 to its bins.
    """

    def add_row(counts: jax.Array, row: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        x, valid = row
        bins = bin_of(x)  # clipped to [0, num_bins), except NaN, which no clip removes
        # NaN goes to bin 0, never to an index the scatter was promised not to see (the
        # pass reports it as an error afterwards).
        idx = jnp.where(jnp.isnan(bins), 0, bins).astype(jnp.int32).reshape(-1, 1)
        weight = jnp.broadcast_to(valid.astype(COUNT_DTYPE), idx.shape[:1])
        counts = lax.scatter_add(
            counts,
            idx,
            weight,
            _ONE_BIN_PER_VALUE,
            mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
        )
        return counts, None

    zeros = jnp.zeros(num_bins, COUNT_DTYPE)
    counts, _ = lax.scan(add_row, zeros, (batch.x, batch.valid))
    return counts if axis_name is None else lax.psum(counts, axis_name)


class Pow2Histogram(NamedTuple):
    """Counts over `[0, top]` (|x|) or `[-top, top]` (x), plus the extremes of x that
    decide `top`."""

    counts: jax.Array  # (num_bins,) int32
    top: jax.Array  # float32, the smallest power of two >= every |x| so far (0: none yet)
    min: jax.Array  # float32 observed extremes of x
    max: jax.Array


def _pow2_ceil(a: jax.Array) -> jax.Array:
    """The smallest power of two >= `a` (> 0, finite), exactly; 0 for 0."""
    mantissa, exponent = jnp.frexp(a)  # a = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    return jnp.where(a > 0, jnp.ldexp(jnp.float32(1), exponent), jnp.float32(0))


def _abs_bins(x: jax.Array, scale: jax.Array, num_bins: int) -> jax.Array:
    """|x| over `[0, top]`: bin `floor(|x| * num_bins / top)`."""
    return jnp.clip(jnp.floor(jnp.abs(x) * scale), 0, num_bins - 1)


def _signed_bins(x: jax.Array, scale: jax.Array, num_bins: int) -> jax.Array:
    """x over `[-top, top]` in left-closed bins, half of them below 0. Each side counts
    from 0 with `|x| * (half / top)`, which is exact (a power-of-two scale); `floor` of
    `(x + top) * scale` instead would round in the addition."""
    half = num_bins // 2
    above = half + jnp.floor(x * scale)
    below = half - jnp.ceil(-x * scale)
    return jnp.clip(jnp.where(x >= 0, above, below), 0, num_bins - 1)


# Where old bin `index` lands when the range grows `2**shift` times (NumPy or JAX ints).
def _abs_rebin_target(index: Any, shift: Any, num_bins: int) -> Any:
    return index >> shift


def _signed_rebin_target(index: Any, shift: Any, num_bins: int) -> Any:
    half = num_bins // 2  # bins stay split at 0; the arithmetic shift floors below it
    return half + ((index - half) >> shift)


class _Binning(NamedTuple):
    bins_of: Callable[[jax.Array, jax.Array, int], jax.Array]  # (x, scale, num_bins)
    bins_over_top: Callable[[int], int]  # bins spanning [0, top], from num_bins
    rebin_target: Callable[[Any, Any, int], Any]  # (old bin, shift, num_bins) -> new bin


_BINNING = {  # keyed by `signed`
    False: _Binning(_abs_bins, lambda num_bins: num_bins, _abs_rebin_target),
    True: _Binning(_signed_bins, lambda num_bins: num_bins // 2, _signed_rebin_target),
}


def _rebin(counts: jax.Array, shift: jax.Array, target: Callable[..., jax.Array]) -> jax.Array:
    """Counts over the range `2**shift` times wider: old bins nest in new ones, exactly."""
    num_bins = counts.shape[0]
    index = jnp.arange(num_bins, dtype=jnp.int32)
    return jnp.zeros_like(counts).at[target(index, jnp.minimum(shift, 31), num_bins)].add(counts)


@functools.cache  # one instance per kind, so compiled steps keyed on it are reused
def pow2_histogram(signed: bool) -> Observer:
    """Counts of |x| over `[0, top]` (or of x over `[-top, top]` when `signed`), `top` a
    power of two that doubles as needed.

    Why a power of two: growing the range by `2**k` merges every `2**k` bins into one
    with no loss, and the bin of a value is exact float32 arithmetic (a power-of-two
    scale), so the final counts equal a histogram taken over the final range in one go,
    whatever order and batches the rows came in. The range is the one a first min/max
    pass would give, rounded up to a power of two, so a second pass over the data is not
    needed. `top < 2 max|x|`.
    """
    binning = _BINNING[signed]

    def init(num_bins: int) -> Pow2Histogram:
        if signed and num_bins % 2:
            raise ValueError(f"a signed histogram needs an even number of bins, got {num_bins}")
        return Pow2Histogram(
            jnp.zeros(num_bins, COUNT_DTYPE),
            jnp.float32(0),
            jnp.float32(jnp.inf),
            jnp.float32(-jnp.inf),
        )

    def update(stats: Pow2Histogram, batch: SiteBatch, axis_name: str | None) -> Pow2Histogram:
        lo, hi = batch_extremes(batch, axis_name)
        new_min, new_max = jnp.minimum(stats.min, lo), jnp.maximum(stats.max, hi)
        absmax = jnp.maximum(-new_min, new_max)
        absmax = jnp.where(jnp.isfinite(absmax), absmax, 0.0)  # NaN/Inf: reported after
        top = jnp.maximum(stats.top, _pow2_ceil(absmax))
        shift = jnp.where(stats.top > 0, jnp.frexp(top)[1] - jnp.frexp(stats.top)[1], 0)
        num_bins = stats.counts.shape[0]
        units = jnp.float32(binning.bins_over_top(num_bins))
        scale = jnp.where(top > 0, units / jnp.where(top > 0, top, 1), 0)

        def bin_of(x: jax.Array) -> jax.Array:
            return binning.bins_of(x, scale, num_bins)

        counts = _rebin(stats.counts, shift, binning.rebin_target)
        counts = counts + _count(bin_of, batch, num_bins, axis_name)
        return Pow2Histogram(counts, top, new_min, new_max)

    return Observer(init, update)


def merge_counts(
    counts: np.ndarray,
    top: np.float32 | float,
    more: np.ndarray,
    more_top: np.float32 | float,
    signed: bool,
) -> tuple[np.ndarray, np.float32]:
    """Host-side sum of two histograms of the same kind and bins, on the larger `top`."""
    new_top = np.float32(max(top, more_top))
    target = _BINNING[signed].rebin_target

    def lift(c: np.ndarray, t: np.float32 | float) -> np.ndarray:
        if t <= 0 or t == new_top:
            return c
        shift = min(int(np.log2(new_top / np.float32(t))), 62)
        index = target(np.arange(c.shape[0], dtype=np.int64), shift, c.shape[0])
        return np.bincount(index, weights=c, minlength=c.shape[0])

    return (lift(counts, top) + lift(more, more_top)).astype(np.int64), new_top


def bin_centers(num_bins: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`(sites, num_bins)` float64 bin centres of `[lo, hi]` ranges, per site."""
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    width = (hi64 - lo64) / num_bins
    return lo64[:, None] + (np.arange(num_bins) + 0.5)[None, :] * width[:, None]
