"""Histogram observer over a fixed range, with exact integer counts."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxptq.calibrate.observers import Observer, row_mask

# Counts are int32, not float32: float32 counts stop being exact past 2**24, and then the
# totals would depend on how rows were split into batches. int32 is exact to 2**31 - 1;
# the caller drains counts to host int64 before a site can pass that (see `max_elements`).
COUNT_DTYPE = jnp.int32
MAX_COUNT = int(np.iinfo(np.int32).max)


class Histogram(NamedTuple):
    counts: jax.Array  # (num_bins,) int32
    lo: jax.Array  # float32 left edge of bin 0
    scale: jax.Array  # float32 bins per unit: bin = floor((x - lo) * scale), clipped


def histogram_stats(num_bins: int, lo: float, hi: float) -> Histogram:
    """Empty counts over `[lo, hi]`; a zero-width range puts everything in bin 0."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    scale = np.float32(num_bins) / (hi32 - lo32) if hi32 > lo32 else np.float32(0)
    return Histogram(jnp.zeros(num_bins, COUNT_DTYPE), jnp.float32(lo32), jnp.float32(scale))


@functools.cache  # one instance per flavour, so compiled steps keyed on it are reused
def histogram(absolute: bool = False) -> Observer:
    """Counts of x (or |x| when `absolute`) in the bins of the range held in the stats.

    The range travels in the stats rather than in the program, so one compiled step
    serves every site and every calibration run. Values outside the range land in the
    end bins; the bin of a value is `floor((x - lo) * scale)`, exactly the same float32
    arithmetic for a row whatever batch it comes in.
    """

    def init(num_bins: int, lo: float, hi: float) -> Histogram:
        return histogram_stats(num_bins, lo, hi)

    def update(
        stats: Histogram, x: jax.Array, valid: jax.Array, axis_name: str | None
    ) -> Histogram:
        v = jnp.abs(x) if absolute else x
        num_bins = stats.counts.shape[0]
        idx = jnp.clip(jnp.floor((v - stats.lo) * stats.scale), 0, num_bins - 1)
        weight = row_mask(valid, x).astype(COUNT_DTYPE)
        counts = (
            jnp.zeros(num_bins, COUNT_DTYPE).at[idx.astype(jnp.int32).ravel()].add(weight.ravel())
        )
        if axis_name is not None:
            counts = lax.psum(counts, axis_name)
        return stats._replace(counts=stats.counts + counts)

    def finalize(stats: Histogram) -> jax.Array:
        return stats.counts

    return Observer(init, update, finalize)


def bin_centers(num_bins: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`(sites, num_bins)` float64 bin centres of `[lo, hi]` ranges, per site."""
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    width = (hi64 - lo64) / num_bins
    return lo64[:, None] + (np.arange(num_bins) + 0.5)[None, :] * width[:, None]
