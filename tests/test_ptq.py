"""End to end: LeNet-5 and an MLP trained on real digits, quantized in every mode."""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxptq
from jaxptq import kernels
from jaxptq.models import digits
from jaxptq.probe import site_inputs
from tests.digits_fixtures import integer_op, site_operand_dtypes

ALL_SITES = {"min_quant_weight_channel": 0}


def _acc(fn: Any, data: Any) -> float:
    return digits.accuracy(fn, data[2], data[3])


def _agreement(a: Any, b: Any, x: np.ndarray) -> float:
    return float(np.mean(np.argmax(a(x), -1) == np.argmax(b(x), -1)) * 100)


def test_float_models_are_accurate(lenet: Any, mlp: Any, digits_data: Any) -> None:
    assert _acc(lenet, digits_data) >= 97.0
    assert _acc(mlp, digits_data) >= 97.0


@pytest.mark.parametrize(("bits", "max_drop"), [(8, 0.5), (4, 2.0)])
@pytest.mark.parametrize("model", ["lenet", "mlp"])
def test_weight_quant_accuracy(
    model: str, bits: int, max_drop: float, request: Any, digits_data: Any, calib: Any
) -> None:
    fn = request.getfixturevalue(model)
    qfn = jaxptq.ptq(fn, calib, {"quant_type": "WEIGHT_QUANT", "bit_num": bits, **ALL_SITES})
    assert all(s.quantized and s.bits == bits for s in qfn.plan.sites)
    assert _acc(fn, digits_data) - _acc(qfn, digits_data) <= max_drop
    # Weight-only: the dots and convolutions stay float.
    assert all(d[1] == "float32" for d in site_operand_dtypes(qfn, digits_data[2][:4]))


def test_weight_quant_size_thresholds_explain_skips(lenet: Any, calib: Any) -> None:
    qfn = jaxptq.ptq(lenet, calib, {"quant_type": "WEIGHT_QUANT", "min_quant_weight_size": 500})
    plan = qfn.plan
    assert "min_quant_weight_size=500" in plan["conv1"].skip_reason  # 150 weights
    assert "min_quant_weight_channel=16" in plan["fc3"].skip_reason  # 10 outputs
    assert plan["fc1"].quantized and plan["fc1"].weight_q.dtype == np.int8
    assert "3/5 sites quantized" in str(plan) and "< min_quant_weight_channel=16" in str(plan)


@pytest.mark.parametrize("strategy", ["ALWC", "ACWL"])
def test_dynamic_quant_accuracy(strategy: str, lenet: Any, digits_data: Any, calib: Any) -> None:
    qfn = jaxptq.ptq(lenet, calib, {"quant_type": "DYNAMIC_QUANT", "quant_strategy": strategy})
    assert _acc(lenet, digits_data) - _acc(qfn, digits_data) <= 1.0
    dtypes = site_operand_dtypes(qfn, digits_data[2][:4])
    assert dtypes and all(integer_op(d) for d in dtypes)


@pytest.fixture(scope="module")
def full_lenet(lenet: Any, calib: Any) -> Any:
    return jaxptq.ptq(lenet, calib, {"quant_type": "FULL_QUANT"})


def test_full_quant_accuracy(full_lenet: Any, lenet: Any, digits_data: Any) -> None:
    assert _acc(lenet, digits_data) - _acc(full_lenet, digits_data) <= 1.0
    assert _agreement(full_lenet, lenet, digits_data[2]) >= 98.0


@pytest.mark.parametrize("method", ["KL", "REMOVAL_OUTLIER"])
def test_full_quant_other_calibration_methods(
    method: str, lenet: Any, calib: Any, digits_data: Any
) -> None:
    qfn = jaxptq.ptq(lenet, calib, {"quant_type": "FULL_QUANT", "activation_quant_method": method})
    assert _acc(lenet, digits_data) - _acc(qfn, digits_data) <= 1.0


