"""Debug reports: MindSpore's statistics against NumPy, and the files of a small model."""

from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxptq
from jaxptq import report

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((16, 32)).astype(np.float32)
W2 = RNG.standard_normal((32, 8)).astype(np.float32) * 0.2


def _mlp(x):
    with jax.named_scope("fc1"):
        h = jax.nn.relu(x @ W1)
    with jax.named_scope("fc2"):
        return h @ W2


def test_tensor_stats_match_numpy():
    x = RNG.standard_normal((3, 5, 7)).astype(np.float32)
    x[0, 0] = 0.0
    got = np.asarray(report.tensor_stats(x))
    flat = x.ravel()
    want = [
        *np.quantile(flat, [0.0, 0.25, 0.5, 0.75, 1.0]),
        flat.mean(),
        flat.std(),  # MindSpore's "Var" column is sqrt of the variance
        np.mean(flat == 0),
    ]
    # Quartiles come from a two-level histogram: within range / 2048**2 of the exact ones.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_quartiles_on_repeated_values_are_exact():
    relu = np.maximum(RNG.standard_normal(5000), 0).astype(np.float32)
    pixels = np.clip(RNG.integers(-40, 300, 784), 0, 255).astype(np.float32)
    for x in (relu, pixels):
        got = np.asarray(report.tensor_stats(x))
        want = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
        on_repeats = [i for i, v in enumerate(want) if v in (0.0, 255.0)]
        assert on_repeats  # zeros / saturated pixels hold some quartiles: exact there
        np.testing.assert_array_equal(got[on_repeats], want[on_repeats])
        np.testing.assert_allclose(got[:5], want, atol=1e-6 * (x.max() - x.min()))


def test_cosine_clip_and_mean_bias_follow_mindspore():
    a = RNG.standard_normal(100).astype(np.float32)
    b = a + 0.1 * RNG.standard_normal(100).astype(np.float32)
    want = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert float(report.cosine_similarity(a, b)) == pytest.approx(want, rel=1e-5)
    zeros = np.zeros(4, np.float32)
    assert float(report.cosine_similarity(zeros, zeros)) == 1.0
    assert float(report.cosine_similarity(zeros, np.ones(4, np.float32))) == 0.0
    assert float(report.cosine_similarity(np.array([np.nan, 1.0]), np.ones(2))) == 0.0
    clipped = np.clip(a, -1.0, 1.0)
    seg = np.repeat(np.arange(2, dtype=np.int32), [30, 70])
    got = report.segment_stats(a, clipped, seg, (30, 70))
    for k, part in enumerate((slice(0, 30), slice(30, 100))):
        want_clip = np.mean(np.abs(a[part]) > 1.0)
        assert float(got["cmp"][k, 0]) == pytest.approx(want_clip)
        x, y = a[part], clipped[part]
        want_cos = x @ y / np.linalg.norm(x) / np.linalg.norm(y)
        assert float(got["cmp"][k, 1]) == pytest.approx(want_cos, rel=1e-5)
        np.testing.assert_allclose(got["stats"][k, 1, :5], np.quantile(y, [0, .25, .5, .75, 1]),
                                   atol=1e-5)  # fmt: skip
        assert int(got["hist"][k].sum()) == x.size
    ref = np.array([1.0, -2.0, 0.0, 4.0, 0.0], np.float32)
    out = np.array([1.0, -2.5, 0.5, 4.0, 1e-6], np.float32)
    # Off elements: -2.5 vs -2 (0.25 relative) and 0.5 vs 0 (0.5 absolute); 1e-6 vs 0 is
    # within MindSpore's 1e-5 floor and not counted.
    assert float(report.mean_bias(out, ref)) == pytest.approx((0.25 + 0.5) / 2, rel=1e-6)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("debug")
    samples = [RNG.standard_normal((4, 16)).astype(np.float32) for _ in range(3)]
    cfg = {
        "quant_type": "FULL_QUANT",
        "bias_correction": False,
        "debug_info_save_path": str(folder),
    }
    qfn = jaxptq.ptq(_mlp, samples, cfg)
    return folder, qfn, samples


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_columns_and_values(full_report):
    folder, qfn, samples = full_report
    names = {p.name for p in folder.iterdir()}
    assert {"output_summary.csv", "quant_param.csv", "cosine_similarity.png"} <= names
    assert {f"report_{r}.csv" for r in range(3)} <= names
    summary = _rows(folder / "output_summary.csv")
    assert list(summary[0]) == list(report.OUTPUT_SUMMARY_COLUMNS)
    assert [int(r["Round"]) for r in summary] == [0, 1, 2]
    for r, x in zip(summary, samples, strict=True):
        y, yq = np.asarray(_mlp(x)).ravel(), np.asarray(qfn(x)).ravel()
        want = y @ yq / np.linalg.norm(y) / np.linalg.norm(yq)
        assert float(r["CosineSimilarity"]) == pytest.approx(want, abs=1e-5)
        assert 0.99 < float(r["CosineSimilarity"]) <= 1.0
    rows = _rows(folder / "report_0.csv")
    assert list(rows[0]) == list(report.REPORT_COLUMNS)
    assert len(rows) == 2 * 6  # two sites x (input, weight, output) x (Origin, Dequant)
    assert [r["NodeName"] for r in rows[:6]] == ["fc1"] * 6
    for r in rows:
        assert -1.0 <= float(r["CosineSimilarity"]) <= 1.0
        assert 0.0 <= float(r["Clip"]) <= 1.0
        assert float(r["Min"]) <= float(r["Q1"]) <= float(r["Median"]) <= float(r["Q3"])
        assert float(r["Q3"]) <= float(r["MAX"])
        if r["DataTypeFlag"] == "Origin":
            assert (float(r["Clip"]), float(r["CosineSimilarity"])) == (0.0, 1.0)
    fc1_in = np.asarray(samples[0]).ravel()
    origin = rows[0]
    assert (origin["InOutFlag"], origin["TensorTypeFlag"]) == ("Input", "Activation")
    assert float(origin["Median"]) == pytest.approx(np.median(fc1_in), abs=1e-5)
    assert float(origin["Var"]) == pytest.approx(fc1_in.std(), rel=1e-5)
    weight = rows[2]
    assert (weight["TensorTypeFlag"], weight["DataTypeFlag"]) == ("Weight", "Origin")
    assert float(weight["MAX"]) == pytest.approx(W1.max(), rel=1e-6)
    # MAX_MIN calibrated on these samples: round 0's input is inside the range; only the
    # extremes can round just inside the dequantized [min, max] and count as clipped.
    assert float(rows[1]["Clip"]) <= 2 / fc1_in.size
    assert float(rows[1]["CosineSimilarity"]) > 0.999


