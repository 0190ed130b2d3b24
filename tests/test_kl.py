"""KL threshold search against a plain NumPy transcription of MXNet's `_get_optimal_threshold`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxptq.calibrate import kl_divergences
from jaxptq.calibrate.kl import MAX_BINS, NUM_LEVELS, balanced_candidates

TIE = 1e-12  # only exact ties (KL plateaus at 0) are this close; float noise is ~1e-15


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """MXNet `_smooth_distribution`: eps onto zero bins, taken off the nonzero ones."""
    zeros = p == 0
    nonzeros = p.size - zeros.sum()
    if nonzeros == 0:
        return None
    eps1 = eps * zeros.sum() / nonzeros
    assert eps1 < 1.0
    out = p + eps * zeros - eps1 * ~zeros
    assert (out > 0).all()
    return out


def _entropy(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def reference_kl(hist: np.ndarray, num_levels: int = NUM_LEVELS) -> tuple[int, np.ndarray]:
    """The published algorithm on a |x| histogram, one candidate at a time, in float64."""
    hist = np.asarray(hist, np.float64)
    divergences = []
    for i in range(num_levels, hist.size + 1):
        sliced = hist[:i]
        p = sliced.copy()
        p[-1] += hist[i:].sum()  # outliers into the last bin
        nonzero = p != 0
        merged = i // num_levels
        starts = np.arange(num_levels) * merged
        stops = np.append(starts[1:], i)  # the last level takes the remainder
        levels = np.add.reduceat(sliced, starts)
        norms = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.divide(levels, norms, out=np.zeros(num_levels), where=norms != 0)
        q = np.repeat(per_bin, stops - starts)
        q[~nonzero] = 0  # Q is zero where P is
        ps, qs = _smooth(p), _smooth(q)
        divergences.append(np.inf if qs is None or ps is None else _entropy(ps, qs))
    kl = np.array(divergences)
    best = int(np.flatnonzero(kl <= kl.min() + TIE)[0])
    return best + num_levels, kl


def _check(hists: np.ndarray) -> None:
    best, kl = kl_divergences(hists)
    for s, hist in enumerate(hists):
        ref_best, ref_kl = reference_kl(hist)
        assert best[s] == ref_best, f"histogram {s}: chose {best[s]} bins, reference {ref_best}"
        np.testing.assert_array_equal(np.isinf(kl[s]), np.isinf(ref_kl))
        finite = np.isfinite(ref_kl)
        np.testing.assert_allclose(kl[s][finite], ref_kl[finite], rtol=1e-9, atol=1e-12)


def _activation_hist(x: np.ndarray, num_bins: int = 2048) -> np.ndarray:
    a = np.abs(x.ravel())
    return np.histogram(a, num_bins, range=(0.0, float(a.max())))[0]


@st.composite
def histograms(draw: st.DrawFn) -> np.ndarray:
    """Shapes seen in practice, plus sparse and tiny-count ones that stress the smoothing."""
    num_bins = draw(st.sampled_from([256, 2048]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["exponential", "uniform", "sparse", "spikes"]))
    scale = draw(st.sampled_from([3, 200, 10**7]))
    k = np.arange(num_bins)
    if kind == "exponential":
        hist = rng.poisson(scale * np.exp(-k / rng.uniform(5, num_bins / 2)))
    elif kind == "uniform":
        hist = rng.integers(0, scale + 1, num_bins)
    elif kind == "sparse":
        hist = rng.integers(1, scale + 1, num_bins) * (rng.random(num_bins) < 0.03)
    else:
        hist = np.zeros(num_bins, np.int64)
        hist[rng.integers(0, num_bins, 5)] = rng.integers(1, scale + 1, 5)
    if draw(st.booleans()):
        hist[-1] = max(hist[-1], 1)  # the maximum sits in the last bin, as in calibration
    if hist.sum() == 0:
        hist[0] = 1
    return hist.astype(np.int64)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hist=histograms())
def test_matches_reference_on_random_histograms(hist: np.ndarray) -> None:
    _check(hist[None])


def test_matches_reference_on_hand_made_edge_cases() -> None:
    cases = np.zeros((5, 256), np.int64)
    cases[0, 0] = 100  # all mass at zero: every candidate is exact
    cases[1, [0, 255]] = [100, 1]  # one far outlier
    cases[2, [3, 200, 255]] = [100, 3, 1]  # last level fed by outliers alone
    cases[3, :128] = 1  # KL 0 plateau over several candidates
    cases[4] = 7  # flat
    _check(cases)


def test_matches_reference_on_mnist_activations(shared_data) -> None:
    """Real |x| histograms of every intermediate tensor of the ONNX zoo MNIST CNN."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from jaxptq.datasets import load_mnist_5k

    model = onnx.load(str(shared_data / "models" / "mnist-8.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    wanted = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Add", "Relu")]
    infos = {v.name: v for v in inferred.graph.value_info}
    model.graph.output.extend(infos[n] for n in wanted if n in infos)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, _ = load_mnist_5k(shared_data / "mnist_5k.csv.gz")
    names = [o.name for o in session.get_outputs()]
    acts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for row in x[:64].astype(np.float32):
        for n, a in zip(names, session.run(None, {"Input3": row[None]}), strict=True):
            acts[n].append(a)
    hists = np.stack([_activation_hist(np.concatenate(acts[n])) for n in names])
    assert len(hists) >= 7
    _check(hists)


