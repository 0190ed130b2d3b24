"""Fused requantization between int8 sites (`jaxptq.requant`) on the trained digits models."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class SitePlanStub:
    """The two fields of a consumer's `SitePlan` a requantize reads."""

    act_scale: np.float32
    act_zero_point: int


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


def _qlinear_reference(acc: np.ndarray, bias: np.ndarray, out_scale: np.ndarray, nxt: Any) -> Any:
    """onnxruntime's QLinearConv output stage in NumPy: the bias in int32 at scale
    `s_x * s_w`, `float32(acc + bias) * float32(s_x * s_w / s_y)`, clamped to the uint8
    range, rounded half to even, plus the zero point."""
    bias_q = np.round(bias.astype(np.float64) / out_scale.astype(np.float64)).astype(np.int64)
    total = (acc.astype(np.int64) + bias_q).astype(np.float32)
    zp = np.float32(nxt.act_zero_point + 128)
    t = total * (out_scale / np.float32(nxt.act_scale)).astype(np.float32)
    t = np.clip(t, np.maximum(-zp, 0.0), 255 - zp)  # the chain's ReLU bounds it below at 0
    return np.round(t) + zp


def test_fused_codes_are_onnxruntime_qlinear_codes(full_mlp: Any, digits_data: Any) -> None:
    """The requantize computes what onnxruntime's fused integer kernels do (so an exported
    model agrees with the JAX program), bit for bit; against the exact real value it can
    differ only where that sits within the rounded bias's error of a half-integer."""
    x = jnp.asarray(digits_data[2])
    graph = full_mlp._graphs.get((x,))
    plans = {sp.name: sp for sp in full_mlp.plan.sites}
    inputs = site_inputs(full_mlp._graphs, jax.tree_util.tree_structure((x,)), ["fc1", "fc2"])(x)
    checked = 0
    for chain in requant.find_chains(graph, plans):
        name, nxt = chain.producer.name, plans[chain.consumers[0].name]
        args = kernels.static_args(plans[name], chain.producer)
        y = kernels._static_sum(plans[name], chain.producer, inputs[name], args, False)
        quant = (nxt.act_scale, nxt.act_zero_point)
        assert requant.chain_quant(chain, plans) == quant
        codes = np.asarray(requant.requantize(y, requant.chain_args(chain, args, *quant)))
        acc = np.asarray(y).astype(np.int64)
        assert np.array_equal(acc, np.asarray(y))  # exact integers
        bias = (chain.affine.bias + args["bias"]).astype(np.float32)
        assert np.array_equal(codes, _qlinear_reference(acc, bias, args["out_scale"], nxt))
        real = np.asarray(y, np.float64) * args["out_scale"] + args["bias"]
        real = np.maximum(real + chain.affine.bias, 0.0) / nxt.act_scale
        want = np.clip(np.round(real) + nxt.act_zero_point, -128, 127) + 128
        bias_error = 0.5 * np.max(args["out_scale"]) / nxt.act_scale + 1e-4
        near_tie = np.abs(real - np.floor(real) - 0.5) < bias_error
        assert np.all((codes == want) | near_tie)
        assert codes.dtype == np.uint8 and np.mean(codes != want) < 1e-3
        checked += codes.size
    assert checked == 2 * 359 * 128


def test_fused_program_agrees_with_site_by_site(full_mlp: Any, digits_data: Any) -> None:
    x = digits_data[2]
    fused, unfused = np.asarray(full_mlp(x)), _unfused(full_mlp, x)
    cos = np.sum(fused * unfused) / (np.linalg.norm(fused) * np.linalg.norm(unfused))
    assert cos > 0.99999
    assert np.array_equal(fused.argmax(-1), unfused.argmax(-1))
    # between the sites one rounding each, no clamp (a ReLU's bound at zero point 0 is the
    # uint8 conversion's own saturation) and no float ReLU: the one `max` is the input's clip
    eqns = [e.primitive.name for e in iter_eqns(jax.make_jaxpr(full_mlp)(x[:4]).jaxpr)]
    counts = [eqns.count(p) for p in ("max", "clamp", "round", "u8s8_dot")]
    assert counts == [1, 0, 3, 3]  # rounds: the input's quantize and two requantizes


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