def test_bias_correction_lowers_output_error(lenet: Any, calib: Any, digits_data: Any) -> None:
    x = digits_data[2]
    y = np.asarray(lenet(x))
    errors = {}
    for bias_correction in (False, True):
        qfn = jaxptq.ptq(
            lenet, calib, {"quant_type": "FULL_QUANT", "bias_correction": bias_correction}
        )
        errors[bias_correction] = float(np.mean((np.asarray(qfn(x)) - y) ** 2))
        corrections = [s.bias_correction for s in qfn.plan.sites]
        assert all((c is not None) == bias_correction for c in corrections)
        assert all(np.all(np.isfinite(c)) for c in corrections if c is not None)
    assert errors[True] < errors[False]


def test_full_quant_sites_are_int8_in_jaxpr_and_stablehlo(
    full_lenet: Any, digits_data: Any
) -> None:
    x = digits_data[2][:32]
    plan = full_lenet.plan
    assert [s.name for s in plan.sites] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    dtypes = site_operand_dtypes(full_lenet, x)
    # The jaxpr holds both platforms' form of every site (one `platforms.dependent` each;
    # lowering keeps one): a padded conv as XLA:CPU's im2col u8 x s8 dot and XLA:GPU's two
    # int8 convolutions, a dense site as a u8 x s8 and an s8 x s8 dot.
    assert len(dtypes) == 2 * 3 + 3 * 2, dtypes
    assert all(integer_op(d) for d in dtypes)
    text = full_lenet.lower(x).as_text()
    int_convs = [
        ln
        for ln in text.splitlines()
        if "stablehlo.convolution" in ln and "xi8>" in ln and "xi32>" in ln.split("->")[-1]
    ]
    int_dots = [
        ln
        for ln in text.splitlines()
        if "stablehlo.dot_general" in ln and "xi8>" in ln and "xi32>" in ln.split("->")[-1]
    ]
    # On XLA:CPU LeNet's 1- and 6-channel convs are im2col dots (conv_forms.py); XLA:GPU's
    # form of a padded zero-point conv adds a batch-1 conv (kernels.py).
    on_cpu = jax.default_backend() == "cpu"
    assert (len(int_convs), len(int_dots)) == ((0, 5) if on_cpu else (4, 3))
    # Integer weights are arguments of the program, not constants baked into the HLO.
    assert not [ln for ln in text.splitlines() if "stablehlo.constant" in ln and "xi8>" in ln]


def test_skipped_site_stays_float(lenet: Any, calib: Any, digits_data: Any) -> None:
    qfn = jaxptq.ptq(lenet, calib, {"quant_type": "FULL_QUANT", "skip_quant_node": ["fc3"]})
    assert qfn.plan["fc3"].skip_reason == "listed in skip_quant_node"
    dtypes = site_operand_dtypes(qfn, digits_data[2][:4])
    # fc3 last, in float; the others in both platforms' integer forms (see above)
    assert [d[1] for d in dtypes] == ["uint8", "int8", "int8"] * 2 + ["uint8", "int8"] * 2 + [
        "float32"
    ]


def test_jit_and_vmap(full_lenet: Any, digits_data: Any) -> None:
    x = digits_data[2][:16]
    y = np.asarray(full_lenet(x))
    np.testing.assert_array_equal(np.asarray(jax.jit(full_lenet)(x)), y)
    # the one-array fast path, keyed by a device array's abstract value and by a NumPy
    # array's shape and dtype: device arrays of two shapes in turn, then NumPy again
    device_x = jax.numpy.asarray(x)
    for _ in range(2):
        np.testing.assert_array_equal(np.asarray(full_lenet(device_x)), y)
        five = np.asarray(full_lenet(device_x[:5]))
        np.testing.assert_allclose(five, y[:5], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(full_lenet(x[:5])), five)
    np.testing.assert_array_equal(np.asarray(full_lenet(x)), y)
    # whichever kind of input comes first, each kind then takes the fast path
    fresh = jaxptq.ptq(full_lenet.fn, [x], {"quant_type": "FULL_QUANT"})
    fresh(x)
    fresh(device_x)
    assert set(fresh._one_array) == {(x.shape, x.dtype), device_x.aval}
    # a weakly typed input has an abstract value of its own, and the same program
    weak = jax.numpy.broadcast_to(jax.numpy.asarray(0.5), x.shape)
    assert weak.aval.weak_type
    np.testing.assert_array_equal(
        np.asarray(full_lenet(weak)), np.asarray(full_lenet(np.full(x.shape, 0.5, np.float32)))
    )
    per_example = jax.vmap(lambda xi: full_lenet(xi[None])[0])(x)
    np.testing.assert_allclose(np.asarray(per_example), y, rtol=1e-5, atol=1e-5)


