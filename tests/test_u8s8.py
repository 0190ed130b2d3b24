"""The `u8 x s8` form of an integer dot is exact, batches, exports, and is what XLA:CPU gets."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export

from jaxptq import u8s8


def _int8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-128, 128, size=shape).astype(np.int8)


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    k=st.integers(1, 40),
    n=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_equals_the_int64_reference(lead, k, n, seed) -> None:
    rng = np.random.default_rng(seed)
    x, w = _int8(rng, (*lead, k)), _int8(rng, (k, n))
    x[..., 0] = -128  # the extremes, where an off-by-128 would show
    w[0] = -128
    want = x.astype(np.int64) @ w.astype(np.int64)
    got = np.asarray(jax.jit(u8s8.dot)(x, w))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_vmap_over_activations_and_over_weights() -> None:
    rng = np.random.default_rng(0)
    x, w = _int8(rng, (3, 5, 16)), _int8(rng, (2, 16, 4))
    ref = np.einsum("bmk,wkn->wbmn", x.astype(np.int64), w.astype(np.int64))
    by_rows = jax.vmap(u8s8.dot, in_axes=(1, None))(x, w[0])
    np.testing.assert_array_equal(np.asarray(by_rows), np.moveaxis(ref[0], 1, 0))
    by_weights = jax.vmap(u8s8.dot, in_axes=(None, 0))(x, w)
    np.testing.assert_array_equal(np.asarray(by_weights), ref)


def test_stablehlo_is_u8_on_cpu_and_s8_elsewhere_and_exports() -> None:
    rng = np.random.default_rng(1)
    x, w = _int8(rng, (8, 32)), _int8(rng, (32, 4))
    cpu = export.export(jax.jit(u8s8.dot), platforms=("cpu",))(x, w).mlir_module()
    assert "tensor<8x32xui8>, tensor<32x4xi8>) -> tensor<8x4xi32>" in cpu
    cuda = export.export(jax.jit(u8s8.dot), platforms=("cuda",))(x, w).mlir_module()
    assert "ui8" not in cuda
    assert "tensor<8x32xi8>, tensor<32x4xi8>) -> tensor<8x4xi32>" in cuda
    reloaded = export.deserialize(export.export(jax.jit(u8s8.dot))(x, w).serialize())
    want = x.astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(np.asarray(reloaded.call(x, w)), want)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 17])
def test_s8_dot_general_pads_odd_contractions_exactly(k) -> None:
    """Off the CPU an int8 dot contracts a multiple of 4 (XLA:GPU's Triton int8 gemm gave
    twice the product otherwise); the zero padding leaves every sum exact."""
    rng = np.random.default_rng(k)
    x, w = _int8(rng, (3, k)), _int8(rng, (k, 5))
    want = x.astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(np.asarray(jax.jit(u8s8.dot)(x, w)), want)
    cuda = export.export(jax.jit(u8s8.dot), platforms=("cuda",))(x, w).mlir_module()
    k4 = -(-k // 4) * 4
    assert f"(tensor<3x{k4}xi8>, tensor<{k4}x5xi8>) -> tensor<3x5xi32>" in cuda
    # batched, two contracting axes (6 x 3 = 18 values: the last axis pads 3 -> 4)
    q, kv = _int8(rng, (2, 4, 6, 3)), _int8(rng, (2, 5, 6, 3))
    dims = (((2, 3), (2, 3)), ((0,), (0,)))
    got = jax.jit(u8s8.s8_dot_general, static_argnums=2)(q, kv, dims)
    ref = np.einsum("bqcd,bkcd->bqk", q.astype(np.int64), kv.astype(np.int64))
    np.testing.assert_array_equal(np.asarray(got), ref)
