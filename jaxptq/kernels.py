"""Quantized implementations of a site, one per kind of `SitePlan`.

Each kernel is split in two: `*_args` turns a `SitePlan` into the arrays the program
takes as arguments (integer weights travel as arguments, never as HLO constants), and
`*_apply` is the traced code that replaces the float `dot_general` / convolution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxptq import conv_forms, platforms, qmath, requant, u8s8
from jaxptq.graph import Site
from jaxptq.layout import SiteLayout, site_layout, to_output
from jaxptq.plan import SitePlan

Args = dict[str, Any]
_INT8 = qmath.signed_range(8)


def _operands(site: Site, x: Any, w: Any) -> tuple[Any, Any]:
    return (w, x) if site.weight_index == 0 else (x, w)


def _dense_weight(site: Site, w_q: Any, params: dict[str, Any]) -> Any:
    """The [K, N] weight when the site is `x[..., K] @ w`, the `u8 x s8` form on XLA:CPU
    (`jaxptq.u8s8`); else None."""
    if site.primitive != "dot_general":
        return None
    (lhs_contract, rhs_contract), batch = params["dimension_numbers"]
    last = len(site.activation.aval.shape) - 1
    if site.weight_index != 1 or w_q.ndim != 2 or batch[0] or tuple(lhs_contract) != (last,):
        return None
    return w_q if tuple(rhs_contract) == (0,) else w_q.T


def _int_params(params: dict[str, Any]) -> dict[str, Any]:
    """The node's params for an int32-accumulating integer dot/convolution."""
    params = dict(params, preferred_element_type=np.dtype(np.int32))
    if "precision" in params:
        params["precision"] = None
    return params


def _bind_int(
    site: Site,
    x_q: Any,
    w_q: Any,
    params: dict[str, Any],
    pad_value: int = 0,
    w_sum: Any = None,
) -> Any:
    """The i8 x i8 -> i32 dot/convolution, with the site's own dimension numbers; a
    convolution's padding holds `pad_value`. `w_sum` (`_u8_args`) is for the u8 x s8
    form XLA:CPU gets (`jaxptq.u8s8`)."""
    params = _int_params(params)
    if site.primitive == "conv_general_dilated":
        return conv_forms.conv(x_q, w_q, params, pad_value, w_sum)
    dense = _dense_weight(site, w_q, params)
    if dense is not None:
        return u8s8.dot(x_q, dense, w_sum)
    return u8s8.s8_dot_general(*_operands(site, x_q, w_q), params["dimension_numbers"])


# --- weight-only ------------------------------------------------------------------------


def weight_only_args(plan: SitePlan, site: Site, packed: bool) -> Args:
    assert plan.weight_q is not None and plan.weight_scale is not None and plan.bits
    q = plan.weight_q
    if packed and plan.bits < 8:
        q = qmath.pack(q, plan.bits)
    return {"q": q, "scale": plan.weight_scale}


def weight_only_apply(plan: SitePlan, site: Site, vals: list[Any], args: Args) -> Any:
    q = args["q"]
    if q.dtype == jnp.uint8:  # packed sub-8-bit weights: unpack inside the program
        assert plan.bits is not None
        q = qmath.unpack(q, plan.bits, plan.weight_elements).reshape(plan.weight_shape)
    dtype = site.node.inputs[site.weight_index].aval.dtype
    w = (q.astype(jnp.float32) * args["scale"]).astype(dtype)
    x = vals[1 - site.weight_index]
    if site.primitive == "conv_general_dilated":
        return conv_forms.conv(x, w, site.node.params)
    return site.node.primitive.bind(*_operands(site, x, w), **site.node.params)


def _weight_sums(plan: SitePlan, site: Site) -> Any:
    """`sum_k w_q` over the weight's contracting axes, int32, kept as size-1 axes."""
    assert plan.weight_q is not None
    lay = site_layout(site)
    return plan.weight_q.astype(np.int32).sum(axis=lay.weight_contracting, keepdims=True)


