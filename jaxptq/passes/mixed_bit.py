"""Mixed-bit WEIGHT_QUANT (`bit_num` = 0): the fewest stored bits within `init_scale`'s error.

The error of a site at `b` bits is MindSpore Lite's (`MixedBitWeightQuantization::
MeasureQuantizationError`): per output channel ||w_c - deq(q(w_c))|| / ||w_c||, averaged over
the channels whose squared norm is above 1e-10, with jaxptq's symmetric max-abs scale
(per channel by `per_channel`), for every width 1..16 at once.

MindSpore gives each site the fewest bits whose error is within `init_scale` (0.02: 2% error
per site, comparable to 6-7 fixed bits; larger compresses more). Measured on
EfficientNet-Lite0, that per-site rule spends the same error on a 288-weight depthwise conv as
on the 1.28M-weight classifier: 7 bits everywhere, output cosine 0.979, top-1 -3.3 points.
jaxptq keeps `init_scale`'s meaning as an error level but spends it where bits are cheap:

1. the budget is the root-mean-square over sites of the errors MindSpore's per-site rule
   would give at `init_scale`;
2. the widths minimise the stored weight bits (`b` bits packed up to 8, 16 above) subject
   to the root-mean-square site error staying within that budget, solved by Lagrangian
   relaxation: for a multiplier `lam`, every site independently takes
   argmin_b n_site * stored_bits(b) / n_total + lam * error(b)**2 / n_sites (one argmin over
   a sites x widths array), and `lam` is bisected on a log scale to the cheapest feasible
   assignment. If that is not cheaper than the per-site rule, the per-site rule is kept.

Small layers (stem, early depthwise convs) so take 8-16 bits and the large late 1x1 convs and
the classifier 6-7: on EfficientNet-Lite0 6.6 bits per weight at output cosine 0.99+, versus
uniform 8 bits at 0.996. Clipped (MSE-optimal) scales (`qmath.mse_symmetric_scales`) were
measured too and did not help there (7 bits: cosine 0.983 against 0.985 with max-abs), so the
search keeps max-abs scales. The result is an ordinary plan that packs and runs like
fixed-bit WEIGHT_QUANT.

With `auto_tune`, `init_scale` itself is searched by bisection on a log scale so that the
cosine similarity of the quantized model's outputs with the float ones on the calibration
samples lands in [0.993, 0.997] (aiming at 0.995).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxptq import qmath
from jaxptq.config import QuantConfig
from jaxptq.graph import Site
from jaxptq.layout import site_layout
from jaxptq.passes.common import skip_reason, skipped_site_plan, weight_site_plan
from jaxptq.plan import SitePlan
from jaxptq.rewrite import GraphCache

logger = logging.getLogger(__name__)

CANDIDATE_BITS = tuple(range(1, 17))
TARGET_COSINE = 0.995
COSINE_BAND = (0.993, 0.997)
# MindSpore ignores channels this small: their relative error is meaningless.
_NORM_FLOOR = 1e-10
# At most this many elements per temporary (bits x weight), so big layers stay in memory.
_CHUNK_ELEMENTS = 1 << 23


def weight_errors(
    weight: np.ndarray,
    channel_axes: Sequence[int],
    scale_axes: Sequence[int],
    bits: Sequence[int] = CANDIDATE_BITS,
) -> np.ndarray:
    """The mean per-channel relative error of `weight` at every candidate width.

    All widths are evaluated together along a leading axis (in chunks for large weights).

    Args:
        weight: the float weight.
        channel_axes: the output-channel axes over which the error is measured.
        scale_axes: the axes that carry their own scale (`()` for one scale per tensor).
        bits: candidate widths.

    Returns:
        float64 array of shape `(len(bits),)`.
    """
    w = np.asarray(weight, np.float32)
    norm_axes = qmath.reduce_axes(w.ndim, channel_axes)
    norms = np.sum(np.square(w, dtype=np.float64), axis=norm_axes)
    valid = norms > _NORM_FLOOR
    if not valid.any():
        return np.zeros(len(bits))
    absmax = np.max(np.abs(w), axis=qmath.reduce_axes(w.ndim, scale_axes), keepdims=True)
    ranges = np.array([qmath.symmetric_range(b) for b in bits], np.float32)
    ones = (1,) * w.ndim
    chunk = max(1, _CHUNK_ELEMENTS // max(w.size, 1))
    errors = []
    for start in range(0, len(bits), chunk):
        lo = ranges[start : start + chunk, 0].reshape(-1, *ones)
        hi = ranges[start : start + chunk, 1].reshape(-1, *ones)
        scale = np.maximum(absmax / np.maximum(hi, -lo), qmath._TINY)  # = symmetric_scale
        # One quantize call for every width: the bounds broadcast like the scale.
        q = qmath.quantize(w, scale, 0, lo, hi, np.float32)  # type: ignore[arg-type]
        diff = w - qmath.dequantize(q, scale)
        sq = np.sum(np.square(diff, dtype=np.float64), axis=tuple(a + 1 for a in norm_axes))
        errors.append(np.sqrt(sq[:, valid] / norms[valid]).mean(axis=1))
    return np.concatenate(errors)


def choose_bits(errors: np.ndarray, init_scale: float) -> int:
    """MindSpore's per-site rule: the fewest candidate bits whose error is within
    `init_scale` (the widest if none)."""
    ok = np.flatnonzero(errors <= init_scale)
    return CANDIDATE_BITS[int(ok[0]) if ok.size else len(CANDIDATE_BITS) - 1]


def stored_bits(bits: int) -> int:
    """Bits a weight element takes in a saved plan: packed up to 8, int16 above."""
    return bits if bits <= 8 else 16


def allocate_bits(errors: np.ndarray, sizes: np.ndarray, init_scale: float) -> np.ndarray:
    """The fewest stored bits whose root-mean-square site error is within the budget that
    MindSpore's per-site rule sets at `init_scale` (see the module docstring).

    Args:
        errors: `(sites, len(CANDIDATE_BITS))` error of every site at every width.
        sizes: weight elements of every site.
        init_scale: the per-site error level.

    Returns:
        int array of widths, one per site.
    """
    errors = np.asarray(errors, np.float64)
    n_sites = len(errors)
    widths = np.array(CANDIDATE_BITS)
    per_site = np.array([choose_bits(e, init_scale) for e in errors], dtype=int)
    rows = np.arange(n_sites)
    budget = np.mean(np.square(errors[rows, per_site - 1]))
    cost = (sizes / sizes.sum())[:, None] * np.array([stored_bits(b) for b in widths])[None]
    penalty = np.square(errors) / n_sites

    def assign(log_lam: float) -> np.ndarray:
        return np.argmin(cost + math.exp(log_lam) * penalty, axis=1)

    def feasible(idx: np.ndarray) -> bool:
        return float(np.mean(np.square(errors[rows, idx]))) <= budget * (1 + 1e-9)

    lo, hi = -60.0, 60.0  # exp(-60): bits cost all, 1 bit everywhere; exp(60): error does
    if not feasible(assign(hi)):
        return per_site
    for _ in range(80):
        mid = (lo + hi) / 2
        if feasible(assign(mid)):
            hi = mid
        else:
            lo = mid
    best = widths[assign(hi)]
    total = (sizes * [stored_bits(int(b)) for b in best]).sum()
    if total >= (sizes * [stored_bits(int(b)) for b in per_site]).sum():
        return per_site
    return best


def _site_errors(site: Site, per_channel: bool) -> np.ndarray:
    channel_axes = site_layout(site).weight_channel_axes
    return weight_errors(site.weight, channel_axes, channel_axes if per_channel else ())


def _plans(
    sites: Sequence[Site],
    reasons: dict[str, str | None],
    errors: dict[str, np.ndarray],
    init_scale: float,
    per_channel: bool,
) -> list[SitePlan]:
    names = list(errors)
    bits: dict[str, int] = {}
    if names:
        table = np.stack([errors[n] for n in names])
        sizes = np.array([s.weight.size for s in sites if s.name in errors], np.float64)
        bits = dict(zip(names, allocate_bits(table, sizes, init_scale).tolist(), strict=True))
    plans = []
    for site in sites:
        reason = reasons[site.name]
        if reason:
            plans.append(skipped_site_plan(site, reason))
        else:
            plans.append(weight_site_plan(site, int(bits[site.name]), per_channel))
    return plans


def _average_bits(plans: Sequence[SitePlan]) -> float:
    quantized = [p for p in plans if p.quantized]
    total = sum(p.weight_elements for p in quantized)
    return sum(p.weight_elements * (p.bits or 0) for p in quantized) / max(total, 1)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """The outcome of the `init_scale` search.

    Attributes:
        init_scale: the chosen value.
        cosine: the output cosine similarity it gives on the calibration samples.
        in_band: whether `cosine` is inside `COSINE_BAND`.
        steps: `(init_scale, average bits of quantized sites, cosine)` per evaluation.
    """

    init_scale: float
    cosine: float
    in_band: bool
    steps: tuple[tuple[float, float, float], ...]


def tune_init_scale(
    sites: Sequence[Site],
    reasons: dict[str, str | None],
    errors: dict[str, np.ndarray],
    per_channel: bool,
    graphs: GraphCache,
    in_tree: Any,
    samples: Sequence[tuple[Any, ...]],
    *,
    bounds: tuple[float, float] = (1e-4, 1.0),
    max_steps: int = 12,
) -> TuneResult:
    """Bisects `log(init_scale)` so the output cosine lands near `TARGET_COSINE`.

    The cosine falls as `init_scale` grows (fewer bits). Each step re-chooses the bits from
    the precomputed error tables and evaluates the model with one jitted program, whose
    integer weights are arguments: a new bit assignment costs no recompilation.
    """
    from jaxptq.accuracy_control import PlanEvaluator, output_cosine

    evaluator = PlanEvaluator(
        graphs, in_tree, _plans(sites, reasons, errors, bounds[0], per_channel)
    )
    reference = evaluator.reference(samples)
    seen: dict[tuple[int, ...], float] = {}
    steps: list[tuple[float, float, float]] = []

    def evaluate(init_scale: float) -> float:
        plans = _plans(sites, reasons, errors, init_scale, per_channel)
        key = tuple(p.bits or 0 for p in plans)
        if key not in seen:
            args = evaluator.site_args(plans, samples[0])
            seen[key] = output_cosine(reference, evaluator.outputs(args, samples))
        steps.append((init_scale, _average_bits(plans), seen[key]))
        logger.info("mixed-bit auto_tune: init_scale %.4g -> %.2f bits, cosine %.5f", *steps[-1])
        return seen[key]

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    for _ in range(max_steps):
        if hi - lo < 0.01:  # the bracket is narrower than 1%: nothing new to find
            break
        mid = math.exp((lo + hi) / 2)
        cosine = evaluate(mid)
        if abs(cosine - TARGET_COSINE) <= 5e-4:
            break
        if cosine > TARGET_COSINE:
            lo = math.log(mid)
        else:
            hi = math.log(mid)
    in_band = [s for s in steps if COSINE_BAND[0] <= s[2] <= COSINE_BAND[1]]
    above = [s for s in steps if s[2] > COSINE_BAND[1]]
    if in_band:  # nearest the target; the most compression among equals
        best = min(in_band, key=lambda s: (abs(s[2] - TARGET_COSINE), -s[0]))
    elif above:  # otherwise stay on the accurate side
        best = max(above, key=lambda s: s[0])
    else:
        best = min(steps, key=lambda s: s[0])
    return TuneResult(best[0], best[2], bool(in_band), tuple(steps))


def plan_mixed_bit(
    sites: list[Site],
    config: QuantConfig,
    graphs: GraphCache,
    in_tree: Any,
    samples: Sequence[tuple[Any, ...]],
    notes: list[str] | None = None,
) -> list[SitePlan]:
    """Per-site bit widths for `bit_num` = 0.

    Args:
        sites: the graph's sites.
        config: the config; reads `init_scale`, `auto_tune`, `per_channel` and the skip
            rules.
        graphs, in_tree, samples: the traced function and its calibration samples, used by
            `auto_tune` to measure the output cosine.
        notes: if given, receives lines for the plan's notes (the tuned `init_scale`, sites
            that even 16 bits could not bring within the target).

    Returns:
        One `SitePlan` per site, quantized sites with their own `bits`.
    """
    mixed = config.mixed_bit_weight_quant_param
    per_channel = config.full_quant_param.per_channel
    reasons = {s.name: skip_reason(s, config, size_rules=True) for s in sites}
    errors = {s.name: _site_errors(s, per_channel) for s in sites if reasons[s.name] is None}
    init_scale = mixed.init_scale
    lines = []
    if mixed.auto_tune and errors:
        result = tune_init_scale(sites, reasons, errors, per_channel, graphs, in_tree, samples)
        init_scale = result.init_scale
        lines.append(
            f"mixed-bit auto_tune: init_scale {init_scale:.4g}, output cosine "
            f"{result.cosine:.5f} on {len(samples)} calibration samples"
            + ("" if result.in_band else f" (outside the target band {COSINE_BAND})")
            + f", {len(result.steps)} steps"
        )
    plans = _plans(sites, reasons, errors, init_scale, per_channel)
    for plan in plans:
        if plan.quantized and errors[plan.name][-1] > init_scale:
            lines.append(
                f"mixed-bit: `{plan.name}` has relative error {errors[plan.name][-1]:.3g} "
                f"> init_scale={init_scale:.4g} even at {CANDIDATE_BITS[-1]} bits"
            )
    for line in lines:
        logger.info("%s", line)
    if notes is not None:
        notes.extend(lines)
    return plans
