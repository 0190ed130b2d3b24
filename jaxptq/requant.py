"""Fused requantization: an int8 site's output goes to the next int8 sites as codes.

Between two `FULL_QUANT` sites the float program computes `y = acc * out_scale (+ bias
correction)`, then the model's own bias `Add` and activation (`max(y, 0)`, a clip to 6),
and the next site rounds `y / s + zp` to int8. Every step is affine or a bound, so the
chain folds into one requantize of the accumulator, done as onnxruntime's `QLinearConv`
does it (MLAS's requantize output stage), so that an exported model's integer kernels
compute the same codes as this program:

    code = round_half_even(clamp((acc + bias_q) * M, lo, hi)) + zp + 128

with `bias_q = round(bias / (s_x s_w))` (int32, `qmath.bias_int32`, what the export
writes) and `M = float32(s_x s_w) / s_y` in float32. `code` is `q + 128` as uint8
(`jaxptq.u8s8.dot_codes` reads it as it is). Rounding the bias to the accumulator's grid
moves a value by at most `M / 2` of a code; it made onnxruntime's outputs on an exported
EfficientNet-Lite0 agree with this program to cosine 0.99993 instead of 0.99927.

The count of operations a value matters on XLA:CPU, whose cost model splits a loop fusion
over threads once it does more arithmetic than it moves bytes (`DefaultCostModel` in
XLA's `parallel_task_assignment.cc`); for the MLP of `scripts/bench_core.py` waking the
second core cost more than the whole layer (docs/benchmarks.md). So terms that change
nothing are left out: the uint8 conversion saturates (XLA converts out-of-range floats
to 0 or 255; `tests/test_requant.py` checks it), which is already the clamp of a ReLU
output whose zero point is the lowest code, and a zero point of 0 or a zero bias adds
nothing. A ReLU chain is then five operations (convert, add, multiply, round, convert).

A chain is folded only when nothing else reads its values: each intermediate value has one
reader and is no output, and every reader of the last one is an int8 site quantizing it
with the same scale and zero point.

A site whose plan quantizes its output (`SitePlan.out_act_scale`, planned for a named
`target_device`) ends its chain the same way wherever the chain's value goes, and hands
its float readers the dequantized codes `(code - 128 - zp) * s`: the `Conv -> Q -> DQ` an
integer runtime computes when a convolution's output feeds a float op such as a residual
Add (`passes.full._quantize_outputs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxptq import qmath
from jaxptq.graph import Graph, Node, Site, Value
from jaxptq.layout import site_layout
from jaxptq.plan import SitePlan

Args = dict[str, Any]


@dataclasses.dataclass
class _Affine:
    """The folded ops so far: `clamp(y + bias, lower, upper)`."""

    bias: np.ndarray | float = 0.0
    lower: float = -np.inf
    upper: float = np.inf


@dataclasses.dataclass(frozen=True)
class Chain:
    """A site whose output reaches `consumers` only through the `folded` elementwise ops."""

    producer: Site
    folded: tuple[Node, ...]
    running: tuple[int, ...]  # per folded node, the input index the chain passes through
    consumers: tuple[Site, ...]  # () when the producer's own output quantization ends it
    affine: _Affine

    @property
    def end(self) -> Value:
        """The chain's last value: what its requantize produces."""
        return (self.folded[-1] if self.folded else self.producer.node).outputs[0]


def _scalar(v: Value) -> float | None:
    """The constant's one value, if it is a constant holding one value."""
    if not v.is_const:
        return None
    c = np.asarray(v.const)
    if c.size and np.all(c == c.flat[0]):
        return float(c.flat[0])
    return None


def _per_channel(v: Value, out_shape: tuple[int, ...], channels: set[int]) -> np.ndarray | None:
    """The constant as an array varying only along the output channel axes, if it is one."""
    c = np.asarray(v.const, np.float64)
    if c.ndim != len(out_shape):
        return None
    full = np.broadcast_to(c, out_shape)
    first = full[tuple(slice(None) if a in channels else slice(0, 1) for a in range(c.ndim))]
    return first if np.array_equal(np.broadcast_to(first, out_shape), full) else None


def _add(state: _Affine, c: Value, sign: float, out_shape: Any, channels: set[int]) -> bool:
    s = _scalar(c)
    if s is not None:
        state.bias, state.lower, state.upper = (
            state.bias + sign * s,
            state.lower + sign * s,
            state.upper + sign * s,
        )
        return True
    if not c.is_const or np.isfinite(state.lower) or np.isfinite(state.upper):
        return False  # another activation, or a per-channel shift of a bound
    vec = _per_channel(c, out_shape, channels)
    if vec is None:
        return False
    state.bias = state.bias + sign * vec
    return True


