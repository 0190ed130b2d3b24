"""Calibration: per-site activation ranges from streamed batches (MAX_MIN, KL, REMOVAL_OUTLIER).

Pass 1 folds every site's min and max (and a NaN/Inf check) into running statistics,
one jitted step per fixed-size microbatch; KL and REMOVAL_OUTLIER add a pass 2 that
histograms each site over the range pass 1 found, then pick ranges from the histograms.
No activation outlives its step. See docs/calibration.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxptq.calibrate import sharding
from jaxptq.calibrate.histogram import MAX_COUNT, Histogram, histogram
from jaxptq.calibrate.kl import kl_divergences
from jaxptq.calibrate.methods import KL, MaxMin, Method, RemovalOutlier, make_method
from jaxptq.calibrate.observers import Observer, min_max
from jaxptq.calibrate.percentile import histogram_quantiles
from jaxptq.calibrate.stream import ROWS_PER_DEVICE, as_batch, run_pass

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
    "histogram",
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
    # site -> (counts, range lo, range hi); KL histograms are of |x|. Empty for MAX_MIN.
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
    one program is compiled per pass. KL and REMOVAL_OUTLIER need two passes: a one-shot
    iterator is then read once into a list of host arrays (activations are never kept).

    Args:
        site_activations: traceable `(*batch_args) -> {site name: activation}`; every
            activation has a leading row axis matching the inputs'.
        batches: tuples of positional arguments (a bare array is a 1-tuple), each with a
            leading batch axis; sizes may differ between batches.
        method: "MAX_MIN" (observed extremes), "KL" (TensorRT entropy threshold on a
            `num_bins` |x| histogram) or "REMOVAL_OUTLIER" (quantiles).
        num_bins: KL histogram bins (128..4096).
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
    if spec is not None and not isinstance(batches, Sequence):
        batches = [as_batch(b, k) for k, b in enumerate(batches)]  # read once, two passes
    common = dict(rows_per_device=rows_per_device, progress=progress)

    observer = min_max()
    first = run_pass(
        site_activations,
        observer,
        lambda shapes: {n: observer.init() for n in shapes},
        batches,
        mesh,
        desc="calibrate: min/max",
        **common,  # type: ignore[arg-type]
    )
    if first.num_rows == 0:
        raise ValueError(
            "calibration set is empty: `batches` gave no rows; pass at least one batch "
            "with a leading batch axis of size >= 1."
        )
    if first.nonfinite is not None:
        site, index = first.nonfinite
        where = f"batch {index}" if index >= 0 else "a batch of another process"
        raise ValueError(
            f"site `{site}` produced NaN or Inf in {where}; check the model and the "
            f"calibration data (e.g. its preprocessing) for that batch."
        )
    extremes = sharding.fetch_replicated(first.stats)
    names = sorted(extremes)
    mins = np.array([extremes[n].min for n in names], np.float32)
    maxs = np.array([extremes[n].max for n in names], np.float32)

    counts: np.ndarray | None = None
    histograms: dict[str, tuple[np.ndarray, np.float32 | float, np.float32 | float]] = {}
    if spec is not None:
        lo, hi = spec.ranges(mins, maxs)
        per_site = _histogram_pass(
            site_activations,
            batches,
            mesh,
            spec.num_bins,
            spec.absolute,
            dict(zip(names, zip(lo, hi, strict=True), strict=True)),
            common,
        )
        counts = np.stack([per_site[n] for n in names])
        histograms = {
            n: (counts[k], np.float32(lo[k]), np.float32(hi[k])) for k, n in enumerate(names)
        }
    sel_lo, sel_hi = rule.select(mins, maxs, counts)
    ranges = {
        n: ActRange(np.float32(sel_lo[k]), np.float32(sel_hi[k]), mins[k], maxs[k])
        for k, n in enumerate(names)
    }
    return CalibrationResult(ranges, histograms, first.num_rows)


def _histogram_pass(
    site_fn: Callable[..., Mapping[str, jax.Array]],
    batches: Iterable[Any],
    mesh: jax.sharding.Mesh,
    num_bins: int,
    absolute: bool,
    bounds: dict[str, tuple[float, float]],
    common: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Pass 2: int32 counts on the devices, drained into int64 on the host before overflow."""
    observer = histogram(absolute)
    total = {n: np.zeros(num_bins, np.int64) for n in bounds}

    def fresh(_: Any = None) -> dict[str, Histogram]:
        return {n: observer.init(num_bins, lo, hi) for n, (lo, hi) in bounds.items()}

    def drain(stats: dict[str, Histogram]) -> dict[str, Histogram]:
        for n, part in sharding.fetch_replicated(stats).items():
            total[n] += part.counts
        return fresh()

    result = run_pass(
        site_fn,
        observer,
        fresh,
        batches,
        mesh,
        desc="calibrate: histograms",
        drain=drain,
        drain_elements=MAX_COUNT,
        **common,
    )
    drain(result.stats)
    return total
