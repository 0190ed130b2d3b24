"""The QDQ rule: QuantizeLinear/DequantizeLinear around a site's float Conv/Gemm/MatMul,
integer weights behind DequantizeLinear, the bias correction folded into the bias."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from jaxptq import qmath
from jaxptq.export._context import Ctx, SiteRef, get_attr, next_quant, pop_alpha, set_attr
from jaxptq.export._qparams import ActQuant, act_quant, channel_vector, weight_quant
from jaxptq.layout import site_layout, to_output

_TINY = np.float32(1e-30)


def bias_value(ctx: Ctx, node: onnx.NodeProto, index: int) -> np.ndarray | None:
    """The node's constant bias input `index` as float32, None when it has none."""
    if len(node.input) <= index or not node.input[index]:
        return None
    name = node.input[index]
    if name not in ctx.consts:
        raise NotImplementedError(
            f"node `{node.name}` ({node.op_type}): bias input `{name}` is computed at run "
            "time; export needs a constant bias to fold the bias correction into."
        )
    return np.asarray(ctx.consts[name], np.float32)


def onnx_weight(ref: SiteRef, alpha: float) -> tuple[np.ndarray, np.ndarray, int | None, int]:
    """(integer weight in ONNX layout, scales, ONNX axis, output channels)."""
    wq = weight_quant(ref.plan)
    q = wq.q.transpose(ref.perm)
    axis = None if wq.axis is None else ref.perm.index(wq.axis)
    scale = (wq.scale * np.float32(alpha)).astype(np.float32)
    lay = site_layout(ref.site)
    channels = int(np.prod([wq.q.shape[a] for a in lay.weight_channel_axes]))
    return q, scale, axis, channels


def out_scale(ref: SiteRef, aq_scale: np.ndarray | np.float32, alpha: float) -> np.ndarray:
    """act_scale * weight_scale laid out to broadcast over the ONNX node's output."""
    plan, lay = ref.plan, site_layout(ref.site)
    assert plan.weight_scale is not None
    w = to_output(plan.weight_scale, lay.weight_to_out, lay.out_ndim)
    out = (np.float32(aq_scale) * w * np.float32(alpha)).astype(np.float32)
    return onnx_channels(ref, out)


def onnx_channels(ref: SiteRef, arr: np.ndarray) -> np.ndarray:
    """An output-layout array of the site, re-laid for an NC... ONNX Conv output."""
    if ref.site.primitive != "conv_general_dilated":
        return arr
    out_spec = ref.site.node.params["dimension_numbers"][2]
    return np.asarray(arr).transpose(out_spec)


def _add_after(ctx: Ctx, node: onnx.NodeProto, value: np.ndarray, post: list) -> None:
    """y -> Add(y, value) under y's original name."""
    y = node.output[0]
    raw = ctx.b.fresh(f"{y}_before_bias")
    node.output[0] = raw
    c = ctx.b.const(f"{node.name}_bias_correction", value.astype(np.float32))
    post.append(helper.make_node("Add", [raw, c], [y], name=ctx.b.fresh(f"{node.name}_bias")))


def _fold_bias(
    ctx: Ctx,
    node: onnx.NodeProto,
    ref: SiteRef,
    channels: int,
    int32_scale: np.ndarray | None,
    pre: list,
    post: list,
) -> None:
    """Folds the bias correction into the node's bias: int32 through a DequantizeLinear when
    `int32_scale` is given (the target wants it), float otherwise."""
    bc = ref.plan.bias_correction
    op = node.op_type
    if op == "MatMul" or (op == "Gemm" and ref.weight_input == 0):
        if bc is not None:
            if op == "Gemm":
                _fold_gemm_float(ctx, node, onnx_channels(ref, bc))
            else:
                _add_after(ctx, node, onnx_channels(ref, bc), post)
        return
    b_index = 2
    bias = bias_value(ctx, node, b_index)
    if op == "Gemm" and bias is not None:
        beta = get_attr(node, "beta", 1.0)
        bias = bias * np.float32(beta)
        if bias.size not in (1, channels):
            if int32_scale is None and bc is not None:
                _fold_gemm_float(ctx, node, channel_vector(bc, channels, "bias correction"))
            return  # a full (M, N) bias: leave it as it is
        set_attr(node, "beta", 1.0)
    if bias is None and bc is None and int32_scale is None:
        return
    total = (
        np.zeros(channels, np.float32)
        if bias is None
        else channel_vector(bias, channels, f"bias of `{node.name}`")
    )
    if bc is not None:
        total = total + channel_vector(bc, channels, f"bias correction of `{node.name}`")
    if op == "Gemm" and int32_scale is None:
        # onnxruntime fuses DQ -> Gemm into its integer QGemm only when C is absent or an int32
        # DequantizeLinear; a float C left EfficientNet-Lite0's classifier a float Gemm that
        # dequantized its 1280x1000 weight on every run. The float bias goes after, as the
        # JAX program adds it after the integer dot.
        del node.input[2:]
        _add_after(ctx, node, total, post)
        return
    inputs = list(node.input) + [""] * (3 - len(node.input))
    if int32_scale is not None:
        q = qmath.bias_int32(total, int32_scale)
        inputs[2] = ctx.b.dequantize_const(
            f"{node.name}_B", q, int32_scale, 0, pre, zero_point=False
        )
    else:
        inputs[2] = ctx.b.const(f"{node.name}_B", total.astype(np.float32))
    del node.input[:]
    node.input.extend(inputs)