def _bound(state: _Affine, c: Value, take: Callable[[float, float], float]) -> bool:
    s = _scalar(c)
    if s is None:
        return False
    state.lower, state.upper = take(state.lower, s), take(state.upper, s)
    return True


# Per primitive: given the state, the node and the index of the chain's input, fold the
# node in and say whether it could be.
_FOLD: dict[str, Callable[[_Affine, Node, int, Any, set[int]], bool]] = {
    "add": lambda st, n, i, shape, ch: _add(st, n.inputs[1 - i], 1.0, shape, ch),
    "sub": lambda st, n, i, shape, ch: i == 0 and _add(st, n.inputs[1], -1.0, shape, ch),
    "max": lambda st, n, i, shape, ch: _bound(st, n.inputs[1 - i], max),
    "min": lambda st, n, i, shape, ch: _bound(st, n.inputs[1 - i], min),
    "clamp": lambda st, n, i, shape, ch: (
        i == 1 and _bound(st, n.inputs[0], max) and _bound(st, n.inputs[2], min)
    ),
}


class GraphIndex(NamedTuple):
    """Who reads what in a graph, built once for a walk over many sites."""

    readers: dict[int, list[tuple[Node, int]]]  # value id -> every (node, input index)
    outputs: set[int]  # the graph's output value ids
    site_of: dict[int, Site]  # id(node) -> the site it is

    @classmethod
    def of(cls, graph: Graph) -> GraphIndex:
        readers: dict[int, list[tuple[Node, int]]] = {}
        for node in graph.nodes:
            for i, v in enumerate(node.inputs):
                if not v.is_const:
                    readers.setdefault(v.id, []).append((node, i))
        return cls(readers, {v.id for v in graph.outputs}, {id(s.node): s for s in graph.sites})

    def activation_reader(
        self, node: Node, index: int, static: Callable[[str], bool]
    ) -> Site | None:
        """The static site `node` is, when it reads input `index` as its activation."""
        site = self.site_of.get(id(node))
        if site is None or index != 1 - site.weight_index or not static(site.name):
            return None
        return site


def is_static(plan: SitePlan | None) -> bool:
    """The site runs int8 with calibrated activation parameters."""
    return plan is not None and plan.quantized and plan.act_mode == "static"


class _Walk(NamedTuple):
    folded: tuple[Node, ...]
    running: tuple[int, ...]
    affine: _Affine
    end: Value  # the last value of the chain


def _walk(site: Site, ix: GraphIndex) -> _Walk:
    """The elementwise ops after `site` that fold into its requantize (module doc)."""
    value = site.node.outputs[0]
    shape = tuple(value.aval.shape)
    lay = site_layout(site)
    channels = {o for o in lay.weight_to_out if o is not None}
    state = _Affine()
    folded: list[Node] = []
    running: list[int] = []
    while value.id not in ix.outputs:
        nexts = ix.readers.get(value.id, [])
        if len(nexts) != 1 or id(nexts[0][0]) in ix.site_of:
            break
        node, i = nexts[0]
        fold = _FOLD.get(node.primitive.name)
        out = node.outputs[0]
        if fold is None or tuple(out.aval.shape) != shape or out.aval.dtype != np.float32:
            break
        if not fold(state, node, i, shape, channels):
            break
        folded.append(node)
        running.append(i)
        value = out
    return _Walk(tuple(folded), tuple(running), state, value)


def find_chains(
    graph: Graph, plans: Mapping[str, SitePlan], ix: GraphIndex | None = None
) -> list[Chain]:
    """Every producer -> folded ops -> int8 consumers chain of the graph, and every chain a
    site's own output quantization ends (module doc). `ix`: the graph's index, when the
    caller has built it already."""
    ix = ix or GraphIndex.of(graph)
    chains = []
    for site in graph.sites:
        plan = plans.get(site.name)
        if not is_static(plan) or site.node.outputs[0].aval.dtype != np.float32:
            continue
        walk = _walk(site, ix)
        consumers = _consumers(walk.end, ix, plans)
        if consumers or (plan is not None and plan.out_act_scale is not None):
            chains.append(Chain(site, walk.folded, walk.running, consumers, walk.affine))
    return chains


def unfused_sites(graph: Graph, static: Collection[str]) -> dict[str, str | None]:
    """The `static` sites whose output goes on as float: some reader of its chain's value
    is not a static site taking it as its activation (a residual Add, a pool), and the
    value is no graph output.

    Maps each to a static site that also reads that value as its activation (so the
    output can share its quantization), or None.
    """
    ix = GraphIndex.of(graph)
    static = set(static)
    found: dict[str, str | None] = {}
    for site in graph.sites:
        if site.name not in static or site.node.outputs[0].aval.dtype != np.float32:
            continue
        end = _walk(site, ix).end
        if end.id in ix.outputs:
            continue
        reading = ix.readers.get(end.id, [])
        takers = [
            t.name
            for node, i in reading
            if (t := ix.activation_reader(node, i, static.__contains__)) is not None
        ]
        if len(takers) < len(reading):
            found[site.name] = takers[0] if takers else None
    return found


