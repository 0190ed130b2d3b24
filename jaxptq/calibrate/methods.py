"""Range-selection methods: each a frozen dataclass turning site statistics into ranges."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import numpy as np

from jaxptq.calibrate.kl import MAX_BINS, NUM_LEVELS, kl_divergences
from jaxptq.calibrate.percentile import OUTLIER_BINS, histogram_quantiles

Ranges = tuple[np.ndarray, np.ndarray]  # (lo, hi) per site, float32


@dataclasses.dataclass(frozen=True)
class HistogramSpec:
    """The histogram a method needs in its second pass."""

    num_bins: int
    absolute: bool  # |x| over [0, max |x|]; otherwise x over [min, max]

    def ranges(self, mins: np.ndarray, maxs: np.ndarray) -> Ranges:
        if self.absolute:
            return np.zeros_like(mins), np.maximum(np.abs(mins), np.abs(maxs))
        return mins, maxs


class Method(Protocol):
    """What `calibrate` needs from a method: an optional histogram, then a selection."""

    name: ClassVar[str]

    @property
    def histogram(self) -> HistogramSpec | None: ...

    def select(self, mins: np.ndarray, maxs: np.ndarray, counts: np.ndarray | None) -> Ranges:
        """Per-site `(lo, hi)` from observed extremes and (if any) histogram counts."""
        ...


@dataclasses.dataclass(frozen=True)
class MaxMin:
    """The observed extremes, nothing clipped."""

    name: ClassVar[str] = "MAX_MIN"

    @property
    def histogram(self) -> HistogramSpec | None:
        return None

    def select(self, mins: np.ndarray, maxs: np.ndarray, counts: np.ndarray | None) -> Ranges:
        return mins, maxs


@dataclasses.dataclass(frozen=True)
class KL:
    """TensorRT entropy calibration: the |x| threshold whose int8 image loses least (KL).

    The range is `[-t, t]` narrowed to the observed `[min, max]` (so a ReLU output gets
    `[0, t]`); see `jaxptq.calibrate.kl` for the search.
    """

    name: ClassVar[str] = "KL"
    num_bins: int = 2048

    def __post_init__(self) -> None:
        if not NUM_LEVELS <= self.num_bins <= MAX_BINS:
            raise ValueError(
                f"KL `num_bins` = {self.num_bins} is out of range {NUM_LEVELS}..{MAX_BINS}."
            )

    @property
    def histogram(self) -> HistogramSpec | None:
        return HistogramSpec(self.num_bins, absolute=True)

    def select(self, mins: np.ndarray, maxs: np.ndarray, counts: np.ndarray | None) -> Ranges:
        assert counts is not None
        # Exact zeros (ReLU, padding) pile up in bin 0; merged into a level with its
        # neighbours they dominate the divergence and push the threshold down. NVIDIA's
        # pytorch-quantization entropy calibrator sets bin 0 to bin 1 for this reason.
        counts = np.array(counts, copy=True)
        has_more = counts[:, 1:].sum(axis=1) > 0
        counts[has_more, 0] = counts[has_more, 1]
        best, _ = kl_divergences(counts, balanced=True)
        absmax = np.maximum(np.abs(mins), np.abs(maxs)).astype(np.float32)
        t = best.astype(np.float32) * (absmax / np.float32(self.num_bins))
        return np.maximum(-t, mins).astype(np.float32), np.minimum(t, maxs).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RemovalOutlier:
    """Drops `outlier_percent` of the values at each end: a fraction, 1e-4 is 0.01 %.

    The quantiles come from a fine histogram (`OUTLIER_BINS` bins over `[min, max]`)
    and match `np.quantile` of all values to half a bin width.
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
        return HistogramSpec(OUTLIER_BINS, absolute=False)

    def select(self, mins: np.ndarray, maxs: np.ndarray, counts: np.ndarray | None) -> Ranges:
        assert counts is not None
        lo = histogram_quantiles(counts, mins, maxs, self.outlier_percent)
        hi = histogram_quantiles(counts, mins, maxs, 1.0 - self.outlier_percent)
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
