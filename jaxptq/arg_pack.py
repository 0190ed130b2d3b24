"""Which of a program's arrays are arguments, and how few arguments they travel in.

A quantized program reads every site's weight, scales, zero-point terms and weight sums,
each fused requantize's parameters and the graph's float constants. Integer weights are
arguments (they must never be folded into the HLO); every call pays for each argument
array, so the rest are made as cheap as they can be:

- small arrays that are not weights (scales, sums, biases, requantize parameters: at most
  `SMALL_BYTES`) are constants of the program, like the literals of the user's own `jit`;
- small weights travel in one buffer per dtype, sliced back out inside the program (a
  dot reads its slice as a copy of at most `SMALL_BYTES`); large arrays are arguments of
  their own, so nothing large is copied out of a buffer on every call;
- the arguments are one flat list: a list and a dict of arrays cost JAX's dispatch a
  pytree walk on every call.

Measured on the digits MLP's FULL_QUANT program at batch 32 (XLA:CPU, jax 0.10.2,
synchronous dispatch, against `jax.jit` of the float model in the same loop): its 26
argument arrays had cost 70-75 us a call against 32 us as constants; packed per dtype
into 5 (a list and a dict) it ran 1.08x faster than the float model; as here (the input
and 3 weight arrays) 1.14-1.16x.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax

# Arrays up to this size are constants (or, for weights, packed); larger ones are arguments
# of their own.
SMALL_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class _Slot:
    kind: str  # "const", "alone" (an argument of its own) or "packed" (in its dtype's buffer)
    index: int  # the constant's or the argument's index; for "packed", the buffer offset
    shape: tuple[int, ...]
    buffer: str = ""  # for "packed": the buffer's dtype


class ArgPack:
    """A pytree of concrete arrays split into a program's arguments (`args`, a flat tuple
    of device arrays) and its constants; `unpack(*args)` rebuilds the tree inside a trace.

    `is_weight(path)` names the leaves that must stay arguments whatever their size."""

    def __init__(self, tree: Any, is_weight: Callable[[tuple[Any, ...]], bool]):
        leaves_with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        alone: list[Any] = []
        self._consts: list[np.ndarray] = []
        parts: dict[str, list[np.ndarray]] = {}
        self._slots: list[_Slot] = []
        for path, leaf in leaves_with_paths:
            a = np.asarray(leaf)
            if a.nbytes > SMALL_BYTES:
                self._slots.append(_Slot("alone", len(alone), a.shape))
                alone.append(leaf)
            elif not is_weight(path):
                self._slots.append(_Slot("const", len(self._consts), a.shape))
                self._consts.append(a)
            else:
                chunks = parts.setdefault(a.dtype.str, [])
                offset = sum(c.size for c in chunks)
                self._slots.append(_Slot("packed", offset, a.shape, a.dtype.str))
                chunks.append(a.ravel())
        # the buffers follow the arrays that travel alone
        self._buffer_at = {key: len(alone) + i for i, key in enumerate(parts)}
        buffers = [np.concatenate(chunks) for chunks in parts.values()]
        with jax.ensure_compile_time_eval():
            self.args: tuple[Any, ...] = tuple(jax.device_put([*alone, *buffers]))

    def unpack(self, *args: Any) -> Any:
        leaves: list[Any] = []
        for slot in self._slots:
            if slot.kind == "const":
                leaves.append(self._consts[slot.index])
            elif slot.kind == "alone":
                leaves.append(args[slot.index])
            else:
                size = int(np.prod(slot.shape, dtype=np.int64))
                buffer = args[self._buffer_at[slot.buffer]]
                flat = lax.slice(buffer, (slot.index,), (slot.index + size,))
                leaves.append(flat.reshape(slot.shape))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)