def _u8_args(sums: Any, site: Site) -> Args:
    """`{"w_sum": int32[O]}` for the u8 x s8 form (`jaxptq.u8s8`) where the weight has one
    output axis: computed once here rather than in every call."""
    if len(site_layout(site).weight_channel_axes) != 1:
        return {}
    return {"w_sum": sums.reshape(-1)}


# --- static int8 (FULL_QUANT) -------------------------------------------------------------


def static_args(plan: SitePlan, site: Site) -> Args:
    assert plan.weight_q is not None and plan.weight_scale is not None
    assert plan.act_scale is not None and plan.act_zero_point is not None
    lay = site_layout(site)
    w_scale = to_output(plan.weight_scale, lay.weight_to_out, lay.out_ndim)
    sums = _weight_sums(plan, site)
    args: Args = {
        "q": plan.weight_q.astype(np.int8),
        "act_scale": np.float32(plan.act_scale),
        "out_scale": qmath.accumulator_scale(plan.act_scale, w_scale),
        **_u8_args(sums, site),
    }
    if plan.act_zero_point != 0 and _dense_weight(site, plan.weight_q, site.node.params) is None:
        # sum_k (x_q - zp) w_q = sum_k x_q w_q - zp * sum_k w_q: the second term is a constant
        # (`u8s8.dot_codes` takes it for dense sites).
        args["zp_term"] = (
            np.int32(plan.act_zero_point) * to_output(sums, lay.weight_to_out, lay.out_ndim)
        ).astype(np.int32)
    if plan.bias_correction is not None:
        args["bias"] = plan.bias_correction.astype(np.float32)
    return args


def _quantize_act(x: Any, scale: Any, zero_point: int) -> Any:
    """int8 `round(x / scale) + zero_point`: a division, as onnxruntime's QuantizeLinear
    does it (`x * (1 / scale)` differs in the last bit and flips a code now and then)."""
    q = jnp.round(x.astype(jnp.float32) / scale) + zero_point
    return jnp.clip(q, *_INT8).astype(jnp.int8)


def _quantize_codes(x: Any, scale: Any, zero_point: int) -> Any:
    """`_quantize_act(...) + 128` as uint8, the codes `u8s8.dot_codes` reads."""
    q = jnp.round(x.astype(jnp.float32) / scale) + (zero_point + 128)
    return jnp.clip(q, 0, 255).astype(jnp.uint8)


def _has_padding(site: Site) -> bool:
    return any(p != (0, 0) for p in site.node.params["padding"])


def conv_zero_point_padded(site: Site, x_q: Any, args: Args, zero_point: int) -> Any:
    """XLA:CPU's `sum_k (x_q - zp) w_q`: the input padded with the code `zp` (float 0), the
    per-channel `zp * sum w_q` subtracted in int32, exactly."""
    params = dict(site.node.params)
    acc = _bind_int(site, x_q, args["q"], params, zero_point, args.get("w_sum"))
    return (acc - args["zp_term"]).astype(jnp.float32)


def conv_zero_point_covered(site: Site, x_q: Any, args: Args, zero_point: int) -> Any:
    """XLA:GPU's `sum_k (x_q - zp) w_q`: the convolution keeps its own zero padding and the
    term goes after the convert; with padding it sums `zp * w_q` over the window positions
    on real input only (a batch-1 all-ones image)."""
    params = dict(site.node.params)
    acc = _bind_int(site, x_q, args["q"], params).astype(jnp.float32)
    if not _has_padding(site):
        return acc - args["zp_term"].astype(jnp.float32)
    batch_axis = params["dimension_numbers"][0][0]
    shape = tuple(1 if a == batch_axis else d for a, d in enumerate(x_q.shape))
    real = _bind_int(site, jnp.ones(shape, jnp.int8), args["q"], params)
    return acc - jnp.float32(zero_point) * real.astype(jnp.float32)


