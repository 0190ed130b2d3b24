"""Accuracy control: quantize, then return the most harmful sites to float until the
user's metric drops by no more than `max_drop`.

The flow follows OpenVINO NNCF's `quantize_with_accuracy_control`: quantize everything,
validate float and quantized models with the user's `validate(fn, data) -> float`, rank
the quantized sites by what quantizing each one costs, then revert them one at a time,
most harmful first, re-validating after each, until the drop is within bounds.

Ranking uses a cheap proxy instead of the user's metric: on a few calibration samples, the
output error (1 - cosine similarity with the float outputs) of the quantized model, and of
the quantized model with one site switched back to float. One jitted program serves every
such variant: the site choice is a boolean mask argument, not a recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxptq import kernels
from jaxptq.api import collect_samples, ptq
from jaxptq.config import QuantConfig
from jaxptq.graph import Graph, Site, bind, evaluate
from jaxptq.plan import QuantPlan, SitePlan
from jaxptq.rewrite import GraphCache, QuantizedFunction

logger = logging.getLogger(__name__)

REVERTED = "reverted by accuracy control"
DROP_TYPES = ("absolute", "relative")
RANKINGS = ("output", "metric")

Sample = tuple[Any, ...]  # flat arrays of one calibration sample


# --- evaluating many variants of one plan with one compiled program -----------------------


def output_cosine(reference: Sequence[Sequence[Any]], outputs: Sequence[Sequence[Any]]) -> float:
    """Mean over samples of the cosine similarity between flattened outputs.

    Each sample's output leaves are concatenated into one vector; a sample whose outputs
    are both all-zero counts as 1.
    """
    sims = []
    for ref, out in zip(reference, outputs, strict=True):
        a = np.concatenate([np.ravel(np.asarray(r, np.float64)) for r in ref])
        b = np.concatenate([np.ravel(np.asarray(o, np.float64)) for o in out])
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        sims.append(1.0 if denom == 0 else float(a @ b / denom))
    return float(np.mean(sims)) if sims else 1.0


class PlanEvaluator:
    """Runs a plan's quantized program on samples, any subset of sites switched to float.

    Integer weights, scales and the float mask are arguments of one jitted program per
    input shape, so ranking (one mask per site) and bit-width tuning (new integer weights
    of the same dtype) compile once.

    Args:
        graphs: the `GraphCache` of the float function (`qfn._graphs`).
        in_tree: the pytree structure of one sample's arguments.
        plans: the site plans; which sites are quantized and their modes are fixed here.
    """

    def __init__(self, graphs: GraphCache, in_tree: Any, plans: Sequence[SitePlan]):
        self._graphs = graphs
        self._tree = in_tree
        self._plans = {p.name: p for p in plans}
        self.names = [p.name for p in plans if p.quantized]
        self._programs: dict[int, tuple[Any, list[Any]]] = {}
        self._float: dict[int, Any] = {}

    def _graph(self, flat: Sample) -> Graph:
        return self._graphs.get(jax.tree_util.tree_unflatten(self._tree, list(flat)))

    def site_args(self, plans: Sequence[SitePlan], flat: Sample) -> dict[str, Any]:
        """The runtime arrays of every quantized site, unpacked (fixed dtype per width)."""
        graph = self._graph(flat)
        by_name = {p.name: p for p in plans}
        out = {}
        for site in graph.sites:
            plan = by_name[site.name]
            if plan.quantized:
                out[site.name] = kernels.KERNELS[plan.act_mode][0](plan, site, False)
        return jax.device_put(out)

    def _program(self, graph: Graph) -> tuple[Any, list[Any]]:
        entry = self._programs.get(id(graph))
        if entry is not None:
            return entry
        matched = [(s, self._plans[s.name]) for s in graph.sites if s.name in self.names]
        consts = graph.runtime_consts()

        def run(site_args: Any, mask: Any, const_arrays: list[Any], *flat: Any) -> list[Any]:
            rules = {
                id(site.node): functools.partial(
                    _site_rule, plan, site_args[plan.name], None if mask is None else mask[i]
                )
                for i, (site, plan) in enumerate(matched)
            }
            env = {v.id: c for v, c in zip(consts, const_arrays, strict=True)}
            return evaluate(graph, env, flat, rules)

        entry = (jax.jit(run), jax.device_put([np.asarray(v.const) for v in consts]))
        self._programs[id(graph)] = entry
        return entry

    def reference(self, samples: Sequence[Sample]) -> list[list[np.ndarray]]:
        """The float program's flat outputs on each sample."""
        outs = []
        for flat in samples:
            graph = self._graph(flat)
            if id(graph) not in self._float:
                consts = graph.runtime_consts()

                def run(const_arrays: list[Any], *args: Any, graph=graph, consts=consts) -> Any:
                    env = {v.id: c for v, c in zip(consts, const_arrays, strict=True)}
                    return evaluate(graph, env, args)

                arrays = jax.device_put([np.asarray(v.const) for v in consts])
                self._float[id(graph)] = functools.partial(jax.jit(run), arrays)
            outs.append([np.asarray(o) for o in self._float[id(graph)](*flat)])
        return outs

    def mask(self, float_sites: Iterable[str] | None) -> Any:
        """The mask argument that switches `float_sites` to float (None: no float path)."""
        if float_sites is None:
            return None
        chosen = set(float_sites)
        return jnp.asarray([n in chosen for n in self.names])

    def run(self, site_args: Mapping[str, Any], mask: Any, flat: Sample) -> list[Any]:
        """The quantized program's flat outputs on one sample (device arrays)."""
        program, const_arrays = self._program(self._graph(flat))
        return program(dict(site_args), mask, const_arrays, *flat)

    def outputs(
        self,
        site_args: Mapping[str, Any],
        samples: Sequence[Sample],
        float_sites: Iterable[str] | None = None,
    ) -> list[list[np.ndarray]]:
        """The quantized program's flat outputs; `float_sites` run their float op instead."""
        mask = self.mask(float_sites)
        return [[np.asarray(o) for o in self.run(site_args, mask, flat)] for flat in samples]

    def as_function(
        self, site_args: Mapping[str, Any], float_sites: Iterable[str]
    ) -> Callable[..., Any]:
        """A callable like the quantized function with `float_sites` in float, sharing
        this evaluator's compiled programs (for validating many variants cheaply)."""
        mask = self.mask(float_sites)

        def call(*args: Any) -> Any:
            flat = tuple(jax.tree_util.tree_leaves(args))
            outs = self.run(site_args, mask, flat)
            return jax.tree_util.tree_unflatten(self._graph(flat).out_tree, outs)

        return call


