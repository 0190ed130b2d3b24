"""Quantiles read from fine histograms, for REMOVAL_OUTLIER clipping."""

from __future__ import annotations

import numpy as np

from jaxptq.calibrate.histogram import bin_centers

# Fine bins of x over [-top, top], top < 2 max|x|: the quantile is off by at most half a
# bin, under 1.6e-5 of max|x| (as fine as the 65,536 bins over [min, max] a first min/max
# pass would allow, for a range symmetric about 0; at most twice as coarse otherwise).
OUTLIER_BINS = 1 << 17


def histogram_quantiles(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, q: float) -> np.ndarray:
    """Each site's `q`-quantile, matching `np.quantile(values, q)` to half a bin width.

    `np.quantile` (method "linear") interpolates between the order statistics `k` and
    `k + 1` around position `q * (n - 1)`. The histogram tells in which bin each order
    statistic lies, so the same interpolation between those bins' centres is within half
    a bin of the exact answer, however far apart the two order statistics are.

    Args:
        counts: `(sites, num_bins)` integer counts over `[lo, hi]` per site.
        lo: `(sites,)` left edges.
        hi: `(sites,)` right edges.
        q: the quantile, in [0, 1].

    Returns:
        `(sites,)` float64 estimates, clipped to `[lo, hi]`.
    """
    counts = np.asarray(counts, np.int64)
    n = counts.sum(axis=1)
    pos = q * (n - 1).astype(np.float64)
    k = np.floor(pos)
    frac = pos - k
    cum = np.cumsum(counts, axis=1)
    # The bin of order statistic k (0-based) is the first whose inclusive count exceeds k.
    first = np.sum(cum <= k[:, None], axis=1)
    second = np.sum(cum <= np.minimum(k + 1, n - 1)[:, None], axis=1)
    centers = bin_centers(counts.shape[1], lo, hi)
    rows = np.arange(counts.shape[0])
    c0, c1 = centers[rows, first], centers[rows, second]
    return np.clip(c0 + frac * (c1 - c0), np.asarray(lo, np.float64), np.asarray(hi, np.float64))