def _conv_minus_zero_point(site: Site, x_q: Any, args: Args, zero_point: int) -> Any:
    """`sum_k (x_q - zp) w_q` of a convolution with a zero point, as float32.

    XLA:GPU runs an integer convolution only as a cuDNN call whose result is converted to
    float inside the call, and rejected both things XLA:CPU takes: an int32 term folded
    into the call (an s32 result with a bias), and a zero-point-padded VALID convolution
    (LeNet's 5x5 SAME conv on a 4x4 map, which became a backward-filter call with no
    integer kernel). So the CPU form stays exact int32 and other platforms get
    `conv_zero_point_covered`. Both give the same integers; the float32 values agree while
    |acc| < 2**24 (tested bit for bit). Transposed convolutions never get here: their
    activations are symmetric (`passes.full._needs_symmetric`).
    """
    return platforms.dependent(
        cpu=lambda: conv_zero_point_padded(site, x_q, args, zero_point),
        default=lambda: conv_zero_point_covered(site, x_q, args, zero_point),
    )


def _static_sum(plan: SitePlan, site: Site, x: Any, args: Args, codes_in: bool) -> Any:
    """`sum_k (x_q - zp) w_q` as float32; `x` is float, or uint8 codes when `codes_in`.

    Where XLA:CPU's form is a dot (dense sites; pointwise and im2col convolutions) the
    activation goes in as uint8 codes, the dot's own operand; elsewhere as int8."""
    zp = plan.act_zero_point
    assert zp is not None
    params = dict(site.node.params)
    dense = _dense_weight(site, args["q"], params)
    if dense is not None:
        codes = x if codes_in else _quantize_codes(x, args["act_scale"], zp)
        return u8s8.dot_codes(codes, dense, args.get("w_sum"), zp).astype(jnp.float32)
    if site.primitive == "conv_general_dilated" and "w_sum" in args:
        int_params = _int_params(params)
        as_codes = jax.ShapeDtypeStruct(x.shape, jnp.uint8)
        if conv_forms.takes_codes(int_params, as_codes, args["q"]):
            codes = x if codes_in else _quantize_codes(x, args["act_scale"], zp)
            return platforms.dependent(
                cpu=lambda: conv_forms.conv_codes(
                    codes, args["q"], int_params, zp, args["w_sum"]
                ).astype(jnp.float32),
                default=lambda: _int8_sum(plan, site, u8s8.to_int8(codes), args),
            )
    x_q = u8s8.to_int8(x) if codes_in else _quantize_act(x, args["act_scale"], zp)
    return _int8_sum(plan, site, x_q, args)


def _int8_sum(plan: SitePlan, site: Site, x_q: Any, args: Args) -> Any:
    """`sum_k (x_q - zp) w_q` as float32 from the int8 activation `x_q`."""
    zp = plan.act_zero_point
    assert zp is not None
    params = dict(site.node.params)
    if "zp_term" not in args:
        return _bind_int(site, x_q, args["q"], params, w_sum=args.get("w_sum")).astype(jnp.float32)
    if site.primitive == "conv_general_dilated":
        return _conv_minus_zero_point(site, x_q, args, zp)
    # sum_k (x_q - zp) w_q = sum_k x_q w_q - zp * sum_k w_q, the second a constant
    acc = _bind_int(site, x_q, args["q"], params, w_sum=args.get("w_sum"))
    return (acc - args["zp_term"]).astype(jnp.float32)


def static_apply(
    plan: SitePlan,
    site: Site,
    vals: list[Any],
    args: Args,
    codes_in: bool = False,
    requant_args: Args | None = None,
    dequant_args: Args | None = None,
) -> Any:
    """The int8 site. With `codes_in` its activation arrives as uint8 codes, and with
    `requant_args` its output leaves as the next sites' codes (`jaxptq.requant`), or with
    `dequant_args` too, as the float values of its own output codes."""
    y = _static_sum(plan, site, vals[1 - site.weight_index], args, codes_in)
    if requant_args is not None:
        codes = requant.requantize(y, requant_args)
        if dequant_args is None:
            return codes
        return requant.dequantize(codes, dequant_args).astype(site.node.outputs[0].aval.dtype)
    y = y * args["out_scale"]
    if "bias" in args:
        y = y + args["bias"]
    return y.astype(site.node.outputs[0].aval.dtype)


# --- dynamic int8 (DYNAMIC_QUANT) ---------------------------------------------------------