def test_thresholds_of_clipped_distributions() -> None:
    """A Gaussian with a few far outliers: the threshold clips them, keeping the bulk."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0, 38.0]])
    hist = _activation_hist(x)
    best, _ = kl_divergences(hist[None])
    threshold = best[0] * 40.0 / 2048
    assert 4.0 < threshold < 10.0, threshold  # max |x| is 40


def test_rejects_bad_histograms() -> None:
    with pytest.raises(ValueError, match="num_bins"):
        kl_divergences(np.ones((1, NUM_LEVELS - 1)))
    with pytest.raises(ValueError, match="num_bins"):
        kl_divergences(np.ones((1, MAX_BINS + 1)))
    with pytest.raises(ValueError, match="integer counts"):
        kl_divergences(np.full((1, 256), 0.5))
    with pytest.raises(ValueError, match="empty"):
        kl_divergences(np.zeros((2, 256)))
    with pytest.raises(ValueError, match=r"\(sites, num_bins\)"):
        kl_divergences(np.ones(256))


def test_balanced_search_skips_remainder_heavy_candidates() -> None:
    """MXNet's merge lets the last level swallow the remainder (at i = 255 it holds 128
    bins); the balanced search never chooses such a candidate, and on histograms where
    MXNet's choice is balanced anyway both agree."""
    mask = balanced_candidates(2048)
    assert mask[255 - 128] == np.False_ and mask[256 - 128] and mask[2048 - 128]
    rng = np.random.default_rng(0)
    relu6 = np.clip(np.abs(rng.standard_t(3, size=200_000)) * 0.4, 0, 6)
    hist = _activation_hist(relu6)[None]
    best, kl = kl_divergences(hist, balanced=True)
    i = best[0]
    assert mask[i - 128]
    assert kl[0, i - 128] == np.min(np.where(mask, kl[0], np.inf))


def test_stops_search_the_occupied_prefix() -> None:
    """A histogram over a power-of-two range with empty top bins: stopping the search at
    the last occupied bin is the reference search of that prefix."""
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_t(4, size=100_000))
    top = 2.0 ** np.ceil(np.log2(x.max()))
    hist = np.histogram(x, 4096, range=(0.0, top))[0]
    stop = int(np.flatnonzero(hist)[-1]) + 1
    assert 2048 < stop < 4096
    best, kl = kl_divergences(hist[None], stops=np.array([stop]))
    ref_best, ref_kl = reference_kl(hist[:stop])
    assert best[0] == ref_best
    assert np.isinf(kl[0, stop - NUM_LEVELS + 1 :]).all()
    np.testing.assert_allclose(kl[0, : stop - NUM_LEVELS + 1], ref_kl, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="stops"):
        kl_divergences(hist[None], stops=np.array([4097]))
