"""The outputs a plan quantizes, as ONNX tensors to quantize: site outputs
(`SitePlan.out_act_scale`) and the outputs of Adds run on codes (`QuantPlan.adds`).

The JAX program requantizes such a site's output after the ops that fold into it (its
bias, a Relu/Clip: `requant.Chain`) and hands the dequantized codes on, and computes such
an Add's codes as `QLinearAdd` does (`jaxptq.qadd`); the export puts `Q -> DQ` on the same
tensors, so a runtime fuses `DQ -> Conv -> Q` and `DQ, DQ -> Add -> Q` and computes the
same codes.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from jaxptq import requant
from jaxptq.export._context import SiteRef, clip_reader, make_context
from jaxptq.export._qparams import ActQuant, act_quant_from
from jaxptq.graph import Graph
from jaxptq.importers.onnx._function import nodes_by_site_name
from jaxptq.plan import QuantPlan
from jaxptq.targets import TargetProfile

_BOUNDS = ("max", "min", "clamp")


def planned_outputs(
    plan: QuantPlan,
    graph: Graph,
    model: onnx.ModelProto,
    refs: Mapping[str, SiteRef],
    target: TargetProfile,
) -> dict[str, ActQuant]:
    """ONNX tensor -> its quantization, for every site output the plan quantizes.

    Only imported models' Conv/Gemm sites get output quantization (`passes.full`), and
    such a node computes its bias too, so the tensor is the node's output, or the
    Relu/Clip after it when the chain folded a bound.
    """
    plans = {sp.name: sp for sp in plan.sites}
    ctx = make_context(model, refs, target, "qdq")
    node_of = {ref.plan.name: name for name, ref in refs.items()}
    outputs = {n.name: n.output[0] for n in model.graph.node}
    found: dict[str, ActQuant] = {}
    for chain in requant.find_chains(graph, plans):
        if chain.consumers:
            continue
        sp = plans[chain.producer.name]
        assert sp.out_act_scale is not None and sp.out_act_zero_point is not None
        y = outputs[node_of[sp.name]]
        bounded = any(n.primitive.name in _BOUNDS for n in chain.folded)
        tensor = (clip_reader(ctx, y) if bounded else None) or y
        found[tensor] = act_quant_from(sp.out_act_scale, sp.out_act_zero_point, target)
    nodes = nodes_by_site_name(model)
    for add in plan.adds:
        found[nodes[add.name].output[0]] = act_quant_from(add.out_scale, add.out_zero_point, target)
    return found
