"""Calibration: per-site activation ranges from streamed batches (MAX_MIN, KL, REMOVAL_OUTLIER).

One pass folds each site's statistics into running totals, one jitted step per
fixed-size microbatch, and no activation outlives its step. MAX_MIN keeps the extremes
(and a NaN/Inf check); KL keeps them together with a |x| histogram, REMOVAL_OUTLIER with
an x histogram, each over a power-of-two range that doubles as needed. See
docs/calibration.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxptq.calibrate import sharding
from jaxptq.calibrate.histogram import MAX_COUNT, Pow2Histogram, merge_counts, pow2_histogram
from jaxptq.calibrate.kl import kl_divergences
from jaxptq.calibrate.methods import (
    KL,
    Histograms,
    MaxMin,
    Method,
    RemovalOutlier,
    make_method,
)
from jaxptq.calibrate.observers import Observer, min_max
from jaxptq.calibrate.percentile import histogram_quantiles
from jaxptq.calibrate.stream import ROWS_PER_DEVICE, PassResult, run_pass

__all__ = [
    "KL",
    "ROWS_PER_DEVICE",
    "ActRange",
    "CalibrationResult",
    "MaxMin",
    "Method",
    "Observer",
    "RemovalOutlier",
    "calibrate",
    "histogram_quantiles",
    "kl_divergences",
    "min_max",
]


@dataclasses.dataclass(frozen=True)
class ActRange:
    """One site's activation range; float32 NumPy scalars."""

    lo: np.float32 | float  # the chosen clipping range; need not contain 0 (caller widens)
    hi: np.float32 | float
    min: np.float32 | float  # the observed extremes
    max: np.float32 | float


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """Every site's range, plus the histograms behind them (for plots)."""

    ranges: dict[str, ActRange]
    # site -> (counts, range lo, range hi): KL's of |x| over [0, top], REMOVAL_OUTLIER's
    # of x over [-top, top], top a power of two. Empty for MAX_MIN.
    histograms: dict[str, tuple[np.ndarray, np.float32 | float, np.float32 | float]]
    num_samples: int


def calibrate(
    site_activations: Callable[..., Mapping[str, jax.Array]],
    batches: Iterable[Any],
    method: str = "MAX_MIN",
    *,
    num_bins: int = 2048,
    outlier_percent: float = 1e-4,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
    rows_per_device: int = ROWS_PER_DEVICE,
) -> CalibrationResult:
    """Streams calibration batches through the model and picks every site's range.

    Rows are re-cut into microbatches of `rows_per_device` rows per device, so the
    result is bitwise the same whatever the batch sizes and however rows are split, and
    one program is compiled. Every method reads the data once, so `batches` may be a
    one-shot iterator.

    Args:
        site_activations: traceable `(*batch_args) -> {site name: activation}`; every
            activation has a leading row axis matching the inputs'.
        batches: tuples of positional arguments (a bare array is a 1-tuple), each with a
            leading batch axis; sizes may differ between batches.
        method: "MAX_MIN" (observed extremes), "KL" (TensorRT entropy threshold on a
            |x| histogram at least as fine as `num_bins` bins over `[0, max|x|]`) or
            "REMOVAL_OUTLIER" (quantiles).
        num_bins: KL histogram resolution (128..2048).
        outlier_percent: REMOVAL_OUTLIER: the fraction of values dropped at EACH end
            (1e-4 keeps the 0.01 %..99.99 % quantile range).
        progress: show a tqdm bar over the batches of each pass.
        devices: split each microbatch's rows over these devices (a 1-D data mesh,
            statistics all-reduced); None means all local devices. For several hosts see
            `jaxptq.calibrate.sharding`.
        rows_per_device: microbatch rows per device (fixed, so results never depend on
            the caller's batch sizes).

    Returns:
        A `CalibrationResult` with one `ActRange` per site.

    Raises:
        ValueError: empty calibration set; NaN or Inf in an activation (naming the site
            and batch); an unknown method or a bad option.

    Example:
        >>> fn = lambda x: {"relu": jax.nn.relu(x @ np.ones((3, 2), np.float32))}
        >>> batches = [(np.arange(6, dtype=np.float32).reshape(2, 3),)]
        >>> calibrate(fn, batches, progress=False).ranges["relu"].hi
        np.float32(12.0)
    """
    rule = make_method(method, num_bins=num_bins, outlier_percent=outlier_percent)
    if rows_per_device < 1:
        raise ValueError(f"`rows_per_device` must be >= 1, got {rows_per_device}.")
    mesh = sharding.data_mesh(devices)
    spec = rule.histogram
    common: dict[str, Any] = dict(rows_per_device=rows_per_device, progress=progress)
    hists: Histograms | None = None
    if spec is not None:  # the extremes and the counts together
        names, mins, maxs, hists, num_rows = _histogram_pass(
            site_activations, batches, mesh, spec.num_bins, spec.signed, common
        )
    else:
        observer = min_max()
        result = run_pass(
            site_activations,
            observer,
            lambda shapes: {n: observer.init() for n in shapes},
            batches,
            mesh,
            desc="calibrate",
            **common,
        )
        _check(result)
        extremes = sharding.fetch_replicated(result.stats)
        names = sorted(extremes)
        mins = np.array([extremes[n].min for n in names], np.float32)
        maxs = np.array([extremes[n].max for n in names], np.float32)
        num_rows = result.num_rows
    sel_lo, sel_hi = rule.select(mins, maxs, hists)
    ranges = {
        n: ActRange(np.float32(sel_lo[k]), np.float32(sel_hi[k]), mins[k], maxs[k])
        for k, n in enumerate(names)
    }
    histograms: dict[str, tuple[np.ndarray, np.float32 | float, np.float32 | float]] = {}
    if hists is not None:
        histograms = {
            n: (hists.counts[k], np.float32(hists.lo[k]), np.float32(hists.hi[k]))
            for k, n in enumerate(names)
        }
    return CalibrationResult(ranges, histograms, num_rows)


