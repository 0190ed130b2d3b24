"""Bias correction: fold each site's mean output error, per output channel, into a bias.

Rounding weights to int8 shifts a channel's expected output by a constant; measuring that
shift on the calibration set (float input of the site -> float output vs quantized
output) and adding it back removes it. Sites without a bias get one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxptq.graph import Site
from jaxptq.layout import site_layout
from jaxptq.plan import SitePlan
from jaxptq.probe import site_output_pairs
from jaxptq.rewrite import GraphCache

ROWS = 16  # rows per step: one compiled program whatever the caller's batch sizes


def apply_bias_correction(
    graphs: GraphCache,
    in_tree: Any,
    sites: Sequence[Site],
    plans: Sequence[SitePlan],
    samples: Sequence[tuple[Any, ...]],
) -> None:
    """Sets `bias_correction` on every quantized site plan, from one pass over `samples`.

    Rows are evaluated one at a time under `vmap` (so fixed-batch models work) in steps
    of `ROWS`; the last step repeats its last row and masks the copies out.
    """
    active = {p.name: p for p in plans if p.int8_compute}
    if not active:
        return
    summed_axes = {}  # every output axis but the weight's (output channel) axes
    for site in sites:
        if site.name in active:
            lay = site_layout(site)
            kept = {o for o in lay.weight_to_out if o is not None}
            summed_axes[site.name] = tuple(a for a in range(lay.out_ndim) if a not in kept)
    pairs = site_output_pairs(graphs, in_tree, list(active.values()), per_row=True)

    @jax.jit
    def step(valid: jax.Array, *flat: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
        out = {}
        for name, (y_float, y_quant) in pairs(*flat).items():
            diff = y_float.astype(jnp.float32) - y_quant.astype(jnp.float32)
            keep = (valid > 0).reshape((-1,) + (1,) * (diff.ndim - 1))
            # rows summed, padding rows masked with `where`: a product with the mask
            # would let a NaN of a padding row through
            diff = jnp.sum(jnp.where(keep, diff, 0.0), axis=0)
            axes = summed_axes[name]
            count = jnp.sum(valid) * np.prod([diff.shape[a] for a in axes])
            out[name] = (jnp.sum(diff, axis=axes, keepdims=True), count)
        return out

    rows = [np.concatenate(parts) for parts in zip(*samples, strict=True)]
    total = len(rows[0])
    sums: dict[str, jax.Array] = {}
    counts: dict[str, jax.Array] = {}
    for start in range(0, total, ROWS):
        index = np.minimum(np.arange(start, start + ROWS), total - 1)
        valid = (np.arange(start, start + ROWS) < total).astype(np.float32)
        for name, (part, count) in step(valid, *[a[index] for a in rows]).items():
            sums[name] = sums[name] + part if name in sums else part
            counts[name] = counts[name] + count if name in counts else count
    for name, plan in active.items():
        mean = np.asarray(sums[name], np.float64) / max(float(counts[name]), 1.0)
        if np.all(np.isfinite(mean)):
            plan.bias_correction = mean.astype(np.float32)