def _fold_gemm_float(ctx: Ctx, node: onnx.NodeProto, bc: np.ndarray) -> None:
    bias = bias_value(ctx, node, 2)
    beta = get_attr(node, "beta", 1.0)
    total = bc if bias is None else bias * np.float32(beta) + bc
    inputs = list(node.input) + [""] * (3 - len(node.input))
    inputs[2] = ctx.b.const(f"{node.name}_C", np.asarray(total, np.float32))
    set_attr(node, "beta", 1.0)
    del node.input[:]
    node.input.extend(inputs)


def _dynamic_scale(ctx: Ctx, ref: SiteRef, x: str, pre: list) -> str:
    """The run-time symmetric int8 scale of `x`: max|x| / 127, per tensor or per row."""
    b, name = ctx.b, ref.plan.name
    node, (ax,) = b.node("Abs", [x], f"{name}_x_abs")
    pre.append(node)
    if ref.plan.act_mode == "dynamic_tensor":
        node, (m,) = b.node("ReduceMax", [ax], f"{name}_x_absmax", keepdims=0)
    else:
        axes = [int(a) for a in site_layout(ref.site).act_contracting]
        if ctx.opset >= 18:
            node, (m,) = b.node(
                "ReduceMax",
                [ax, b.const(f"{name}_axes", np.array(axes))],
                f"{name}_x_absmax",
                keepdims=1,
            )
        else:
            node, (m,) = b.node("ReduceMax", [ax], f"{name}_x_absmax", keepdims=1, axes=axes)
    pre.append(node)
    node, (d,) = b.node("Div", [m, b.const(f"{name}_127", np.float32(127))], f"{name}_x_div")
    pre.append(node)
    node, (s,) = b.node("Max", [d, b.const(f"{name}_tiny", _TINY)], f"{name}_x_scale")
    pre.append(node)
    return s


def dynamic_qdq(ctx: Ctx, ref: SiteRef, x: str, pre: list) -> tuple[str, str, str]:
    """Returns (fake-quantized x, int8 x or "", scale) for a dynamic site."""
    b, name = ctx.b, ref.plan.name
    s = _dynamic_scale(ctx, ref, x, pre)
    if ref.plan.act_mode == "dynamic_tensor":
        z = b.const(f"{name}_x_zero_point", np.array(0, np.int8))
        node, (q,) = b.node("QuantizeLinear", [x, s, z], f"{name}_x_QuantizeLinear")
        pre.append(node)
        node, (dq,) = b.node("DequantizeLinear", [q, s, z], f"{name}_x_DequantizeLinear")
        pre.append(node)
        return dq, q, s
    # Per-row scales vary along several axes: spelled as float arithmetic.
    node, (d,) = b.node("Div", [x, s], f"{name}_x_scaled")
    pre.append(node)
    node, (r,) = b.node("Round", [d], f"{name}_x_round")
    pre.append(node)
    lo, hi = b.const(f"{name}_qmin", np.float32(-128)), b.const(f"{name}_qmax", np.float32(127))
    node, (c,) = b.node("Clip", [r, lo, hi], f"{name}_x_clip")
    pre.append(node)
    node, (dq,) = b.node("Mul", [c, s], f"{name}_x_dequant")
    pre.append(node)
    return dq, "", s


def qdq_site(ctx: Ctx, node: onnx.NodeProto, ref: SiteRef, pre: list, post: list) -> None:
    plan, b = ref.plan, ctx.b
    alpha = pop_alpha(node)
    q, w_scale, axis, channels = onnx_weight(ref, alpha)
    x = node.input[ref.act_input]
    int32_scale = None
    requantized = plan.act_mode == "static" and next_quant(ctx, node.output[0]) is not None
    if plan.act_mode == "static":
        aq = act_quant(plan, ctx.target)
        node.input[ref.act_input] = b.qdq(x, aq, pre, plan.name)
        if (ctx.target.bias_int32 or requantized) and node.op_type in ("Conv", "Gemm"):
            int32_scale = qmath.accumulator_scale(aq.scale, np.broadcast_to(w_scale, (channels,)))
    elif plan.act_mode is not None:
        node.input[ref.act_input] = dynamic_qdq(ctx, ref, x, pre)[0]
    # Symmetric weights: a Conv's zero point can default to 0 (a vector of zeros costs a
    # byte a channel); onnxruntime fuses DQ -> Gemm into QGemm only with one.
    node.input[ref.weight_input] = b.dequantize_const(
        f"{plan.name}_W", q, w_scale, axis, pre, zero_point=node.op_type != "Conv"
    )
    _fold_bias(ctx, node, ref, channels, int32_scale, pre, post)
    if plan.act_mode == "static":
        found = next_quant(ctx, post[-1].output[0] if post else node.output[0])
        if found is not None:
            quantize_output(ctx, post[-1] if post else node, found[0], post)


def quantize_output(ctx: Ctx, last: onnx.NodeProto, aq: ActQuant, post: list) -> None:
    """last's output y -> Q -> DQ under y's name, so a runtime sees DQ -> op -> Q."""
    y = last.output[0]
    raw = ctx.b.fresh(f"{y}_float")
    last.output[0] = raw
    q, s, z = ctx.b.quantize(raw, aq, post, f"{last.name}_y")
    post.append(
        helper.make_node(
            "DequantizeLinear", [q, s, z], [y], name=ctx.b.fresh(f"{last.name}_y_DequantizeLinear")
        )
    )
