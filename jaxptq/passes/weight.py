"""WEIGHT_QUANT: integer weights dequantized inside the program; activations stay float."""

from __future__ import annotations

from jaxptq.config import QuantConfig
from jaxptq.graph import Site
from jaxptq.passes.common import skip_reason, skipped_site_plan, weight_site_plan
from jaxptq.plan import SitePlan


def plan_weight_quant(sites: list[Site], config: QuantConfig) -> list[SitePlan]:
    """Fixed `bit_num` bits per site; `bit_num=0` is the mixed-bit search's job."""
    bits = config.common_quant_param.bit_num
    per_channel = config.full_quant_param.per_channel
    plans = []
    for site in sites:
        reason = skip_reason(site, config, size_rules=True)
        plans.append(
            skipped_site_plan(site, reason) if reason else weight_site_plan(site, bits, per_channel)
        )
    return plans