def _check(result: PassResult) -> None:
    """The errors a pass can only tell once it has seen the data."""
    if result.num_rows == 0:
        raise ValueError(
            "calibration set is empty: `batches` gave no rows; pass at least one batch "
            "with a leading batch axis of size >= 1."
        )
    if result.nonfinite is not None:
        site, index = result.nonfinite
        where = f"batch {index}" if index >= 0 else "a batch of another process"
        raise ValueError(
            f"site `{site}` produced NaN or Inf in {where}; check the model and the "
            f"calibration data (e.g. its preprocessing) for that batch."
        )


def _histogram_pass(
    site_fn: Callable[..., Mapping[str, jax.Array]],
    batches: Iterable[Any],
    mesh: jax.sharding.Mesh,
    num_bins: int,
    signed: bool,
    common: dict[str, Any],
) -> tuple[list[str], np.ndarray, np.ndarray, Histograms, int]:
    """Extremes and power-of-two-range counts of every site; int32 counts on the devices,
    drained into int64 on the host before they could overflow."""
    observer = pow2_histogram(signed)
    totals: dict[str, tuple[np.ndarray, np.float32]] = {}

    def drain(stats: dict[str, Pow2Histogram]) -> dict[str, Pow2Histogram]:
        fresh = {}
        for n, part in sharding.fetch_replicated(stats).items():
            counts, top = totals.get(n, (np.zeros(num_bins, np.int64), np.float32(0)))
            totals[n] = merge_counts(counts, top, part.counts, part.top, signed)
            fresh[n] = part._replace(counts=np.zeros_like(part.counts))
        return fresh

    result = run_pass(
        site_fn,
        observer,
        lambda shapes: {n: observer.init(num_bins) for n in shapes},
        batches,
        mesh,
        desc="calibrate",
        drain=drain,
        drain_elements=MAX_COUNT,
        **common,
    )
    _check(result)
    last = drain(result.stats)
    names = sorted(last)
    mins = np.array([last[n].min for n in names], np.float32)
    maxs = np.array([last[n].max for n in names], np.float32)
    counts = np.stack([totals[n][0] for n in names])
    tops = np.array([totals[n][1] for n in names], np.float32)
    lows = -tops if signed else np.zeros_like(tops)
    return names, mins, maxs, Histograms(counts, lows, tops), result.num_rows
