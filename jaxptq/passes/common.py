"""What every mode shares: which sites may be quantized, and quantizing a weight."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxptq import qmath
from jaxptq.config import ConfigError, QuantConfig, closest
from jaxptq.graph import Site
from jaxptq.layout import site_layout
from jaxptq.plan import SitePlan

# How a weight scale is chosen: max-abs, or the clip with the least squared error.
WEIGHT_CLIPS = ("max", "mse")


def check_skip_names(sites: Sequence[Site], names: Sequence[str]) -> None:
    """Every `skip_quant_node` entry must name a site; a typo would silently quantize."""
    known = [s.name for s in sites]
    for name in names:
        if name not in known:
            hint = closest(name, known)
            raise ConfigError(
                f"[common_quant_param] `skip_quant_node` names `{name}`, which matches no site"
                + (
                    f"; closest: {', '.join(f'`{h}`' for h in hint)}."
                    if hint
                    else f"; sites are: {', '.join(known[:10])}{'...' if len(known) > 10 else ''}."
                )
            )


def skip_reason(site: Site, config: QuantConfig, *, size_rules: bool) -> str | None:
    """Why a site stays float, or None. Size thresholds apply to weight-only quantization."""
    common = config.common_quant_param
    weight = site.weight
    if not np.issubdtype(weight.dtype, np.floating):
        return f"weight dtype {weight.dtype} is not floating point"
    try:
        layout = site_layout(site)
    except NotImplementedError as err:
        return f"not supported: {err}"
    if site.name in common.skip_quant_node:
        return "listed in skip_quant_node"
    if size_rules:
        if weight.size < common.min_quant_weight_size:
            return (
                f"weight has {weight.size} elements < min_quant_weight_size="
                f"{common.min_quant_weight_size}"
            )
        channels = int(np.prod([weight.shape[a] for a in layout.weight_channel_axes]))
        if channels < common.min_quant_weight_channel:
            return (
                f"weight has {channels} output channels < min_quant_weight_channel="
                f"{common.min_quant_weight_channel}"
            )
    return None


def weight_site_plan(
    site: Site,
    bits: int,
    per_channel: bool,
    *,
    clip: str = "max",
    scale: np.ndarray | None = None,
) -> SitePlan:
    """A site plan with the weight quantized symmetrically to `bits`.

    Args:
        site: the site.
        bits: the weight width.
        per_channel: one scale per output channel, else one per tensor.
        clip: "max" maps max|w| to the top level; "mse" clips each channel where its
            squared error is least (`qmath.mse_symmetric_scales`), which matters below
            8 bits.
        scale: a precomputed scale (as `symmetric_scale` shapes it); overrides `clip`.
    """
    if clip not in WEIGHT_CLIPS:
        raise ValueError(f"`clip` must be one of {WEIGHT_CLIPS}, got {clip!r}.")
    weight = site.weight.astype(np.float32)
    axes = site_layout(site).weight_channel_axes if per_channel else ()
    if scale is None:
        if clip == "mse":
            scale = qmath.mse_symmetric_scales(weight, [bits], axes)[0]
        else:
            scale = qmath.symmetric_scale(weight, bits, axes)
    lo, hi = qmath.symmetric_range(bits)
    q = qmath.quantize(weight, scale, 0, lo, hi, qmath.storage_dtype(bits))
    return SitePlan(
        name=site.name,
        primitive=site.primitive,
        weight_shape=tuple(weight.shape),
        bits=bits,
        channel_axes=tuple(axes),
        weight_scale=scale,
        weight_q=q,
    )


def skipped_site_plan(site: Site, reason: str) -> SitePlan:
    return SitePlan(site.name, site.primitive, tuple(site.weight.shape), skip_reason=reason)