def test_deterministic(lenet: Any, calib: Any, digits_data: Any, full_lenet: Any) -> None:
    again = jaxptq.ptq(lenet, calib, {"quant_type": "FULL_QUANT"})
    for a, b in zip(full_lenet.plan.sites, again.plan.sites, strict=True):
        np.testing.assert_array_equal(a.weight_q, b.weight_q)
        np.testing.assert_array_equal(a.weight_scale, b.weight_scale)
        assert (a.act_scale, a.act_zero_point) == (b.act_scale, b.act_zero_point)
        np.testing.assert_array_equal(a.bias_correction, b.bias_correction)
    x = digits_data[2]
    np.testing.assert_array_equal(np.asarray(full_lenet(x)), np.asarray(again(x)))


def test_plan_save_load_round_trip(
    full_lenet: Any, lenet: Any, digits_data: Any, tmp_path: Any
) -> None:
    full_lenet.plan.save(tmp_path / "plan")
    loaded = jaxptq.QuantPlan.load(tmp_path / "plan")
    assert loaded.table() == full_lenet.plan.table()
    rebuilt = jaxptq.apply_plan(lenet, loaded, digits_data[2][:8])
    x = digits_data[2]
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(full_lenet(x)))


def test_plan_save_packs_sub_byte_weights(mlp: Any, calib: Any, tmp_path: Any) -> None:
    sizes = {}
    for bits in (8, 4, 2):
        qfn = jaxptq.ptq(mlp, calib, {"quant_type": "WEIGHT_QUANT", "bit_num": bits, **ALL_SITES})
        qfn.plan.save(tmp_path / f"p{bits}")
        sizes[bits] = (tmp_path / f"p{bits}" / "arrays.npz").stat().st_size
        loaded = jaxptq.QuantPlan.load(tmp_path / f"p{bits}")
        for a, b in zip(qfn.plan.sites, loaded.sites, strict=True):
            np.testing.assert_array_equal(a.weight_q, b.weight_q)
    assert sizes[4] < 0.6 * sizes[8] and sizes[2] < 0.6 * sizes[4]


# --- the integer path, bit for bit ---------------------------------------------------------


def _np_quantize(x: np.ndarray, scale: float, zp: int) -> np.ndarray:
    inv = np.float32(1.0 / scale)
    return np.clip(np.round(x.astype(np.float32) * inv) + zp, -128, 127).astype(np.int64)


def test_dense_site_matches_numpy_int64_reference(mlp: Any, digits_data: Any) -> None:
    w = jnp.asarray(mlp.fc1.kernel[...])
    b = np.asarray(mlp.fc1.bias[...])
    x = digits_data[2][:64].reshape(64, -1)
    layer = jaxptq.ptq(
        lambda v: v @ w + b, [x], {"quant_type": "FULL_QUANT", "bias_correction": False}
    )
    site = layer.plan.sites[0]
    x_q = _np_quantize(x, site.act_scale, site.act_zero_point)
    w_q = site.weight_q.astype(np.int64)
    acc = x_q @ w_q - site.act_zero_point * w_q.sum(0)
    assert np.abs(acc).max() < 2**31
    expected = acc.astype(np.float32) * (np.float32(site.act_scale) * site.weight_scale[0]) + b
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-6, atol=1e-6)