def chain_ends(graph: Graph, names: Collection[str]) -> dict[str, tuple[Site, Value]]:
    """For each named site, the value its requantize would produce: its output after the
    foldable ops."""
    ix = GraphIndex.of(graph)
    return {s.name: (s, _walk(s, ix).end) for s in graph.sites if s.name in names}


def _consumers(value: Value, ix: GraphIndex, plans: Mapping[str, SitePlan]) -> tuple[Site, ...]:
    """The int8 sites that alone read `value` as their activation, with one shared
    quantization; () when anything else reads it."""
    if value.id in ix.outputs or not ix.readers.get(value.id):
        return ()
    sites = []
    for node, i in ix.readers[value.id]:
        site = ix.activation_reader(node, i, lambda n: is_static(plans.get(n)))
        if site is None:
            return ()
        sites.append(site)
    params = {(plans[s.name].act_scale, plans[s.name].act_zero_point) for s in sites}
    return tuple(sites) if len(params) == 1 else ()


def chain_quant(chain: Chain, plans: Mapping[str, SitePlan]) -> tuple[float, int]:
    """The (scale, int8 zero point) a chain requantizes to: its consumers' activation
    quantization, or the producer's own output quantization."""
    if chain.consumers:
        consumer = plans[chain.consumers[0].name]
        scale, zero_point = consumer.act_scale, consumer.act_zero_point
    else:
        producer = plans[chain.producer.name]
        scale, zero_point = producer.out_act_scale, producer.out_act_zero_point
    assert scale is not None and zero_point is not None
    return scale, zero_point


def chain_args(chain: Chain, producer_args: Args, scale: float, zero_point: int) -> Args:
    """The requantize's arrays from the producer's kernel arrays (`kernels.static_args`)
    and the int8 `scale` and `zero_point` it quantizes to, as onnxruntime's QLinearConv
    takes them (module doc). Terms that change nothing are left out: a zero bias, a zero
    point of 0, bounds the uint8 conversion's own saturation already applies.

    A chain that dequantizes its codes again (one with no consumers) always clamps: XLA:CPU
    did not saturate a float -> uint8 -> float pair it fused (EfficientNet-Lite0's ReLU6
    head gave 6.0 for negative values)."""
    s_y = np.float32(scale)
    zp = zero_point + 128
    acc_scale = np.asarray(producer_args["out_scale"], np.float32)
    bias = np.asarray(chain.affine.bias, np.float32) + np.asarray(
        producer_args.get("bias", 0.0), np.float32
    )
    args: Args = {"scale": (acc_scale / s_y).astype(np.float32)}
    if np.any(bias != 0):
        args["bias"] = qmath.bias_int32(bias, acc_scale).astype(np.float32)
    lo = float(np.float32(chain.affine.lower) / s_y)
    hi = float(np.float32(chain.affine.upper) / s_y)
    if lo > -zp or hi < 255 - zp or not chain.consumers:
        args["lo"], args["hi"] = np.float32(max(lo, -zp)), np.float32(min(hi, 255 - zp))
    if zp:
        args["zp"] = np.float32(zp)
    return args


def requantize(y: Any, args: Args) -> Any:
    """uint8 codes `q + 128` of the consumers' input, from the producer's float32
    `sum (x_q - zp) w_q` (module doc)."""
    t = (y + args["bias"] if "bias" in args else y) * args["scale"]
    if "lo" in args:
        t = lax.clamp(args["lo"], t, args["hi"])
    t = jnp.round(t)  # half to even
    if "zp" in args:
        t = t + args["zp"]
    return t.astype(jnp.uint8)  # saturating: XLA converts out-of-range floats to 0 or 255


def dequantize_args(scale: float, zero_point: int) -> Args:
    """`dequantize`'s arrays for codes of the int8 `scale` and `zero_point`."""
    return {"scale": np.float32(scale), "code_zp": np.float32(zero_point + 128)}


def dequantize(codes: Any, args: Args) -> Any:
    """Float32 values of uint8 codes, as DequantizeLinear computes them: the exact
    difference `code - 128 - zp`, then one rounding multiply by the scale. XLA:CPU may
    contract it with a reader's add into one multiply-add; an optimization barrier against
    that left EfficientNet-Lite0's logits unchanged (to 1e-6 on 20 photos against
    onnxruntime), so there is none."""
    return (codes.astype(jnp.float32) - args["code_zp"]) * args["scale"]
