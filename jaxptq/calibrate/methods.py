"""Range-selection methods: each a frozen dataclass turning site statistics into ranges."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Protocol

import numpy as np

from jaxptq.calibrate.kl import MAX_BINS, NUM_LEVELS, kl_divergences
from jaxptq.calibrate.percentile import OUTLIER_BINS, histogram_quantiles

Ranges = tuple[np.ndarray, np.ndarray]  # (lo, hi) per site, float32


@dataclasses.dataclass(frozen=True)
class HistogramSpec:
    """The histogram a method needs, taken in the same pass as the extremes over a
    power-of-two range that grows as needed (`jaxptq.calibrate.histogram.pow2_histogram`):
    |x| over `[0, top]`, or x over `[-top, top]` when `signed`; `top` is the power of two
    at or above max |x|."""

    num_bins: int
    signed: bool


class Histograms(NamedTuple):
    """Every site's counts and the range they cover."""

    counts: np.ndarray  # (sites, num_bins) int64
    lo: np.ndarray  # (sites,) float32 left edge of bin 0
    hi: np.ndarray  # (sites,) float32 right edge of the last bin


class Method(Protocol):
    """What `calibrate` needs from a method: an optional histogram, then a selection."""

    name: ClassVar[str]

    @property
    def histogram(self) -> HistogramSpec | None: ...

    def select(self, mins: np.ndarray, maxs: np.ndarray, hists: Histograms | None) -> Ranges:
        """Per-site `(lo, hi)` from observed extremes and (if any) histograms."""
        ...


@dataclasses.dataclass(frozen=True)
class MaxMin:
    """The observed extremes, nothing clipped."""

    name: ClassVar[str] = "MAX_MIN"

    @property
    def histogram(self) -> HistogramSpec | None:
        return None

    def select(self, mins: np.ndarray, maxs: np.ndarray, hists: Histograms | None) -> Ranges:
        return mins, maxs


@dataclasses.dataclass(frozen=True)
class KL:
    """TensorRT entropy calibration: the |x| threshold whose int8 image loses least (KL).

    The histogram has `2 * num_bins` bins over a power-of-two range `[0, top]` with
    `max|x| <= top < 2 max|x|`, so its bins are at least as fine as TensorRT's `num_bins`
    over `[0, max|x|]`, and it is collected in the same pass as the extremes. The search
    runs over the bins up to the one holding max|x| (see `jaxptq.calibrate.kl`). The
    range is `[-t, t]` narrowed to the observed `[min, max]` (so a ReLU output gets
    `[0, t]`).
    """

    name: ClassVar[str] = "KL"
    num_bins: int = 2048

    def __post_init__(self) -> None:
        if not NUM_LEVELS <= self.num_bins <= MAX_BINS // 2:
            raise ValueError(
                f"KL `num_bins` = {self.num_bins} is out of range {NUM_LEVELS}..{MAX_BINS // 2}."
            )

    @property
    def histogram(self) -> HistogramSpec | None:
        return HistogramSpec(2 * self.num_bins, signed=False)

    def select(self, mins: np.ndarray, maxs: np.ndarray, hists: Histograms | None) -> Ranges:
        assert hists is not None
        # Exact zeros (ReLU, padding) pile up in bin 0; merged into a level with its
        # neighbours they dominate the divergence and push the threshold down. NVIDIA's
        # pytorch-quantization entropy calibrator sets bin 0 to bin 1 for this reason.
        counts = np.array(hists.counts, copy=True)
        has_more = counts[:, 1:].sum(axis=1) > 0
        counts[has_more, 0] = counts[has_more, 1]
        bins = counts.shape[1]
        width = (np.asarray(hists.hi, np.float32) / np.float32(bins)).astype(np.float32)
        absmax = np.maximum(np.abs(mins), np.abs(maxs)).astype(np.float32)
        # The bin holding max|x| is the last candidate (width is a power of two: exact).
        last = np.floor(absmax / np.where(width > 0, width, np.float32(1)))
        stops = np.clip(last, 0, bins - 1).astype(np.int64) + 1
        best, _ = kl_divergences(counts, balanced=True, stops=stops)
        t = np.where(width > 0, best.astype(np.float32) * width, np.float32(0))
        return np.maximum(-t, mins).astype(np.float32), np.minimum(t, maxs).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RemovalOutlier:
    """Drops `outlier_percent` of the values at each end: a fraction, 1e-4 is 0.01 %.

    The quantiles come from a fine histogram (`OUTLIER_BINS` bins of x over `[-top, top]`,
    `top` the power of two at or above max |x|) and match `np.quantile` of all values to
    half a bin width; they are kept inside the observed `[min, max]`, as `np.quantile`'s.
    """

    name: ClassVar[str] = "REMOVAL_OUTLIER"
    outlier_percent: float = 1e-4

    def __post_init__(self) -> None:
        if not 0.0 <= self.outlier_percent < 0.5:
            raise ValueError(
                f"`outlier_percent` = {self.outlier_percent} must be a fraction in [0, 0.5) "
                f"dropped at each end (1e-4 drops 0.01 % per side)."
            )

    @property
    def histogram(self) -> HistogramSpec | None:
        return HistogramSpec(OUTLIER_BINS, signed=True)

    def select(self, mins: np.ndarray, maxs: np.ndarray, hists: Histograms | None) -> Ranges:
        assert hists is not None
        lo = histogram_quantiles(hists.counts, hists.lo, hists.hi, self.outlier_percent)
        hi = histogram_quantiles(hists.counts, hists.lo, hists.hi, 1.0 - self.outlier_percent)
        lo, hi = np.clip(lo, mins, maxs), np.clip(hi, mins, maxs)
        return lo.astype(np.float32), hi.astype(np.float32)


METHODS: dict[str, type] = {m.name: m for m in (KL, MaxMin, RemovalOutlier)}


def make_method(name: str, *, num_bins: int, outlier_percent: float) -> Method:
    """The method called `name` ("MAX_MIN", "KL" or "REMOVAL_OUTLIER")."""
    if name == "KL":
        return KL(num_bins)
    if name == "REMOVAL_OUTLIER":
        return RemovalOutlier(outlier_percent)
    if name == "MAX_MIN":
        return MaxMin()
    raise ValueError(
        f"calibration `method` = {name!r} is not valid; choose one of {', '.join(sorted(METHODS))}."
    )
