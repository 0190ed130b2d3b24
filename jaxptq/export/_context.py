"""What the ONNX rewriting rules share: where each site is, and how tensors are quantized next."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from jaxptq.export._builder import GraphBuilder
from jaxptq.export._qparams import ActQuant, act_quant
from jaxptq.graph import Site
from jaxptq.plan import SitePlan
from jaxptq.targets import TargetProfile


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
class Ctx:
    """One rewrite in progress: the graph, its sites, the target and what is known so far."""

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
    # Tensors quantized for the runtime's sake (`fuse_calib`), with calibrated parameters.
    extra: Mapping[str, ActQuant] = dataclasses.field(default_factory=dict)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _act_quant(ctx: Ctx, node: onnx.NodeProto, index: int) -> ActQuant | None:
    """The static quantization a node applies to input `index`, if it is a site's activation."""
    ref = ctx.refs.get(node.name)
    if ref is None or ref.act_input != index or ref.plan.act_mode != "static":
        return None
    if not ref.plan.quantized:
        return None
    return act_quant(ref.plan, ctx.target)


def _clip_bounds(ctx: Ctx, node: onnx.NodeProto) -> tuple[float, float] | None:
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


def _readers_quant(ctx: Ctx, tensor: str) -> ActQuant | None:
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


def site_reader_quant(ctx: Ctx, tensor: str) -> ActQuant | None:
    """The quantization of the first static site that reads `tensor`, if any."""
    for reader in ctx.consumers.get(tensor, []):
        for i, x in enumerate(reader.input):
            aq = _act_quant(ctx, reader, i) if x == tensor else None
            if aq is not None:
                return aq
    return None


def clip_reader(ctx: Ctx, tensor: str) -> str | None:
    """The output of the one Relu/Clip (with constant bounds) that alone reads `tensor`."""
    readers = ctx.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in ctx.outputs or _clip_bounds(ctx, readers[0]) is None:
        return None
    return readers[0].output[0]


class NextQuant(NamedTuple):
    """How a site's output is quantized next (`output_quant`)."""

    aq: ActQuant
    clipped: str | None  # the Relu/Clip output the quantization reads, None when direct
    code_bounds: tuple[int, int] | None  # the clip in codes, where the range does not do it


def output_quant(ctx: Ctx, tensor: str) -> NextQuant | None:
    """How `tensor` is quantized next: directly by the sites that read it, or through one
    Relu/Clip.

    When the int8 range already enforces the clip's bounds (Q(clip(y)) == Q(y)),
    `code_bounds` is None; otherwise it holds the bounds in codes, `round(bound / s) + zp`
    saturated, since Q(clip(y)) == clip(Q(y), those codes) (rounding is monotone): the
    JAX program's fused requantize applies exactly that clamp (`jaxptq.requant`).
    """
    aq = _readers_quant(ctx, tensor)
    if aq is not None:
        return NextQuant(aq, None, None)
    readers = ctx.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in ctx.outputs:
        return None
    bounds = _clip_bounds(ctx, readers[0])
    if bounds is None:
        return None
    clipped = readers[0].output[0]
    aq = _readers_quant(ctx, clipped) or ctx.extra.get(clipped)
    if aq is None:
        return None
    info = np.iinfo(aq.dtype)
    s, z = np.float32(aq.scale), int(aq.zero_point)

    def code(bound: float, edge: int) -> int:
        if not math.isfinite(bound):
            return edge
        return int(np.clip(np.round(np.float32(bound) / s) + z, info.min, info.max))

    lo, hi = code(bounds[0], int(info.min)), code(bounds[1], int(info.max))
    if (lo, hi) == (info.min, info.max):
        return NextQuant(aq, clipped, None)
    return NextQuant(aq, clipped, (lo, hi))


def next_quant(ctx: Ctx, tensor: str) -> NextQuant | None:
    found = output_quant(ctx, tensor)
    if found is None and tensor in ctx.extra:
        return NextQuant(ctx.extra[tensor], None, None)
    return found


def get_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(helper.get_attribute_value(a))
    return default


def set_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for a in node.attribute:
        if a.name == name:
            a.f = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def pop_alpha(node: onnx.NodeProto) -> float:
    """Gemm's alpha, folded into the weight scale (and reset to 1)."""
    if node.op_type != "Gemm":
        return 1.0
    alpha = get_attr(node, "alpha", 1.0)
    set_attr(node, "alpha", 1.0)
    return alpha


def make_context(
    model: onnx.ModelProto,
    refs: Mapping[str, SiteRef],
    target: TargetProfile,
    form: str,
    extra: Mapping[str, ActQuant] | None = None,
) -> Ctx:
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return Ctx(
        model,
        refs,
        target,
        form,
        GraphBuilder.for_graph(graph),
        _constants(graph),
        consumers,
        {o.name for o in graph.output},
        opset,
        extra=dict(extra or {}),
    )
