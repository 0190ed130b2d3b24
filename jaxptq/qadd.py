"""Integer residual Adds: the program computes the codes onnxruntime's `QLinearAdd` computes.

A plan made for a `target_device` from an imported ONNX model quantizes a residual `Add`
whose two inputs are codes already (outputs the plan quantizes, `SitePlan.out_act_scale`,
or another such Add) and whose output an int8 site reads (`plan_adds`). The export puts
`Q -> DQ` on the Add's output, and onnxruntime runs `DQ, DQ -> Add -> Q` as one
`QLinearAdd` over the codes, as it runs its own quantized models, instead of a float Add
between dequantizes and a quantize.

For the two to agree, the program computes the codes as onnxruntime's x86 kernel does
(MLAS `MlasQLinearAddKernelAvx2Helper`): in float32, with fused multiply-adds, over the
raw codes `a`, `b` of the runtime's integer type (uint8 or int8):

    r_a = s_a / s_c,  r_b = s_b / s_c,  f = zp_c - fma(r_a, zp_a, r_b * zp_b)
    c = saturate(round_half_even(fma(a, r_a, fma(b, r_b, f))))

JAX has no fused multiply-add, and XLA:CPU contracts a multiply and an add as it sees fit,
so the program does not compute this formula. The output code is a function of two bytes:
`code_table` computes all 65,536 of them once, in NumPy and exactly (`_fma32`), and the
program looks them up. tests/test_qadd.py checks the table against onnxruntime for every
pair of codes. MLAS's SSE2 and NEON kernels round differently and can differ by one code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from jaxptq import requant
from jaxptq.graph import Graph, Node
from jaxptq.plan import AddPlan, SitePlan

Args = dict[str, Any]


def _fma32(x: ArrayLike, y: ArrayLike, z: ArrayLike) -> np.ndarray:
    """float32(x * y + z) with one rounding, as a fused multiply-add computes it.

    `x * y` must be exact in float64 (here a code or zero point of at most 9 bits times a
    float32). The sum is rounded to odd in float64 (TwoSum gives its error), which a
    second rounding to float32 turns into the correctly rounded sum (Boldo & Melquiond).
    """
    p = np.asarray(x, np.float64) * np.asarray(y, np.float64)
    z64 = np.asarray(z, np.float32).astype(np.float64)
    s = p + z64
    t = s - p
    err = (p - (s - t)) + (z64 - t)  # exact: s + err == p + z
    even = (s.view(np.int64) & 1) == 0
    toward = np.nextafter(s, np.where(err > 0, np.inf, -np.inf))
    odd = np.where((err != 0) & even, toward, s)
    return odd.astype(np.float32)


def code_table(plan: AddPlan, signed: bool) -> np.ndarray:
    """The output codes (`q + 128`, as `jaxptq.requant`) for every pair of input codes,
    indexed `[code_a * 256 + code_b]`, for a runtime with int8 (`signed`) or uint8 codes."""
    shift = 0 if signed else 128  # our codes are q + 128; a runtime's are q or q + 128
    (s_a, s_b), (zp_a, zp_b) = plan.input_scales, plan.input_zero_points
    s_c = np.float32(plan.out_scale)
    r_a, r_b = np.float32(s_a) / s_c, np.float32(s_b) / s_c
    z_a, z_b, z_c = (np.float32(z + shift) for z in (zp_a, zp_b, plan.out_zero_point))
    fixed = z_c - _fma32(r_a, z_a, r_b * z_b)
    raw = np.arange(256, dtype=np.float32) - (128 - shift)
    inner = _fma32(raw[None, :], r_b, fixed)  # fma(b, r_b, f): one per b
    y = _fma32(raw[:, None], r_a, inner)  # fma(a, r_a, ...): [a, b]
    # cvtps2dq: half to even; out of int32's range (or NaN) it gives INT32_MIN
    r = np.where(np.abs(y) < 2.0**31, np.rint(y), -(2.0**31))
    lo, hi = (-128, 127) if signed else (0, 255)
    return (np.clip(r, lo, hi) + (128 - shift)).astype(np.uint8).reshape(-1)


def add_args(plan: AddPlan, signed: bool) -> Args:
    """`apply`'s arrays: the code table, and the inputs' and output's quantization."""
    (s_a, s_b), (zp_a, zp_b) = plan.input_scales, plan.input_zero_points
    return {
        "table": code_table(plan, signed),
        "inv_a": np.float32(1.0) / np.float32(s_a),
        "inv_b": np.float32(1.0) / np.float32(s_b),
        "code_zp_a": np.float32(zp_a + 128),
        "code_zp_b": np.float32(zp_b + 128),
        **requant.dequantize_args(plan.out_scale, plan.out_zero_point),
    }