def test_conv_integer_accumulator_is_exact() -> None:
    """The i8 convolution XLA runs equals an int64 NumPy convolution, zero point included."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)  # HWIO
    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32) + 0.5

    def conv(v: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            v, jnp.asarray(w), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    qfn = jaxptq.ptq(conv, [x], {"quant_type": "FULL_QUANT", "bias_correction": False})
    site = qfn.plan.sites[0]
    assert site.act_zero_point != 0
    x_q = _np_quantize(x, site.act_scale, site.act_zero_point) - site.act_zero_point
    padded = np.pad(x_q, ((0, 0), (1, 1), (1, 1), (0, 0)))
    acc = np.zeros((2, 6, 6, 8), np.int64)
    for i in range(3):
        for j in range(3):
            acc += np.einsum(
                "nhwc,co->nhwo",
                padded[:, i : i + 6, j : j + 6],
                site.weight_q[i, j].astype(np.int64),
            )
    expected = acc.astype(np.float32) * (np.float32(site.act_scale) * site.weight_scale.reshape(-1))
    np.testing.assert_allclose(np.asarray(qfn(x)), expected, rtol=1e-6, atol=1e-5)


def _zero_point_conv_net() -> tuple[Any, np.ndarray]:
    """A 3x3 SAME conv and a 1x1 VALID conv, quantized with non-zero zero points."""
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(rng.normal(size=(3, 3, 4, 8)).astype(np.float32))
    w2 = jnp.asarray(rng.normal(size=(1, 1, 8, 8)).astype(np.float32))
    dims = ("NHWC", "HWIO", "NHWC")

    def two_convs(v: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(v, w1, (1, 1), "SAME", dimension_numbers=dims)
        y = jax.nn.relu(y)
        return jax.lax.conv_general_dilated(y, w2, (1, 1), "VALID", dimension_numbers=dims)

    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32) + 0.5
    qfn = jaxptq.ptq(two_convs, [x], {"quant_type": "FULL_QUANT", "bias_correction": False})
    assert all(s.act_zero_point != 0 for s in qfn.plan.sites)
    return qfn, x


def _check_zero_point_forms(qfn: Any, x: np.ndarray) -> list[bool]:
    """Runs XLA:GPU's and XLA:CPU's form of every conv site on the CPU (XLA:GPU cannot run
    the CPU one) and asserts they agree bit for bit; returns each site's has-padding."""
    padded = []
    with jax.default_device(jax.devices("cpu")[0]):
        x = jnp.asarray(x)
        graph = qfn._graphs.get((x,))
        names = [s.name for s in graph.sites]
        inputs = site_inputs(qfn._graphs, jax.tree_util.tree_structure((x,)), names)(x)
        for site, plan in zip(graph.sites, qfn.plan.sites, strict=True):
            if site.primitive != "conv_general_dilated":
                continue
            args = kernels.static_args(plan, site)
            zp = plan.act_zero_point
            assert zp != 0
            x_q = kernels._quantize_act(inputs[site.name], args["act_scale"], zp)
            gpu_form = kernels.conv_zero_point_covered(site, x_q, args, zp)
            cpu_form = kernels.conv_zero_point_padded(site, x_q, args, zp)
            np.testing.assert_array_equal(np.asarray(gpu_form), np.asarray(cpu_form))
            padded.append(site.node.params["padding"] != ((0, 0), (0, 0)))
    return padded


def test_gpu_and_cpu_zero_point_conv_forms_agree_bit_for_bit(
    lenet: Any, calib: Any, digits_data: Any
) -> None:
    """XLA:GPU's form of a zero-point conv (own padding, the term after the convert, over
    the real window positions) equals XLA:CPU's (input padded with the zero point, the
    term in int32): LeNet's two SAME convs, and a SAME plus a VALID conv."""
    qfn = jaxptq.ptq(lenet, calib, {"quant_type": "FULL_QUANT", "bias_correction": False})
    assert _check_zero_point_forms(qfn, digits_data[2][:32]) == [True, True]
    assert _check_zero_point_forms(*_zero_point_conv_net()) == [True, False]


