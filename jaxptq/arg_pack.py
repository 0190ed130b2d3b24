"""A program's small argument arrays travel in one buffer per dtype.

A quantized program takes every site's scales, zero-point terms and weight sums, and each
fused requantize's parameters, as arguments (integer weights must never be folded into
the HLO). Measured on the digits MLP (XLA:CPU, jax 0.10.2), a call with its 26 argument
arrays ran in 70-75 us against 32 us with the same arrays as constants, about 1.5 us an
argument; packed, the small ones cost one argument per dtype, and slicing them back out
inside the program fuses into their readers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax import lax

# Arrays up to this size are packed; larger ones (weights) stay arguments of their own, so
# nothing large is sliced out of a buffer on every call.
SMALL_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class _Slot:
    dtype: str | None  # the buffer holding it; None for a large array passed as it is
    start: int  # offset in that buffer, or index among the large arrays
    shape: tuple[int, ...]


class ArgPack:
    """A pytree of concrete arrays as `(large, buffers)`: the large arrays as they are and
    the small ones concatenated per dtype; `unpack` rebuilds the tree inside a trace."""

    def __init__(self, tree: Any):
        leaves, self.treedef = jax.tree_util.tree_flatten(tree)
        large: list[Any] = []
        parts: dict[str, list[np.ndarray]] = {}
        sizes: dict[str, int] = {}
        self._slots: list[_Slot] = []
        for leaf in leaves:
            a = np.asarray(leaf)
            if a.nbytes > SMALL_BYTES:
                self._slots.append(_Slot(None, len(large), a.shape))
                large.append(leaf)
                continue
            key = a.dtype.str
            self._slots.append(_Slot(key, sizes.get(key, 0), a.shape))
            parts.setdefault(key, []).append(a.ravel())
            sizes[key] = sizes.get(key, 0) + a.size
        with jax.ensure_compile_time_eval():
            self.args: tuple[list[Any], dict[str, Any]] = (
                large,
                jax.device_put({k: np.concatenate(v) for k, v in parts.items()}),
            )

    def unpack(self, large: list[Any], buffers: dict[str, Any]) -> Any:
        leaves = []
        for slot in self._slots:
            if slot.dtype is None:
                leaves.append(large[slot.start])
                continue
            size = int(np.prod(slot.shape, dtype=np.int64))
            flat = lax.slice(buffers[slot.dtype], (slot.start,), (slot.start + size,))
            leaves.append(flat.reshape(slot.shape))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)
