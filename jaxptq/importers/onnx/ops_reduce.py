"""Reductions: Reduce* (axes as attribute or input, by opset), ArgMax and ArgMin."""

from __future__ import annotations

from functools import partial

import numpy as np

from jaxptq.importers.onnx._registry import Inputs, Node, Value, register
from jaxptq.importers.onnx._values import for_jax, ints, normalize_axes, xp


def _reduce(name: str, node: Node, x: Value, axes: list[int] | None) -> Value:
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(np.ndim(x)))
    m = xp(x)
    x = x if m is np else for_jax(x)
    return getattr(m, name)(
        x, axis=tuple(normalize_axes(axes, np.ndim(x))), keepdims=bool(node.attr("keepdims", 1))
    )


def _axes_attr(name: str, node: Node, inputs: Inputs) -> Value:
    return _reduce(name, node, inputs[0], node.attr("axes", None))


def _axes_input(name: str, node: Node, inputs: Inputs) -> Value:
    given = inputs[1] if len(inputs) > 1 else None
    return _reduce(name, node, inputs[0], None if given is None else ints(given, "`axes`"))


# ReduceSum took `axes` as an input from opset 13, the others from opset 18.
for _op, _fn, _switch in [
    ("ReduceSum", "sum", 13),
    ("ReduceMean", "mean", 18),
    ("ReduceMax", "max", 18),
    ("ReduceMin", "min", 18),
    ("ReduceProd", "prod", 18),
]:
    register(_op, until=_switch)(partial(_axes_attr, _fn))
    register(_op, since=_switch)(partial(_axes_input, _fn))


def _arg(name: str, node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    m = xp(x)
    axis = node.attr("axis", 0) % np.ndim(x)
    keep = bool(node.attr("keepdims", 1))
    if node.attr("select_last_index", 0):
        last = np.shape(x)[axis] - 1
        idx = last - getattr(m, name)(m.flip(x, axis=axis), axis=axis, keepdims=keep)
    else:
        idx = getattr(m, name)(x, axis=axis, keepdims=keep)
    return idx.astype(np.int64) if m is np else idx


register("ArgMax")(partial(_arg, "argmax"))
register("ArgMin")(partial(_arg, "argmin"))