def test_cuda_lowering_keeps_integer_convs_in_forms_xla_gpu_runs() -> None:
    """Lowered for CUDA (no GPU needed), every int8 convolution's int32 result goes straight
    to a float convert, and no int8 input is padded: the two forms XLA:GPU rejected
    (an int32 zero-point term folded into an s32 cuDNN call; a zero-point-padded VALID conv
    turned into a backward-filter call) cannot come back. scripts/check_gpu.py runs it."""
    qfn, x = _zero_point_conv_net()
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    text = jax.export.export(jax.jit(qfn), platforms=("cuda",))(spec).mlir_module()
    lines = text.splitlines()
    assert sum("stablehlo.convolution" in ln and "xi8>" in ln for ln in lines) >= 2
    assert not [ln for ln in lines if "stablehlo.pad" in ln and "xi8>" in ln]
    int_math = r"stablehlo\.(add|subtract|multiply) .*: tensor<[0-9x]*xi32>"
    assert not [ln for ln in lines if re.search(int_math, ln)]


# --- tracing: names, folding, sub-jaxprs ----------------------------------------------------


def test_linen_sites_named_by_module_path(digits_data: Any) -> None:
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.relu(nn.Dense(32, name="hidden")(x.reshape(x.shape[0], -1)))
            return nn.Dense(10, name="head")(x)

    x = digits_data[0][:20]
    variables = Net().init(jax.random.key(0), x)
    qfn = jaxptq.ptq(
        functools.partial(Net().apply, variables), [x], {"quant_type": "DYNAMIC_QUANT"}
    )
    assert [s.name for s in qfn.plan.sites] == ["Net/hidden", "Net/head"]


def test_weight_expressions_fold_and_sub_jaxprs_are_searched() -> None:
    rng = np.random.default_rng(1)
    w_t = jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))  # stored transposed
    gamma = jnp.asarray(rng.uniform(0.5, 2, size=(16,)).astype(np.float32))
    w2 = jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32))
    w3 = jnp.asarray(rng.normal(size=(4, 4)).astype(np.float32))

    @jax.jit
    def inner(h: jax.Array) -> jax.Array:
        with jax.named_scope("inner"):
            return jnp.einsum("bi,io->bo", h, w2)

    @jax.checkpoint
    def block(h: jax.Array) -> jax.Array:
        return jax.nn.relu(inner(h)) @ w3

    def fn(x: jax.Array) -> jax.Array:
        with jax.named_scope("first"):
            h = x @ (w_t.T * gamma)  # transpose and BatchNorm-style scaling of a weight
        return block(jax.nn.gelu(h))

    x = rng.normal(size=(32, 8)).astype(np.float32)
    qfn = jaxptq.ptq(fn, [x], {"quant_type": "DYNAMIC_QUANT"})
    names = [s.name for s in qfn.plan.sites]
    assert names[:2] == ["first", "inner/bi,io->bo"] and len(names) == 3  # einsum scopes its spec
    assert qfn.plan["first"].weight_shape == (8, 16)
    y, y_q = np.asarray(fn(x)), np.asarray(qfn(x))
    cos = float(np.sum(y * y_q) / np.linalg.norm(y) / np.linalg.norm(y_q))
    assert cos > 0.999
    assert all(integer_op(d) for d in site_operand_dtypes(qfn, x))


# --- bad input -----------------------------------------------------------------------------


def test_mismatched_calibration_sample_names_index(lenet: Any, calib: Any) -> None:
    bad = [*calib[:3], np.zeros((10, 8, 9, 1), np.float32)]
    with pytest.raises(
        ValueError, match=r"sample 3.*float32\[10, 8, 8, 1\].*float32\[10, 8, 9, 1\]"
    ):
        jaxptq.ptq(lenet, bad, {"quant_type": "FULL_QUANT"})
    with pytest.raises(ValueError, match=r"sample 1.*float64"):
        jaxptq.ptq(lenet, [calib[0], calib[1].astype(np.float64)], {"quant_type": "FULL_QUANT"})


def test_sample_that_does_not_fit_fn(lenet: Any) -> None:
    with pytest.raises(ValueError, match=r"sample 0 \(float32\[4, 5, 5, 1\]\) does not fit `fn`"):
        jaxptq.ptq(lenet, [np.zeros((4, 5, 5, 1), np.float32)], {"quant_type": "DYNAMIC_QUANT"})


def test_nan_in_calibration_names_site(lenet: Any, calib: Any) -> None:
    bad = [c.copy() for c in calib]
    bad[2][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="conv1"):
        jaxptq.ptq(lenet, bad, {"quant_type": "FULL_QUANT"})


