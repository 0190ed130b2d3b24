"""Accuracy control on LeNet-5 and real digits: nothing reverted under a generous bound, the
fewest sites under a tight one, everything (and a warning) when the bound is impossible."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import jaxptq
from jaxptq.accuracy_control import (
    REVERTED,
    PlanEvaluator,
    ptq_with_accuracy_control,
    with_reverted_sites,
)
from jaxptq.api import collect_samples, ptq
from jaxptq.models.digits import accuracy, load_digits_split, pretrained

THREE_BIT = {"bit_num": 3, "min_quant_weight_channel": 0}


@pytest.fixture(scope="module")
def lenet() -> tuple:
    model = pretrained("lenet5")
    x_train, _, x_test, y_test = load_digits_split()
    calib = [x_train[i : i + 64] for i in range(0, 256, 64)]
    return model, calib, (x_test, y_test)


def top1(fn: object, data: tuple[np.ndarray, np.ndarray]) -> float:
    """Top-1 in percent over the whole test split in one batch (one compiled shape)."""
    return accuracy(fn, *data, batch=len(data[1]))  # type: ignore[arg-type]


def test_public_names() -> None:
    assert jaxptq.ptq_with_accuracy_control is ptq_with_accuracy_control
    assert "ptq_with_accuracy_control" in jaxptq.__all__


def test_generous_bound_reverts_nothing(lenet: tuple) -> None:
    model, calib, data = lenet
    result = ptq_with_accuracy_control(model, calib, data, top1, max_drop=1.0)
    assert result.reverted == []
    assert result.met
    assert [s.action for s in result.history] == ["quantize"]
    assert result.float_metric - result.quant_metric <= 1.0
    assert result.final_metric == result.quant_metric


@pytest.mark.parametrize("ranking", ["output", "metric"])
def test_tight_bound_reverts_the_fewest_needed(lenet: tuple, ranking: str) -> None:
    model, calib, data = lenet
    result = ptq_with_accuracy_control(
        model, calib, data, top1, max_drop=1.0, config=THREE_BIT, ranking=ranking
    )
    sites = [s.name for s in result.qfn.plan.sites]
    assert result.float_metric - result.quant_metric > 5.0  # 3 bits really hurt
    assert result.met
    assert 0 < len(result.reverted) < len(sites), result.history
    # The returned function is what the history claims, and meets the bound.
    final = top1(result.qfn, data)
    assert final == result.final_metric
    assert result.float_metric - final <= 1.0
    for s in result.qfn.plan.sites:
        assert (s.skip_reason == REVERTED) == (s.name in result.reverted)
    if ranking == "metric":  # ranked by each site's own gain: one site is never enough here
        best_single = result.quant_metric + result.ranking[0][1]
        assert (result.float_metric - best_single > 1.0) == (len(result.reverted) > 1)
    # No reverted site can be quantized again on its own.
    base = ptq(model, calib, THREE_BIT)
    for name in result.reverted:
        fewer = [n for n in result.reverted if n != name]
        metric = top1(with_reverted_sites(base, fewer) if fewer else base, data)
        assert result.float_metric - metric > 1.0, (name, metric)


def test_impossible_bound_reverts_everything_and_says_so(
    lenet: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    model, calib, data = lenet

    def float_only(fn: object, _: object) -> float:  # any quantized site costs everything
        return 1.0 if fn is model else 0.0

    with caplog.at_level(logging.WARNING, logger="jaxptq.accuracy_control"):
        result = ptq_with_accuracy_control(model, calib, data, float_only, 0.5, "relative")
    quantized = [s.name for s in ptq(model, calib).plan.sites if s.quantized]
    assert not result.met
    assert sorted(result.reverted) == sorted(quantized)
    assert [s.metric for s in result.history] == [0.0] * (1 + len(quantized))
    assert "still above max_drop" in caplog.text


def test_reverting_every_site_gives_the_float_function(lenet: tuple) -> None:
    model, calib, (x, _) = lenet
    qfn = ptq(model, calib, THREE_BIT)
    everything = with_reverted_sites(qfn, [s.name for s in qfn.plan.sites])
    assert not everything.plan.quantized_sites
    np.testing.assert_allclose(everything(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="conv9"):
        with_reverted_sites(qfn, ["conv9"])


@pytest.mark.parametrize("config", [THREE_BIT, {"quant_type": "DYNAMIC_QUANT"}])
def test_masked_program_matches_the_real_ones(lenet: tuple, config: dict) -> None:
    model, calib, (x, _) = lenet
    qfn = ptq(model, calib, config)
    samples, tree = collect_samples([x])
    evaluator = PlanEvaluator(qfn._graphs, tree, qfn.plan.sites)
    args = evaluator.site_args(qfn.plan.sites, samples[0])
    (quant,) = evaluator.outputs(args, samples, ())[0]
    np.testing.assert_allclose(quant, qfn(x), rtol=1e-5, atol=1e-5)
    (flt,) = evaluator.outputs(args, samples, evaluator.names)[0]
    np.testing.assert_allclose(flt, model(x), rtol=1e-5, atol=1e-5)
    one = evaluator.names[0]
    (partial,) = evaluator.outputs(args, samples, [one])[0]
    np.testing.assert_allclose(partial, with_reverted_sites(qfn, [one])(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop_type": "percent"}, "drop_type"),
        ({"ranking": "random"}, "ranking"),
        ({"max_drop": -1.0}, "max_drop"),
    ],
)
def test_bad_arguments_are_refused(lenet: tuple, kwargs: dict, message: str) -> None:
    model, calib, data = lenet
    with pytest.raises(ValueError, match=message):
        ptq_with_accuracy_control(model, calib, data, top1, **kwargs)
