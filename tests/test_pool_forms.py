"""Pooling as strided slices equals XLA's reduce-window: exactly for max and min (and for
integer sums), to float rounding for float sums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxptq import pool_forms

CASES = [  # (window, strides, padding)
    ((1, 2, 2, 1), (1, 2, 2, 1), "VALID"),  # LeNet's average pools
    ((1, 3, 3, 1), (1, 2, 2, 1), "SAME"),  # overlapping, padded (ResNet's max pool)
    ((1, 1, 3, 3), (1, 1, 1, 2), ((0, 0), (0, 0), (1, 1), (0, 2))),  # NCHW, uneven padding
    ((2, 1, 2, 1), (1, 1, 2, 1), "VALID"),  # a window over the batch axis too
]


pytestmark = pytest.mark.usefixtures("on_the_cpu")


@pytest.mark.parametrize(("window", "strides", "padding"), CASES)
@pytest.mark.parametrize(
    ("combine", "init", "prim"),
    [
        (lax.add, 0.0, lax.reduce_window_sum_p),
        (lax.max, -np.inf, lax.reduce_window_max_p),
        (lax.min, np.inf, lax.reduce_window_min_p),
    ],
)
def test_slices_equal_the_primitive(window, strides, padding, combine, init, prim) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 9, 10, 5)).astype(np.float32)
    expected = lax.reduce_window(x, init, combine, window, strides, padding)

    def pool(v):
        return lax.reduce_window(v, init, combine, window, strides, padding)

    params = jax.make_jaxpr(pool)(x).eqns[0].params
    assert pool_forms.applies(params)
    got = jax.jit(lambda v: pool_forms.RULES[prim](v, params))(x)
    assert got.shape == expected.shape
    if combine is lax.add:
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
        ints = rng.integers(-1000, 1000, size=x.shape).astype(np.int32)
        exact = lax.reduce_window(ints, 0, lax.add, window, strides, padding)
        got_ints = jax.jit(lambda v: pool_forms.RULES[prim](v, params))(ints)
        np.testing.assert_array_equal(np.asarray(got_ints), np.asarray(exact))
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    # One loop fusion, no reduce-window left for XLA:CPU to hand to YNNPACK.
    hlo = jax.jit(lambda v: pool_forms.RULES[prim](v, params)).lower(x).compile().as_text()
    assert "reduce-window" not in hlo and "ynn" not in hlo


def test_large_windows_keep_the_primitive() -> None:
    x = np.ones((2, 8, 8, 3), np.float32)
    params = (
        jax.make_jaxpr(
            lambda v: lax.reduce_window(v, 0.0, lax.add, (1, 5, 5, 1), (1, 1, 1, 1), "VALID")
        )(x)
        .eqns[0]
        .params
    )
    assert not pool_forms.applies(params)
    got = pool_forms.RULES[lax.reduce_window_sum_p](jnp.asarray(x), params)
    np.testing.assert_array_equal(np.asarray(got), np.full((2, 4, 4, 3), 25.0, np.float32))
