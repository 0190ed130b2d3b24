"""Integer dots as `u8 x s8 -> s32` on XLA:CPU, the form x86's VNNI multiplies natively.

`sum_k x w = sum_k (x + 128) w - 128 sum_k w` holds exactly in int32, and `x + 128` of an
int8 is its bit pattern with the top bit flipped, read as uint8. YNNPACK takes `u8 x s8`
dots (`IsDotSupportedByYnn`); measured here at batch 32 they ran 2.3-2.6x faster than its
`s8 x s8` ones for the convnet's 1152- and 2304-deep patch dots (9.5 -> 4.1 ms,
10.7 -> 4.1 ms) and 1.1-1.2x on shallow, memory-bound ones.

`lax.dot_general` converts operands of different dtypes to a common one before the dot,
so `u8s8_dot_p` is a primitive of its own that lowers to one mixed-type StableHLO
`dot_general`. Other platforms keep `s8 x s8` (cuDNN and cuBLAS take signed int8), through
`s8_dot_general`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core
from jax.extend.mlir.dialects import stablehlo as hlo
from jax.interpreters import batching, mlir

from jaxptq import platforms

u8s8_dot_p = core.Primitive("u8s8_dot")


def _abstract_eval(x: Any, w: Any) -> Any:
    """`x[..., K] (uint8) @ w[K, N] (int8) -> int32[..., N]`."""
    if x.dtype != jnp.uint8 or w.dtype != jnp.int8 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise TypeError(f"u8s8_dot takes uint8[..., K] and int8[K, N], got {x} and {w}")
    return jax.core.ShapedArray((*x.shape[:-1], w.shape[1]), jnp.int32)


def _lowering(ctx: mlir.LoweringRuleContext, x: Any, w: Any) -> list[Any]:
    out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    dims = hlo.DotDimensionNumbers.get(
        lhs_batching_dimensions=[],
        rhs_batching_dimensions=[],
        lhs_contracting_dimensions=[len(ctx.avals_in[0].shape) - 1],  # type: ignore[attr-defined]
        rhs_contracting_dimensions=[0],
    )
    return [hlo.dot_general(out_type, x, w, dims)]


def _exact_int32(x: Any, w: Any) -> Any:
    return lax.dot_general(
        x.astype(jnp.int32), w.astype(jnp.int32), (((x.ndim - 1,), (0,)), ((), ()))
    )


def _batching(args: tuple[Any, Any], dims: tuple[Any, Any]) -> tuple[Any, int]:
    x, w = args
    x_dim, w_dim = dims
    if w_dim is not None:  # weights vmapped too: rare, so the plain int32 dot
        return jax.vmap(_exact_int32, in_axes=(x_dim, w_dim))(x, w), 0
    return u8s8_dot_p.bind(jnp.moveaxis(x, x_dim, 0), w), 0


u8s8_dot_p.def_abstract_eval(_abstract_eval)
u8s8_dot_p.def_impl(_exact_int32)
mlir.register_lowering(u8s8_dot_p, _lowering)
batching.primitive_batchers[u8s8_dot_p] = _batching


def _flip_to_uint8(x: Any) -> Any:
    return lax.bitcast_convert_type(x, jnp.uint8) ^ jnp.uint8(0x80)


def dot(x: Any, w: Any, w_sum: Any = None) -> Any:
    """`x[..., K] @ w[K, N]` of int8 operands, exactly, as int32: `u8 x s8` on XLA:CPU.

    `w_sum`, `sum_k w` as int32[N], saves the program that reduction when the caller has
    it already (a plan computes it once with the weights).
    """
    return platforms.dependent(
        x,
        w,
        w_sum,
        cpu=lambda x, w, w_sum: dot_codes(_flip_to_uint8(x), w, w_sum),
        default=lambda x, w, w_sum: s8_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))),
    )


def to_int8(codes: Any) -> Any:
    """The int8 value `q` of a code `q + 128` held as uint8."""
    return lax.bitcast_convert_type(codes ^ jnp.uint8(0x80), jnp.int8)


def dot_codes(codes: Any, w: Any, w_sum: Any = None, zero_point: int = 0) -> Any:
    """`sum_k (q - zero_point) w` for activations given as uint8 codes `q + 128`, exactly,
    as int32.

    Codes are what a fused requantize writes (`jaxptq.requant`) and what the `u8 x s8`
    dot reads, so on XLA:CPU nothing converts between them, and the two constant terms
    (`128 sum w` of the code offset, `zero_point sum w`) are one subtraction, none when
    `zero_point` is -128 (the zero point of every ReLU output).
    """

    def minus(acc: Any, w: Any, w_sum: Any, term: int) -> Any:
        """`acc - term * sum_k w`, exactly; nothing when `term` is 0."""
        if term == 0:
            return acc
        if w_sum is None:
            # Behind a barrier: when `w` is a constant XLA would otherwise fold this sum
            # at compile time, 1-2 s for a 1280x1000 weight.
            w_sum = jnp.sum(lax.optimization_barrier(w).astype(jnp.int32), axis=0)
        return acc - term * w_sum

    def on_cpu(codes: Any, w: Any, w_sum: Any) -> Any:
        return minus(u8s8_dot_p.bind(codes, w), w, w_sum, 128 + zero_point)

    def elsewhere(codes: Any, w: Any, w_sum: Any) -> Any:
        acc = s8_dot_general(to_int8(codes), w, (((codes.ndim - 1,), (0,)), ((), ())))
        return minus(acc, w, w_sum, zero_point)

    return platforms.dependent(codes, w, w_sum, cpu=on_cpu, default=elsewhere)


def s8_dot_general(lhs: Any, rhs: Any, dimension_numbers: Any) -> Any:
    """`int8 x int8 -> int32` `dot_general`, exactly, on every platform.

    A contracted length that is not a multiple of 4 is padded with zeros to one (the sum
    is unchanged): on an H100, XLA:GPU's Triton gemm for such an int8 dot (jax 0.11.2)
    returned exactly twice the product, for every length tried from 2 to 17 that is not
    a multiple of 4 (`scripts/check_gpu.py` checks it).
    """
    (lhs_contract, rhs_contract), _ = dimension_numbers
    if math.prod(lhs.shape[a] for a in lhs_contract) % 4:
        pad = -lhs.shape[lhs_contract[-1]] % 4
        lhs = _pad_axis(lhs, lhs_contract[-1], pad)
        rhs = _pad_axis(rhs, rhs_contract[-1], pad)
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.int32)


def _pad_axis(a: Any, axis: int, pad: int) -> Any:
    return jnp.pad(a, [(0, pad if i == axis else 0) for i in range(a.ndim)])
