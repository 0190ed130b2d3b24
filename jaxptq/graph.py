"""Tracing: a JAX function becomes a flat graph with its weight expressions folded.

`build_graph` traces with `jax.make_jaxpr`, inlines call-like sub-jaxprs (`jit`,
`custom_jvp_call`, `custom_vjp_call`, `remat`, ...) so sites inside them are visible,
and evaluates every equation whose inputs are all constants once, eagerly. What is left
is a list of `Node`s over `Value`s, where every weight a site sees is a plain array.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxptq import conv_forms, pool_forms

logger = logging.getLogger(__name__)

# Call-like primitives whose bodies run inline: their equations join the outer graph.
_SUBJAXPR_PARAM = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
# Primitives with bodies that stay opaque; sites inside them are not quantized (yet).
_OPAQUE_WITH_BODY = ("scan", "while", "cond")

SITE_PRIMITIVES = (lax.dot_general_p, lax.conv_general_dilated_p)

_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Value:
    """One array in the graph: a runtime value, or a constant known at trace time."""

    aval: Any
    const: Any = None  # np.ndarray / jax.Array when known at trace time
    origin: str | None = None  # parameter path the constant came from, for naming sites
    id: int = dataclasses.field(default_factory=lambda: next(_ids))

    @property
    def is_const(self) -> bool:
        return self.const is not None


@dataclasses.dataclass(eq=False)
class Node:
    """One primitive application whose inputs are not all constants."""

    primitive: Any
    params: dict[str, Any]
    inputs: list[Value]
    outputs: list[Value]
    scope: str  # the name stack, outer scopes first


@dataclasses.dataclass(eq=False)
class Site:
    """A dot_general / conv_general_dilated with one weight operand."""

    name: str
    node: Node
    weight_index: int  # 0 if the weight is the lhs, 1 if the rhs

    @property
    def primitive(self) -> str:
        return self.node.primitive.name

    @property
    def weight(self) -> np.ndarray:
        return np.asarray(self.node.inputs[self.weight_index].const)

    @property
    def activation(self) -> Value:
        return self.node.inputs[1 - self.weight_index]


@dataclasses.dataclass(eq=False)
class Graph:
    inputs: list[Value]
    outputs: list[Value]
    nodes: list[Node]
    sites: list[Site]
    out_tree: Any
    opaque: list[str]  # names of bodies we did not look inside, for the plan's notes

    def runtime_consts(self, replaced: Sequence[Site] = ()) -> list[Value]:
        """Constants the program reads at run time; `replaced` sites bring their own weight."""
        dropped = {(id(s.node), s.weight_index) for s in replaced}
        seen: dict[int, Value] = {}
        for node in self.nodes:
            for i, v in enumerate(node.inputs):
                if v.is_const and not isinstance(v, _Literal) and (id(node), i) not in dropped:
                    seen.setdefault(v.id, v)
        for v in self.outputs:
            if v.is_const:
                seen.setdefault(v.id, v)
        return list(seen.values())


class _Literal(Value):
    """A scalar literal: inlined into the program, never an argument."""


def param_paths(tree: Any) -> dict[int, str]:
    """Maps `id(leaf)` to a readable path such as `conv1/kernel` for every array leaf."""
    out: dict[int, str] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for key in path:
            name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
            if name is None or name in ("value", "params"):
                continue
            parts.append(str(name))
        out[id(leaf)] = "/".join(parts)
    return out


def _module_name(origin: str) -> str:
    """`conv1/kernel` -> `conv1`: sites are named after the layer, not the array."""
    head, _, _ = origin.rpartition("/")
    return head or origin


_TRANSFORM = re.compile(r"\b(?:vmap|jvp|transpose|pmap|remat|checkpoint)\(([^()]*)\)")


def _join(prefix: str, scope: str) -> str:
    """Joins name stacks, unwrapping transform markers: `vmap(layer)` names `layer`."""
    while True:
        unwrapped = _TRANSFORM.sub(r"\1", scope)
        if unwrapped == scope:
            break
        scope = unwrapped
    parts = [p for p in f"{prefix}/{scope}".split("/") if p]
    return "/".join(parts)


class _Builder:
    def __init__(self, paths: Mapping[int, str]):
        self.paths = paths
        self.nodes: list[Node] = []
        self.opaque: list[str] = []

    def read(self, env: dict[Any, Value], var: Any) -> Value:
        if isinstance(var, jcore.Literal):
            return _Literal(aval=var.aval, const=var.val)
        return env[var]

    def run(
        self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Value], prefix: str
    ) -> list[Value]:
        env: dict[Any, Value] = {}
        for var, c in zip(jaxpr.constvars, consts, strict=True):
            env[var] = Value(aval=var.aval, const=c, origin=self.paths.get(id(c)))
        for var, a in zip(jaxpr.invars, args, strict=True):
            env[var] = a
        for eqn in jaxpr.eqns:
            scope = _join(prefix, str(eqn.source_info.name_stack))
            ins = [self.read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, ins, scope)
            for var, val in zip(eqn.outvars, outs, strict=True):
                env[var] = val
        return [self.read(env, v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[Value], scope: str) -> list[Value]:
        key = _SUBJAXPR_PARAM.get(eqn.primitive.name)
        if key is not None and key in eqn.params:
            body = eqn.params[key]
            inner, consts = (body.jaxpr, body.consts) if hasattr(body, "consts") else (body, ())
            return self.run(inner, consts, ins, scope)
        if eqn.primitive.name in _OPAQUE_WITH_BODY:
            self.opaque.append(f"{eqn.primitive.name} at `{scope or '<top>'}`")
        if all(v.is_const for v in ins) and not eqn.effects:
            return self.fold(eqn, ins)
        outs = [Value(aval=v.aval) for v in eqn.outvars]
        self.nodes.append(Node(eqn.primitive, dict(eqn.params), ins, outs, scope))
        return outs

    def fold(self, eqn: Any, ins: list[Value]) -> list[Value]:
        """Evaluates a constant-only equation now, so sites see plain weight arrays."""
        with jax.ensure_compile_time_eval():
            result = eqn.primitive.bind(*[v.const for v in ins], **eqn.params)
        results = result if eqn.primitive.multiple_results else [result]
        origins = {v.origin for v in ins if v.origin is not None}
        origin = origins.pop() if len(origins) == 1 else None
        return [
            Value(aval=var.aval, const=np.asarray(r), origin=origin)
            for var, r in zip(eqn.outvars, results, strict=True)
        ]


def _find_sites(nodes: list[Node]) -> list[Site]:
    sites: list[Site] = []
    used: dict[str, int] = {}
    for node in nodes:
        if node.primitive not in SITE_PRIMITIVES:
            continue
        lhs, rhs = node.inputs[:2]
        if lhs.is_const == rhs.is_const or isinstance(lhs, _Literal) or isinstance(rhs, _Literal):
            continue  # activation x activation (attention) or fully constant
        weight_index = 0 if lhs.is_const else 1
        weight = node.inputs[weight_index]
        base = node.scope or (weight.origin and _module_name(weight.origin)) or node.primitive.name
        count = used.get(base, 0)
        used[base] = count + 1
        sites.append(Site(base if count == 0 else f"{base}#{count}", node, weight_index))
    # A name that repeats gets its first use suffixed too, so `name` never means two sites.
    for site in sites:
        if used.get(site.name, 0) > 1:
            site.name = f"{site.name}#0"
    return sites


def build_graph(
    fn: Callable[..., Any], args: Sequence[Any], paths: Mapping[int, str] | None = None
) -> Graph:
    """Traces `fn` at the shapes of `args` and returns its folded, flat graph."""
    specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), _dtype_of(a)), args)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*specs)
    builder = _Builder(paths or {})
    inputs = [Value(aval=v.aval) for v in closed.jaxpr.invars]
    outputs = builder.run(closed.jaxpr, closed.consts, inputs, "")
    out_tree = jax.tree_util.tree_structure(out_shape)
    nodes = builder.nodes
    return Graph(inputs, outputs, nodes, _find_sites(nodes), out_tree, builder.opaque)


def _dtype_of(a: Any) -> Any:
    return a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype


SiteRule = Callable[[Site, list[Any]], Any]


def bind(node: Node, vals: Sequence[Any]) -> list[Any]:
    """Applies a node's primitive, through `FAST_RULES` where one exists."""
    fast = FAST_RULES.get(node.primitive)
    if fast is not None:
        return [fast(*vals, node.params)]
    result = node.primitive.bind(*vals, **node.params)
    return list(result) if node.primitive.multiple_results else [result]