def test_quant_param_rows_one_per_quantized_tensor(full_report):
    folder, qfn, _ = full_report
    rows = _rows(folder / "quant_param.csv")
    assert list(rows[0]) == list(report.QUANT_PARAM_COLUMNS)
    quantized = [s for s in qfn.plan.sites if s.quantized]
    assert len(rows) == 2 * len(quantized)  # the static input and the weight of each
    act = rows[0]
    plan = qfn.plan["fc1"]
    assert float(act["Scale"]) == pytest.approx(plan.act_scale, rel=1e-6)
    assert int(act["ZeroPoint"]) == plan.act_zero_point and act["Bits"] == "8"
    weight = rows[1]
    assert weight["Dims"] == "16 32" and int(weight["ElementsNum"]) == W1.size
    scales = np.array(weight["Scale"].split(), np.float32)
    np.testing.assert_allclose(scales, plan.weight_scale.ravel(), rtol=1e-6)
    assert len(weight["CorrectionVar"].split()) == 32


def test_pictures_are_valid_pngs(full_report):
    folder, _, _ = full_report
    pictures = [folder / "cosine_similarity.png", *sorted((folder / "histograms").glob("*.png"))]
    assert len(pictures) == 3
    for p in pictures:
        with Image.open(p) as img:
            img.verify()
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size[0] > 0 and img.size[1] > 0


def test_dequantized_input_matches_the_int8_grid(full_report):
    _, qfn, samples = full_report
    plan = qfn.plan["fc1"]
    graph = qfn._graphs.get((samples[0],))
    site = graph.sites[0]
    x = jnp.asarray(samples[0]) * 3.0  # partly outside the calibrated range
    xd = np.asarray(report.dequantized_input(plan, site, x))
    codes = xd / plan.act_scale + plan.act_zero_point
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert codes.min() >= -128 - 1e-3 and codes.max() <= 127 + 1e-3
