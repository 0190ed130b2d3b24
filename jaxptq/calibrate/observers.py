"""Observers: per-site statistics as pure init/update/finalize functions over array pytrees."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Stats = Any  # a pytree of arrays: one site's running statistics


class Observer(NamedTuple):
    """One statistic of a site's activations, in the shape of optax's GradientTransformation.

    `update(stats, x, valid, axis_name)` folds one batch `x` (leading axis: rows) into
    `stats`, counting only rows where `valid` is true; with `axis_name` it first combines
    the device-local parts over that mesh axis (`psum`, `pmin`, `pmax`), so it works as is
    inside `shard_map`. Every update is an exact, associative merge (min, max, integer
    add), which is what makes the result independent of how rows are split into batches
    and over devices.
    """

    init: Callable[..., Stats]
    update: Callable[[Stats, jax.Array, jax.Array, str | None], Stats]
    finalize: Callable[[Stats], Any]


class MinMax(NamedTuple):
    # float32, the activations' own dtype: min and max select values, they never round.
    min: jax.Array
    max: jax.Array


def row_mask(valid: jax.Array, x: jax.Array) -> jax.Array:
    """`valid` (rows,) broadcast to the shape of `x`, whose leading axis is rows."""
    return jnp.broadcast_to(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)


@functools.cache  # one instance, so compiled steps keyed on it are reused
def min_max() -> Observer:
    """Observed extremes; NaN propagates into them, Inf shows as the extreme itself."""

    def init() -> MinMax:
        return MinMax(jnp.float32(jnp.inf), jnp.float32(-jnp.inf))

    def update(stats: MinMax, x: jax.Array, valid: jax.Array, axis_name: str | None) -> MinMax:
        mask = row_mask(valid, x)
        lo = jnp.min(jnp.where(mask, x, jnp.inf), initial=jnp.inf)
        hi = jnp.max(jnp.where(mask, x, -jnp.inf), initial=-jnp.inf)
        if axis_name is not None:
            lo, hi = lax.pmin(lo, axis_name), lax.pmax(hi, axis_name)
        return MinMax(jnp.minimum(stats.min, lo), jnp.maximum(stats.max, hi))

    def finalize(stats: MinMax) -> tuple[jax.Array, jax.Array]:
        return stats.min, stats.max

    return Observer(init, update, finalize)