# Faster lowerings of primitives that XLA:CPU runs slowly (jaxptq.conv_forms, pool_forms).
FAST_RULES: dict[Any, Callable[..., Any]] = {
    lax.conv_general_dilated_p: conv_forms.conv,
    **pool_forms.RULES,
}


def evaluate(
    graph: Graph,
    consts: Mapping[int, Any],
    args: Sequence[Any],
    site_rules: Mapping[int, SiteRule] | None = None,
    forward: Mapping[int, int] | None = None,
    capture: dict[int, Any] | None = None,
    node_rules: Mapping[int, Callable[[list[Any]], Any]] | None = None,
) -> list[Any]:
    """Runs the graph. `consts` maps `Value.id` to the runtime array of each constant.

    `site_rules` maps `id(site.node)` to a function of the site and its input arrays
    that replaces the node (the weight input is None when it was not passed);
    `node_rules` maps `id(node)` of other one-output nodes to a function of the input
    arrays that replaces them (`jaxptq.qadd`). `forward`
    maps `id(node)` to the input a node passes on unchanged: the ops a fused requantize
    has already applied (`jaxptq.requant`). `capture`'s keys are `Value.id`s whose arrays
    are stored into it.
    """
    env: dict[int, Any] = dict(consts)
    for v, a in zip(graph.inputs, args, strict=True):
        env[v.id] = a

    def read(v: Value) -> Any:
        if isinstance(v, _Literal):
            return v.const
        return env.get(v.id)

    sites = {id(s.node): s for s in graph.sites}
    rules = site_rules or {}
    passed = forward or {}
    replaced = node_rules or {}
    for node in graph.nodes:
        vals = [read(v) for v in node.inputs]
        rule = rules.get(id(node))
        if id(node) in passed:
            out = [vals[passed[id(node)]]]
        elif rule is not None:
            out = [rule(sites[id(node)], vals)]
        elif id(node) in replaced:
            out = [replaced[id(node)](vals)]
        else:
            out = bind(node, vals)
        for var, val in zip(node.outputs, out, strict=True):
            env[var.id] = val
            if capture is not None and var.id in capture:
                capture[var.id] = val
    return [read(v) for v in graph.outputs]
