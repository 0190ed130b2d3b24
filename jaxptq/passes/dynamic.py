"""DYNAMIC_QUANT: int8 weights now, int8 activations scaled at run time.

`ALWC` scales activations per layer (one scale per tensor) and weights per channel;
`ACWL` scales activations per row (each index of the activation's non-contracting axes,
the only per-"channel" activation scale an integer dot can factor out) and weights per
layer.
"""

from __future__ import annotations

from jaxptq.config import QuantConfig
from jaxptq.graph import Site
from jaxptq.passes.common import skip_reason, skipped_site_plan, weight_site_plan
from jaxptq.plan import SitePlan

_STRATEGY = {  # strategy -> (weights per channel, activation mode)
    "ALWC": (True, "dynamic_tensor"),
    "ACWL": (False, "dynamic_row"),
}


def plan_dynamic_quant(sites: list[Site], config: QuantConfig) -> list[SitePlan]:
    per_channel, act_mode = _STRATEGY[config.dynamic_quant_param.quant_strategy]
    plans = []
    for site in sites:
        reason = skip_reason(site, config, size_rules=False)
        if reason:
            plans.append(skipped_site_plan(site, reason))
            continue
        plan = weight_site_plan(site, 8, per_channel)
        plan.act_mode = act_mode
        plan.act_symmetric = True
        plans.append(plan)
    return plans
