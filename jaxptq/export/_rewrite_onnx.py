"""Inserting a plan's quantization into a float ONNX graph, node by node.

The graph keeps its nodes, names and wiring; each quantized Conv/Gemm/MatMul node gets
its activation quantized (QDQ pair or a QOperator node), an integer weight initializer
with its DequantizeLinear, and the plan's bias correction folded into its bias. Where the
next consumer's quantization of this node's output is known (the next sites read it, maybe
through a Relu/Clip that the int8 range already saturates), the output is quantized too,
which is what lets onnxruntime fuse `DQ -> Conv -> Q` into one integer kernel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from jaxptq.export._builder import GraphBuilder
from jaxptq.export._qparams import ActQuant, act_quant, bias_int32, channel_vector, weight_quant
from jaxptq.graph import Site
from jaxptq.layout import site_layout, to_output
from jaxptq.plan import SitePlan
from jaxptq.targets import TargetProfile

_TINY = np.float32(1e-30)


@dataclasses.dataclass(frozen=True)
class SiteRef:
    """Where a site lives in the ONNX graph.

    `perm` lays the site's (JAX) weight out as the ONNX node's weight input:
    `onnx_weight = jax_weight.transpose(perm)`.
    """

    plan: SitePlan
    site: Site
    weight_input: int
    act_input: int
    perm: tuple[int, ...]


@dataclasses.dataclass
class _Ctx:
    model: onnx.ModelProto
    refs: Mapping[str, SiteRef]  # by node name
    target: TargetProfile
    form: str
    b: GraphBuilder
    consts: dict[str, np.ndarray]
    consumers: dict[str, list[onnx.NodeProto]]
    outputs: set[str]
    opset: int
    # tensor -> (quantized tensor, scale, zero point, parameters): for QOperator chains.
    quantized: dict[str, tuple[str, str, str, ActQuant]] = dataclasses.field(default_factory=dict)
    # Tensors quantized for the runtime's sake (`fuse_outputs`), with calibrated parameters.
    extra: Mapping[str, ActQuant] = dataclasses.field(default_factory=dict)


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The name the importer gives a node (and so its site): its own, or `OpType_index`."""
    return node.name or f"{node.op_type}_{index}"


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _act_quant(ctx: _Ctx, node: onnx.NodeProto, index: int) -> ActQuant | None:
    """The static quantization a node applies to input `index`, if it is a site's activation."""
    ref = ctx.refs.get(node.name)
    if ref is None or ref.act_input != index or ref.plan.act_mode != "static":
        return None
    if not ref.plan.quantized:
        return None
    return act_quant(ref.plan, ctx.target)


def _clip_bounds(ctx: _Ctx, node: onnx.NodeProto) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type != "Clip":
        return None
    lo, hi = -math.inf, math.inf
    if ctx.opset < 11:
        attrs = {a.name: a.f for a in node.attribute}
        return attrs.get("min", lo), attrs.get("max", hi)
    ins = list(node.input) + ["", ""]
    if any(ins[i] and ins[i] not in ctx.consts for i in (1, 2)):
        return None
    lo = float(ctx.consts[ins[1]]) if ins[1] else lo
    hi = float(ctx.consts[ins[2]]) if ins[2] else hi
    return lo, hi


def _readers_quant(ctx: _Ctx, tensor: str) -> ActQuant | None:
    """One quantization shared by every reader of `tensor`, or None."""
    if tensor in ctx.outputs:
        return None
    found: ActQuant | None = None
    for reader in ctx.consumers.get(tensor, []):
        for i, x in enumerate(reader.input):
            if x != tensor:
                continue
            aq = _act_quant(ctx, reader, i)
            if aq is None or (found is not None and found != aq):
                return None
            found = aq
    return found


def output_quant(ctx: _Ctx, tensor: str) -> tuple[ActQuant, str | None] | None:
    """How `tensor` is quantized next: directly by the sites that read it, or through one
    Relu/Clip whose bounds the int8 range already enforces (so Q(clip(y)) == Q(y)).

    Returns the parameters and the clipped tensor's name (None when read directly).
    """
    aq = _readers_quant(ctx, tensor)
    if aq is not None:
        return aq, None
    readers = ctx.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in ctx.outputs:
        return None
    bounds = _clip_bounds(ctx, readers[0])
    if bounds is None:
        return None
    clipped = readers[0].output[0]
    aq = _readers_quant(ctx, clipped)
    if aq is None:
        return None
    info = np.iinfo(aq.dtype)
    s, z = float(aq.scale), int(aq.zero_point)
    lo_f, hi_f = (info.min - z) * s, (info.max - z) * s
    if bounds[0] <= lo_f + 0.49 * s and bounds[1] >= hi_f - 0.49 * s:
        return aq, clipped
    return None


