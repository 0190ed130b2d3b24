"""A traced JAX graph (Flax or plain JAX) as a float ONNX model, one rule per primitive.

Why our own table rather than jax2onnx: the quantized export must know which ONNX node
and which weight layout each jaxptq site became, and `Graph` (weights already folded,
sites already named) is what the plan was made on. Translating it directly keeps that
mapping exact in ~300 lines; docs/export.md says more.

Every site becomes a Conv or MatMul node named after the site, with its weight as an
initializer laid out for that node; `_rewrite_onnx.quantize_graph` then inserts the
plan. The leading (batch) axis of the inputs stays symbolic where the program allows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from jaxptq.export._builder import GraphBuilder
from jaxptq.export._context import SiteRef
from jaxptq.graph import Graph, Node, Site, Value, _Literal
from jaxptq.rewrite import QuantizedFunction

OPSET = 18
_BATCH = "batch"


@dataclasses.dataclass
class _Ctx:
    graph: Graph
    b: GraphBuilder
    names: dict[int, str]  # Value.id -> ONNX tensor name
    nodes: list[onnx.NodeProto]
    sites: dict[int, Site]  # id(node) -> site
    refs: dict[str, SiteRef]
    plans: dict[str, Any]

    def name(self, v: Value) -> str:
        if v.id not in self.names:
            if not v.is_const:
                raise NotImplementedError(f"value {v.aval} is read before it is computed")
            arr = np.asarray(v.const)
            if arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            base = "literal" if isinstance(v, _Literal) else (v.origin or "const")
            self.names[v.id] = self.b.const(base.replace("/", "."), arr)
        return self.names[v.id]

    def emit(self, op: str, inputs: Sequence[str], base: str, **attrs: Any) -> str:
        node, (out,) = self.b.node(op, inputs, base, **attrs)
        self.nodes.append(node)
        return out

    def ints(self, base: str, values: Sequence[int]) -> str:
        return self.b.const(base, np.asarray(list(values), np.int64))


Rule = Callable[[_Ctx, Node, list[str]], list[str]]
RULES: dict[str, Rule] = {}


def _register(*names: str) -> Callable[[Rule], Rule]:
    def deco(rule: Rule) -> Rule:
        for n in names:
            RULES[n] = rule
        return rule

    return deco


def _elementwise(op: str) -> Rule:
    return lambda ctx, node, ins: [ctx.emit(op, ins, node.primitive.name)]


for _prim, _op in {
    "abs": "Abs",
    "add": "Add",
    "div": "Div",
    "eq": "Equal",
    "erf": "Erf",
    "exp": "Exp",
    "ge": "GreaterOrEqual",
    "gt": "Greater",
    "le": "LessOrEqual",
    "log": "Log",
    "logistic": "Sigmoid",
    "lt": "Less",
    "max": "Max",
    "min": "Min",
    "mul": "Mul",
    "neg": "Neg",
    "pow": "Pow",
    "sqrt": "Sqrt",
    "sub": "Sub",
    "tanh": "Tanh",
    "copy": "Identity",
    "copy_p": "Identity",
    "stop_gradient": "Identity",
    "floor": "Floor",
    "ceil": "Ceil",
    "round": "Round",
    "sign": "Sign",
}.items():
    RULES[_prim] = _elementwise(_op)


@_register("rsqrt")
def _rsqrt(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    return [ctx.emit("Reciprocal", [ctx.emit("Sqrt", ins, "rsqrt_sqrt")], "rsqrt")]


@_register("square")
def _square(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    return [ctx.emit("Mul", [ins[0], ins[0]], "square")]


@_register("integer_pow")
def _integer_pow(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    y = node.params["y"]
    if y == 2:
        return [ctx.emit("Mul", [ins[0], ins[0]], "square")]
    dtype = np.dtype(node.inputs[0].aval.dtype)
    return [ctx.emit("Pow", [ins[0], ctx.b.const("exponent", np.asarray(y, dtype))], "pow")]


@_register("convert_element_type")
def _convert(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    to = helper.np_dtype_to_tensor_dtype(np.dtype(node.params["new_dtype"]))
    return [ctx.emit("Cast", ins, "cast", to=to)]


@_register("select_n")
def _select_n(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    if len(ins) != 3:
        raise NotImplementedError("select_n with more than two cases")
    pred = ins[0]
    if np.dtype(node.inputs[0].aval.dtype) != np.bool_:
        pred = ctx.emit("Cast", [pred], "select_pred", to=TensorProto.BOOL)
    return [ctx.emit("Where", [pred, ins[2], ins[1]], "select")]


@_register("clamp")
def _clamp(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    lo, x, hi = ins
    return [ctx.emit("Min", [ctx.emit("Max", [x, lo], "clamp_lo"), hi], "clamp")]


def _shape_arg(node: Node, shape: Sequence[int]) -> list[int]:
    """A target shape whose leading axis is copied (0) when it is the input's batch axis."""
    in_shape = node.inputs[0].aval.shape
    out = list(shape)
    if out and in_shape and out[0] == in_shape[0]:
        out[0] = 0
    return out


