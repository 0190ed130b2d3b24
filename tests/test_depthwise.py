"""Depthwise convolutions as shifted slices equal XLA's convolution."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxptq import depthwise


@pytest.mark.parametrize(
    ("dn", "stride", "padding", "dilation", "multiplier"),
    [
        (("NCHW", "OIHW", "NCHW"), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
        (("NCHW", "OIHW", "NCHW"), (2, 2), ((0, 1), (1, 0)), (1, 1), 1),
        (("NHWC", "HWIO", "NHWC"), (1, 2), ((2, 2), (2, 2)), (2, 1), 2),
        (("NHWC", "HWIO", "NCHW"), (2, 1), ((1, 1), (0, 0)), (1, 1), 1),
    ],
)
def test_matches_xla_exactly_on_integers(dn, stride, padding, dilation, multiplier) -> None:
    rng = np.random.default_rng(0)
    c = 6
    lhs = rng.integers(-128, 128, size=(2, c, 9, 11)).astype(np.int8)
    rhs = rng.integers(-127, 128, size=(c * multiplier, 1, 3, 3)).astype(np.int8)
    lhs = np.transpose(lhs, [("NCHW").index(a) for a in dn[0]])
    rhs = np.transpose(rhs, [("OIHW").index(a) for a in dn[1]])
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
    params = dict(
        window_strides=stride,
        padding=padding,
        lhs_dilation=(1, 1),
        rhs_dilation=dilation,
        dimension_numbers=dims,
        feature_group_count=c,
        batch_group_count=1,
        precision=None,
        preferred_element_type=jnp.int32,
        out_sharding=None,
    )
    assert depthwise.is_depthwise(params, lhs.shape, rhs.shape)
    expected = lax.conv_general_dilated_p.bind(jnp.asarray(lhs), jnp.asarray(rhs), **params)
    got = depthwise.conv(jnp.asarray(lhs), jnp.asarray(rhs), params)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    f_params = dict(params, preferred_element_type=None)
    f_expected = lax.conv_general_dilated_p.bind(
        jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), **f_params
    )
    f_got = depthwise.conv(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), f_params)
    np.testing.assert_allclose(np.asarray(f_got), np.asarray(f_expected), rtol=1e-6)