def _output_quant_or_extra(ctx: _Ctx, tensor: str) -> tuple[ActQuant, str | None] | None:
    found = output_quant(ctx, tensor)
    if found is None and tensor in ctx.extra:
        return ctx.extra[tensor], None
    return found


def _bias_value(ctx: _Ctx, node: onnx.NodeProto, index: int) -> np.ndarray | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    name = node.input[index]
    if name not in ctx.consts:
        raise NotImplementedError(
            f"node `{node.name}` ({node.op_type}): bias input `{name}` is computed at run "
            "time; export needs a constant bias to fold the bias correction into."
        )
    return np.asarray(ctx.consts[name], np.float32)


def _weight(ref: SiteRef, alpha: float) -> tuple[np.ndarray, np.ndarray, int | None, int]:
    """(integer weight in ONNX layout, scales, ONNX axis, output channels)."""
    wq = weight_quant(ref.plan)
    q = wq.q.transpose(ref.perm)
    axis = None if wq.axis is None else ref.perm.index(wq.axis)
    scale = (wq.scale * np.float32(alpha)).astype(np.float32)
    lay = site_layout(ref.site)
    channels = int(np.prod([wq.q.shape[a] for a in lay.weight_channel_axes]))
    return q, scale, axis, channels


def _out_scale(ref: SiteRef, aq_scale: np.ndarray | np.float32, alpha: float) -> np.ndarray:
    """act_scale * weight_scale laid out to broadcast over the ONNX node's output."""
    plan, lay = ref.plan, site_layout(ref.site)
    assert plan.weight_scale is not None
    w = to_output(plan.weight_scale, lay.weight_to_out, lay.out_ndim)
    out = (np.float32(aq_scale) * w * np.float32(alpha)).astype(np.float32)
    return _onnx_channels(ref, out)


def _onnx_channels(ref: SiteRef, arr: np.ndarray) -> np.ndarray:
    """An output-layout array of the site, re-laid for an NC... ONNX Conv output."""
    if ref.site.primitive != "conv_general_dilated":
        return arr
    out_spec = ref.site.node.params["dimension_numbers"][2]
    return np.asarray(arr).transpose(out_spec)


def _add_after(ctx: _Ctx, node: onnx.NodeProto, value: np.ndarray, post: list) -> None:
    """y -> Add(y, value) under y's original name."""
    y = node.output[0]
    raw = ctx.b.fresh(f"{y}_before_bias")
    node.output[0] = raw
    c = ctx.b.const(f"{node.name}_bias_correction", value.astype(np.float32))
    post.append(helper.make_node("Add", [raw, c], [y], name=ctx.b.fresh(f"{node.name}_bias")))


