"""Inserting a plan's quantization into a float ONNX graph, node by node.

The graph keeps its nodes, names and wiring; each quantized Conv/Gemm/MatMul node gets
its activation quantized (QDQ pair or a QOperator node), an integer weight initializer
with its DequantizeLinear, and the plan's bias correction folded into its bias. Where the
next consumer's quantization of this node's output is known (the next sites read it, maybe
through a Relu/Clip that the int8 range already saturates), the output is quantized too,
which is what lets onnxruntime fuse `DQ -> Conv -> Q` into one integer kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx
from onnx import helper

from jaxptq.export._context import (
    Ctx,
    SiteRef,
    clip_reader,
    make_context,
    output_quant,
    site_reader_quant,
)
from jaxptq.export._qdq import qdq_site, quantize_output
from jaxptq.export._qoperator import qlinear_add, qop_site
from jaxptq.export._qparams import ActQuant
from jaxptq.targets import TargetProfile

SiteRule = Callable[[Ctx, onnx.NodeProto, SiteRef, list, list], None]
_FORMS: dict[str, SiteRule] = {"qdq": qdq_site, "qoperator": qop_site}


def fusable_outputs(
    model: onnx.ModelProto, refs: Mapping[str, SiteRef], target: TargetProfile
) -> dict[str, ActQuant | None]:
    """Float tensors that, once quantized, let a runtime run every static site and residual
    Add in integers: site outputs no later site quantizes (after their Relu/Clip, which the
    runtime then folds away), and Adds of such tensors.

    Maps each to the quantization of a site that reads it (so the runtime needs no
    requantization there), or None when it must be calibrated.
    """
    ctx = make_context(model, refs, target, "qdq")
    quantized: set[str] = set()
    wanted: dict[str, ActQuant | None] = {}

    def want(tensor: str) -> None:
        if tensor not in ctx.outputs:
            wanted[tensor] = site_reader_quant(ctx, tensor)
            quantized.add(tensor)

    for node in model.graph.node:
        ref = refs.get(node.name)
        if ref is not None and ref.plan.quantized and ref.plan.act_mode == "static":
            y = node.output[0]
            found = output_quant(ctx, y)
            quantized.update(t for t in (y, found[1] if found else None) if t)
            if found is None:
                clipped = clip_reader(ctx, y)
                want(clipped or y)
        elif node.op_type == "Add" and all(x in quantized for x in node.input):
            want(node.output[0])
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
    ctx = make_context(out, refs, target, form, extra)
    rule = _FORMS[form]
    nodes: list[onnx.NodeProto] = []
    for node in list(graph.node):
        ref = refs.get(node.name)
        if ref is None or not ref.plan.quantized:
            aq = ctx.extra.get(node.output[0]) if node.output else None
            if aq is not None and form == "qoperator" and qlinear_add(ctx, node, aq, nodes):
                continue
            nodes.append(node)
            if aq is not None:
                post: list[onnx.NodeProto] = []
                quantize_output(ctx, node, aq, post)
                nodes.extend(post)
            continue
        pre: list[onnx.NodeProto] = []
        post = []
        try:
            rule(ctx, node, ref, pre, post)
        except (NotImplementedError, ValueError) as err:
            raise type(err)(
                f"exporting site `{ref.plan.name}` (node `{node.name}`, {node.op_type}): {err}"
            ) from err
        replaced = any(p.name == node.name for p in post)
        nodes.extend(pre + ([] if replaced else [node]) + post)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(ctx.b.initializers)
    prune(graph)
    if any(n.domain == "com.microsoft" for n in graph.node) and not any(
        o.domain == "com.microsoft" for o in out.opset_import
    ):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
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
