"""Applying a plan: the float program with each quantized site replaced by its kernel."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxptq import kernels, qadd, requant
from jaxptq.arg_pack import ArgPack
from jaxptq.graph import Graph, Site, build_graph, evaluate
from jaxptq.plan import QuantPlan, SitePlan
from jaxptq.targets import TARGETS


def _shape_key(flat: list[Any], tree: Any) -> tuple[Any, ...]:
    # dtype objects, not their names: this runs on every call, and `str(dtype)` was half
    # of its cost
    return (tree, tuple((np.shape(a), _dtype(a)) for a in flat))


def _dtype(a: Any) -> Any:
    dtype = getattr(a, "dtype", None)  # (a dtype is falsy: `len(np.dtype("f4")) == 0`)
    return np.result_type(a) if dtype is None else dtype


def _array_key(a: Any) -> Any:
    """The abstract value of a JAX array or tracer, (shape, dtype) of another array; None
    for anything else (a pytree, a scalar).

    A JAX array's `aval` first: under asynchronous dispatch, reading its `.shape` and
    `.dtype` measured 6-10 us a call on the digits MLP against 0-2 us for `.aval`."""
    aval = getattr(a, "aval", None)
    if aval is not None:
        return aval
    shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
    return None if shape is None or dtype is None else (shape, dtype)


class GraphCache:
    """One traced, folded graph per input signature: the plan is shape-free, graphs are not."""

    def __init__(self, fn: Callable[..., Any], paths: Mapping[int, str]):
        self.fn = fn
        self.paths = paths
        self._graphs: dict[tuple[Any, ...], Graph] = {}

    def first(self) -> Graph:
        """The graph traced first (at the calibration samples' shapes)."""
        return next(iter(self._graphs.values()))

    def get(self, args: tuple[Any, ...]) -> Graph:
        flat, tree = jax.tree_util.tree_flatten(args)
        key = _shape_key(flat, tree)
        if key not in self._graphs:
            self._graphs[key] = build_graph(self.fn, args, self.paths)
        return self._graphs[key]


class QuantizedFunction:
    """The quantized twin of a float function: call it, jit it, vmap it, lower it.

    Attributes:
        plan: the `QuantPlan` it applies.
    """

    def __init__(self, fn: Callable[..., Any], plan: QuantPlan, graphs: GraphCache):
        self.fn = fn
        self.plan = plan
        self._graphs = graphs
        self._programs: dict[int, _Program] = {}
        self._by_shape: dict[tuple[Any, ...], _Program] = {}
        self._one_array: dict[Any, Callable[[Any], Any]] = {}
        self._site_args: dict[str, dict[str, Any]] | None = None
        self._add_args: dict[str, dict[str, Any]] | None = None
        functools.update_wrapper(self, fn, updated=())

    def __repr__(self) -> str:
        return (
            f"QuantizedFunction({getattr(self.fn, '__name__', self.fn)!r}, {self.plan.quant_type})"
        )

    def _matched_sites(self, graph: Graph) -> list[tuple[Site, SitePlan]]:
        names = [s.name for s in graph.sites]
        expected = [s.name for s in self.plan.sites]
        if names != expected:
            raise ValueError(
                "the function traced at these input shapes has sites "
                f"{names[:5]}{'...' if len(names) > 5 else ''}, but the plan was made for "
                f"{expected[:5]}{'...' if len(expected) > 5 else ''}; call it with inputs "
                "like the calibration samples."
            )
        return list(zip(graph.sites, self.plan.sites, strict=True))

    def site_args(self) -> dict[str, dict[str, Any]]:
        """Every quantized site's runtime arrays (integer weights, scales), on device."""
        if self._site_args is None:
            graph = self._graphs.first()
            out = {}
            for site, sp in self._matched_sites(graph):
                if sp.quantized:
                    make_args = kernels.KERNELS[sp.act_mode][0]
                    out[sp.name] = _on_device(make_args(sp, site, self.plan.packed))
            self._site_args = out
        return self._site_args

    def add_args(self) -> dict[str, dict[str, Any]]:
        """Every Add run on codes' arrays (`qadd.add_args`: its code table, made for the
        plan's target's integer type), computed once."""
        if self._add_args is None:
            signed = not TARGETS[self.plan.config.full_quant_param.target_device].act_unsigned
            self._add_args = {a.name: qadd.add_args(a, signed) for a in self.plan.adds}
        return self._add_args

    def _program(self, graph: Graph) -> _Program:
        program = self._programs.get(id(graph))
        if program is not None:
            return program
        matched = [(s, sp) for s, sp in self._matched_sites(graph) if sp.quantized]
        consts = graph.runtime_consts([s for s, _ in matched])
        plans = {sp.name: sp for _, sp in matched}
        all_site_args = self.site_args()
        chains = requant.find_chains(graph, plans)
        chain_arrays = {
            c.producer.name: requant.chain_args(
                c, all_site_args[c.producer.name], *requant.chain_quant(c, plans)
            )
            for c in chains
        }
        # A chain its producer's own output quantization ends hands on dequantized codes.
        dequant_arrays = {
            c.producer.name: requant.dequantize_args(*requant.chain_quant(c, plans))
            for c in chains
            if not c.consumers
        }
        codes_in = {t.name for c in chains for t in c.consumers}
        forward = {id(n): i for c in chains for n, i in zip(c.folded, c.running, strict=True)}
        add_nodes = qadd.add_nodes(graph, self.plan.adds)
        all_add_args = self.add_args()

        const_arrays = [np.asarray(v.const) for v in consts]
        pack = ArgPack(
            (all_site_args, chain_arrays, dequant_arrays, const_arrays, all_add_args),
            _is_integer_weight,
        )
        n_params = len(pack.args)

        def run(*params_and_args: Any) -> Any:
            site_args, fused_args, dequant_args, const_arrays, add_args = pack.unpack(
                *params_and_args[:n_params]
            )
            flat_args = params_and_args[n_params:]
            rules = {}
            for site, sp in matched:
                apply = kernels.KERNELS[sp.act_mode][1]
                if sp.name in codes_in or sp.name in fused_args:
                    apply = functools.partial(
                        kernels.static_apply,
                        codes_in=sp.name in codes_in,
                        requant_args=fused_args.get(sp.name),
                        dequant_args=dequant_args.get(sp.name),
                    )
                rules[id(site.node)] = functools.partial(
                    _call_kernel, apply, sp, site_args[sp.name]
                )
            adds = {
                id(node): functools.partial(qadd.apply, add_args[name])
                for name, node in add_nodes.items()
            }
            env = {v.id: c for v, c in zip(consts, const_arrays, strict=True)}
            outs = evaluate(graph, env, flat_args, rules, forward, node_rules=adds)
            return jax.tree_util.tree_unflatten(graph.out_tree, outs)

        program = _Program(jax.jit(run), pack.args)
        self._programs[id(graph)] = program
        return program

    def __call__(self, *args: Any) -> Any:
        # A small model's int8 program runs in ~50 us, so the common call (one array) is one
        # lookup and a C-level partial: the general path below measured 10-30 us more.
        if len(args) == 1:
            call = self._one_array.get(_array_key(args[0]))
            if call is not None:
                return call(args[0])
        flat, tree = jax.tree_util.tree_flatten(args)
        key = _shape_key(flat, tree)
        program = self._by_shape.get(key)
        if program is None:
            program = self._by_shape[key] = self._program(self._graphs.get(args))
        # Every kind of one-array key gets the fast path, not only the first seen: after a
        # NumPy batch, device arrays of its shape (another key) took this path every call.
        one_array = _array_key(args[0]) if len(args) == 1 else None
        if one_array is not None:
            self._one_array[one_array] = functools.partial(program.jitted, *program.params)
        return program(*flat)

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """The lowered program; `.as_text()` is its StableHLO."""
        graph = self._graphs.get(args)
        flat = jax.tree_util.tree_leaves(args)
        return self._program(graph).lower(*flat)


class _Program:
    """A jitted program with its arrays (site arguments, fused requantize parameters,
    float constants; `jaxptq.arg_pack`) bound as its leading arguments."""

    def __init__(self, jitted: Any, params: tuple[Any, ...]):
        self.jitted = jitted
        self.params = params

    def __call__(self, *flat: Any) -> Any:
        return self.jitted(*self.params, *flat)

    def lower(self, *flat: Any) -> jax.stages.Lowered:
        return self.jitted.lower(*self.params, *flat)


def _is_integer_weight(path: tuple[Any, ...]) -> bool:
    """A site's weight: `"q"` in a site's kernel arrays (`jaxptq.kernels`), the first part
    of the tree `_program` packs. An argument of the program, never a constant."""
    return (
        len(path) == 3
        and getattr(path[0], "idx", None) == 0  # the site arrays, (site name, array name)
        and getattr(path[2], "key", None) == "q"
    )


def _on_device(tree: Any) -> Any:
    """Concrete device arrays even when first asked for inside a trace (`jax.jit(qfn)`),
    so the cached arrays never hold a tracer."""
    with jax.ensure_compile_time_eval():
        return jax.device_put(tree)


def _call_kernel(apply: Any, sp: SitePlan, args: Any, site: Site, vals: list[Any]) -> Any:
    return apply(sp, site, vals, args)
