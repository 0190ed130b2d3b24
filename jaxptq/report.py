"""Debug reports in MindSpore Lite's format: CSV statistics per calibration round, quant
parameters, output similarity, and pictures (cosine per site, activation histograms).

`write_debug_report` runs when `debug_info_save_path` is set. Each calibration sample is
one *round*: the float program and the quantized program run on it side by side, and
every site's input, weight and output get MindSpore's statistics, once as computed by the
float model (`Origin`) and once as the quantized model sees them (`Dequant`: the
integer values mapped back to float, with the error of every earlier site included).
Column meanings follow MindSpore Lite's `statistic_utils.h`:

- Min, Q1, Median, Q3, MAX: quantiles with linear interpolation between sorted values
  (Q1/Median/Q3 located by a two-level histogram, see `_describe`).
- Mean; Var: the *standard deviation* `sqrt(mean((x - mean)^2))`, as MindSpore computes it.
- Sparsity: the fraction of elements exactly 0.
- Clip: the fraction of `Origin` elements outside the `[min, max]` of the `Dequant`
  tensor (0 on `Origin` rows).
- CosineSimilarity: `Dequant` vs `Origin` (1 on `Origin` rows; 1 when both are all zero,
  0 when only one is, 0 on NaN/Inf).

Per round, one jitted program runs both models and concatenates every site's tensors,
and one more computes all their statistics at once (segment sums and histograms):
two compiles per model whatever its number of sites, and only scalars and small
histograms reach the host.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxptq import atomic, kernels, qadd
from jaxptq.graph import Graph, Site, bind, evaluate
from jaxptq.layout import site_layout
from jaxptq.plan import AddPlan, SitePlan
from jaxptq.rewrite import QuantizedFunction

logger = logging.getLogger(__name__)

OUTPUT_SUMMARY_COLUMNS = ("Round", "TensorName", "CosineSimilarity")
REPORT_COLUMNS = (
    "NodeName", "NodeType", "TensorName", "InOutFlag", "DataTypeFlag", "TensorTypeFlag",
    "Min", "Q1", "Median", "Q3", "MAX", "Mean", "Var", "Sparsity", "Clip", "CosineSimilarity",
)  # fmt: skip
QUANT_PARAM_COLUMNS = (
    "NodeName", "NodeType", "TensorName", "ElementsNum", "Dims", "Scale", "ZeroPoint", "Bits",
    "CorrectionVar", "CorrectionMean",
)  # fmt: skip
HIST_BINS = 128


# --- metrics (jnp, traceable) ----------------------------------------------------------------


def tensor_stats(x: jax.Array) -> jax.Array:
    """`[min, q1, median, q3, max, mean, std, sparsity]` of all elements of one tensor."""
    x = jnp.ravel(jnp.asarray(x, jnp.float32))
    seg = jnp.zeros(x.shape, jnp.int32)
    return segment_stats(x, x, seg, (int(x.size),))["stats"][0, 0]


@jax.jit
def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """MindSpore's `GetCosSimilarity`: 1 if both are ~0, 0 if one is, 0 on NaN/Inf."""
    a = jnp.ravel(a).astype(jnp.float32)
    b = jnp.ravel(b).astype(jnp.float32)
    dot, sa, sb = jnp.vdot(a, b), jnp.vdot(a, a), jnp.vdot(b, b)
    tiny = jnp.finfo(jnp.float32).tiny
    cos = dot / jnp.maximum(jnp.sqrt(sa) * jnp.sqrt(sb), tiny)
    cos = jnp.where((sa < tiny) & (sb < tiny), 1.0, jnp.where(sa * sb < tiny, 0.0, cos))
    finite = jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))
    return jnp.where(finite, jnp.clip(cos, -1.0, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("rtol", "atol"))
def mean_bias(out: jax.Array, ref: jax.Array, rtol: float = 1e-5, atol: float = 1e-8) -> jax.Array:
    """MindSpore benchmark's "mean bias": over the elements off by more than
    `atol + rtol * |ref|`, the mean of `|out - ref| / |ref|` (`|out - ref|` where ref is 0
    and the error exceeds 1e-5). A fraction; the benchmark prints it times 100 as %."""
    out = jnp.ravel(out).astype(jnp.float32)
    ref = jnp.ravel(ref).astype(jnp.float32)
    err = jnp.abs(out - ref)
    off = err > atol + rtol * jnp.abs(ref)
    zero_ref = jnp.abs(ref) < jnp.finfo(jnp.float32).eps
    counted = off & (~zero_ref | (err > 1e-5))
    terms = jnp.where(zero_ref, err, err / (jnp.abs(ref) + jnp.finfo(jnp.float32).tiny))
    total = jnp.sum(jnp.where(counted, terms, 0.0))
    return total / jnp.maximum(jnp.sum(counted), 1)


# --- what the quantized program feeds each site -----------------------------------------------


def dequantized_input(plan: SitePlan, site: Site, x: jax.Array) -> jax.Array:
    """The site's activation as its kernel sees it after quantization, back in float."""
    x = x.astype(jnp.float32)
    if not plan.quantized or plan.act_mode is None:
        return x
    if plan.act_mode == "static":
        assert plan.act_scale is not None and plan.act_zero_point is not None
        zp = plan.act_zero_point
        q = jnp.clip(jnp.round(x * np.float32(1.0 / plan.act_scale)) + zp, -128, 127)
        return (q - zp) * np.float32(plan.act_scale)
    scale = kernels.dynamic_act_scale(x, site_layout(site), plan.act_mode == "dynamic_row")
    return jnp.clip(jnp.round(x / scale), -127, 127) * scale


def dequantized_weight(plan: SitePlan) -> np.ndarray | None:
    if not plan.quantized or plan.weight_q is None or plan.weight_scale is None:
        return None
    return plan.weight_q.astype(np.float32) * plan.weight_scale.astype(np.float32)


# --- one round ------------------------------------------------------------------------------


_Key = tuple[str, str]  # (site name, "in" / "out" / "weight")


_BINS = 2048  # bins per level of the quantile search: 2048 x 2048 cells per tensor range


def _describe(x: jax.Array, seg: jax.Array, sizes: tuple[int, ...]) -> dict[str, jax.Array]:
    """MindSpore's statistics of each segment of `x`, without sorting.

    XLA's CPU sort of millions of values is many times slower than a histogram, so the
    quartiles are located in two histogram levels (2048 bins of the segment's range, then
    2048 sub-bins of the bin holding the wanted rank) and interpolated inside the sub-bin:
    within `(max - min) / 4194304` of the sorted-value quantile. Ranks that fall on the
    segment's exact zeros, minimum or maximum (ReLU outputs, clipped or padded inputs) get
    that value exactly. Min, MAX, Mean, Var (the standard deviation, as MindSpore
    computes it) and Sparsity are exact.
    """
    num = len(sizes)
    counts = np.asarray(sizes, np.int64)
    n = counts.astype(np.float32)
    rows = np.arange(num)
    lo = jax.ops.segment_min(x, seg, num, indices_are_sorted=True)
    hi = jax.ops.segment_max(x, seg, num, indices_are_sorted=True)
    indicators = [x, x == 0, x < 0, x == lo[seg], x == hi[seg]]
    sums = _segsum(jnp.stack([v.astype(jnp.float32) for v in indicators], axis=1), seg, num)
    mean, zeros, negative, at_lo, at_hi = (sums[:, i] for i in range(5))
    mean = mean / n
    std = jnp.sqrt(_segsum(jnp.square(x - mean[seg]), seg, num) / n)
    width = jnp.maximum(hi - lo, jnp.finfo(jnp.float32).tiny) / _BINS
    bins = jnp.clip(jnp.floor((x - lo[seg]) / width[seg]), 0, _BINS - 1).astype(jnp.int32)
    hist = jnp.bincount(seg * _BINS + bins, length=num * _BINS).reshape(num, _BINS)
    cum = jnp.cumsum(hist, axis=1)

    def at_rank(rank: np.ndarray) -> jax.Array:
        """The value of 0-based `rank` in each sorted segment, to `range / 2048**2`."""
        target = jnp.minimum(jnp.sum(cum <= rank[:, None], axis=1), _BINS - 1)
        before = jnp.where(target > 0, cum[rows, jnp.maximum(target - 1, 0)], 0)
        lo2 = lo + target * width
        width2 = width / _BINS
        sub = jnp.clip(jnp.floor((x - lo2[seg]) / width2[seg]), 0, _BINS - 1).astype(jnp.int32)
        index = jnp.where(bins == target[seg], seg * _BINS + sub, num * _BINS)
        hist2 = jnp.bincount(index, length=num * _BINS + 1)[:-1].reshape(num, _BINS)
        cum2 = jnp.cumsum(hist2, axis=1)
        rank2 = rank - before
        target2 = jnp.minimum(jnp.sum(cum2 <= rank2[:, None], axis=1), _BINS - 1)
        before2 = jnp.where(target2 > 0, cum2[rows, jnp.maximum(target2 - 1, 0)], 0)
        count2 = jnp.maximum(hist2[rows, target2], 1)
        # The sub-bin's elements taken as evenly spread over it.
        offset = ((rank2 - before2).astype(jnp.float32) + 0.5) / count2.astype(jnp.float32)
        v = jnp.clip(lo2 + (target2 + jnp.minimum(offset, 1.0)) * width2, lo, hi)
        v = jnp.where(rank < at_lo, lo, v)
        v = jnp.where(rank >= n - at_hi, hi, v)
        return jnp.where((rank >= negative) & (rank < negative + zeros), 0.0, v)

    def quantile(p: float) -> jax.Array:
        pos = (counts - 1) * p
        k = np.floor(pos).astype(np.int64)
        frac = (pos - k).astype(np.float32)
        below = at_rank(k)
        if not frac.any():
            return below
        return below * (1 - frac) + at_rank(np.minimum(k + 1, counts - 1)) * frac

    sparsity = zeros / n
    quartiles = [quantile(p) for p in (0.25, 0.5, 0.75)]
    return {
        "stats": jnp.stack([lo, *quartiles, hi, mean, std, sparsity], axis=1),
        "hist": hist.reshape(num, HIST_BINS, _BINS // HIST_BINS).sum(axis=2),
        "lo": lo,
        "hi": hi,
    }


def _segsum(v: jax.Array, seg: jax.Array, num: int) -> jax.Array:
    return jax.ops.segment_sum(v, seg, num, indices_are_sorted=True)


@functools.partial(jax.jit, static_argnames=("sizes",))
def segment_stats(
    origin: jax.Array, dequant: jax.Array, seg: jax.Array, sizes: tuple[int, ...]
) -> dict[str, jax.Array]:
    """MindSpore's statistics for many tensors at once, in one program.

    Args:
        origin: the float tensors, raveled and concatenated.
        dequant: the same tensors as the quantized program has them, likewise.
        seg: the segment (tensor) index of every element, non-decreasing.
        sizes: the element count of each segment (static).

    Returns:
        `stats` `(S, 2, 8)`: `[min, q1, median, q3, max, mean, std, sparsity]` of origin and
        dequant (see `_describe`); `cmp` `(S, 2)`: clip rate and cosine similarity;
        `hist` `(S, HIST_BINS)` with `hist_lo`, `hist_hi` `(S,)`: each origin's histogram.
    """
    num = len(sizes)
    n = np.asarray(sizes, np.float32)
    origin = origin.astype(jnp.float32)
    dequant = dequant.astype(jnp.float32)
    o, d = _describe(origin, seg, sizes), _describe(dequant, seg, sizes)
    outside = (origin > d["hi"][seg]) | (origin < d["lo"][seg])
    nonfinite = ~(jnp.isfinite(origin) & jnp.isfinite(dequant))
    columns = [outside, origin * dequant, origin * origin, dequant * dequant, nonfinite]
    sums = _segsum(jnp.stack([c.astype(jnp.float32) for c in columns], axis=1), seg, num)
    clip, dot, sa, sb, bad = (sums[:, i] for i in range(5))
    tiny = jnp.finfo(jnp.float32).tiny
    cos = dot / jnp.maximum(jnp.sqrt(sa) * jnp.sqrt(sb), tiny)
    cos = jnp.where((sa < tiny) & (sb < tiny), 1.0, jnp.where(sa * sb < tiny, 0.0, cos))
    cos = jnp.where(bad == 0, jnp.clip(cos, -1.0, 1.0), 0.0)
    return {
        "stats": jnp.stack([o["stats"], d["stats"]], axis=1),
        "cmp": jnp.stack([clip / n, cos], axis=1),
        "hist": o["hist"],
        "hist_lo": o["lo"],
        "hist_hi": o["hi"],
    }


class _Segments:
    """The static layout of a set of tensors concatenated into one flat buffer."""

    def __init__(self, shapes: dict[_Key, tuple[int, ...]]):
        self.keys = list(shapes)
        self.sizes = tuple(max(int(np.prod(shape)), 1) for shape in shapes.values())
        self.seg = jax.device_put(np.repeat(np.arange(len(self.sizes), dtype=np.int32), self.sizes))

    def run(self, origin: jax.Array, dequant: jax.Array) -> dict[_Key, dict[str, np.ndarray]]:
        result = jax.device_get(segment_stats(origin, dequant, self.seg, self.sizes))
        return {
            key: {name: value[i] for name, value in result.items()}
            for i, key in enumerate(self.keys)
        }


def _flat(arrays: Sequence[Any]) -> jax.Array:
    return jnp.concatenate([jnp.ravel(a).astype(jnp.float32) for a in arrays])


def _round_program(graph: Graph, matched: list[tuple[Site, SitePlan]]) -> tuple[Any, list[Any]]:
    """A jitted `(site_args, consts, outputs, *flat) -> (output cosines, origin, dequant)`:
    the float program and the quantized sites side by side, every site's input and output
    concatenated. The output cosines compare the float outputs with `outputs`, those of the
    program the user runs: there, int8 sites may hand each other codes (`jaxptq.requant`),
    while here each site is run alone so that its input and output can be recorded."""
    consts = graph.runtime_consts()

    def run(
        site_args: dict[str, Any], const_arrays: list[Any], outputs: list[Any], *flat: Any
    ) -> Any:
        env = {v.id: c for v, c in zip(consts, const_arrays, strict=True)}
        seen_float: dict[str, tuple[Any, Any]] = {}
        seen_quant: dict[str, tuple[Any, Any]] = {}

        def float_rule(site: Site, vals: list[Any]) -> Any:
            y = bind(site.node, vals)[0]
            seen_float[site.name] = (vals[1 - site.weight_index], y)
            return y

        def quant_rule(sp: SitePlan, site: Site, vals: list[Any]) -> Any:
            x = vals[1 - site.weight_index]
            if sp.quantized:
                y = kernels.KERNELS[sp.act_mode][1](sp, site, vals, site_args[sp.name])
            else:
                y = bind(site.node, vals)[0]
            seen_quant[site.name] = (dequantized_input(sp, site, x), y)
            return y

        f_rules = {id(s.node): float_rule for s, _ in matched}
        q_rules = {id(s.node): _bind(quant_rule, sp) for s, sp in matched}
        y_float = evaluate(graph, env, flat, f_rules)
        evaluate(graph, env, flat, q_rules)
        cosines = [cosine_similarity(a, b) for a, b in zip(y_float, outputs, strict=True)]
        origin, dequant = [], []
        for site, _ in matched:  # the order of `_activation_segments`
            (x, y), (xd, yd) = seen_float[site.name], seen_quant[site.name]
            origin += [x, y]
            dequant += [xd, yd]
        return cosines, _flat(origin), _flat(dequant)

    return jax.jit(run), [np.asarray(v.const) for v in consts]


def _bind(rule: Any, sp: SitePlan) -> Any:
    return lambda site, vals: rule(sp, site, vals)


def _activation_segments(matched: list[tuple[Site, SitePlan]]) -> _Segments:
    shapes: dict[_Key, tuple[int, ...]] = {}
    for site, _ in matched:
        shapes[(site.name, "in")] = tuple(site.activation.aval.shape)
        shapes[(site.name, "out")] = tuple(site.node.outputs[0].aval.shape)
    return _Segments(shapes)


# --- names ----------------------------------------------------------------------------------


def _onnx_nodes(fn: Any) -> dict[str, Any]:
    """An imported ONNX model's nodes by the name their sites get ({} for a JAX function)."""
    import onnx

    from jaxptq.importers.onnx._function import nodes_by_site_name

    model = getattr(fn, "model", None)
    return nodes_by_site_name(model) if isinstance(model, onnx.ModelProto) else {}


def _names(site: Site, nodes: dict[str, Any]) -> tuple[str, str, str, str]:
    """(node type, input tensor, weight tensor, output tensor) names for one site."""
    node = nodes.get(site.name)
    if node is not None and len(node.input) >= 2 and node.output:
        w = site.weight_index if node.op_type != "Conv" else 1
        return node.op_type, node.input[1 - w], node.input[w], node.output[0]
    return site.primitive, f"{site.name}/input", f"{site.name}/weight", f"{site.name}/output"


def _output_names(fn: Any, count: int) -> list[str]:
    names = list(getattr(fn, "output_names", ()) or ())
    return names if len(names) == count else [f"output_{i}" for i in range(count)]


# --- writing --------------------------------------------------------------------------------


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_fmt(v) for v in row] for row in rows])
    return buf.getvalue().encode()


