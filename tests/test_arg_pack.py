"""`jaxptq.arg_pack`: small arrays ride in one buffer per dtype and come back exactly."""

from __future__ import annotations

import jax
import numpy as np

from jaxptq.arg_pack import SMALL_BYTES, ArgPack


def test_a_tree_comes_back_exactly_with_one_buffer_per_small_dtype() -> None:
    rng = np.random.default_rng(0)
    tree = {
        "a": {"q": rng.integers(-128, 128, (64, 128)).astype(np.int8), "s": np.float32(0.5)},
        "b": [rng.normal(size=(1, 7)).astype(np.float32), np.arange(5, dtype=np.int32)],
        "big": rng.normal(size=(SMALL_BYTES // 4 + 1,)).astype(np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    pack = ArgPack(tree)
    large, buffers = pack.args
    assert [a.shape for a in large] == [(64, 128), (SMALL_BYTES // 4 + 1,)]
    assert sorted(buffers) == ["<f4", "<i4"] and buffers["<f4"].shape == (8,)
    back = jax.jit(pack.unpack)(large, buffers)
    for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(back), strict=True):
        assert got.dtype == want.dtype and got.shape == np.shape(want)
        np.testing.assert_array_equal(np.asarray(got), want)
