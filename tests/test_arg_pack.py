"""`jaxptq.arg_pack`: weights stay arguments (small ones in one buffer per dtype), other
small arrays become constants, and every array comes back exactly."""

from __future__ import annotations

import jax
import numpy as np

from jaxptq.arg_pack import SMALL_BYTES, ArgPack


def _is_weight(path: tuple) -> bool:
    return getattr(path[-1], "key", None) == "q"


def test_a_tree_comes_back_exactly_with_weights_as_the_only_small_arguments() -> None:
    rng = np.random.default_rng(0)
    tree = {
        "a": {"q": rng.integers(-128, 128, (64, 128)).astype(np.int8), "s": np.float32(0.5)},
        "b": {"q": rng.integers(-128, 128, (10, 7)).astype(np.int8)},
        "c": {"q": np.arange(3, dtype=np.int8), "w_sum": np.arange(5, dtype=np.int32)},
        "d": {"q": np.arange(6, dtype=np.uint8)},
        "f": [rng.normal(size=(1, 7)).astype(np.float32)],
        "big": rng.normal(size=(SMALL_BYTES // 4 + 1,)).astype(np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    pack = ArgPack(tree, _is_weight)
    # the two arrays over SMALL_BYTES alone, then the small weights' buffers per dtype
    assert [(a.shape, a.dtype) for a in pack.args] == [
        ((64, 128), np.int8),
        ((SMALL_BYTES // 4 + 1,), np.float32),
        ((73,), np.int8),
        ((6,), np.uint8),
    ]
    back = jax.jit(pack.unpack)(*pack.args)
    for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(back), strict=True):
        assert got.dtype == want.dtype and got.shape == np.shape(want)
        np.testing.assert_array_equal(np.asarray(got), want)
    # the scale, the weight sums and the small float array are literals of the program
    text = jax.jit(pack.unpack).lower(*pack.args).as_text()
    assert "dense<5.000000e-01>" in text and "dense<[0, 1, 2, 3, 4]>" in text
