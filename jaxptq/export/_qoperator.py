"""The QOperator rule: QLinearConv / QLinearMatMul where the output's quantization is known,
ConvInteger / MatMulInteger followed by a float rescale elsewhere."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from jaxptq import qmath
from jaxptq.export._context import Ctx, SiteRef, get_attr, next_quant, pop_alpha
from jaxptq.export._qdq import (
    bias_value,
    dynamic_qdq,
    onnx_channels,
    onnx_weight,
    out_scale,
    qdq_site,
)
from jaxptq.export._qparams import ActQuant, act_quant, channel_vector, weight_quant


def _qop_input(ctx: Ctx, x: str, aq: ActQuant, pre: list, site: str) -> tuple[str, str, str]:
    """The quantized form of `x`: reused when a QLinear node already produced it."""
    hit = ctx.quantized.get(x)
    if hit is not None and hit[3] == aq:
        return hit[0], hit[1], hit[2]
    return ctx.b.quantize(x, aq, pre, site)


def qop_site(ctx: Ctx, node: onnx.NodeProto, ref: SiteRef, pre: list, post: list) -> None:
    plan, b = ref.plan, ctx.b
    if plan.act_mode is None:
        return qdq_site(ctx, node, ref, pre, post)
    op = node.op_type
    if op == "Gemm" and get_attr(node, "transA" if ref.weight_input == 1 else "transB", 0):
        raise NotImplementedError(
            f"node `{node.name}` (Gemm): the activation operand is transposed; QOperator "
            "export handles Gemm(x, W) with the weight as B (use form='qdq')."
        )
    alpha = pop_alpha(node)
    q, w_scale, axis, channels = onnx_weight(ref, alpha)
    if op == "Gemm":  # the integer op is a MatMul over the JAX-layout weight (K, N)
        q = np.asarray(weight_quant(plan).q)
    x = node.input[ref.act_input]
    if plan.act_mode == "static":
        aq = act_quant(plan, ctx.target)
        xq, xs, xz = _qop_input(ctx, x, aq, pre, plan.name)
        scale_in: str | np.float32 = np.float32(aq.scale)
    elif plan.act_mode == "dynamic_tensor":
        aq = None
        _, xq, xs = dynamic_qdq(ctx, ref, x, pre)
        xz = b.const(f"{plan.name}_x_zero_point", np.array(0, np.int8))
        scale_in = xs
    else:
        return qdq_site(ctx, node, ref, pre, post)
    wq = b.const(f"{plan.name}_W_quantized", q)
    found = next_quant(ctx, node.output[0]) if aq is not None else None
    fused = found is not None and (
        op == "Conv" or (op == "MatMul" and ref.weight_input == 1 and plan.bias_correction is None)
    )
    if fused and found is not None:
        yq_aq, clipped, code_bounds = found
        ws = b.const(f"{plan.name}_W_scale", w_scale)
        wz = b.const(f"{plan.name}_W_zero_point", np.zeros(np.shape(w_scale), q.dtype))
        ys = b.const(f"{plan.name}_y_scale", np.float32(yq_aq.scale))
        yz = b.const(f"{plan.name}_y_zero_point", yq_aq.zero_point)
        y = node.output[0]
        yq = b.fresh(f"{y}_quantized")
        if op == "Conv":
            assert aq is not None
            bias = bias_value(ctx, node, 2)
            total = (
                np.zeros(channels, np.float32)
                if bias is None
                else channel_vector(bias, channels, f"bias of `{node.name}`")
            )
            if plan.bias_correction is not None:
                total = total + channel_vector(plan.bias_correction, channels, "bias correction")
            acc_scale = qmath.accumulator_scale(aq.scale, np.broadcast_to(w_scale, (channels,)))
            bq = qmath.bias_int32(total, acc_scale)
            ins = [xq, xs, xz, wq, ws, wz, ys, yz, b.const(f"{plan.name}_B_quantized", bq)]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            post.append(helper.make_node("QLinearConv", ins, [yq], name=node.name, **attrs))
        else:
            post.append(
                helper.make_node(
                    "QLinearMatMul", [xq, xs, xz, wq, ws, wz, ys, yz], [yq], name=node.name
                )
            )
        post.append(
            helper.make_node(
                "DequantizeLinear",
                [yq, ys, yz],
                [y],
                name=b.fresh(f"{node.name}_y_DequantizeLinear"),
            )
        )
        ctx.quantized[y] = (yq, ys, yz, yq_aq)
        if clipped is not None:
            clipped_q = _clip_codes(ctx, yq, yq_aq, code_bounds, plan.name, post)
            ctx.quantized[clipped] = (clipped_q, ys, yz, yq_aq)
        return None
    _integer_then_rescale(ctx, node, ref, xq, xz, wq, scale_in, alpha, channels, post)
    return None


def _clip_codes(
    ctx: Ctx, yq: str, aq: ActQuant, code_bounds: tuple[int, int] | None, name: str, post: list
) -> str:
    """The Relu/Clip after a QLinearConv as Max/Min on its codes, where the output range
    does not already clip (`_context.output_quant`)."""
    if code_bounds is None:
        return yq
    info = np.iinfo(aq.dtype)
    for op, bound, edge in (("Max", code_bounds[0], info.min), ("Min", code_bounds[1], info.max)):
        if bound != edge:
            const = ctx.b.const(f"{name}_y_{op.lower()}", np.array(bound, aq.dtype))
            node, (yq,) = ctx.b.node(op, [yq, const], f"{name}_y_{op.lower()}")
            post.append(node)
    return yq


def _integer_then_rescale(
    ctx: Ctx,
    node: onnx.NodeProto,
    ref: SiteRef,
    xq: str,
    xz: str,
    wq: str,
    scale_in: str | np.float32,
    alpha: float,
    channels: int,
    post: list,
) -> None:
    """ConvInteger / MatMulInteger in int32, then float: * (act_scale * w_scale) + bias."""
    b, plan, op = ctx.b, ref.plan, node.op_type
    name = plan.name
    if op == "Conv":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        int_node = helper.make_node(
            "ConvInteger", [xq, wq, xz], [b.fresh(f"{name}_acc")], name=node.name, **attrs
        )
    else:
        ins = [xq, wq, xz] if ref.weight_input == 1 else [wq, xq, "", xz]
        int_node = helper.make_node("MatMulInteger", ins, [b.fresh(f"{name}_acc")], name=node.name)
    post.append(int_node)
    cast, (acc,) = b.node(
        "Cast", [int_node.output[0]], f"{name}_acc_float", to=onnx.TensorProto.FLOAT
    )
    post.append(cast)
    if isinstance(scale_in, str):
        w_out = out_scale(ref, np.float32(1.0), alpha)
        mul, (s,) = b.node("Mul", [scale_in, b.const(f"{name}_W_scale", w_out)], f"{name}_scale")
        post.append(mul)
    else:
        s = b.const(f"{name}out_scale", out_scale(ref, scale_in, alpha))
    bias = None
    if op in ("Conv", "Gemm"):
        raw = bias_value(ctx, node, 2)
        if raw is not None:
            bias = raw * np.float32(get_attr(node, "beta", 1.0)) if op == "Gemm" else raw
            if op == "Conv":
                bias = bias.reshape((1, -1) + (1,) * (len(ref.site.node.params["padding"])))
    # Added in the JAX program's order: the bias correction right after the rescale (XLA
    # fuses the two into one multiply-add), then the model's bias. One Add of their sum
    # rounded differently and cost EfficientNet-Lite0 0.00005 of cosine to the JAX program.
    bc = None if plan.bias_correction is None else onnx_channels(ref, plan.bias_correction)
    mul, (out,) = b.node("Mul", [acc, s], f"{name}_rescale")
    post.append(mul)
    for what, value in (("bias_correction", bc), ("bias", bias)):
        if value is None:
            continue
        const = b.const(f"{name}_{what}", np.asarray(value, np.float32))
        add, (out,) = b.node("Add", [out, const], f"{name}_{what}_add")
        post.append(add)
    post[-1].output[0] = node.output[0]


def qlinear_add(ctx: Ctx, node: onnx.NodeProto, aq: ActQuant, out: list) -> bool:
    """An Add whose inputs a QLinear node already produced as codes, and whose output the
    plan quantizes (`jaxptq.qadd`), as onnxruntime's `com.microsoft.QLinearAdd` on those
    codes, then `DequantizeLinear` under the Add's output name; False (nothing emitted)
    when an input has no codes."""
    if node.op_type != "Add" or len(node.input) != 2:
        return False
    hits = [ctx.quantized.get(x) for x in node.input]
    if any(h is None for h in hits):
        return False
    (a_q, a_s, a_z, _), (b_q, b_s, b_z, _) = hits  # type: ignore[misc]
    b, y = ctx.b, node.output[0]
    cs = b.const(f"{node.name}_y_scale", np.float32(aq.scale))
    cz = b.const(f"{node.name}_y_zero_point", aq.zero_point)
    cq = b.fresh(f"{y}_quantized")
    out.append(
        helper.make_node(
            "QLinearAdd",
            [a_q, a_s, a_z, b_q, b_s, b_z, cs, cz],
            [cq],
            name=node.name,
            domain="com.microsoft",
        )
    )
    out.append(
        helper.make_node(
            "DequantizeLinear", [cq, cs, cz], [y], name=b.fresh(f"{node.name}_y_DequantizeLinear")
        )
    )
    ctx.quantized[y] = (cq, cs, cz, aq)
    return True