def test_empty_calibration_set(lenet: Any) -> None:
    with pytest.raises(ValueError, match="`calib_data` is empty.*about 100"):
        jaxptq.ptq(lenet, [], {"quant_type": "FULL_QUANT"})


@pytest.mark.parametrize(
    ("keys", "pattern"),
    [
        ({"bit_num": 17}, r"`bit_num` = 17 is out of range 0..16"),
        ({"quant_type": "INT8"}, r"WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT"),
        ({"bit_nums": 8}, r"unknown config key `bit_nums`; did you mean `bit_num`"),
        ({"quant_type": "FULL_QUANT", "bit_num": 4}, r"set `bit_num` = 8"),
    ],
)
def test_bad_config_values(keys: dict[str, Any], pattern: str) -> None:
    with pytest.raises(jaxptq.ConfigError, match=pattern):
        jaxptq.QuantConfig.create(**keys)


def test_unknown_skip_node_lists_closest(lenet: Any, calib: Any) -> None:
    with pytest.raises(jaxptq.ConfigError, match=r"`fc_3`.*closest: `fc3`"):
        jaxptq.ptq(lenet, calib, {"quant_type": "WEIGHT_QUANT", "skip_quant_node": ["fc_3"]})


def test_site_names_survive_vmap() -> None:
    w = jnp.ones((3, 2))

    def f(x: jax.Array) -> jax.Array:
        with jax.named_scope("layer"):
            return x @ w

    row_wise = jax.vmap(lambda r: f(r[None])[0])
    qfn = jaxptq.ptq(row_wise, [np.ones((4, 3), np.float32)], {"quant_type": "DYNAMIC_QUANT"})
    assert [s.name for s in qfn.plan.sites] == ["layer"]


def test_first_call_inside_jit_and_vmap_caches_no_tracer(
    lenet: Any, calib: Any, digits_data: Any
) -> None:
    qfn = jaxptq.ptq(lenet, calib, {"quant_type": "FULL_QUANT", "bias_correction": False})
    rows = jax.jit(jax.vmap(lambda r: qfn(r[None])[0]))  # per-row shapes: a new graph
    x = digits_data[2][:8]
    first = np.asarray(rows(x))
    np.testing.assert_array_equal(np.asarray(rows(x[:4])), first[:4])  # a second trace
    np.testing.assert_allclose(first, np.asarray(qfn(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ALWC", "ACWL"])
def test_dynamic_quant_of_nchw_conv_equals_its_nhwc_twin(strategy: str) -> None:
    """On XLA:CPU a convolution's run-time scale and quantize are taken channels last
    (`kernels._dynamic_quantize_conv_input`); an NCHW model gets the very integers and
    outputs of the same model written NHWC."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)  # OIHW
    x = rng.normal(size=(5, 3, 9, 11)).astype(np.float32)  # NCHW

    def nchw(v: jax.Array) -> jax.Array:
        dn = ("NCHW", "OIHW", "NCHW")
        y = jax.lax.conv_general_dilated(jnp.tanh(v), w, (1, 1), "SAME", dimension_numbers=dn)
        return jax.nn.relu(y)

    def nhwc(v: jax.Array) -> jax.Array:
        dn = ("NHWC", "HWIO", "NHWC")
        w_hwio = np.transpose(w, (2, 3, 1, 0))
        y = jax.lax.conv_general_dilated(jnp.tanh(v), w_hwio, (1, 1), "SAME", dimension_numbers=dn)
        return jax.nn.relu(y)

    config = {"quant_type": "DYNAMIC_QUANT", "quant_strategy": strategy}
    a = jaxptq.ptq(nchw, [x], config)(x)
    b = jaxptq.ptq(nhwc, [np.transpose(x, (0, 2, 3, 1))], config)(np.transpose(x, (0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(a), np.transpose(np.asarray(b), (0, 3, 1, 2)))
    ref = np.asarray(nchw(x)).ravel()
    cos = float(np.asarray(a).ravel() @ ref / (np.linalg.norm(a) * np.linalg.norm(ref)))
    assert cos > 0.999