def _site_rule(plan: SitePlan, args: Any, use_float: Any, site: Site, vals: list[Any]) -> Any:
    apply = kernels.KERNELS[plan.act_mode][1]
    quantized = apply(plan, site, vals, args)
    if use_float is None:
        return quantized
    # Both branches run; `where` keeps one compiled program for every mask.
    return jnp.where(use_float, bind(site.node, vals)[0], quantized)


# --- editing a plan -----------------------------------------------------------------------


def with_reverted_sites(
    qfn: QuantizedFunction, names: Iterable[str], reason: str = REVERTED
) -> QuantizedFunction:
    """A new `QuantizedFunction` whose named sites stay float, everything else as in `qfn`.

    Example:
        >>> qfn2 = with_reverted_sites(qfn, ["conv1"])
        >>> qfn2.plan["conv1"].skip_reason
        'reverted by accuracy control'
    """
    chosen = set(names)
    known = {s.name for s in qfn.plan.sites}
    unknown = sorted(chosen - known)
    if unknown:
        raise KeyError(f"no site named {', '.join(f'`{n}`' for n in unknown)} in the plan.")
    sites = [
        SitePlan(s.name, s.primitive, s.weight_shape, skip_reason=reason)
        if s.name in chosen and s.quantized
        else s
        for s in qfn.plan.sites
    ]
    plan = QuantPlan(qfn.plan.config, sites, list(qfn.plan.notes))
    return QuantizedFunction(qfn.fn, plan, qfn._graphs)


