"""Packed weight encoding and the quantize/dequantize math it stores, checked as properties,
plus the sizes a packed plan really takes on disk and as program arguments."""

from __future__ import annotations

import pathlib

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from jaxptq import qmath
from jaxptq.api import ptq
from jaxptq.config import ConfigError, QuantConfig
from jaxptq.plan import QuantPlan

SETTINGS = settings(max_examples=60, deadline=None)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7)


@st.composite
def signed_codes(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bits = draw(st.integers(1, 8))
    lo, hi = qmath.signed_range(bits)
    q = draw(hnp.arrays(np.int8, draw(shapes), elements=st.integers(lo, hi)))
    return q, bits


@given(signed_codes())
@SETTINGS
def test_pack_round_trips_bit_exactly(case: tuple[np.ndarray, int]) -> None:
    q, bits = case
    packed = qmath.pack(q, bits)
    assert packed.dtype == np.uint8
    assert packed.size == qmath.packed_size(q.size, bits) == -(-q.size * bits // 8)
    back = qmath.unpack(packed, bits, q.size).reshape(q.shape)
    np.testing.assert_array_equal(back, q)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_inside_jit_matches_numpy(bits: int) -> None:
    lo, hi = qmath.signed_range(bits)
    q = np.random.default_rng(bits).integers(lo, hi + 1, size=37).astype(np.int8)
    packed = qmath.pack(q, bits)
    traced = jax.jit(lambda p: qmath.unpack(p, bits, q.size))(jnp.asarray(packed))
    np.testing.assert_array_equal(np.asarray(traced), q)


def test_pack_refuses_wide_codes() -> None:
    with pytest.raises(ValueError, match="1..8 bits"):
        qmath.pack(np.zeros(4, np.int16), 9)


@st.composite
def weight_case(draw: st.DrawFn) -> tuple[np.ndarray, int, tuple[int, ...]]:
    shape = draw(shapes)
    w = draw(
        hnp.arrays(
            np.float32,
            shape,
            elements=st.floats(-100, 100, allow_nan=False, width=32),
        )
    )
    w.flat[0] = 0.0  # zero must come back exactly, whatever else is there
    bits = draw(st.integers(1, 16))
    axes = tuple(draw(st.sets(st.integers(0, len(shape) - 1))))
    return w, bits, axes


@given(weight_case())
@SETTINGS
def test_quantize_dequantize_properties(case: tuple[np.ndarray, int, tuple[int, ...]]) -> None:
    w, bits, axes = case
    scale = qmath.symmetric_scale(w, bits, axes)
    lo, hi = qmath.symmetric_range(bits)
    q = qmath.quantize(w, scale, 0, lo, hi, qmath.storage_dtype(bits))
    deq = qmath.dequantize(q, scale)
    # Per-channel axes keep their length, every other axis shares one scale.
    assert scale.shape == tuple(n if a in axes else 1 for a, n in enumerate(w.shape))
    assert q.dtype == (np.int8 if bits <= 8 else np.int16)
    assert lo <= q.min() and q.max() <= hi
    # Zero is exact.
    assert q.flat[0] == 0 and deq.flat[0] == 0.0
    # Inside the representable range the error is at most half a step.
    scale_b = np.broadcast_to(scale, w.shape)
    inside = (w >= lo * scale_b) & (w <= hi * scale_b)
    err = np.abs(deq - w)
    bound = 0.5 * scale_b * (1 + 1e-5) + 1e-6 * np.abs(w)
    assert np.all(err[inside] <= bound[inside])
    # Outside it the codes saturate at the ends.
    assert np.all(q[w > hi * scale_b] == hi)
    assert np.all(q[w < lo * scale_b] == lo)
    if bits > 1:  # each channel's largest magnitude lands on the largest level
        # (channels below qmath's tiny-scale floor count as all-zero)
        absq = np.max(np.abs(q.astype(np.int32)), axis=qmath.reduce_axes(w.ndim, axes))
        absw = np.max(np.abs(w), axis=qmath.reduce_axes(w.ndim, axes))
        np.testing.assert_array_equal(absq[absw > 1e-20], hi)


@pytest.mark.parametrize("bits", range(1, 17))
def test_values_beyond_the_scale_saturate(bits: int) -> None:
    lo, hi = qmath.symmetric_range(bits)
    scale = np.float32(0.5)
    x = np.array([-1e6, lo * 0.5 - 3.0, 0.0, hi * 0.5 + 3.0, 1e6], np.float32)
    q = qmath.quantize(x, scale, 0, lo, hi, qmath.storage_dtype(bits))
    np.testing.assert_array_equal(q, [lo, lo, 0, hi, hi])


@pytest.mark.parametrize("bit_num", [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 15])
def test_enable_encode_false_is_refused_below_8_and_between(bit_num: int) -> None:
    with pytest.raises(ConfigError, match="enable_encode"):
        QuantConfig.create(bit_num=bit_num, enable_encode=False)


@pytest.mark.parametrize("bit_num", [8, 16])
def test_enable_encode_false_is_accepted_at_8_and_16(bit_num: int) -> None:
    cfg = QuantConfig.create(bit_num=bit_num, enable_encode=False)
    assert not cfg.common_quant_param.enable_encode


# --- sizes of real plans ----------------------------------------------------------------

_RNG = np.random.default_rng(0)
_K = _RNG.normal(size=(3, 3, 32, 64)).astype(np.float32)  # HWIO
_W2 = _RNG.normal(size=(64, 256)).astype(np.float32) / 8
_W3 = _RNG.normal(size=(256, 256)).astype(np.float32) / 16
_X = _RNG.normal(size=(2, 8, 8, 32)).astype(np.float32)
_ELEMENTS = (_K.size, _W2.size, _W3.size)


def _net(x: jax.Array, k: object = _K, w2: object = _W2, w3: object = _W3) -> jax.Array:
    y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jnp.mean(jax.nn.relu(y), axis=(1, 2))
    return jax.nn.relu(y @ w2) @ w3


def _folder_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def _int_arg_bytes(lowered: jax.stages.Lowered) -> int:
    infos = jax.tree_util.tree_leaves(lowered.args_info)
    return sum(
        int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        for a in infos
        if np.issubdtype(a.dtype, np.integer)
    )


@pytest.fixture(scope="module")
def saved_sizes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[int, int, QuantPlan]]:
    """bits -> (saved folder bytes, integer argument bytes of the lowered program, plan)."""
    out = {}
    for bits in (8, 4, 3, 2, 1):
        qfn = ptq(_net, [_X], {"bit_num": bits})
        folder = tmp_path_factory.mktemp(f"plan{bits}")
        qfn.plan.save(folder / "p")
        out[bits] = (_folder_bytes(folder / "p"), _int_arg_bytes(qfn.lower(_X)), qfn.plan)
        if bits == 4:  # the packed program computes exactly the dequantized weights
            deq = [qmath.dequantize(s.weight_q, s.weight_scale) for s in qfn.plan.sites]
            np.testing.assert_allclose(qfn(_X), _net(_X, *deq), rtol=1e-5, atol=1e-5)
            loaded = QuantPlan.load(folder / "p")
            for a, b in zip(qfn.plan.sites, loaded.sites, strict=True):
                np.testing.assert_array_equal(a.weight_q, b.weight_q)
    return out


@pytest.mark.parametrize("bits", [4, 3, 2, 1])
def test_packed_sizes_shrink_with_the_bits(saved_sizes: dict, bits: int) -> None:
    folder8, args8, _ = saved_sizes[8]
    folder, args, plan = saved_sizes[bits]
    assert all(s.bits == bits for s in plan.sites)
    # The program's integer arguments are exactly the packed weights.
    assert args8 == sum(_ELEMENTS)
    assert args == sum(qmath.packed_size(n, bits) for n in _ELEMENTS)
    # The saved folder shrinks in proportion, plus a few KB of scales and metadata.
    assert folder / folder8 <= bits / 8 + 0.05
    assert folder >= sum(qmath.packed_size(n, bits) for n in _ELEMENTS)
    before, after = plan.weight_bytes()
    assert before == 4 * sum(_ELEMENTS)
    assert after == sum(qmath.packed_size(n, bits) for n in _ELEMENTS) + 4 * (64 + 256 + 256)


def test_unpacked_16_bit_weights_take_two_bytes(tmp_path: pathlib.Path) -> None:
    qfn = ptq(_net, [_X], {"bit_num": 16, "enable_encode": False})
    qfn.plan.save(tmp_path / "p")
    with np.load(tmp_path / "p" / "arrays.npz") as npz:
        q = [npz[k] for k in npz.files if k.endswith("weight_q")]
    assert [a.dtype for a in q] == [np.int16] * 3
    assert sum(a.nbytes for a in q) == 2 * sum(_ELEMENTS)
    assert _int_arg_bytes(qfn.lower(_X)) == 2 * sum(_ELEMENTS)
