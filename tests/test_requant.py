"""Fused requantization between int8 sites (`jaxptq.requant`) on the trained digits models."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxptq
from jaxptq import kernels, requant
from jaxptq.graph import evaluate
from jaxptq.probe import site_inputs
from tests.digits_fixtures import iter_eqns

FULL = {"quant_type": "FULL_QUANT", "bias_correction": False}


@pytest.fixture(scope="module")
def full_mlp(mlp: Any, calib: Any) -> Any:
    return jaxptq.ptq(mlp, calib, {**FULL, "bias_correction": True})


def _chains(qfn: Any, x: np.ndarray) -> list[requant.Chain]:
    graph = qfn._graphs.get((x,))
    return requant.find_chains(graph, {sp.name: sp for sp in qfn.plan.sites})


def _unfused(qfn: Any, x: np.ndarray) -> np.ndarray:
    """The same plan run site by site: float between the sites, no chain folded."""
    graph = qfn._graphs.get((x,))
    site_args = qfn.site_args()
    rules = {
        id(site.node): functools.partial(
            lambda apply, sp, site, vals: apply(sp, site, vals, site_args[sp.name]),
            kernels.KERNELS[sp.act_mode][1],
            sp,
        )
        for site, sp in zip(graph.sites, qfn.plan.sites, strict=True)
        if sp.quantized
    }
    consts = {v.id: v.const for v in graph.runtime_consts(graph.sites)}
    return np.asarray(jax.jit(lambda x: evaluate(graph, consts, [x], rules)[0])(x))


def test_chains_fold_bias_and_relu_between_dense_sites(
    full_mlp: Any, lenet: Any, calib: Any, digits_data: Any
) -> None:
    """MLP: fc1 -> +b, relu -> fc2 -> +b, relu -> fc3. LeNet-5: its convolutions feed
    average pools, which are not folded, so only its dense chains are."""
    x = digits_data[2][:32]
    chains = _chains(full_mlp, x)
    assert [(c.producer.name, [t.name for t in c.consumers]) for c in chains] == [
        ("fc1", ["fc2"]),
        ("fc2", ["fc3"]),
    ]
    for c in chains:
        assert [n.primitive.name for n in c.folded] == ["add", "max"]
        assert c.affine.lower == 0.0 and c.affine.upper == np.inf
        assert np.shape(c.affine.bias) == (1, 128)
    lenet_q = jaxptq.ptq(lenet, calib, FULL)
    assert [c.producer.name for c in _chains(lenet_q, x)] == ["fc1", "fc2"]


def test_fused_codes_match_rounding_except_at_ties(full_mlp: Any, digits_data: Any) -> None:
    """The requantize's codes equal what the unfused program quantizes (float64 bias, ReLU,
    `round` to the next site's int8, + 128), except where that value sits within float32
    rounding of a half-integer: there the fused form rounds half up."""
    x = jnp.asarray(digits_data[2])
    graph = full_mlp._graphs.get((x,))
    plans = {sp.name: sp for sp in full_mlp.plan.sites}
    inputs = site_inputs(full_mlp._graphs, jax.tree_util.tree_structure((x,)), ["fc1", "fc2"])(x)
    checked = 0
    for chain in requant.find_chains(graph, plans):
        name, nxt = chain.producer.name, plans[chain.consumers[0].name]
        args = kernels.static_args(plans[name], chain.producer)
        y = kernels._static_sum(plans[name], chain.producer, inputs[name], args, False)
        codes = np.asarray(requant.requantize(y, requant.chain_args(chain, args, nxt)))
        real = np.asarray(y, np.float64) * args["out_scale"] + args.get("bias", 0.0)
        real = np.maximum(real + chain.affine.bias, 0.0) / nxt.act_scale
        want = np.clip(np.round(real) + nxt.act_zero_point, -128, 127) + 128
        tie = np.abs(real - np.floor(real) - 0.5) < 1e-4
        assert np.all((codes == want) | tie)
        assert codes.dtype == np.uint8 and np.mean(codes != want) < 1e-3
        checked += codes.size
    assert checked == 2 * 359 * 128


def test_fused_program_agrees_with_site_by_site(full_mlp: Any, digits_data: Any) -> None:
    x = digits_data[2]
    fused, unfused = np.asarray(full_mlp(x)), _unfused(full_mlp, x)
    cos = np.sum(fused * unfused) / (np.linalg.norm(fused) * np.linalg.norm(unfused))
    assert cos > 0.99999
    assert np.array_equal(fused.argmax(-1), unfused.argmax(-1))
    # between the sites, one clamp each and no float ReLU: the only `max` is the input's clip
    eqns = [e.primitive.name for e in iter_eqns(jax.make_jaxpr(full_mlp)(x[:4]).jaxpr)]
    assert (eqns.count("max"), eqns.count("clamp"), eqns.count("u8s8_dot")) == (1, 2, 3)


def _two_layer(w1: Any, b1: Any, w2: Any, w3: Any, x: Any, keep_hidden: bool) -> Any:
    h = jax.nn.relu6(x @ w1 + b1)
    if keep_hidden:
        return h @ w2, h
    return h @ w2 + h @ w3


def test_a_value_read_by_two_sites_is_fused_for_both_and_an_output_is_not() -> None:
    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.normal(size=s).astype(np.float32) for s in ((16, 32), (32, 8), (32, 8)))
    b1 = rng.normal(size=32).astype(np.float32)
    calib = [rng.normal(size=(8, 16)).astype(np.float32) for _ in range(4)]
    x = rng.normal(size=(64, 16)).astype(np.float32)
    shared = functools.partial(_two_layer, w1, b1, w2, w3, keep_hidden=False)
    q = jaxptq.ptq(shared, calib, FULL)
    (chain,) = _chains(q, x)
    assert len(chain.consumers) == 2 and (chain.affine.lower, chain.affine.upper) == (0.0, 6.0)
    y, ref = np.asarray(q(x)), np.asarray(shared(x))
    assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.999
    assert np.allclose(y, _unfused(q, x), atol=0.05 * np.abs(ref).max())
    kept = functools.partial(_two_layer, w1, b1, w2, w3, keep_hidden=True)
    assert _chains(jaxptq.ptq(kept, calib, FULL), x) == []