def _fold_bias(
    ctx: _Ctx,
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
                _fold_gemm_float(ctx, node, _onnx_channels(ref, bc))
            else:
                _add_after(ctx, node, _onnx_channels(ref, bc), post)
        return
    b_index = 2
    bias = _bias_value(ctx, node, b_index)
    if op == "Gemm" and bias is not None:
        beta = _attr(node, "beta", 1.0)
        bias = bias * np.float32(beta)
        if bias.size not in (1, channels):
            if int32_scale is None and bc is not None:
                _fold_gemm_float(ctx, node, channel_vector(bc, channels, "bias correction"))
            return  # a full (M, N) bias: leave it as it is
        _set_attr(node, "beta", 1.0)
    if bias is None and bc is None and int32_scale is None:
        return
    total = np.zeros(channels, np.float32) if bias is None else channel_vector(
        bias, channels, f"bias of `{node.name}`")
    if bc is not None:
        total = total + channel_vector(bc, channels, f"bias correction of `{node.name}`")
    inputs = list(node.input) + [""] * (3 - len(node.input))
    if int32_scale is not None:
        q, scale = bias_int32(total, np.float32(1.0), int32_scale)
        inputs[2] = ctx.b.dequantize_const(f"{node.name}_B", q, scale, 0, pre)
    else:
        inputs[2] = ctx.b.const(f"{node.name}_B", total.astype(np.float32))
    del node.input[:]
    node.input.extend(inputs)


def _fold_gemm_float(ctx: _Ctx, node: onnx.NodeProto, bc: np.ndarray) -> None:
    bias = _bias_value(ctx, node, 2)
    beta = _attr(node, "beta", 1.0)
    total = bc if bias is None else bias * np.float32(beta) + bc
    inputs = list(node.input) + [""] * (3 - len(node.input))
    inputs[2] = ctx.b.const(f"{node.name}_C", np.asarray(total, np.float32))
    _set_attr(node, "beta", 1.0)
    del node.input[:]
    node.input.extend(inputs)


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(helper.get_attribute_value(a))
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for a in node.attribute:
        if a.name == name:
            a.f = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _alpha(node: onnx.NodeProto) -> float:
    """Gemm's alpha, folded into the weight scale (and reset to 1)."""
    if node.op_type != "Gemm":
        return 1.0
    alpha = _attr(node, "alpha", 1.0)
    _set_attr(node, "alpha", 1.0)
    return alpha


# --- QDQ ---------------------------------------------------------------------------------


def _dynamic_scale(ctx: _Ctx, ref: SiteRef, x: str, pre: list) -> str:
    """The run-time symmetric int8 scale of `x`: max|x| / 127, per tensor or per row."""
    b, name = ctx.b, ref.plan.name
    node, (ax,) = b.node("Abs", [x], f"{name}_x_abs")
    pre.append(node)
    if ref.plan.act_mode == "dynamic_tensor":
        node, (m,) = b.node("ReduceMax", [ax], f"{name}_x_absmax", keepdims=0)
    else:
        axes = [int(a) for a in site_layout(ref.site).act_contracting]
        if ctx.opset >= 18:
            node, (m,) = b.node("ReduceMax", [ax, b.const(f"{name}_axes", np.array(axes))],
                                f"{name}_x_absmax", keepdims=1)
        else:
            node, (m,) = b.node("ReduceMax", [ax], f"{name}_x_absmax", keepdims=1, axes=axes)
    pre.append(node)
    node, (d,) = b.node("Div", [m, b.const(f"{name}_127", np.float32(127))], f"{name}_x_div")
    pre.append(node)
    node, (s,) = b.node("Max", [d, b.const(f"{name}_tiny", _TINY)], f"{name}_x_scale")
    pre.append(node)
    return s


def _dynamic_qdq(ctx: _Ctx, ref: SiteRef, x: str, pre: list) -> tuple[str, str, str]:
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


def _qdq_site(ctx: _Ctx, node: onnx.NodeProto, ref: SiteRef, pre: list, post: list) -> None:
    plan, b = ref.plan, ctx.b
    alpha = _alpha(node)
    q, w_scale, axis, channels = _weight(ref, alpha)
    x = node.input[ref.act_input]
    int32_scale = None
    if plan.act_mode == "static":
        aq = act_quant(plan, ctx.target)
        node.input[ref.act_input] = b.qdq(x, aq, pre, plan.name)
        if ctx.target.bias_int32 and node.op_type in ("Conv", "Gemm"):
            int32_scale = (np.float32(aq.scale) * np.broadcast_to(w_scale, (channels,))).astype(
                np.float32)
    elif plan.act_mode is not None:
        node.input[ref.act_input] = _dynamic_qdq(ctx, ref, x, pre)[0]
    node.input[ref.weight_input] = b.dequantize_const(f"{plan.name}_W", q, w_scale, axis, pre)
    _fold_bias(ctx, node, ref, channels, int32_scale, pre, post)
    if plan.act_mode == "static":
        found = _output_quant_or_extra(ctx, post[-1].output[0] if post else node.output[0])
        if found is not None:
            _quantize_output(ctx, post[-1] if post else node, found[0], post)


def _quantize_output(ctx: _Ctx, last: onnx.NodeProto, aq: ActQuant, post: list) -> None:
    """last's output y -> Q -> DQ under y's name, so a runtime sees DQ -> op -> Q."""
    y = last.output[0]
    raw = ctx.b.fresh(f"{y}_float")
    last.output[0] = raw
    q, s, z = ctx.b.quantize(raw, aq, post, f"{last.name}_y")
    post.append(helper.make_node("DequantizeLinear", [q, s, z], [y],
                                 name=ctx.b.fresh(f"{last.name}_y_DequantizeLinear")))


# --- QOperator -----------------------------------------------------------------------------


def _qop_input(ctx: _Ctx, x: str, aq: ActQuant, pre: list, site: str) -> tuple[str, str, str]:
    """The quantized form of `x`: reused when a QLinear node already produced it."""
    hit = ctx.quantized.get(x)
    if hit is not None and hit[3] == aq:
        return hit[0], hit[1], hit[2]
    return ctx.b.quantize(x, aq, pre, site)


def _qop_site(ctx: _Ctx, node: onnx.NodeProto, ref: SiteRef, pre: list, post: list) -> None:
    plan, b = ref.plan, ctx.b
    if plan.act_mode is None:
        return _qdq_site(ctx, node, ref, pre, post)
    op = node.op_type
    if op == "Gemm" and _attr(node, "transA" if ref.weight_input == 1 else "transB", 0):
        raise NotImplementedError(
            f"node `{node.name}` (Gemm): the activation operand is transposed; QOperator "
            "export handles Gemm(x, W) with the weight as B (use form='qdq')."
        )
    alpha = _alpha(node)
    q, w_scale, axis, channels = _weight(ref, alpha)
    if op == "Gemm":  # the integer op is a MatMul over the JAX-layout weight (K, N)
        q = np.asarray(weight_quant(plan).q)
    x = node.input[ref.act_input]
    if plan.act_mode == "static":
        aq = act_quant(plan, ctx.target)
        xq, xs, xz = _qop_input(ctx, x, aq, pre, plan.name)
        scale_in: str | np.float32 = np.float32(aq.scale)
    elif plan.act_mode == "dynamic_tensor":
        aq = None
        _, xq, xs = _dynamic_qdq(ctx, ref, x, pre)
        xz = b.const(f"{plan.name}_x_zero_point", np.array(0, np.int8))
        scale_in = xs
    else:
        return _qdq_site(ctx, node, ref, pre, post)
    wq = b.const(f"{plan.name}_W_quantized", q)
    found = _output_quant_or_extra(ctx, node.output[0]) if aq is not None else None
    fused = found is not None and (
        op == "Conv"
        or (op == "MatMul" and ref.weight_input == 1 and plan.bias_correction is None)
    )
    if fused and found is not None:
        yq_aq, clipped = found
        ws = b.const(f"{plan.name}_W_scale", w_scale)
        wz = b.const(f"{plan.name}_W_zero_point", np.zeros(np.shape(w_scale), q.dtype))
        ys = b.const(f"{plan.name}_y_scale", np.float32(yq_aq.scale))
        yz = b.const(f"{plan.name}_y_zero_point", yq_aq.zero_point)
        y = node.output[0]
        yq = b.fresh(f"{y}_quantized")
        if op == "Conv":
            assert aq is not None
            bias = _bias_value(ctx, node, 2)
            total = np.zeros(channels, np.float32) if bias is None else channel_vector(
                bias, channels, f"bias of `{node.name}`")
            if plan.bias_correction is not None:
                total = total + channel_vector(plan.bias_correction, channels, "bias correction")
            bq, _ = bias_int32(total, aq.scale, np.broadcast_to(w_scale, (channels,)))
            ins = [xq, xs, xz, wq, ws, wz, ys, yz, b.const(f"{plan.name}_B_quantized", bq)]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            post.append(helper.make_node("QLinearConv", ins, [yq], name=node.name, **attrs))
        else:
            post.append(helper.make_node(
                "QLinearMatMul", [xq, xs, xz, wq, ws, wz, ys, yz], [yq], name=node.name))
        post.append(helper.make_node("DequantizeLinear", [yq, ys, yz], [y],
                                     name=b.fresh(f"{node.name}_y_DequantizeLinear")))
        ctx.quantized[y] = (yq, ys, yz, yq_aq)
        if clipped is not None:
            ctx.quantized[clipped] = (yq, ys, yz, yq_aq)
        return None
    _integer_then_rescale(ctx, node, ref, xq, xz, wq, scale_in, alpha, channels, post)
    return None


def _integer_then_rescale(
    ctx: _Ctx,
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
        int_node = helper.make_node("ConvInteger", [xq, wq, xz], [b.fresh(f"{name}_acc")],
                                    name=node.name, **attrs)
    else:
        ins = [xq, wq, xz] if ref.weight_input == 1 else [wq, xq, "", xz]
        int_node = helper.make_node("MatMulInteger", ins, [b.fresh(f"{name}_acc")],
                                    name=node.name)
    post.append(int_node)
    cast, (acc,) = b.node("Cast", [int_node.output[0]], f"{name}_acc_float",
                          to=onnx.TensorProto.FLOAT)
    post.append(cast)
    if isinstance(scale_in, str):
        w_out = _out_scale(ref, np.float32(1.0), alpha)
        mul, (s,) = b.node("Mul", [scale_in, b.const(f"{name}_W_scale", w_out)], f"{name}_scale")
        post.append(mul)
    else:
        s = b.const(f"{name}_out_scale", _out_scale(ref, scale_in, alpha))
    bias = None
    if op in ("Conv", "Gemm"):
        raw = _bias_value(ctx, node, 2)
        if raw is not None:
            bias = raw * np.float32(_attr(node, "beta", 1.0)) if op == "Gemm" else raw
            if op == "Conv":
                bias = bias.reshape((1, -1) + (1,) * (len(ref.site.node.params["padding"])))
    if plan.bias_correction is not None:
        bc = _onnx_channels(ref, plan.bias_correction)
        bias = bc if bias is None else bias + bc
    y = node.output[0]
    mul, (scaled,) = b.node("Mul", [acc, s], f"{name}_rescale")
    if bias is None:
        mul.output[0] = y
        post.append(mul)
        return
    post.append(mul)
    post.append(helper.make_node("Add", [scaled, b.const(f"{name}_bias", bias.astype(np.float32))],
                                 [y], name=b.fresh(f"{name}_bias_add")))


SiteRule = Callable[[_Ctx, onnx.NodeProto, SiteRef, list, list], None]
_FORMS: dict[str, SiteRule] = {"qdq": _qdq_site, "qoperator": _qop_site}


def _context(
    model: onnx.ModelProto,
    refs: Mapping[str, SiteRef],
    target: TargetProfile,
    form: str,
    extra: Mapping[str, ActQuant] | None = None,
) -> _Ctx:
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return _Ctx(model, refs, target, form, GraphBuilder.for_graph(graph), _constants(graph),
                consumers, {o.name for o in graph.output}, opset, extra=dict(extra or {}))


def fusable_outputs(
    model: onnx.ModelProto, refs: Mapping[str, SiteRef], target: TargetProfile
) -> list[str]:
    """Float tensors that, once quantized, let a runtime run every static site and residual
    Add in integers: site outputs no later site quantizes, and Adds of such tensors."""
    ctx = _context(model, refs, target, "qdq")
    quantized: set[str] = set()
    wanted: list[str] = []
    for node in model.graph.node:
        ref = refs.get(node.name)
        if ref is not None and ref.plan.quantized and ref.plan.act_mode == "static":
            y = node.output[0]
            found = output_quant(ctx, y)
            if found is None and y not in ctx.outputs:
                wanted.append(y)
            quantized.update(t for t in (y, found[1] if found else None) if t)
        elif node.op_type == "Add" and all(x in quantized for x in node.input):
            if node.output[0] not in ctx.outputs:
                wanted.append(node.output[0])
                quantized.add(node.output[0])
    return wanted


def quantize_graph(
    model: onnx.ModelProto,
    refs: Mapping[str, SiteRef],
    target: TargetProfile,
    form: str,
    extra: Mapping[str, ActQuant] | None = None,
) -> onnx.ModelProto:
    """Rewrites `model` (a copy is made) with every quantized site of `refs` inserted.

    `refs` maps ONNX node names to the sites they compute; nodes are visited in graph
    order, and each site's rule emits the nodes before and after it. `extra` quantizes more
    tensors (Q -> DQ after their producer), as `fusable_outputs` suggests.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    ctx = _context(out, refs, target, form, extra)
    rule = _FORMS[form]
    nodes: list[onnx.NodeProto] = []
    for node in list(graph.node):
        ref = refs.get(node.name)
        if ref is None or not ref.plan.quantized:
            nodes.append(node)
            if node.output and node.output[0] in ctx.extra:
                post: list[onnx.NodeProto] = []
                _quantize_output(ctx, node, ctx.extra[node.output[0]], post)
                nodes.extend(post)
            continue
        pre: list[onnx.NodeProto] = []
        post = []
        try:
            rule(ctx, node, ref, pre, post)
        except (NotImplementedError, ValueError) as err:
            raise type(err)(f"exporting site `{ref.plan.name}` (node `{node.name}`, "
                            f"{node.op_type}): {err}") from err
        replaced = any(p.name == node.name for p in post)
        nodes.extend(pre + ([] if replaced else [node]) + post)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(ctx.b.initializers)
    prune(graph)
    return out


def prune(graph: onnx.GraphProto) -> None:
    """Drops nodes no graph output depends on, then initializers nothing reads."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(x for x in node.input if x)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    dropped = {t.name for t in graph.initializer if t.name not in needed}
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    # Models before IR 4 list initializers among the inputs too: drop those entries with them.
    inputs = [v for v in graph.input if v.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
