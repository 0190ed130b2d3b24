"""KL (TensorRT entropy) threshold search over every site's |x| histogram in one program.

The algorithm is MXNet's `_get_optimal_threshold` (the reference TensorRT's calibrator and
onnxruntime's `HistogramCollector.get_entropy_threshold` follow), applied to a histogram of
|x| over `[0, absmax]` as in NVIDIA's GTC 2017 talk: for each candidate `i` of
`num_levels..num_bins` bins,

- P is `hist[:i]` with the outlier mass `sum(hist[i:])` folded into its last bin;
- Q merges `hist[:i]` (outliers excluded) into `num_levels` levels of `i // num_levels`
  bins (the last level takes the remainder), then spreads each level's mass evenly over
  the bins of the level where P is nonzero (zero bins of P stay zero in Q);
- both are smoothed as MXNet's `_smooth_distribution` does (eps = 1e-4 put on zero bins,
  taken off the nonzero ones in equal parts), and the candidate's score is KL(P || Q) of
  the normalised vectors; a Q with no mass at all scores +inf;
- the first candidate with the smallest score wins and its threshold is the bin edge
  `i * bin_width` (MXNet's `hist_edges[p_bin_idx_stop]`).

Why not a loop: every candidate's KL is written with prefix sums. The smoothing shift of
P (`eps1`) changes with the candidate, so the sum of `(h - eps1) log(h - eps1)` over the
nonzero bins is taken exactly for small integer counts (prefix counts per value) and by a
short Taylor series in `eps1 / h` for large ones (error < 1e-15 per bin up to 4096 bins).
Candidates sharing `i // num_levels` share all levels but the last, so the level sums are
one small table per group, not a gather per candidate and level. The result is an
O(num_bins * num_levels) program per site, run over all sites with `lax.map` (1.4 ms a
site on XLA:CPU against 2.4 ms under `vmap`, 64 sites of 2048 bins). It runs in float64:
the KL curve is often flat near its minimum and float32 rounding (1e-7) can move the
argmin to a neighbouring candidate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NUM_LEVELS = 128  # quantized levels on one side of zero for int8
MAX_BINS = 4096  # smoothing stays positive (MXNet's assert) and the series exact up to here
_EPS = 1e-4  # MXNet's smoothing eps
_SMALL = 32  # counts below this get an exact x log x through per-value prefix counts
_TAYLOR = 8  # series terms for counts >= _SMALL: eps1 / h <= 0.013 at MAX_BINS
_TIE = 1e-12  # KL values this close are equal: float64 noise here is below 1e-14


def _xlogx(x: jax.Array | np.ndarray) -> jax.Array:
    safe = jnp.where(x > 0, x, 1.0)
    return jnp.where(x > 0, safe * jnp.log(safe), 0.0)


def _prefix(rows: jax.Array) -> jax.Array:
    """Exclusive prefix sums along the last axis: out[..., k] = sum(rows[..., :k])."""
    zero = jnp.zeros(rows.shape[:-1] + (1,), rows.dtype)
    return jnp.concatenate([zero, jnp.cumsum(rows, axis=-1)], axis=-1)


def _shifted_xlogx_sums(h: jax.Array, shift: jax.Array | np.ndarray, stop: np.ndarray) -> jax.Array:
    """sum(g(h[k] - shift[c]) for k < stop[c] if h[k] != 0) per candidate c, g(x) = x log x."""
    values = np.arange(1, _SMALL, dtype=np.float64)
    # Exact part: how many bins hold each small count, times g(count - shift).
    small_counts = _prefix((h[None, :] == values[:, None]).astype(h.dtype))[:, stop]
    small = jnp.sum(small_counts.T * _xlogx(values[None, :] - shift[:, None]), axis=1)
    # Series part: g(h - a) = g(h) - a (log h + 1) + sum_n a^n / (n (n - 1)) h^(1 - n).
    big = h >= _SMALL
    hb = jnp.where(big, h, 1.0)
    log_h = jnp.log(hb)
    inv = jnp.where(big, 1.0 / hb, 0.0)
    powers = [jnp.where(big, hb * log_h, 0.0), jnp.where(big, log_h + 1.0, 0.0)]
    powers += [inv ** (n - 1) for n in range(2, _TAYLOR + 1)]  # integer powers: multiplies
    stats = _prefix(jnp.stack(powers))[:, stop]  # (terms, candidates)
    n = np.arange(2, _TAYLOR + 1)
    coef = [jnp.ones_like(shift), -shift] + [shift**k / (k * (k - 1)) for k in n]
    return small + jnp.sum(stats * jnp.stack(coef), axis=0)


def _divergences(h: jax.Array, num_levels: int) -> jax.Array:
    """KL(P || Q) of every candidate `i = num_levels..num_bins` of one histogram."""
    num_bins = h.shape[0]
    # Candidates come in `groups` of `num_levels` that merge the same `m = i // num_levels`
    # bins a level, so the first num_levels - 1 levels of a group are shared: one small
    # (groups, levels) table instead of a gather per candidate and level.
    groups = num_bins // num_levels
    i = np.arange(num_levels, num_levels * (groups + 1))  # padded past num_bins
    ic = np.minimum(i, num_bins)
    merged = i // num_levels
    total = h.sum()
    cum = _prefix(h)  # cum[k]: mass of bins < k
    nonzero = (h != 0).astype(h.dtype)
    cnz = _prefix(nonzero)  # cnz[k]: nonzero bins < k

    # P: hist[:i], outliers folded into its last bin i - 1.
    outliers = total - cum[ic]
    p_last = h[ic - 1] + outliers
    last_nz = (p_last != 0).astype(h.dtype)
    nnz_p = cnz[ic - 1] + last_nz
    eps_p = _EPS * (ic - nnz_p) / nnz_p

    # The last level: bins [(levels - 1) m, i), its last bin counted as P's.
    start = (num_levels - 1) * merged
    mass_last = cum[ic] - cum[start]
    nz_last = cnz[ic - 1] - cnz[start] + last_nz
    edge = (mass_last == 0) & (nz_last > 0)  # fed by outliers alone: Q's bin is 0 there
    zeros_q = ic - nnz_p + jnp.where(edge, nz_last, 0.0)
    nnz_q = ic - zeros_q
    eps_q = _EPS * zeros_q / jnp.maximum(nnz_q, 1.0)
    q_last = jnp.log(jnp.where(nz_last > 0, mass_last / jnp.maximum(nz_last, 1.0) - eps_q, 1.0))
    q_last = jnp.where(edge, np.log(_EPS), q_last)
    cross = (mass_last + outliers - eps_p * nz_last) * q_last

    # The other levels: bins [j m, (j + 1) m), shared by the group; P's nonzero bins there
    # get Q = mass / nonzeros - eps_q, and weigh P's smoothed mass mass - eps_p nonzeros.
    edges = np.arange(num_levels)[None, :] * np.arange(1, groups + 1)[:, None]
    mass = cum[edges[:, 1:]] - cum[edges[:, :-1]]  # (groups, levels - 1)
    nzs = cnz[edges[:, 1:]] - cnz[edges[:, :-1]]
    value = jnp.where(nzs > 0, mass / jnp.maximum(nzs, 1.0), 1.0)  # >= 1: counts are >= 1
    a = eps_p.reshape(groups, num_levels, 1)
    b = eps_q.reshape(groups, num_levels, 1)
    main = (mass[:, None, :] - a * nzs[:, None, :]) * jnp.log(value[:, None, :] - b)
    cross = cross + jnp.sum(main, axis=-1).reshape(-1)

    self_term = _shifted_xlogx_sums(h, eps_p, ic - 1) + last_nz * _xlogx(p_last - eps_p)
    # sum(P') = total and sum(Q') = total - outliers: smoothing keeps each sum.
    kl = (self_term - cross) / total + jnp.log(cum[ic] / total)
    kl = jnp.where(nnz_q > 0, kl, jnp.inf)
    return kl[: num_bins - num_levels + 1]


def balanced_candidates(num_bins: int, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """Which candidates `i` merge no level from more than twice the bins of the others.

    MXNet's merge gives the last level the remainder: at `i = 255` (128 levels) levels 0-126
    hold one bin each and the last holds 128, and the expanded Q flattens that wide level
    into a uniform spread that P (mostly zeros and small values, as after ReLU6) happens
    to match well. On EfficientNet-Lite0 such candidates won almost every ReLU6 site and
    clipped 6.0 to 0.75 (top-1 fell to 1 %). Keeping candidates whose remainder is at most
    one level's width (`i % L <= i // L`) removes the artifact and keeps 152 of the 1921
    candidates of a 2048-bin histogram, dense where thresholds are small.
    """
    i = np.arange(num_levels, num_bins + 1)
    return i % num_levels <= i // num_levels


@functools.partial(jax.jit, static_argnames=("num_levels", "balanced"))
def _search(
    hists: jax.Array, stops: jax.Array, num_levels: int, balanced: bool
) -> tuple[jax.Array, jax.Array]:
    kl = lax.map(functools.partial(_divergences, num_levels=num_levels), hists)
    candidates = np.arange(num_levels, hists.shape[1] + 1)
    allowed = candidates[None, :] <= stops[:, None]
    if balanced:
        allowed = allowed & balanced_candidates(hists.shape[1], num_levels)[None, :]
    kl = jnp.where(allowed, kl, jnp.inf)
    # The first candidate within float noise of the minimum: exact ties (KL = 0 for
    # several candidates of a sparse histogram) then resolve as NumPy's argmin does.
    tied = kl <= jnp.min(kl, axis=1, keepdims=True) + _TIE
    return jnp.argmax(tied, axis=1) + num_levels, kl


def kl_divergences(
    hists: np.ndarray,
    num_levels: int = NUM_LEVELS,
    *,
    balanced: bool = False,
    stops: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Finds every histogram's KL-optimal number of bins, all histograms in one program.

    Args:
        hists: `(sites, num_bins)` integer counts of |x| over `[0, absmax]`, bin 0 at zero.
        num_levels: quantized levels on one side of zero (128 for int8).
        balanced: choose only among `balanced_candidates` (what `jaxptq`'s KL method
            uses); False is MXNet's search over every candidate.
        stops: `(sites,)` the last candidate of each site (default `num_bins`); `kl`
            is +inf past it. When the bins past it are empty (a power-of-two range
            above the data), this is the search of `hists[s, :stops[s]]`.

    Returns:
        `(best, kl)`: `best[s]` is the chosen bin count `i` (threshold `i * absmax /
        num_bins`), `kl[s, i - num_levels]` the divergence of candidate `i` (float64).

    Example:
        >>> hist = np.round(1e4 * np.exp(-np.arange(2048) / 100.0))
        >>> hist[-1] = 1  # the maximum lands in the last bin
        >>> best, _ = kl_divergences(hist[None])
        >>> int(best[0])
        992
    """
    hists = np.asarray(hists)
    if hists.ndim != 2:
        raise ValueError(f"`hists` must be (sites, num_bins), got shape {hists.shape}.")
    num_bins = hists.shape[1]
    if not num_levels <= num_bins <= MAX_BINS:
        raise ValueError(
            f"KL search needs num_levels ({num_levels}) <= num_bins <= {MAX_BINS}, "
            f"got num_bins = {num_bins}."
        )
    counts = hists.astype(np.float64)
    if np.any(counts < 0) or np.any(counts != np.round(counts)):
        raise ValueError("`hists` must hold non-negative integer counts.")
    if np.any(counts.sum(axis=1) == 0):
        raise ValueError(f"`hists` rows {np.flatnonzero(counts.sum(axis=1) == 0)} are empty.")
    if hists.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros((0, num_bins - num_levels + 1))
    stop = np.full(hists.shape[0], num_bins) if stops is None else np.asarray(stops, np.int64)
    if stop.shape != (hists.shape[0],) or np.any(stop < 1) or np.any(stop > num_bins):
        raise ValueError(f"`stops` must be (sites,) values in 1..{num_bins}, got {stop}.")
    # Pad the site count to a power of two (at least 8) with a harmless histogram, so few
    # shapes are ever compiled (a compile costs ~2 s, a padded site ~2 ms).
    sites = counts.shape[0]
    padded = np.zeros((max(8, 1 << (sites - 1).bit_length()), num_bins))
    padded[:sites], padded[sites:, 0] = counts, 1.0
    padded_stops = np.full(padded.shape[0], num_bins, np.int64)
    padded_stops[:sites] = stop
    with jax.enable_x64(True):
        best, kl = _search(jnp.asarray(padded), jnp.asarray(padded_stops), num_levels, balanced)
        return np.asarray(best, np.int64)[:sites], np.asarray(kl)[:sites]