def dynamic_args(plan: SitePlan, site: Site) -> Args:
    assert plan.weight_q is not None and plan.weight_scale is not None
    lay = site_layout(site)
    return {
        "q": plan.weight_q.astype(np.int8),
        "w_scale": to_output(plan.weight_scale, lay.weight_to_out, lay.out_ndim).astype(np.float32),
        **_u8_args(_weight_sums(plan, site), site),
    }


def dynamic_act_scale(x: Any, lay: SiteLayout, per_row: bool) -> Any:
    """Symmetric int8 scale of an activation, per tensor or per row (non-contracting index)."""
    return _absmax_scale(x, _scale_axes(x, lay, per_row))


def _scale_axes(x: Any, lay: SiteLayout, per_row: bool) -> tuple[int, ...]:
    return lay.act_contracting if per_row else tuple(range(x.ndim))


def _absmax_scale(x: Any, axes: tuple[int, ...]) -> Any:
    absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
    return jnp.maximum(absmax / _INT8[1], qmath._TINY)


def _dynamic_quantize(x: Any, axes: tuple[int, ...]) -> tuple[Any, Any]:
    # The scale is a reduction over `x`: without the barrier XLA:CPU fuses x's producer
    # (e.g. a depthwise conv) into both the reduction and the quantize, computing it twice
    # (EfficientNet-Lite0 at batch 32: 3671 ms without, 463 ms with).
    x = lax.optimization_barrier(x)
    scale = _absmax_scale(x, axes)
    return _quantize_act(x, scale, 0), scale


def _dynamic_quantize_conv_input(x: Any, axes: tuple[int, ...], site: Site) -> Any:
    """`_dynamic_quantize` of a convolution's input, done channels last on XLA:CPU.

    `conv_forms` computes a convolution's input channels last there, so in the model's
    NCHW order the scale's reduction and the quantize each read it through a transposing
    copy (EfficientNet-Lite0 at batch 32: 1.05 s of copies in a 1.18 s program). Channels
    last, the transposes cancel against the producer's and the convolution's own.
    """
    perm = conv_forms.channels_last_order(site.node.params["dimension_numbers"][0])
    inverse = tuple(int(a) for a in np.argsort(perm))
    cl_axes = tuple(i for i, a in enumerate(perm) if a in axes)

    def channels_last(x: Any) -> tuple[Any, Any]:
        x_q, scale = _dynamic_quantize(jnp.transpose(x, perm), cl_axes)
        return jnp.transpose(x_q, inverse), jnp.transpose(scale, inverse)

    return platforms.dependent(x, cpu=channels_last, default=lambda x: _dynamic_quantize(x, axes))


def dynamic_apply(plan: SitePlan, site: Site, vals: list[Any], args: Args) -> Any:
    lay = site_layout(site)
    x = vals[1 - site.weight_index]
    axes = _scale_axes(x, lay, per_row=plan.act_mode == "dynamic_row")
    if site.primitive == "conv_general_dilated":
        x_q, scale = _dynamic_quantize_conv_input(x, axes, site)
    else:
        x_q, scale = _dynamic_quantize(x, axes)
    acc = _bind_int(site, x_q, args["q"], dict(site.node.params), w_sum=args.get("w_sum"))
    if plan.act_mode == "dynamic_row":
        scale = to_output(scale, lay.act_to_out, lay.out_ndim)
    else:
        scale = scale.reshape(())
    y = acc.astype(jnp.float32) * (scale * args["w_scale"])
    return y.astype(site.node.outputs[0].aval.dtype)


Kernel = tuple[Callable[..., Args], Callable[[SitePlan, Site, list[Any], Args], Any]]

KERNELS: dict[str | None, Kernel] = {
    None: (weight_only_args, weight_only_apply),
    "static": (lambda plan, site, packed: static_args(plan, site), static_apply),
    "dynamic_tensor": (lambda plan, site, packed: dynamic_args(plan, site), dynamic_apply),
    "dynamic_row": (lambda plan, site, packed: dynamic_args(plan, site), dynamic_apply),
}