@_register("reshape")
def _reshape(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    if node.params.get("dimensions") is not None:
        raise NotImplementedError("reshape with `dimensions`")
    shape = ctx.ints("shape", _shape_arg(node, node.params["new_sizes"]))
    return [ctx.emit("Reshape", [ins[0], shape], "reshape")]


@_register("squeeze")
def _squeeze(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    axes = ctx.ints("axes", node.params["dimensions"])
    return [ctx.emit("Squeeze", [ins[0], axes], "squeeze")]


@_register("expand_dims")
def _expand_dims(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    axes = ctx.ints("axes", node.params["dimensions"])
    return [ctx.emit("Unsqueeze", [ins[0], axes], "unsqueeze")]


@_register("transpose")
def _transpose(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    return [ctx.emit("Transpose", ins, "transpose", perm=list(node.params["permutation"]))]


@_register("broadcast_in_dim")
def _broadcast(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    """Unsqueeze the new axes, then Expand; kept axes get 1, so the batch stays free."""
    shape, dims = node.params["shape"], node.params["broadcast_dimensions"]
    x = ins[0]
    new_axes = [a for a in range(len(shape)) if a not in dims]
    if new_axes:
        x = ctx.emit("Unsqueeze", [x, ctx.ints("axes", new_axes)], "broadcast_unsqueeze")
    target = [1 if a in dims else s for a, s in enumerate(shape)]
    if all(t == 1 for t in target):
        return [x]
    return [ctx.emit("Expand", [x, ctx.ints("shape", target)], "broadcast")]


@_register("split")
def _split(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    sizes, axis = node.params["sizes"], int(node.params["axis"])
    split = node_split = ctx.b.node(
        "Split", [ins[0], ctx.ints("split", sizes)], "split", n_out=len(sizes), axis=axis
    )
    ctx.nodes.append(node_split[0])
    return split[1]


@_register("concatenate")
def _concatenate(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    return [ctx.emit("Concat", ins, "concat", axis=int(node.params["dimension"]))]


@_register("slice")
def _slice(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    p = node.params
    starts, ends = p["start_indices"], p["limit_indices"]
    steps = p["strides"] or [1] * len(starts)
    args = [
        ctx.ints("starts", starts),
        ctx.ints("ends", ends),
        ctx.ints("axes", range(len(starts))),
        ctx.ints("steps", steps),
    ]
    return [ctx.emit("Slice", [ins[0], *args], "slice")]


def _reduce(op: str) -> Rule:
    def rule(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
        axes = ctx.ints("axes", node.params["axes"])
        return [ctx.emit(op, [ins[0], axes], node.primitive.name, keepdims=0)]

    return rule


RULES["reduce_sum"] = _reduce("ReduceSum")
RULES["reduce_max"] = _reduce("ReduceMax")
RULES["reduce_min"] = _reduce("ReduceMin")


@_register("argmax")
def _argmax(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    (axis,) = node.params["axes"]
    y = ctx.emit("ArgMax", ins, "argmax", axis=int(axis), keepdims=0)
    to = helper.np_dtype_to_tensor_dtype(np.dtype(node.params["index_dtype"]))
    return [ctx.emit("Cast", [y], "argmax_cast", to=to)]


def _window_axes(node: Node) -> tuple[list[int], list[int]]:
    dims = node.params["window_dimensions"]
    strides = node.params["window_strides"]
    spatial = [a for a, (d, s) in enumerate(zip(dims, strides, strict=True)) if d > 1 or s > 1]
    other = [a for a in range(len(dims)) if a not in spatial]
    if len(other) != 2 or any(node.params["padding"][a] != (0, 0) for a in other):
        raise NotImplementedError(
            f"reduce_window over axes {spatial} of a rank-{len(dims)} array: ONNX pooling "
            "needs exactly a batch and a channel axis besides the window axes"
        )
    if any(d != 1 for d in (*node.params["base_dilation"], *node.params["window_dilation"])):
        raise NotImplementedError("dilated reduce_window")
    return other + spatial, spatial


def _pool(op: str) -> Rule:
    def rule(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
        perm, spatial = _window_axes(node)
        p = node.params
        x = ctx.emit("Transpose", ins, "pool_in", perm=perm)
        pads = [p["padding"][a][0] for a in spatial] + [p["padding"][a][1] for a in spatial]
        attrs: dict[str, Any] = {
            "kernel_shape": [p["window_dimensions"][a] for a in spatial],
            "strides": [p["window_strides"][a] for a in spatial],
            "pads": pads,
        }
        if op == "AveragePool":
            attrs["count_include_pad"] = 1
        y = ctx.emit(op, [x], node.primitive.name, **attrs)
        if op == "AveragePool":  # a window sum is the average times the window size
            size = int(np.prod(attrs["kernel_shape"]))
            dtype = np.dtype(node.inputs[0].aval.dtype)
            y = ctx.emit(
                "Mul", [y, ctx.b.const("window_size", np.asarray(size, dtype))], "window_sum"
            )
        return [ctx.emit("Transpose", [y], "pool_out", perm=list(np.argsort(perm)))]

    return rule


RULES["reduce_window_sum"] = _pool("AveragePool")
RULES["reduce_window_max"] = _pool("MaxPool")


@_register("conv_general_dilated")
def _conv(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    p = node.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise NotImplementedError("transposed or batch-grouped convolution")
    if any(lo < 0 or hi < 0 for lo, hi in p["padding"]):
        raise NotImplementedError("negative convolution padding")
    site = ctx.sites.get(id(node))
    x = ctx.emit("Transpose", [ins[0]], "conv_in", perm=list(lhs_spec))
    if site is not None:
        w_perm = tuple(int(a) for a in rhs_spec)
        weight = ctx.b.const(f"{site.name}.kernel", np.asarray(site.weight).transpose(w_perm))
    else:
        weight = ctx.emit("Transpose", [ins[1]], "conv_kernel", perm=list(rhs_spec))
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    base = site.name if site is not None else "conv"
    y = ctx.emit(
        "Conv",
        [x, weight],
        base,
        strides=list(p["window_strides"]),
        pads=pads,
        dilations=list(p["rhs_dilation"]),
        group=int(p["feature_group_count"]),
    )
    if site is not None:
        onnx_node = ctx.nodes[-1]
        ctx.refs[onnx_node.name] = SiteRef(ctx.plans[site.name], site, 1, 0, w_perm)
    inv = list(np.argsort(list(out_spec)))
    return [ctx.emit("Transpose", [y], "conv_out", perm=inv)]


@_register("dot_general")
def _dot(ctx: _Ctx, node: Node, ins: list[str]) -> list[str]:
    """`x (..., K) . W (K, N)` is a MatMul; anything else goes through Einsum, except
    sites, which must be MatMuls with the weight on the right."""
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    lhs, rhs = node.inputs[:2]
    nl, nr = len(lhs.aval.shape), len(rhs.aval.shape)
    site = ctx.sites.get(id(node))
    simple = not lb and tuple(lc) == (nl - 1,) and tuple(rc) == (0,) and nr == 2
    if site is not None:
        if not simple or site.weight_index != 1:
            raise NotImplementedError(
                f"site `{site.name}`: dot_general with dimension numbers "
                f"{node.params['dimension_numbers']} (export handles x(..., K) . W(K, N))"
            )
        weight = ctx.b.const(f"{site.name}.kernel", np.asarray(site.weight))
        y = ctx.emit("MatMul", [ins[0], weight], site.name)
        ctx.refs[ctx.nodes[-1].name] = SiteRef(ctx.plans[site.name], site, 1, 0, (0, 1))
        return [y]
    if simple:
        return [ctx.emit("MatMul", ins, "matmul")]
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    l_sub = [next(letters) for _ in range(nl)]
    r_sub = [""] * nr
    for a, b in zip(lc, rc, strict=True):
        r_sub[b] = l_sub[a]
    for a, b in zip(lb, rb, strict=True):
        r_sub[b] = l_sub[a]
    r_sub = [s or next(letters) for s in r_sub]
    out = [l_sub[a] for a in lb]
    out += [l_sub[a] for a in range(nl) if a not in lc and a not in lb]
    out += [r_sub[a] for a in range(nr) if a not in rc and a not in rb]
    eq = f"{''.join(l_sub)},{''.join(r_sub)}->{''.join(out)}"
    return [ctx.emit("Einsum", ins, "einsum", equation=eq)]


def _value_info(name: str, aval: Any, batch: bool) -> onnx.ValueInfoProto:
    shape: list[Any] = list(aval.shape)
    if batch and shape:
        shape[0] = _BATCH
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype))
    return helper.make_tensor_value_info(name, dtype, shape)


def translate(
    qfn: QuantizedFunction, example_args: tuple[Any, ...]
) -> tuple[onnx.ModelProto, dict[str, SiteRef]]:
    """The float ONNX model of `qfn`'s traced graph, and where each quantized site went."""
    graph = qfn._graphs.get(example_args) if example_args else qfn._graphs.first()
    plans = {sp.name: sp for sp in qfn.plan.sites}
    sites = {id(s.node): s for s in graph.sites if plans[s.name].quantized}
    ctx = _Ctx(graph, GraphBuilder(), {}, [], sites, {}, plans)
    inputs = []
    for i, v in enumerate(graph.inputs):
        name = ctx.b.fresh(f"input_{i}")
        ctx.names[v.id] = name
        inputs.append(_value_info(name, v.aval, batch=True))
    for node in graph.nodes:
        rule = RULES.get(node.primitive.name)
        if rule is None:
            raise NotImplementedError(
                f"`{node.primitive.name}` (at `{node.scope or '<top>'}`) has no ONNX "
                f"translation; supported: {', '.join(sorted(RULES))}."
            )
        site = sites.get(id(node))
        # A site's weight is laid out by its rule; only the activation is a graph tensor.
        ins = [ctx.name(v) for v in (node.inputs if site is None else [site.activation])]
        outs = rule(ctx, node, ins)
        for v, name in zip(node.outputs, outs, strict=True):
            ctx.names[v.id] = name
    outputs = []
    for i, v in enumerate(graph.outputs):
        name = f"output_{i}"
        ctx.nodes.append(
            helper.make_node("Identity", [ctx.name(v)], [name], name=ctx.b.fresh(f"output_{i}"))
        )
        outputs.append(_value_info(name, v.aval, batch=True))
    g = helper.make_graph(ctx.nodes, "jaxptq", inputs, outputs, ctx.b.initializers)
    model = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="jaxptq"
    )
    model.ir_version = 8
    return model, ctx.refs
