"""FULL_QUANT: int8 weights and calibrated int8 activations; sites run i8 x i8 -> i32."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxptq import qmath
from jaxptq.config import QuantConfig
from jaxptq.graph import Site
from jaxptq.passes.bias_correction import apply_bias_correction
from jaxptq.passes.common import skip_reason, skipped_site_plan, weight_site_plan
from jaxptq.plan import SitePlan
from jaxptq.probe import site_inputs, takes_any_batch
from jaxptq.rewrite import GraphCache
from jaxptq.targets import TARGETS


def _needs_symmetric(site: Site) -> bool:
    """A transposed convolution inserts zeros between inputs: only zero point 0 keeps
    those zeros meaning float 0."""
    dilation = site.node.params.get("lhs_dilation") or ()
    return any(d != 1 for d in dilation)


def activation_params(lo: float, hi: float, symmetric: bool) -> tuple[float, int]:
    if symmetric:
        bound = max(abs(lo), abs(hi))
        return float(max(bound / 127.0, float(qmath._TINY))), 0
    scale, zero_point = qmath.affine_params(lo, hi, 8)
    return float(scale), int(zero_point)


def plan_full_quant(
    sites: list[Site],
    config: QuantConfig,
    graphs: GraphCache,
    in_tree: Any,
    samples: Sequence[tuple[Any, ...]],
    progress: bool = True,
) -> tuple[list[SitePlan], Any]:
    """Calibrates every eligible site's input range, then plans int8 sites."""
    from jaxptq.calibrate import calibrate

    full = config.full_quant_param
    reasons = {s.name: skip_reason(s, config, size_rules=False) for s in sites}
    if full.target_device is not None:  # what the named target's integer kernels cannot take
        for s in sites:
            reasons[s.name] = reasons[s.name] or TARGETS[full.target_device].cannot_express(
                s, full.per_channel
            )
    eligible = [s.name for s in sites if reasons[s.name] is None]
    per_row = not takes_any_batch(graphs, in_tree, samples[0])
    result = calibrate(
        site_inputs(graphs, in_tree, eligible, per_row, channels_last=True),
        samples,
        full.activation_quant_method,
        outlier_percent=full.outlier_percent,
        progress=progress,
    )
    target = TARGETS[full.target_device]
    plans = []
    for site in sites:
        reason = reasons[site.name]
        if reason:
            plans.append(skipped_site_plan(site, reason))
            continue
        plan = weight_site_plan(site, 8, full.per_channel)
        rng = result.ranges[site.name]
        symmetric = target.act_symmetric or _needs_symmetric(site)
        plan.act_mode = "static"
        plan.act_range = (float(np.float32(rng.lo)), float(np.float32(rng.hi)))
        plan.act_scale, plan.act_zero_point = activation_params(*plan.act_range, symmetric)
        plan.act_symmetric = symmetric
        plans.append(plan)
    if full.bias_correction:
        apply_bias_correction(graphs, in_tree, sites, plans, samples)
    return plans, result
