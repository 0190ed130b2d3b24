"""Elementwise handlers: arithmetic, activations, comparisons and logic (numpy when static)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxptq.importers.onnx._registry import Inputs, Node, Value, register
from jaxptq.importers.onnx._values import for_jax, lift, xp


def _unary(name: str, node: Node, inputs: Inputs) -> Value:
    m, (x,) = lift(inputs[0])
    return getattr(m, name)(x)


for _op, _fn in [
    ("Abs", "abs"),
    ("Ceil", "ceil"),
    ("Exp", "exp"),
    ("Floor", "floor"),
    ("Log", "log"),
    ("Neg", "negative"),
    ("Sqrt", "sqrt"),
    ("Tanh", "tanh"),
    ("Not", "logical_not"),
]:
    register(_op)(partial(_unary, _fn))


def _binary(name: str, node: Node, inputs: Inputs) -> Value:
    m, (a, b) = lift(inputs[0], inputs[1])
    return getattr(m, name)(a, b)


for _op, _fn in [
    ("Add", "add"),
    ("Sub", "subtract"),
    ("Mul", "multiply"),
    ("Equal", "equal"),
    ("Less", "less"),
    ("Greater", "greater"),
    ("LessOrEqual", "less_equal"),
    ("GreaterOrEqual", "greater_equal"),
    ("And", "logical_and"),
    ("Or", "logical_or"),
    ("Xor", "logical_xor"),
]:
    register(_op)(partial(_binary, _fn))


@register("Div")
def div(node: Node, inputs: Inputs) -> Value:
    m, (a, b) = lift(inputs[0], inputs[1])
    if m.issubdtype(a.dtype, m.integer):
        # ONNX integer division truncates toward zero; `//` floors.
        q = m.abs(a) // m.abs(b)
        return m.where((a < 0) != (b < 0), -q, q).astype(a.dtype)
    return a / b


@register("Pow")
def pow_(node: Node, inputs: Inputs) -> Value:
    m, (x, y) = lift(inputs[0], inputs[1])
    if m is jnp and isinstance(y, np.ndarray) and y.ndim == 0 and float(y) == int(y):
        return jax.lax.integer_pow(x, int(y)) if int(y) >= 0 else m.power(x, y.astype(x.dtype))
    return m.power(x, y.astype(x.dtype)).astype(x.dtype)


@register("Reciprocal")
def reciprocal(node: Node, inputs: Inputs) -> Value:
    m, (x,) = lift(inputs[0])
    return (m.ones((), x.dtype) / x).astype(x.dtype)


def _variadic(name: str, node: Node, inputs: Inputs) -> Value:
    m, xs = lift(*[x for x in inputs if x is not None])
    out = xs[0]
    for x in xs[1:]:
        out = getattr(m, name)(out, x)
    return out


register("Max")(partial(_variadic, "maximum"))
register("Min")(partial(_variadic, "minimum"))
register("Sum")(partial(_variadic, "add"))


@register("Mean")
def mean(node: Node, inputs: Inputs) -> Value:
    s = _variadic("add", node, inputs)
    return (s / len([x for x in inputs if x is not None])).astype(s.dtype)


@register("Erf")
def erf(node: Node, inputs: Inputs) -> Value:
    return jax.scipy.special.erf(inputs[0])


@register("Sigmoid")
def sigmoid(node: Node, inputs: Inputs) -> Value:
    return jax.nn.sigmoid(inputs[0])


@register("Relu")
def relu(node: Node, inputs: Inputs) -> Value:
    m, (x,) = lift(inputs[0])
    return m.maximum(x, m.zeros((), x.dtype))


@register("LeakyRelu")
def leaky_relu(node: Node, inputs: Inputs) -> Value:
    m, (x,) = lift(inputs[0])
    return m.where(x >= 0, x, x * np.asarray(node.attr("alpha", 0.01), x.dtype))


@register("PRelu")
def prelu(node: Node, inputs: Inputs) -> Value:
    m, (x, slope) = lift(inputs[0], inputs[1])
    return m.where(x >= 0, x, x * slope)


@register("HardSigmoid")
def hard_sigmoid(node: Node, inputs: Inputs) -> Value:
    m, (x,) = lift(inputs[0])
    a = np.asarray(node.attr("alpha", 0.2), x.dtype)
    b = np.asarray(node.attr("beta", 0.5), x.dtype)
    return m.clip(x * a + b, np.zeros((), x.dtype), np.ones((), x.dtype))


@register("HardSwish")
def hard_swish(node: Node, inputs: Inputs) -> Value:
    m, (x,) = lift(inputs[0])
    gate = m.clip(x * np.asarray(1 / 6, x.dtype) + np.asarray(0.5, x.dtype), 0.0, 1.0)
    return x * gate.astype(x.dtype)


@register("Clip", since=11)
def clip(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 else None
    hi = inputs[2] if len(inputs) > 2 else None
    m = xp(x, lo, hi)
    if lo is not None:
        x = m.maximum(x, for_jax(lo).astype(x.dtype))
    if hi is not None:
        x = m.minimum(x, for_jax(hi).astype(x.dtype))
    return x


@register("Where")
def where(node: Node, inputs: Inputs) -> Value:
    m, (c, a, b) = lift(inputs[0], inputs[1], inputs[2])
    return m.where(c, a, b)


@register("Einsum")
def einsum(node: Node, inputs: Inputs) -> Value:
    m, xs = lift(*[x for x in inputs if x is not None])
    return m.einsum(node.attr("equation"), *xs)
