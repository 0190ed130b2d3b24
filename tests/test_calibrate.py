"""calibrate(): exact statistics, split and device invariance, errors, on real activations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxptq
import jaxptq.calibrate as cal
from jaxptq.calibrate import ActRange, CalibrationResult, calibrate
from jaxptq.calibrate.kl import NUM_LEVELS, balanced_candidates
from jaxptq.calibrate.percentile import OUTLIER_BINS
from jaxptq.probe import site_inputs
from tests.test_kl import reference_kl

METHODS = ["MAX_MIN", "KL", "REMOVAL_OUTLIER"]


def elementwise(x: jax.Array) -> dict[str, jax.Array]:
    """Sites whose values NumPy reproduces bit for bit."""
    return {"x": x, "neg_sq": -(x * x), "relu": jnp.maximum(x, 0.0)}


def elementwise_np(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": x, "neg_sq": -(x * x), "relu": np.maximum(x, np.float32(0))}


@pytest.fixture(scope="module")
def heavy() -> np.ndarray:
    """Heavy-tailed values (Student t), 100 samples of 6x7."""
    rng = np.random.default_rng(0)
    return rng.standard_t(3, (100, 6, 7)).astype(np.float32)


@pytest.fixture(scope="module")
def lenet_sites(lenet: Any) -> Any:
    """Every layer's output of LeNet-5 trained on the digits: real ReLU activations."""

    def sites(x: jax.Array) -> dict[str, jax.Array]:
        c1 = jax.nn.relu(lenet.conv1(x))
        c2 = jax.nn.relu(lenet.conv2(nnx.avg_pool(c1, (2, 2), strides=(2, 2))))
        flat = nnx.avg_pool(c2, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        f1 = jax.nn.relu(lenet.fc1(flat))
        f2 = jax.nn.relu(lenet.fc2(f1))
        return {"conv1": c1, "conv2": c2, "fc1": f1, "fc2": f2, "logits": lenet.fc3(f2)}

    return sites


@pytest.fixture(scope="module")
def digits100(digits_data: Any) -> np.ndarray:
    return digits_data[0][:100]


def _splits(x: np.ndarray) -> dict[str, Any]:
    return {
        "one batch": [(x,)],
        "100 batches of 1 (one-shot iterator)": iter([(x[i : i + 1],) for i in range(len(x))]),
        "uneven": [(x[:3],), (x[3:50],), (x[50:51],), (x[51:],)],
        "bare arrays": [x[:64], x[64:]],
    }


def _same(a: CalibrationResult, b: CalibrationResult) -> None:
    assert a.ranges == b.ranges
    assert a.num_samples == b.num_samples
    assert a.histograms.keys() == b.histograms.keys()
    for k in a.histograms:
        np.testing.assert_array_equal(a.histograms[k][0], b.histograms[k][0])
        assert a.histograms[k][1:] == b.histograms[k][1:]


def test_max_min_is_exact(heavy: np.ndarray) -> None:
    res = calibrate(elementwise, [(heavy[:30],), (heavy[30:],)], "MAX_MIN", progress=False)
    assert res.num_samples == 100 and res.histograms == {}
    for name, v in elementwise_np(heavy).items():
        r = res.ranges[name]
        assert isinstance(r, ActRange) and isinstance(r.lo, np.float32)
        assert (r.lo, r.hi, r.min, r.max) == (v.min(), v.max(), v.min(), v.max())


def test_removal_outlier_matches_np_quantile(heavy: np.ndarray) -> None:
    p = 0.01
    res = calibrate(elementwise, [(heavy,)], "REMOVAL_OUTLIER", outlier_percent=p, progress=False)
    for name, v in elementwise_np(heavy).items():
        r = res.ranges[name]
        counts, lo, hi = res.histograms[name]
        # x over [-top, top], top the power of two at or above max|x|, in one pass
        top = np.float32(2.0 ** np.ceil(np.log2(float(np.abs(v).max()))))
        assert counts.sum() == v.size and (lo, hi) == (-top, top)
        width = float(hi - lo) / OUTLIER_BINS
        assert width <= 2 * (float(v.max()) - float(v.min())) / (OUTLIER_BINS // 2)
        assert abs(r.lo - np.quantile(v, p)) <= width / 2, name
        assert abs(r.hi - np.quantile(v, 1 - p)) <= width / 2, name
        assert v.min() <= r.lo <= r.hi <= v.max()


def test_removal_outlier_default_on_lenet(lenet_sites: Any, digits100: np.ndarray) -> None:
    res = calibrate(lenet_sites, [(digits100,)], "REMOVAL_OUTLIER", progress=False)
    acts = {k: np.asarray(v) for k, v in jax.jit(lenet_sites)(digits100).items()}
    for name, v in acts.items():
        r = res.ranges[name]
        _, lo, hi = res.histograms[name]
        width = float(hi - lo) / OUTLIER_BINS
        tol = width / 2 + 1e-5 * float(np.abs(v).max())  # activations computed in other batches
        assert abs(r.lo - np.quantile(v, 1e-4)) <= tol, name
        assert abs(r.hi - np.quantile(v, 1 - 1e-4)) <= tol, name


def _kl_method_reference(counts: np.ndarray) -> int:
    """The KL method's choice, from the MXNet reference: bin 0 set to bin 1 (exact zeros
    would dominate), then the argmin over the balanced candidates only."""
    counts = counts.astype(np.int64).copy()
    if counts[1:].sum() > 0:
        counts[0] = counts[1]
    _, kl = reference_kl(counts)
    masked = np.where(balanced_candidates(len(counts)), kl, np.inf)
    return int(np.flatnonzero(masked <= masked.min() + 1e-12)[0]) + NUM_LEVELS


KL_BINS = 2 * 2048  # the KL method's histogram: twice its 2048-bin resolution


def _abs_histogram_reference(v: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """|v| counts over [0, top], top = the power of two at or above max|v|, with the
    observer's float32 binning floor(|v| * (bins / top)); and the bins up to max|v|."""
    a = np.abs(v).ravel()
    top = np.float32(2.0 ** np.ceil(np.log2(float(a.max()))))
    scale = np.float32(KL_BINS) / top
    idx = np.clip(np.floor(a * scale), 0, KL_BINS - 1).astype(np.int64)
    return np.bincount(idx, minlength=KL_BINS), top, int(idx.max()) + 1


def test_kl_matches_reference_end_to_end(heavy: np.ndarray) -> None:
    res = calibrate(elementwise, [(heavy,)], "KL", progress=False)
    for name, v in elementwise_np(heavy).items():
        ref_counts, top, stop = _abs_histogram_reference(v)
        assert top / 2 < np.abs(v).max() <= top and stop > KL_BINS // 2
        counts, lo, hi = res.histograms[name]
        np.testing.assert_array_equal(counts, ref_counts)
        assert (lo, hi) == (0.0, top)
        best = _kl_method_reference(ref_counts[:stop])
        t = np.float32(best) * (top / np.float32(KL_BINS))
        r = res.ranges[name]
        assert (r.lo, r.hi) == (max(-t, v.min()), min(t, v.max())), name
        assert r.lo > v.min() or r.hi < v.max(), name  # heavy tails are clipped


def test_kl_histogram_grows_exactly_across_batches(heavy: np.ndarray) -> None:
    """Small values first, the largest last: the range doubles several times, and the
    merged counts still equal one histogram over the final range."""
    order = np.argsort(np.abs(heavy).reshape(len(heavy), -1).max(axis=1))
    rows = heavy[order] * np.float32(1 + np.arange(100)[:, None, None] / 4)  # growing scale
    batches = [(rows[k : k + 3],) for k in range(0, 100, 3)]
    res = calibrate(elementwise, batches, "KL", progress=False, rows_per_device=2)
    for name, v in elementwise_np(rows).items():
        ref_counts, top, _ = _abs_histogram_reference(v)
        np.testing.assert_array_equal(res.histograms[name][0], ref_counts)
        assert res.histograms[name][2] == top


def test_removal_outlier_histogram_grows_exactly_across_batches(heavy: np.ndarray) -> None:
    """The signed histogram of REMOVAL_OUTLIER, its range doubled several times over the
    batches, equals NumPy's histogram of every value over the final `[-top, top]` in
    left-closed bins, exact zeros and -max|x| included."""
    order = np.argsort(np.abs(heavy).reshape(len(heavy), -1).max(axis=1))
    rows = heavy[order] * np.float32(1 + np.arange(100)[:, None, None] / 4)
    rows[:, 0, 0] = 0.0
    rows[-1, 0, 1] = -np.abs(rows).max()  # exactly -max|x|: lands in bin 0 or 1
    batches = [(rows[k : k + 7],) for k in range(0, 100, 7)]
    res = calibrate(elementwise, batches, "REMOVAL_OUTLIER", progress=False, rows_per_device=3)
    for name, v in elementwise_np(rows).items():
        counts, lo, hi = res.histograms[name]
        top = np.float32(2.0 ** np.ceil(np.log2(float(np.abs(v).max()))))
        assert (lo, hi) == (-top, top)
        width = 2 * float(top) / OUTLIER_BINS  # a power of two: every edge exact
        index = np.floor((v.astype(np.float64) + float(top)) / width).astype(np.int64)
        ref = np.bincount(np.clip(index, 0, OUTLIER_BINS - 1).ravel(), minlength=OUTLIER_BINS)
        np.testing.assert_array_equal(counts, ref, err_msg=name)


def test_kl_on_lenet_clips_relu_tails(lenet_sites: Any, digits100: np.ndarray) -> None:
    res = calibrate(lenet_sites, [(digits100,)], "KL", progress=False)
    acts = {k: np.asarray(v) for k, v in jax.jit(lenet_sites)(digits100).items()}
    for name in sorted(res.ranges):
        r = res.ranges[name]
        counts, _, top = res.histograms[name]
        stop = int(np.floor(max(-r.min, r.max) / (top / np.float32(KL_BINS)))) + 1
        t = np.float32(_kl_method_reference(counts[:stop])) * (top / np.float32(KL_BINS))
        assert r.hi == min(t, r.max)
        assert r.max == acts[name].max() or abs(r.max - acts[name].max()) <= 1e-5 * r.max
        if name != "logits":
            assert r.lo == 0.0 and r.min == 0.0  # ReLU outputs: [0, t]
        assert 0 < r.hi <= r.max
    assert res.num_samples == 100


@pytest.mark.parametrize("method", METHODS)
def test_split_invariance(method: str, lenet_sites: Any, digits100: np.ndarray) -> None:
    results = {
        k: calibrate(lenet_sites, b, method, progress=False) for k, b in _splits(digits100).items()
    }
    first = results.pop("one batch")
    for split, res in results.items():
        try:
            _same(first, res)
        except AssertionError as err:
            raise AssertionError(f"{method}: {split} differs from one batch") from err


@pytest.mark.parametrize("method", ["KL", "REMOVAL_OUTLIER"])
def test_histogram_drains_to_int64_before_int32_overflow(
    monkeypatch: pytest.MonkeyPatch, heavy: np.ndarray, method: str
) -> None:
    growing = heavy * np.float32(1 + np.arange(100)[:, None, None] / 4)  # merged across tops
    plain = calibrate(elementwise, [(growing,)], method, progress=False)
    monkeypatch.setattr(cal, "MAX_COUNT", 100)  # drain every couple of rows
    drained = calibrate(elementwise, [(growing,)], method, progress=False)
    _same(plain, drained)


def test_rows_per_device_does_not_change_exact_statistics(heavy: np.ndarray) -> None:
    a = calibrate(elementwise, [(heavy,)], "REMOVAL_OUTLIER", progress=False)
    b = calibrate(elementwise, [(heavy,)], "REMOVAL_OUTLIER", progress=False, rows_per_device=7)
    _same(a, b)


def test_progress_bar_counts_batches(heavy: np.ndarray, capsys: pytest.CaptureFixture) -> None:
    calibrate(elementwise, [(heavy[:50],), (heavy[50:],)], "MAX_MIN", progress=True)
    assert "2/2" in capsys.readouterr().err


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_names_site_and_batch(bad: float, method: str) -> None:
    """Every method, the histogram ones too (their scatter keeps a NaN in bin 0)."""

    def fn(x: jax.Array) -> dict[str, jax.Array]:
        return {"fine": x, "broken": jnp.where(x == 7.0, bad, x)}

    batches = [(np.full((3, 2), v, np.float32),) for v in (1.0, 2.0, 7.0, 3.0)]
    with pytest.raises(ValueError, match=r"site `broken` produced NaN or Inf in batch 2"):
        calibrate(fn, batches, method, progress=False)


def test_empty_calibration_set() -> None:
    for batches in ([], iter([]), [(np.zeros((0, 3), np.float32),)]):
        with pytest.raises(ValueError, match="calibration set is empty"):
            calibrate(elementwise, batches, "KL", progress=False)


def test_bad_arguments(heavy: np.ndarray) -> None:
    with pytest.raises(ValueError, match="`method` = 'PERCENTILE'.*KL, MAX_MIN, REMOVAL_OUTLIER"):
        calibrate(elementwise, [(heavy,)], "PERCENTILE")
    with pytest.raises(ValueError, match="outlier_percent"):
        calibrate(elementwise, [(heavy,)], "REMOVAL_OUTLIER", outlier_percent=0.5)
    with pytest.raises(ValueError, match="num_bins"):
        calibrate(elementwise, [(heavy,)], "KL", num_bins=64)
    with pytest.raises(ValueError, match=r"site `pooled`.*batch axis"):
        calibrate(lambda x: {"pooled": x.sum(0)}, [(heavy,)], progress=False)
    with pytest.raises(ValueError, match="batch 1: arguments disagree"):
        calibrate(lambda x, y: {"s": x + y}, [(heavy, heavy), (heavy, heavy[:3])], progress=False)
    with pytest.raises(TypeError, match="dict"):
        calibrate(lambda x: x, [(heavy,)], progress=False)


_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from jaxptq.calibrate import calibrate
    from tests.test_calibrate import elementwise

    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 16)).astype(np.float32)
    def fn(x):
        h = x.reshape(x.shape[0], -1) @ w
        return {**elementwise(x), "dense": h, "relu": jax.nn.relu(h)}
    x = rng.standard_t(3, (37, 3, 4)).astype(np.float32)
    batches = [(x[:10],), (x[10:11],), (x[11:],)]
    out = {"devices": len(jax.devices())}
    for method in ("MAX_MIN", "KL", "REMOVAL_OUTLIER"):
        runs = [calibrate(fn, batches, method, progress=False, devices=d)
                for d in (None, jax.devices()[:1])]
        out[method] = [
            {"ranges": {k: [float(v.lo), float(v.hi), float(v.min), float(v.max)]
                        for k, v in r.ranges.items()},
             "hists": {k: h[0].tolist() for k, h in r.histograms.items()},
             "n": r.num_samples}
            for r in runs]
    print(json.dumps(out))
    """
)


def test_sharded_equals_single_device() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED, root],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    for method in METHODS:
        sharded, single = out[method]
        assert sharded["n"] == single["n"] == 37
        assert sharded == single, method


@pytest.mark.parametrize("method", METHODS)
def test_nchw_conv_inputs_observed_channels_last_give_the_same_ranges(method: str) -> None:
    """FULL_QUANT observes a convolution's input channels last (`probe.site_inputs`), the
    order XLA:CPU computes it in; every statistic takes a row's values alike, so the
    ranges equal those of the input observed as the model lays it out (NCHW here)."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(4, 3, 3, 3)).astype(np.float32))

    def fn(x: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            jnp.tanh(x) * 3.0, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )

    samples = [rng.standard_t(3, (4, 3, 6, 5)).astype(np.float32) for _ in range(5)]
    qfn = jaxptq.ptq(fn, samples, {"quant_type": "FULL_QUANT", "activation_quant_method": method})
    (site,) = qfn.plan.sites
    tree = jax.tree_util.tree_structure((samples[0],))
    nchw = site_inputs(qfn._graphs, tree, [site.name])
    ref = calibrate(nchw, samples, method, progress=False).ranges[site.name]
    assert site.act_range == (float(ref.lo), float(ref.hi))
    assert -3.0 <= site.act_range[0] < -1.0 and 1.0 < site.act_range[1] <= 3.0