def _fmt(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return f"{float(v):.9g}"
    return v


def _stat_row(prefix: list[Any], stats: np.ndarray, clip: float, cos: float) -> list[Any]:
    return [*prefix, *(float(s) for s in stats), float(clip), float(cos)]


def _per_channel(values: np.ndarray) -> str:
    return " ".join(f"{float(v):.9g}" for v in np.ravel(values))


def _correction(w: np.ndarray, wd: np.ndarray, axes: tuple[int, ...]) -> tuple[str, str]:
    """MindSpore's weight correction terms per channel: var_corr = std(w) / std(w_dq),
    mean_corr = mean(w) - mean(w_dq) * var_corr."""
    reduce = tuple(a for a in range(w.ndim) if a not in axes)
    std_w, std_d = w.std(axis=reduce), wd.std(axis=reduce)
    var_corr = np.where(std_d > 0, std_w / np.where(std_d > 0, std_d, 1), 1.0)
    mean_corr = w.mean(axis=reduce) - wd.mean(axis=reduce) * var_corr
    return _per_channel(var_corr), _per_channel(mean_corr)


def _activation_row(
    node: str, node_type: str, tensor: str, shape: tuple[int, ...], scale: float, zero_point: int
) -> list[Any]:
    """A per-tensor 8-bit activation's quant_param.csv row (no weight corrections)."""
    dims = " ".join(map(str, shape))
    return [node, node_type, tensor, int(np.prod(shape)), dims, scale, zero_point, 8, 1.0, 0.0]


def _quant_param_rows(
    matched: list[tuple[Site, SitePlan]], nodes: dict[str, Any]
) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for site, sp in matched:
        if not sp.quantized:
            continue
        node_type, x_name, w_name, y_name = _names(site, nodes)
        if sp.act_mode == "static":
            x_shape = tuple(site.activation.aval.shape)
            scale, zero_point = float(sp.act_scale or 0.0), int(sp.act_zero_point or 0)
            rows.append(_activation_row(site.name, node_type, x_name, x_shape, scale, zero_point))
        if sp.out_act_scale is not None:  # an output the plan quantizes too (a target's)
            y_shape = tuple(site.node.outputs[0].aval.shape)
            scale, zero_point = float(sp.out_act_scale), int(sp.out_act_zero_point or 0)
            rows.append(_activation_row(site.name, node_type, y_name, y_shape, scale, zero_point))
        wd = dequantized_weight(sp)
        assert sp.weight_scale is not None and wd is not None
        var_corr, mean_corr = _correction(site.weight.astype(np.float32), wd, sp.channel_axes)
        rows.append(
            [site.name, node_type, w_name, sp.weight_elements, " ".join(map(str, sp.weight_shape)),
             _per_channel(sp.weight_scale), _per_channel(np.zeros(sp.weight_scale.size, int)),
             sp.bits, var_corr, mean_corr]
        )  # fmt: skip
    return rows


def _add_param_rows(adds: list[AddPlan], graph: Graph, nodes: dict[str, Any]) -> list[list[Any]]:
    """One row per Add run on codes (`QuantPlan.adds`): its output's quantization."""
    traced = qadd.add_nodes(graph, adds)
    rows: list[list[Any]] = []
    for add in adds:
        node = nodes.get(add.name)
        y_name = node.output[0] if node is not None else f"{add.name}/output"
        shape = tuple(traced[add.name].outputs[0].aval.shape)
        rows.append(
            _activation_row(
                add.name, "Add", y_name, shape, float(add.out_scale), int(add.out_zero_point)
            )
        )
    return rows


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "site"


def write_debug_report(
    qfn: QuantizedFunction,
    samples: Sequence[tuple[Any, ...]],
    in_tree: Any,
    calibration: Any = None,
) -> pathlib.Path:
    """Writes MindSpore Lite's debug CSVs and jaxptq's pictures to `debug_info_save_path`.

    Args:
        qfn: the quantized function; its plan's config names the folder.
        samples: the calibration samples as flat tuples of host arrays; one round each
            for FULL_QUANT, only the first for the other modes (as MindSpore does).
        in_tree: the pytree structure of one sample's arguments.
        calibration: the calibration result (unused: the plan holds the chosen ranges).

    Returns:
        The folder written: `output_summary.csv`, `report_<round>.csv`,
        `quant_param.csv`, `cosine_similarity.png` and `histograms/<index>_<site>.png`.
    """
    del calibration
    folder_name = qfn.plan.config.common_quant_param.debug_info_save_path
    if not folder_name:
        raise ValueError("`debug_info_save_path` is not set in the plan's config.")
    if not samples:
        raise ValueError("the debug report needs at least one sample.")
    folder = pathlib.Path(folder_name)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`debug_info_save_path` {str(folder)!r} is a file, not a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    graph = qfn._graphs.get(jax.tree_util.tree_unflatten(in_tree, samples[0]))
    matched = qfn._matched_sites(graph)
    nodes = _onnx_nodes(qfn.fn)
    program, const_arrays = _round_program(graph, matched)
    site_args = qfn.site_args()
    consts = jax.device_put(const_arrays)

    weights, weights_dq = [], []
    for site, sp in matched:
        w = site.weight.astype(np.float32)
        wd = dequantized_weight(sp)
        weights.append(w)
        weights_dq.append(w if wd is None else wd)
    weight_segments = _Segments(
        {(s.name, "weight"): w.shape for (s, _), w in zip(matched, weights, strict=True)}
    )
    weight_stats = weight_segments.run(_flat(weights), _flat(weights_dq))
    segments = _activation_segments(matched)

    summary_rows: list[list[Any]] = []
    out_names: list[str] = []
    cos_sum = {s.name: 0.0 for s, _ in matched}
    hists: dict[str, list[tuple[np.ndarray, float, float]]] = {s.name: [] for s, _ in matched}
    # MindSpore writes one round per calibration sample for full quantization, and one
    # report for weight quantization.
    if qfn.plan.quant_type != "FULL_QUANT":
        samples = samples[:1]
    for rnd, sample in enumerate(samples):
        outputs = jax.tree_util.tree_leaves(qfn(*jax.tree_util.tree_unflatten(in_tree, sample)))
        cosines, origin, dequant = program(site_args, consts, outputs, *sample)
        stats = segments.run(origin, dequant) | weight_stats
        out_names = out_names or _output_names(qfn.fn, len(cosines))
        summary_rows += [[rnd, name, float(c)] for name, c in zip(out_names, cosines, strict=True)]
        rows: list[list[Any]] = []
        for site, _ in matched:
            node_type, x_name, w_name, y_name = _names(site, nodes)
            for flag, kind, name, part in (
                ("Input", "Activation", x_name, "in"),
                ("Input", "Weight", w_name, "weight"),
                ("Output", "Activation", y_name, "out"),
            ):
                r = stats[(site.name, part)]
                head = [site.name, node_type, name, flag]
                rows.append(_stat_row([*head, "Origin", kind], r["stats"][0], 0.0, 1.0))
                rows.append(
                    _stat_row([*head, "Dequant", kind], r["stats"][1], r["cmp"][0], r["cmp"][1])
                )
            cos_sum[site.name] += float(stats[(site.name, "out")]["cmp"][1])
            h = stats[(site.name, "in")]
            hists[site.name].append((h["hist"], float(h["hist_lo"]), float(h["hist_hi"])))
        atomic.write_bytes(folder / f"report_{rnd}.csv", _csv_bytes(REPORT_COLUMNS, rows))
    for stale in folder.glob("report_*.csv"):  # rounds of an earlier, longer run
        index = stale.stem.removeprefix("report_")
        if index.isdigit() and int(index) >= len(samples):
            stale.unlink()
    atomic.write_bytes(
        folder / "output_summary.csv", _csv_bytes(OUTPUT_SUMMARY_COLUMNS, summary_rows)
    )
    atomic.write_bytes(
        folder / "quant_param.csv",
        _csv_bytes(
            QUANT_PARAM_COLUMNS,
            _quant_param_rows(matched, nodes) + _add_param_rows(qfn.plan.adds, graph, nodes),
        ),
    )
    cosines = {name: total / len(samples) for name, total in cos_sum.items()}
    _write_pictures(folder, matched, cosines, hists)
    logger.info("debug report written to %s", folder)
    return folder


# --- pictures -------------------------------------------------------------------------------


def _merge_histograms(
    parts: list[tuple[np.ndarray, float, float]],
) -> tuple[np.ndarray, np.ndarray]:
    """Re-bins per-round histograms onto one common range (by bin centres)."""
    lo = min(p[1] for p in parts)
    hi = max(p[2] for p in parts)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    total = np.zeros(HIST_BINS)
    for counts, a, b in parts:
        centers = a + (np.arange(HIST_BINS) + 0.5) * (max(b - a, 1e-30) / HIST_BINS)
        total += np.histogram(centers, bins=edges, weights=counts)[0]
    return total, edges


def _figure(width: float, height: float) -> Any:
    """A bare Agg figure (no pyplot: no global state, no GUI backend, faster import)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "the debug report's pictures need matplotlib: `pip install 'jaxptq[plots]'` "
            "(the CSV files were written)."
        ) from None
    fig = Figure(figsize=(width, height), dpi=72)
    FigureCanvasAgg(fig)
    return fig


def _write_pictures(
    folder: pathlib.Path,
    matched: list[tuple[Site, SitePlan]],
    cosines: dict[str, float],
    hists: dict[str, list[tuple[np.ndarray, float, float]]],
) -> None:
    names = [s.name for s, _ in matched]
    values = [cosines[n] for n in names]
    colors = ["tab:blue" if sp.quantized else "tab:gray" for _, sp in matched]
    label = 0.05 * max(len(n) for n in names)  # inches under the axis for the names
    fig = _figure(max(6.0, 0.2 * len(names) + 2), 3.0 + label)
    ax = fig.subplots()
    ax.bar(range(len(names)), values, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("output cosine similarity (mean over rounds)")
    ax.set_ylim(min([*values, 0.9]) - 0.01, 1.001)
    ax.set_title("per-site cosine similarity, quantized vs float (gray: skipped)")
    fig.subplots_adjust(bottom=(label + 0.2) / (3.0 + label), left=0.1, right=0.98)
    _save(fig, folder / "cosine_similarity.png")

    hist_dir = folder / "histograms"
    hist_dir.mkdir(exist_ok=True)
    for index, (site, sp) in enumerate(matched):
        counts, edges = _merge_histograms(hists[site.name])
        fig = _figure(5.0, 3.0)
        ax = fig.subplots()
        # log10(1 + count) on a linear axis: log-scaled ticks would need mathtext (slow).
        ax.stairs(np.log10(1.0 + counts), edges, fill=True, color="tab:blue", alpha=0.7)
        ax.set_ylabel("log10(1 + count)", fontsize=8)
        clip = _clipping_range(sp, edges)
        if clip is not None:
            for v in clip:
                ax.axvline(v, color="tab:red", linestyle="--", linewidth=1)
            ax.set_title(f"{site.name}: input, clip [{clip[0]:.4g}, {clip[1]:.4g}]", fontsize=8)
        else:
            ax.set_title(f"{site.name}: input (stays float)", fontsize=8)
        ax.set_xlabel("activation value", fontsize=8)
        fig.subplots_adjust(bottom=0.18)
        _save(fig, hist_dir / f"{index:03d}_{_safe_name(site.name)}.png")


def _clipping_range(sp: SitePlan, edges: np.ndarray) -> tuple[float, float] | None:
    """The float range the site's int8 grid covers; dynamic sites cover `+-max|x|`."""
    if not sp.quantized or sp.act_mode is None:
        return None
    if sp.act_mode == "static" and sp.act_scale is not None and sp.act_zero_point is not None:
        return (
            (-128 - sp.act_zero_point) * sp.act_scale,
            (127 - sp.act_zero_point) * sp.act_scale,
        )
    bound = float(max(abs(edges[0]), abs(edges[-1])))
    return -bound, bound


def _save(fig: Any, path: pathlib.Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(path, buf.getvalue())
