"""Each fast convolution form equals XLA's convolution: exactly on integers, to float
rounding on floats, in every layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxptq import conv_forms, depthwise

pytestmark = pytest.mark.usefixtures("on_the_cpu")


def _params(lhs_shape, rhs_shape, dn, stride, padding, dilation, groups):
    return dict(
        window_strides=stride,
        padding=padding,
        lhs_dilation=(1, 1),
        rhs_dilation=dilation,
        dimension_numbers=lax.conv_dimension_numbers(lhs_shape, rhs_shape, dn),
        feature_group_count=groups,
        batch_group_count=1,
        precision=None,
        preferred_element_type=jnp.int32,
        out_sharding=None,
    )


def _operands(dn, c_in, c_out, kernel, groups, rng):
    lhs = rng.integers(-128, 128, size=(2, c_in, 9, 11)).astype(np.int8)
    rhs = rng.integers(-127, 128, size=(c_out, c_in // groups, *kernel)).astype(np.int8)
    lhs = np.transpose(lhs, ["NCHW".index(a) for a in dn[0]])
    rhs = np.transpose(rhs, ["OIHW".index(a) for a in dn[1]])
    return lhs, rhs


def _check(form, lhs, rhs, params) -> None:
    expected = lax.conv_general_dilated_p.bind(jnp.asarray(lhs), jnp.asarray(rhs), **params)
    got = form(jnp.asarray(lhs), jnp.asarray(rhs), params)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    f_params = dict(params, preferred_element_type=None)
    f_lhs, f_rhs = jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32)
    f_expected = lax.conv_general_dilated_p.bind(f_lhs, f_rhs, **f_params)
    f_got = form(f_lhs, f_rhs, f_params)
    np.testing.assert_allclose(np.asarray(f_got), np.asarray(f_expected), rtol=1e-5, atol=1e-2)


LAYOUTS = [
    ("NCHW", "OIHW", "NCHW"),
    ("NHWC", "HWIO", "NHWC"),
    ("NHWC", "HWIO", "NCHW"),
    ("NCHW", "HWIO", "NHWC"),
]


@pytest.mark.parametrize(
    ("dn", "stride", "padding", "dilation", "multiplier"),
    [
        (LAYOUTS[0], (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
        (LAYOUTS[0], (2, 2), ((0, 1), (1, 0)), (1, 1), 1),
        (LAYOUTS[1], (1, 2), ((2, 2), (2, 2)), (2, 1), 2),
        (LAYOUTS[2], (2, 1), ((1, 1), (0, 0)), (1, 1), 1),
    ],
)
def test_depthwise_as_shifted_slices(dn, stride, padding, dilation, multiplier) -> None:
    c = 6
    lhs, rhs = _operands(dn, c, c * multiplier, (3, 3), c, np.random.default_rng(0))
    params = _params(lhs.shape, rhs.shape, dn, stride, padding, dilation, c)
    assert depthwise.is_depthwise(params, lhs.shape, rhs.shape)
    _check(conv_forms._depthwise_conv, lhs, rhs, params)


@pytest.mark.parametrize("dn", LAYOUTS)
@pytest.mark.parametrize("stride", [(1, 1), (2, 3)])
def test_pointwise_as_a_dot(dn, stride) -> None:
    lhs, rhs = _operands(dn, 24, 40, (1, 1), 1, np.random.default_rng(1))
    params = _params(lhs.shape, rhs.shape, dn, stride, ((0, 0), (0, 0)), (1, 1), 1)
    assert conv_forms.is_pointwise(params, lhs, rhs)
    _check(conv_forms.pointwise_conv, lhs, rhs, params)


@pytest.mark.parametrize("dn", LAYOUTS)
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [
        ((3, 3), (2, 2), ((0, 1), (0, 1)), (1, 1)),
        ((5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1)),
        ((3, 2), (1, 2), ((1, 0), (2, 1)), (2, 1)),
    ],
)
def test_im2col_dot(dn, kernel, stride, padding, dilation) -> None:
    lhs, rhs = _operands(dn, 3, 32, kernel, 1, np.random.default_rng(2))
    params = _params(lhs.shape, rhs.shape, dn, stride, padding, dilation, 1)
    assert conv_forms.im2col_pays(params, lhs, rhs)
    _check(conv_forms.im2col_conv, lhs, rhs, params)


@pytest.mark.parametrize(
    ("dtype", "dn", "c_in", "kernel", "groups", "form"),
    [
        (np.int8, LAYOUTS[0], 6, (3, 3), 6, "_depthwise_conv"),
        (np.int8, LAYOUTS[0], 24, (1, 1), 1, "pointwise_conv"),
        (np.int8, LAYOUTS[0], 3, (3, 3), 1, "im2col_conv"),
        (np.int8, LAYOUTS[1], 24, (3, 3), 1, "im2col_conv"),
        (np.int8, LAYOUTS[0], 24, (3, 3), 2, "generic_conv"),
        (np.float32, LAYOUTS[0], 24, (1, 1), 1, "pointwise_conv"),
        (np.float32, LAYOUTS[0], 3, (3, 3), 1, "im2col_conv"),
        (np.float32, LAYOUTS[0], 24, (3, 3), 1, "generic_conv"),
        (np.float32, LAYOUTS[1], 3, (3, 3), 1, "generic_conv"),  # YNNPACK takes it
    ],
)
def test_cpu_picks_the_form_and_agrees_with_xla(dtype, dn, c_in, kernel, groups, form) -> None:
    lhs, rhs = _operands(dn, c_in, 24, kernel, groups, np.random.default_rng(3))
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    params = _params(lhs.shape, rhs.shape, dn, (1, 1), ((1, 1), (0, 0)), (1, 1), groups)
    if dtype == np.float32:
        params["preferred_element_type"] = None
    if kernel == (1, 1):
        params["padding"] = ((0, 0), (0, 0))
    assert conv_forms._lowering(conv_forms.CPU_FORMS, lhs, rhs, params).__name__ == form
    expected = lax.conv_general_dilated_p.bind(jnp.asarray(lhs), jnp.asarray(rhs), **params)
    got = jax.jit(lambda a, b: conv_forms.conv(a, b, params))(lhs, rhs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-2)


def test_a_zero_point_pads_every_form() -> None:
    """`pad_value` fills the padding in each form as an explicitly padded VALID conv does."""
    rng = np.random.default_rng(4)
    for c_in, groups in ((6, 6), (3, 1), (24, 1), (24, 2)):
        lhs, rhs = _operands(LAYOUTS[0], c_in, 24, (3, 3), groups, rng)
        padding = ((1, 2), (0, 1))
        params = _params(lhs.shape, rhs.shape, LAYOUTS[0], (1, 1), padding, (1, 1), groups)
        padded = np.pad(lhs, ((0, 0), (0, 0), padding[0], padding[1]), constant_values=-37)
        valid = dict(params, padding=((0, 0), (0, 0)))
        expected = lax.conv_general_dilated_p.bind(jnp.asarray(padded), jnp.asarray(rhs), **valid)
        forms = [low for applies, low in conv_forms.CPU_FORMS if applies(params, lhs, rhs)]
        assert len(forms) == (0 if groups == 2 else 1)
        for lowering in (*forms, conv_forms.generic_conv):
            got = lowering(jnp.asarray(lhs), jnp.asarray(rhs), params, -37)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize(
    ("dn", "c_in", "kernel", "stride", "padding", "zero_point"),
    [
        (LAYOUTS[0], 24, (1, 1), (1, 1), ((0, 0), (0, 0)), -128),  # pointwise, a ReLU's zp
        (LAYOUTS[2], 16, (1, 1), (2, 2), ((0, 0), (0, 0)), 37),  # strided pointwise
        (LAYOUTS[0], 3, (3, 3), (1, 1), ((1, 1), (1, 1)), -5),  # im2col, padded
        (LAYOUTS[1], 6, (5, 5), (2, 1), ((2, 2), (0, 3)), 100),  # im2col, uneven padding
    ],
)
def test_codes_go_straight_into_the_dot_forms(dn, c_in, kernel, stride, padding, zero_point):
    """`conv_codes` reads uint8 codes `q + 128` and gives `sum (q - zp) w` exactly, the
    padding counting as the zero point, as the int8 convolution of `q - zp` does."""
    lhs, rhs = _operands(dn, c_in, 24, kernel, 1, np.random.default_rng(5))
    params = _params(lhs.shape, rhs.shape, dn, stride, padding, (1, 1), 1)
    assert conv_forms.takes_codes(params, lhs, rhs)
    out_axis = params["dimension_numbers"][1][0]
    w_sum = rhs.astype(np.int32).sum(axis=tuple(a for a in range(4) if a != out_axis))
    codes = (lhs.astype(np.int32) + 128).astype(np.uint8)
    got = jax.jit(lambda c, w, s: conv_forms.conv_codes(c, w, params, zero_point, s))(
        codes, rhs, w_sum
    )
    centred = jnp.asarray(lhs.astype(np.int32) - zero_point)
    expected = lax.conv_general_dilated_p.bind(centred, jnp.asarray(rhs, jnp.int32), **params)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_depthwise_and_grouped_convolutions_take_no_codes():
    rng = np.random.default_rng(6)
    for c_in, groups in ((6, 6), (24, 2)):
        lhs, rhs = _operands(LAYOUTS[0], c_in, 24, (3, 3), groups, rng)
        params = _params(lhs.shape, rhs.shape, LAYOUTS[0], (1, 1), ((1, 1),) * 2, (1, 1), groups)
        assert not conv_forms.takes_codes(params, lhs, rhs)