@pytest.mark.parametrize("zero_point", [-128, -91, 0])
@pytest.mark.parametrize("upper", [np.inf, 6.0])
def test_requantize_saturates_like_onnxruntime(zero_point: int, upper: float) -> None:
    """Far out of range, at exact ties and around them, the codes are MLAS's: clamp to the
    uint8 range (and a ReLU6's bound), round half to even, add the zero point. The program
    leaves the clamp to the uint8 conversion's saturation where that is the same."""
    rng = np.random.default_rng(zero_point + 128)
    acc = np.concatenate(
        [rng.integers(-(2**22), 2**22, 4000), np.arange(-600, 600), [2**23, -(2**23)]]
    ).astype(np.int64)
    bias = np.float32(0.0173) * rng.integers(-100, 100, 8).astype(np.float32)
    out_scale = np.full(8, np.float32(2.0**-4), np.float32)  # ties at exact halves
    acc = acc[: len(acc) // 8 * 8].reshape(-1, 8)
    nxt = SitePlanStub(act_scale=np.float32(0.05), act_zero_point=zero_point)
    # one consumer stands for the next int8 site (a chain with none would clamp always)
    chain = requant.Chain(None, (), (), ("next",), requant._Affine(0.0, 0.0, upper))  # type: ignore[arg-type]
    producer_args = {"out_scale": out_scale, "bias": bias}
    args = requant.chain_args(chain, producer_args, nxt.act_scale, nxt.act_zero_point)
    codes = np.asarray(jax.jit(requant.requantize)(acc.astype(np.float32), args))
    want = _qlinear_reference(acc, bias, out_scale, nxt)
    if upper < np.inf:
        want = np.minimum(want, np.round(np.float32(upper) / nxt.act_scale) + zero_point + 128)
    assert np.array_equal(codes, want)
    top = 255 if upper == np.inf else np.round(np.float32(upper) / nxt.act_scale) + zero_point + 128
    assert (codes.min(), codes.max()) == (zero_point + 128, top)  # both bounds reached
    assert ("lo" in args) == (zero_point != -128 or upper < np.inf)


def test_an_output_chain_clamps_and_dequantizes_as_dequantizelinear():
    """A chain its producer's own output quantization ends always clamps (XLA:CPU does not
    saturate a float -> uint8 -> float pair it fuses), and its codes come back as
    DequantizeLinear's `(code - zp) * scale` in float32, bit for bit."""
    chain = requant.Chain(None, (), (), (), requant._Affine())  # type: ignore[arg-type]
    producer_args = {"out_scale": np.full(4, np.float32(0.01), np.float32)}
    args = requant.chain_args(chain, producer_args, 0.05, -128)
    assert (args["lo"], args["hi"]) == (0.0, 255.0)
    acc = np.linspace(-3000, 3000, 64, dtype=np.float32).reshape(16, 4)
    program = jax.jit(
        lambda y: requant.dequantize(
            requant.requantize(y, args), requant.dequantize_args(0.05, -128)
        )
    )
    got = np.asarray(program(acc))
    multiplier = np.float32(0.01) / np.float32(0.05)
    codes = np.round(np.clip(acc * multiplier, 0, 255))  # zero point -128 + 128 = 0
    want = codes.astype(np.float32) * np.float32(0.05)
    assert got.min() == 0.0 and np.array_equal(got, want)
    every = np.arange(256, dtype=np.uint8)
    dq = np.asarray(requant.dequantize(every, requant.dequantize_args(0.0173, 5)))
    want = (every.astype(np.int32) - 133).astype(np.float32) * np.float32(0.0173)
    assert np.array_equal(dq, want)
