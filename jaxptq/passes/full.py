"""FULL_QUANT: int8 weights and calibrated int8 activations; sites run i8 x i8 -> i32."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxptq import qadd, qmath, requant
from jaxptq.config import QuantConfig
from jaxptq.graph import Site
from jaxptq.passes.bias_correction import apply_bias_correction
from jaxptq.passes.common import skip_reason, skipped_site_plan, weight_site_plan
from jaxptq.plan import AddPlan, SitePlan
from jaxptq.probe import output_key, site_inputs, takes_any_batch
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
) -> tuple[list[SitePlan], list[AddPlan], Any]:
    """Calibrates every eligible site's input range, then plans int8 sites, and for a
    target the Adds its runtime computes on codes."""
    from jaxptq.calibrate import calibrate

    full = config.full_quant_param
    reasons = {s.name: skip_reason(s, config, size_rules=False) for s in sites}
    if full.target_device is not None:  # what the named target's integer kernels cannot take
        for s in sites:
            reasons[s.name] = reasons[s.name] or TARGETS[full.target_device].cannot_express(
                s, full.per_channel
            )
    eligible = [s.name for s in sites if reasons[s.name] is None]
    target = TARGETS[full.target_device]
    op_types = _imported_op_types(graphs) if target.quantize_outputs else {}
    unfused = _integer_outputs(graphs, eligible, op_types)
    own_range = [name for name, reader in unfused.items() if reader is None]
    per_row = not takes_any_batch(graphs, in_tree, samples[0])
    result = calibrate(
        site_inputs(graphs, in_tree, eligible, per_row, channels_last=True, outputs=own_range),
        samples,
        full.activation_quant_method,
        outlier_percent=full.outlier_percent,
        progress=progress,
    )
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
    _quantize_outputs(plans, unfused, result, target.act_symmetric)
    if full.bias_correction:
        apply_bias_correction(graphs, in_tree, sites, plans, samples)
    adds: list[AddPlan] = []
    if op_types:  # a target that quantizes outputs, on an imported model
        by_name = {p.name: p for p in plans}
        adds = qadd.plan_adds(graphs.first(), by_name, lambda n: op_types.get(n.scope) == "Add")
    return plans, adds, result


# ONNX nodes that carry their own bias, so a runtime computes `DQ -> node -> Q` as one
# integer kernel (onnxruntime: QLinearConv, QGemm).
_INTEGER_OUTPUT_OPS = ("Conv", "Gemm")


def _imported_op_types(graphs: GraphCache) -> dict[str, str]:
    """The ONNX op type of each node of an imported model, under its sites' name; {} for a
    JAX function, whose nodes the export translates (its biases and layout transposes are
    nodes of their own, which a runtime does not fuse)."""
    op_types = getattr(graphs.fn, "site_op_types", None)
    return {} if op_types is None else op_types()


def _integer_outputs(
    graphs: GraphCache, static: list[str], op_types: dict[str, str]
) -> dict[str, str | None]:
    """The static sites whose float-fed outputs the target computes as int8
    (`requant.unfused_sites`): those of an imported ONNX model's Conv and Gemm nodes, which
    its export keeps. A MatMul with a separate bias Add stays a float op in the runtime, so
    its output is not rounded either."""
    if not op_types:
        return {}
    found = requant.unfused_sites(graphs.first(), static)
    return {
        name: reader for name, reader in found.items() if op_types.get(name) in _INTEGER_OUTPUT_OPS
    }


def _quantize_outputs(
    plans: list[SitePlan],
    unfused: dict[str, str | None],
    result: Any,
    symmetric: bool,
) -> None:
    """Quantizes the output of each site in `unfused` (`requant.unfused_sites`): like the
    static site that also reads it, or from its own calibrated range.

    Why: an integer runtime runs a convolution on integers only when its output is
    quantized too (onnxruntime fuses `DQ -> Conv -> Q`, never `DQ -> Conv` feeding a float
    Add); otherwise it convolves dequantized floats, whose rounding the JAX program's exact
    int32 sum cannot match. Quantizing those outputs in the plan makes the program compute
    what the target's kernels compute.
    """
    by_name = {p.name: p for p in plans}
    for name, reader in unfused.items():
        plan = by_name[name]
        if reader is not None:
            source = by_name[reader]
            plan.out_act_range = source.act_range
            plan.out_act_scale, plan.out_act_zero_point = (
                source.act_scale,
                source.act_zero_point,
            )
            continue
        rng = result.ranges[output_key(name)]
        plan.out_act_range = (float(np.float32(rng.lo)), float(np.float32(rng.hi)))
        plan.out_act_scale, plan.out_act_zero_point = activation_params(
            *plan.out_act_range, symmetric
        )
