"""Mixed-bit weight search: the criterion, the fewest-bits choice, and LeNet-5 on real digits."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

from jaxptq import qmath
from jaxptq.accuracy_control import output_cosine
from jaxptq.api import apply_plan, ptq
from jaxptq.layout import site_layout
from jaxptq.models.digits import accuracy, load_digits_split, pretrained
from jaxptq.passes.mixed_bit import CANDIDATE_BITS, COSINE_BAND, choose_bits, weight_errors
from jaxptq.plan import QuantPlan

MIXED = {"bit_num": 0, "min_quant_weight_channel": 0}


def _reference_error(w: np.ndarray, bits: int, channel_axes: tuple, scale_axes: tuple) -> float:
    """MindSpore's criterion, one width at a time, through the fixed-bit code path."""
    scale = qmath.symmetric_scale(w, bits, scale_axes)
    lo, hi = qmath.symmetric_range(bits)
    deq = qmath.dequantize(qmath.quantize(w, scale, 0, lo, hi, np.int32), scale)
    red = qmath.reduce_axes(w.ndim, channel_axes)
    num = np.sum((w.astype(np.float64) - deq) ** 2, axis=red)
    den = np.sum(w.astype(np.float64) ** 2, axis=red)
    return float(np.mean(np.sqrt(num[den > 1e-10] / den[den > 1e-10])))


@pytest.mark.parametrize("per_channel", [True, False])
def test_vectorized_errors_match_one_width_at_a_time(per_channel: bool) -> None:
    w = np.random.default_rng(1).standard_t(4, size=(3, 3, 8, 16)).astype(np.float32)
    w[..., 5] = 0.0  # an all-zero channel is left out of the mean, as MindSpore does
    errors = weight_errors(w, (3,), (3,) if per_channel else ())
    expected = [_reference_error(w, b, (3,), (3,) if per_channel else ()) for b in CANDIDATE_BITS]
    np.testing.assert_allclose(errors, expected, rtol=1e-5)
    assert np.all(np.diff(errors[1:]) < 0)  # from 2 bits on, every extra bit helps
    assert errors[-1] < 1e-4


def test_errors_of_large_weights_are_chunked_consistently(monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxptq.passes import mixed_bit

    w = np.random.default_rng(2).normal(size=(64, 48)).astype(np.float32)
    whole = weight_errors(w, (1,), (1,))
    monkeypatch.setattr(mixed_bit, "_CHUNK_ELEMENTS", w.size * 3)  # 3 widths per chunk
    np.testing.assert_array_equal(weight_errors(w, (1,), (1,)), whole)


def test_choose_bits_takes_the_fewest_that_meet_the_target() -> None:
    errors = 0.5 ** np.arange(1, 17)  # 0.5, 0.25, ... one per width 1..16
    assert choose_bits(errors, 0.02) == 6  # 0.5**6 = 0.0156 <= 0.02 < 0.5**5
    assert choose_bits(errors, 0.5) == 1
    assert choose_bits(errors, 1e-9) == 16  # nothing meets it: the widest


@pytest.fixture(scope="module")
def lenet() -> tuple:
    model = pretrained("lenet5")
    x_train, _, x_test, y_test = load_digits_split()
    calib = [x_train[i : i + 64] for i in range(0, 256, 64)]
    return model, calib, x_test, y_test


def _row_cosine(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def test_default_mixed_bit_lenet(lenet: tuple) -> None:
    model, calib, x_test, y_test = lenet
    qfn = ptq(model, calib, MIXED)
    plan = qfn.plan
    assert all(s.quantized for s in plan.sites), plan.table()
    assert plan.average_bits() <= 7.0, plan.table()
    assert all(1 <= (s.bits or 0) <= 8 for s in plan.sites), plan.table()
    # Each site takes the fewest bits whose error meets init_scale = 0.02.
    for site in qfn._graphs.get((calib[0],)).sites:
        axes = site_layout(site).weight_channel_axes
        bits = plan[site.name].bits
        assert _reference_error(site.weight, bits, axes, axes) <= 0.02, site.name
        assert _reference_error(site.weight, bits - 1, axes, axes) > 0.02, site.name
    y_float, y_quant = model(x_test), qfn(x_test)
    assert _row_cosine(y_float, y_quant) >= 0.99
    assert abs(accuracy(model, x_test, y_test) - accuracy(qfn, x_test, y_test)) <= 1.0
    assert "bits/weight" in plan.table()


def test_larger_init_scale_compresses_more(lenet: tuple) -> None:
    model, calib, x_test, _ = lenet
    results = []
    for init_scale in (0.005, 0.02, 0.08):
        qfn = ptq(model, calib, MIXED | {"init_scale": init_scale})
        results.append((qfn.plan.average_bits(), _row_cosine(model(x_test), qfn(x_test))))
    bits, cosines = zip(*results, strict=True)
    assert bits[0] > bits[1] > bits[2], results
    assert cosines[0] >= cosines[1] >= cosines[2], results
    assert bits[0] <= 9.0  # 0.005 is reached with 8-9 bits, not 16


def test_skip_rules_still_apply(lenet: tuple) -> None:
    model, calib, _, _ = lenet
    plan = ptq(model, calib, {"bit_num": 0}).plan  # min_quant_weight_channel = 16
    assert "min_quant_weight_channel" in (plan["conv1"].skip_reason or "")
    assert "min_quant_weight_channel" in (plan["fc3"].skip_reason or "")
    assert plan["fc1"].quantized and plan["fc1"].bits is not None


def test_auto_tune_lands_in_the_cosine_band(lenet: tuple) -> None:
    model, calib, _, _ = lenet
    qfn = ptq(model, calib, MIXED | {"auto_tune": True})
    ref = [[np.asarray(model(x))] for x in calib]
    out = [[np.asarray(qfn(x))] for x in calib]
    cosine = output_cosine(ref, out)
    assert COSINE_BAND[0] <= cosine <= COSINE_BAND[1], (cosine, qfn.plan.notes)
    assert any("auto_tune" in note for note in qfn.plan.notes)
    default = ptq(model, calib, MIXED).plan
    assert qfn.plan.average_bits() < default.average_bits()


def test_mixed_plan_saves_each_site_packed_at_its_width(
    lenet: tuple, tmp_path: pathlib.Path
) -> None:
    model, calib, x_test, _ = lenet
    qfn = ptq(model, calib, MIXED | {"init_scale": 0.05})
    qfn.plan.save(tmp_path / "plan")
    with np.load(tmp_path / "plan" / "arrays.npz") as npz:
        for i, site in enumerate(qfn.plan.sites):
            assert site.bits is not None and site.bits < 8
            packed = npz[f"{i}.weight_q.packed"]
            assert packed.nbytes == qmath.packed_size(site.weight_elements, site.bits)
    loaded = QuantPlan.load(tmp_path / "plan")
    assert [s.bits for s in loaded.sites] == [s.bits for s in qfn.plan.sites]
    again = apply_plan(model, loaded, calib[0])
    np.testing.assert_array_equal(np.asarray(again(x_test)), np.asarray(qfn(x_test)))
