"""`ptq`: the function transform that turns a float JAX function into its quantized twin."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxptq.config import ConfigError, QuantConfig, as_config
from jaxptq.graph import Graph, param_paths
from jaxptq.passes.common import check_skip_names
from jaxptq.passes.dynamic import plan_dynamic_quant
from jaxptq.passes.weight import plan_weight_quant
from jaxptq.plan import AddPlan, QuantPlan
from jaxptq.rewrite import GraphCache, QuantizedFunction

logger = logging.getLogger(__name__)


def _weights_of(fn: Any) -> Any:
    """The parameter pytree behind `fn`, used to name sites after their layers."""
    try:
        from flax import nnx

        if isinstance(fn, nnx.Module):
            return nnx.state(fn)
    except ImportError:  # pragma: no cover - flax is a dependency
        pass
    if hasattr(fn, "args") and hasattr(fn, "func"):  # functools.partial(model.apply, vars)
        return fn.args
    return None


def _as_tuple(sample: Any) -> tuple[Any, ...]:
    return sample if isinstance(sample, tuple) else (sample,)


def collect_samples(calib_data: Iterable[Any] | None) -> tuple[list[tuple[Any, ...]], Any]:
    """Materializes the calibration samples as flat host arrays and checks they agree.

    Returns the flat samples and the pytree structure of one sample's arguments.
    """
    if calib_data is None:
        return [], None
    if isinstance(calib_data, np.ndarray | jax.Array):
        raise TypeError(
            "`calib_data` must be an iterable of samples (e.g. a list of arrays), got one "
            f"array of shape {np.shape(calib_data)}; wrap it as `[x]` or split it."
        )
    samples: list[tuple[Any, ...]] = []
    tree: Any = None
    first: list[tuple[tuple[int, ...], np.dtype]] = []
    for index, sample in enumerate(calib_data):
        leaves, sample_tree = jax.tree_util.tree_flatten(_as_tuple(sample))
        arrays = [np.asarray(leaf) for leaf in leaves]
        sig = [(a.shape, a.dtype) for a in arrays]
        if tree is None:
            tree, first = sample_tree, sig
        elif sample_tree != tree or len(sig) != len(first):
            raise ValueError(
                f"calibration sample {index} has structure {sample_tree}, expected {tree} "
                "like sample 0."
            )
        else:
            for arg, ((shape, dtype), (shape0, dtype0)) in enumerate(zip(sig, first, strict=True)):
                if dtype != dtype0 or len(shape) != len(shape0) or shape[1:] != shape0[1:]:
                    raise ValueError(
                        f"calibration sample {index}, argument {arg}: expected an array like "
                        f"sample 0, {dtype0}{list(shape0)} (the leading batch size may differ); "
                        f"got {dtype}{list(shape)}."
                    )
        samples.append(tuple(arrays))
    return samples, tree


def _first_graph(graphs: GraphCache, tree: Any, sample: tuple[Any, ...]) -> Graph:
    args = jax.tree_util.tree_unflatten(tree, sample)
    try:
        return graphs.get(args)
    except (TypeError, ValueError) as err:
        shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in sample)
        raise ValueError(f"calibration sample 0 ({shapes}) does not fit `fn`: {err}") from err


def ptq(
    fn: Callable[..., Any],
    calib_data: Iterable[Any] | None,
    config: QuantConfig | Mapping[str, Any] | None = None,
    *,
    progress: bool = False,
) -> QuantizedFunction:
    """Quantizes a float JAX function after training.

    Args:
        fn: a JAX-traceable function whose weights are closed over: a Flax nnx `Module`,
            `functools.partial(linen_model.apply, variables)`, an imported ONNX model, or
            a plain function over captured arrays.
        calib_data: an iterable of samples, each the tuple of `fn`'s positional
            arguments (a bare array when `fn` takes one). Samples may carry a leading
            batch axis. FULL_QUANT calibrates on all of them; the other modes trace `fn`
            on the first one.
        config: a `QuantConfig`, or a dict of MindSpore Lite key names.
        progress: show a progress bar over calibration batches.

    Returns:
        A `QuantizedFunction`: call it like `fn`; `.plan` holds every decision and
        `.lower(*args).as_text()` is the StableHLO of the integer program.

    Example:
        >>> qfn = jaxptq.ptq(model, [x[i:i + 10] for i in range(0, 100, 10)],
        ...                  {"quant_type": "FULL_QUANT"})
        >>> logits = qfn(x_test)
    """
    config = as_config(config)
    samples, tree = collect_samples(calib_data)
    if not samples:
        raise ValueError(
            f"`calib_data` is empty: {config.quant_type} needs "
            + (
                "calibration samples (about 100)."
                if config.quant_type == "FULL_QUANT"
                else "at least one example input to trace `fn`."
            )
        )
    graphs = GraphCache(fn, param_paths(_weights_of(fn)))
    graph = _first_graph(graphs, tree, samples[0])
    check_skip_names(graph.sites, config.common_quant_param.skip_quant_node)
    notes = [f"not looked inside: {where}" for where in graph.opaque]
    quant_type = config.quant_type
    calibration = None
    adds: list[AddPlan] = []
    if quant_type == "WEIGHT_QUANT":
        if config.common_quant_param.bit_num == 0:
            from jaxptq.passes.mixed_bit import plan_mixed_bit

            plans = plan_mixed_bit(graph.sites, config, graphs, tree, samples, notes)
        else:
            plans = plan_weight_quant(graph.sites, config)
    elif quant_type == "DYNAMIC_QUANT":
        plans = plan_dynamic_quant(graph.sites, config)
    elif quant_type == "FULL_QUANT":
        from jaxptq.passes.full import plan_full_quant

        plans, adds, calibration = plan_full_quant(
            graph.sites, config, graphs, tree, samples, progress
        )
    else:  # pragma: no cover - QuantConfig validates quant_type
        raise ConfigError(f"unknown quant_type {quant_type!r}")
    plan = QuantPlan(config, plans, notes, adds)
    qfn = QuantizedFunction(fn, plan, graphs)
    if config.common_quant_param.debug_info_save_path:
        from jaxptq.report import write_debug_report

        write_debug_report(qfn, samples, tree, calibration)
    logger.info("%s", plan)
    return qfn


def apply_plan(fn: Callable[..., Any], plan: QuantPlan, example: Any) -> QuantizedFunction:
    """Rebuilds a `QuantizedFunction` from a saved plan and the same float `fn`."""
    samples, tree = collect_samples([example])
    graphs = GraphCache(fn, param_paths(_weights_of(fn)))
    _first_graph(graphs, tree, samples[0])
    return QuantizedFunction(fn, plan, graphs)