def apply(args: Args, vals: list[Any]) -> Any:
    """The Add's output, dequantized codes, from its inputs' dequantized codes.

    An input is `(code - 128 - zp) * s` in float32, so `round(x / s)` gives the code back
    exactly (its relative error is ~1e-7, far below half a code)."""
    x_a, x_b = vals
    code_a = jnp.round(x_a * args["inv_a"]) + args["code_zp_a"]
    code_b = jnp.round(x_b * args["inv_b"]) + args["code_zp_b"]
    index = (code_a * 256 + code_b).astype(jnp.int32)
    codes = jnp.take(args["table"], index, mode="clip")
    return requant.dequantize(codes, args)


def _quantized_ends(
    graph: Graph, plans: Mapping[str, SitePlan], ix: requant.GraphIndex
) -> dict[int, tuple[float, int]]:
    """Value id -> (scale, zero point) for every value the program hands on as dequantized
    codes: the ends of chains a site's own output quantization ends."""
    return {
        chain.end.id: requant.chain_quant(chain, plans)
        for chain in requant.find_chains(graph, plans, ix)
        if not chain.consumers
    }


def _lone_adds(graph: Graph) -> list[Node]:
    """The `add` nodes alone in their scope, so a scope names one (`AddPlan.name`)."""
    adds = [n for n in graph.nodes if n.primitive.name == "add"]
    count = Counter(n.scope for n in adds)
    return [n for n in adds if count[n.scope] == 1]


def plan_adds(
    graph: Graph, plans: Mapping[str, SitePlan], is_add: Callable[[Node], bool]
) -> list[AddPlan]:
    """The Adds to run on codes, in program order: an `add` node `is_add` accepts (an
    imported ONNX Add), alone in its scope, over two same-shaped inputs that are codes
    already, whose output is no graph output and is read by a static site as its
    activation. The output takes that site's quantization, so the site reads the codes as
    they are."""
    ix = requant.GraphIndex.of(graph)
    quant = _quantized_ends(graph, plans, ix)

    def static(name: str) -> bool:
        return requant.is_static(plans.get(name))

    adds = []
    for node in _lone_adds(graph):
        a, b = node.inputs
        y = node.outputs[0]
        if not is_add(node) or a.id not in quant or b.id not in quant or y.id in ix.outputs:
            continue
        if not a.aval.shape == b.aval.shape == y.aval.shape or y.aval.dtype != np.float32:
            continue
        readers = (ix.activation_reader(n, i, static) for n, i in ix.readers.get(y.id, []))
        site = next((r for r in readers if r is not None), None)
        if site is None:
            continue
        reader = plans[site.name]
        assert reader.act_scale is not None and reader.act_zero_point is not None
        assert reader.act_range is not None
        (s_a, z_a), (s_b, z_b) = quant[a.id], quant[b.id]
        out = (reader.act_scale, reader.act_zero_point)
        adds.append(AddPlan(node.scope, (s_a, s_b), (z_a, z_b), *out, reader.act_range))
        quant[y.id] = out
    return adds


def add_nodes(graph: Graph, adds: list[AddPlan]) -> dict[str, Node]:
    """The `add` node of each planned Add, by name (its scope)."""
    by_scope = {n.scope: n for n in _lone_adds(graph)}
    missing = [ap.name for ap in adds if ap.name not in by_scope]
    if missing:
        raise ValueError(
            f"the plan runs Add `{missing[0]}` on codes, but the function traced at these "
            "input shapes has no such add; call it with inputs like the calibration samples."
        )
    return {ap.name: by_scope[ap.name] for ap in adds}
