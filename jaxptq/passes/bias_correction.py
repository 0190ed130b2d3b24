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


def apply_bias_correction(
    graphs: GraphCache,
    in_tree: Any,
    sites: Sequence[Site],
    plans: Sequence[SitePlan],
    samples: Sequence[tuple[Any, ...]],
    per_row: bool = False,
) -> None:
    """Sets `bias_correction` on every quantized site plan, from one pass over `samples`."""
    active = [p for p in plans if p.int8_compute]
    if not active:
        return
    channel_axes = {}
    for site in sites:
        lay = site_layout(site) if site.name in {p.name for p in active} else None
        if lay is not None:
            kept = {o for o in lay.weight_to_out if o is not None}
            channel_axes[site.name] = tuple(a for a in range(lay.out_ndim) if a not in kept)
    pairs = site_output_pairs(graphs, in_tree, active, per_row)

    @jax.jit
    def step(*flat: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
        out = {}
        for name, (y_float, y_quant) in pairs(*flat).items():
            axes = channel_axes[name]
            diff = y_float.astype(jnp.float32) - y_quant.astype(jnp.float32)
            rows = 1
            if per_row:  # rowwise evaluation added a leading row axis
                rows, diff = diff.shape[0], diff.sum(axis=0)
            count = rows * (np.prod([diff.shape[a] for a in axes]) if axes else 1)
            out[name] = (jnp.sum(diff, axis=axes, keepdims=True), jnp.float32(count))
        return out

    # Accumulate on the host in float64, so the split into batches barely matters.
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, float] = {}
    for flat in samples:
        for name, (total, count) in step(*flat).items():
            sums[name] = sums.get(name, 0.0) + np.asarray(total, np.float64)
            counts[name] = counts.get(name, 0.0) + float(count)
    for plan in active:
        mean = sums[plan.name] / max(counts[plan.name], 1.0)
        if np.all(np.isfinite(mean)):
            plan.bias_correction = mean.astype(np.float32)