def rank_sites(
    qfn: QuantizedFunction,
    samples: Sequence[Sample],
    in_tree: Any,
    validate: Callable[[Callable[..., Any], Any], float] | None = None,
    validation_data: Any = None,
) -> list[tuple[str, float]]:
    """Quantized sites, most harmful first, each with what reverting it alone gains.

    Without `validate`, the gain is how much the output error (1 - cosine with the float
    outputs on `samples`) shrinks when only that site runs in float: cheap, one compiled
    program. With `validate`, it is how much the metric on `validation_data` rises: one
    validation per site, still without recompiling.
    """
    evaluator = PlanEvaluator(qfn._graphs, in_tree, qfn.plan.sites)
    args = evaluator.site_args(qfn.plan.sites, samples[0])
    if validate is None:
        reference = evaluator.reference(samples)

        def score(float_sites: list[str]) -> float:
            return output_cosine(reference, evaluator.outputs(args, samples, float_sites))

    else:

        def score(float_sites: list[str]) -> float:
            return float(validate(evaluator.as_function(args, float_sites), validation_data))

    base = score([])
    gains = [(name, score([name]) - base) for name in evaluator.names]
    return sorted(gains, key=lambda item: -item[1])


# --- the accuracy-control loop ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One validation: `action` is "quantize" (the fully quantized start), "revert" (site
    returned to float) or "requantize" (a reverted site tried quantized again); `kept` says
    whether the change stayed."""

    action: str
    site: str | None
    metric: float
    drop: float
    kept: bool = True


@dataclasses.dataclass
class AccuracyControlResult:
    """What `ptq_with_accuracy_control` did.

    Attributes:
        qfn: the final quantized function.
        reverted: the sites left in float, in the order they were reverted.
        history: one `Step` per validation of a quantized candidate, in order.
        float_metric: the metric of the float function.
        quant_metric: the metric of the fully quantized function, before any revert.
        met: whether the final drop is within `max_drop`.
        ranking: `(site, score)` of every quantized site, most harmful first (empty when
            nothing had to be reverted).
    """

    qfn: QuantizedFunction
    reverted: list[str]
    history: list[Step]
    float_metric: float
    quant_metric: float
    met: bool
    ranking: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    @property
    def final_metric(self) -> float:
        kept = [s for s in self.history if s.kept]
        return kept[-1].metric


def _drop(reference: float, value: float, drop_type: str) -> float:
    drop = reference - value
    return drop / abs(reference) if drop_type == "relative" and reference != 0 else drop


def ptq_with_accuracy_control(
    fn: Callable[..., Any],
    calib_data: Iterable[Any],
    validation_data: Any,
    validate: Callable[[Callable[..., Any], Any], float],
    max_drop: float = 0.01,
    drop_type: str = "absolute",
    config: QuantConfig | Mapping[str, Any] | None = None,
    *,
    ranking_subset_size: int = 32,
    ranking: str = "output",
    max_reverts: int | None = None,
    minimize: bool = True,
) -> AccuracyControlResult:
    """Quantizes `fn`, then keeps the most harmful sites in float until the metric holds.

    Sites are reverted one at a time in ranked order, re-validating after each, until the
    drop is within `max_drop`. With `minimize`, each reverted site (least harmful first) is
    then tried quantized again and stays quantized if the bound still holds, so no reverted
    site can be quantized again on its own without breaking the bound.

    Args:
        fn: the float function, as for `ptq`.
        calib_data: calibration samples, as for `ptq`; the first `ranking_subset_size` of
            them also rank the sites.
        validation_data: passed unchanged to `validate`.
        validate: `validate(fn, validation_data) -> float`, higher is better (e.g. top-1).
            It is called with the float function, then with each quantized candidate.
        max_drop: the largest acceptable drop of the metric.
        drop_type: "absolute" (`float - quant`) or "relative" (`(float - quant) / |float|`).
        config: the quantization config, as for `ptq`.
        ranking_subset_size: calibration samples used to rank sites by output error.
        ranking: "output" ranks sites by the output error each adds on the calibration
            subset (cheap); "metric" by the metric gained when each alone is reverted (one
            validation per site, more faithful).
        max_reverts: revert at most this many sites (default: all of them if needed).
        minimize: try to re-quantize reverted sites once the bound is met.

    Returns:
        An `AccuracyControlResult`; `.met` is False when even reverting every allowed site
        could not bring the drop within `max_drop` (a warning is logged as well).

    Example:
        >>> result = jaxptq.ptq_with_accuracy_control(
        ...     model, calib, (x_val, y_val), lambda f, d: top1(f, *d), max_drop=0.5)
        >>> result.reverted, result.final_metric
    """
    if drop_type not in DROP_TYPES:
        raise ValueError(f"`drop_type` = {drop_type!r}; choose one of {', '.join(DROP_TYPES)}.")
    if max_drop < 0:
        raise ValueError(f"`max_drop` must be >= 0, got {max_drop}.")
    if ranking not in RANKINGS:
        raise ValueError(f"`ranking` = {ranking!r}; choose one of {', '.join(RANKINGS)}.")
    if ranking_subset_size < 1:
        raise ValueError(f"`ranking_subset_size` must be >= 1, got {ranking_subset_size}.")
    samples, tree = collect_samples(calib_data)
    base = ptq(fn, [jax.tree_util.tree_unflatten(tree, list(s)) for s in samples], config)
    float_metric = float(validate(fn, validation_data))

    def check(action: str, site: str | None, reverted: list[str]) -> tuple[Any, Step]:
        qfn = with_reverted_sites(base, reverted) if reverted else base
        metric = float(validate(qfn, validation_data))
        step = Step(action, site, metric, _drop(float_metric, metric, drop_type))
        logger.info("accuracy control: %s `%s`: metric %.4f", action, site, metric)
        return qfn, step

    qfn, start = check("quantize", None, [])
    history = [start]
    if start.drop <= max_drop:
        return AccuracyControlResult(qfn, [], history, float_metric, start.metric, True)

    order = (
        rank_sites(base, samples[:ranking_subset_size], tree)
        if ranking == "output"
        else rank_sites(base, samples[:1], tree, validate, validation_data)
    )
    limit = len(order) if max_reverts is None else min(max_reverts, len(order))
    reverted: list[str] = []
    for name, _ in order[:limit]:
        reverted.append(name)
        qfn, step = check("revert", name, reverted)
        history.append(step)
        if step.drop <= max_drop:
            break
    met = history[-1].drop <= max_drop
    tried: set[tuple[str, ...]] = {()}  # sets already validated; none reverted fails
    changed = met and minimize
    while changed:  # until no single reverted site can be quantized again
        changed = False
        for name in reversed(list(reverted)):
            trial = [n for n in reverted if n != name]
            if tuple(sorted(trial)) in tried:
                continue
            tried.add(tuple(sorted(trial)))
            candidate, step = check("requantize", name, trial)
            keep = step.drop <= max_drop
            history.append(dataclasses.replace(step, kept=keep))
            if keep:
                qfn, reverted, changed = candidate, trial, True
    if not met:
        logger.warning(
            "accuracy control: the %s drop %.4g is still above max_drop=%g after reverting %d "
            "of %d quantized sites%s.",
            drop_type,
            history[-1].drop,
            max_drop,
            len(reverted),
            len(order),
            "" if len(reverted) == len(order) else " (max_reverts reached)",
        )
    return AccuracyControlResult(qfn, reverted, history, float_metric, start.metric, met, order)
