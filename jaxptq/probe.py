"""Instrumented evaluations of the float program: what each site sees and produces.

Calibration, bias correction and the debug reports all need per-site tensors of the
float model; these builders return traceable functions of one batch, so the callers can
jit them and reduce on device instead of keeping tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax

from jaxptq import conv_forms, kernels, requant
from jaxptq.graph import Site, bind, evaluate
from jaxptq.plan import SitePlan
from jaxptq.rewrite import GraphCache


def _float_consts(graph: Any) -> dict[int, Any]:
    return {v.id: v.const for v in graph.runtime_consts()}


def rowwise(fn: Callable[..., Any], per_row: bool) -> Callable[..., Any]:
    """Runs `fn` one row at a time under `jax.vmap` when the model only takes one
    row per call (e.g. an ONNX graph exported with batch 1), so callers may batch rows."""
    if not per_row:
        return fn

    def each(*flat: Any) -> Any:
        return jax.vmap(lambda *row: fn(*[r[None] for r in row]))(*flat)

    return each


def output_key(site_name: str) -> str:
    """The key of a site's output (`site_inputs(..., outputs=...)`) among site inputs."""
    return f"{site_name}->out"


def site_inputs(
    graphs: GraphCache,
    in_tree: Any,
    names: Sequence[str],
    per_row: bool = False,
    channels_last: bool = False,
    outputs: Collection[str] = (),
) -> Callable[..., dict[str, jax.Array]]:
    """`(*flat_batch) -> {site: activation operand}` for the named sites, and for the sites
    in `outputs`, `{output_key(site): output}`: the value its fused requantize would
    produce, after the bias and clip ops that fold into it (`requant.chain_end`).

    `channels_last`: a convolution's input comes as (batch, spatial..., feature), the
    order `conv_forms` computes it in on XLA:CPU, for statistics that take every value of
    a row alike. Observed in the model's order (NCHW for ONNX), XLA:CPU re-read each such
    activation through a transposing copy inside the statistic's reduction, recomputing
    the depthwise convolution that produced it (EfficientNet-Lite0: ~1.4 s of the 2.9 s
    MAX_MIN calibration over 100 photos).
    """
    wanted, outs = set(names), set(outputs)

    def fn(*flat: Any) -> dict[str, jax.Array]:
        args = jax.tree_util.tree_unflatten(in_tree, flat)
        graph = graphs.get(args)
        seen: dict[str, jax.Array] = {}

        def record(site: Site, vals: list[Any]) -> Any:
            x = vals[1 - site.weight_index]
            if channels_last and site.primitive == "conv_general_dilated":
                lhs_spec = site.node.params["dimension_numbers"][0]
                if lhs_spec[0] == 0:  # rows stay the leading axis
                    x = conv_forms.channels_last(x, lhs_spec)
            seen[site.name] = x
            return bind(site.node, vals)[0]

        rules = {id(s.node): record for s in graph.sites if s.name in wanted}
        ends = requant.chain_ends(graph, outs)
        captured: dict[int, Any] = {v.id: None for _, v in ends.values()}
        jax_args = jax.tree_util.tree_leaves(args)
        evaluate(graph, _float_consts(graph), jax_args, rules, capture=captured)
        for name, (site, end) in ends.items():
            y = captured[end.id]
            if channels_last and site.primitive == "conv_general_dilated":
                out_spec = site.node.params["dimension_numbers"][2]
                if out_spec[0] == 0:
                    y = conv_forms.channels_last(y, out_spec)
            seen[output_key(name)] = y
        return seen

    return rowwise(fn, per_row)


def site_output_pairs(
    graphs: GraphCache, in_tree: Any, plans: Sequence[SitePlan], per_row: bool = False
) -> Callable[..., dict[str, tuple[jax.Array, jax.Array]]]:
    """`(*flat_batch) -> {site: (float output, quantized output)}`, both from the float
    input of the site, so each site's own error is measured apart from the others'."""
    by_name = {p.name: p for p in plans if p.quantized}

    def fn(*flat: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
        args = jax.tree_util.tree_unflatten(in_tree, flat)
        graph = graphs.get(args)
        pairs: dict[str, tuple[jax.Array, jax.Array]] = {}

        def both(site: Site, vals: list[Any]) -> Any:
            plan = by_name[site.name]
            make_args, apply = kernels.KERNELS[plan.act_mode]
            y_float = bind(site.node, vals)[0]
            y_quant = apply(plan, site, vals, make_args(plan, site, False))
            pairs[site.name] = (y_float, y_quant)
            return y_float

        rules = {id(s.node): both for s in graph.sites if s.name in by_name}
        _evaluate_float(graph, jax.tree_util.tree_leaves(args), rules)
        return pairs

    return rowwise(fn, per_row)


def takes_any_batch(graphs: GraphCache, in_tree: Any, sample: Sequence[Any]) -> bool:
    """Whether `fn` also runs with one more row than `sample` has (most models do; an
    ONNX graph exported with a fixed batch of 1 does not)."""
    bigger = [jax.ShapeDtypeStruct((a.shape[0] + 1, *a.shape[1:]), a.dtype) for a in sample]
    try:
        graphs.get(jax.tree_util.tree_unflatten(in_tree, bigger))
    except Exception:  # noqa: BLE001 - any failure to trace means "fixed batch"
        return False
    return True


def _evaluate_float(graph: Any, flat: Sequence[Any], rules: dict[int, Any]) -> list[Any]:
    return evaluate(graph, _float_consts(graph), flat, rules)
