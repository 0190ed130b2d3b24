"""Normalization and softmax handlers (BatchNorm folded to a scale and shift when static)."""

from __future__ import annotations

import jax
import numpy as np

from jaxptq.importers.onnx._registry import Inputs, Node, Value, register
from jaxptq.importers.onnx._values import lift, xp


@register("BatchNormalization")
def batch_norm(node: Node, inputs: Inputs) -> Value:
    if node.attr("training_mode", 0) or node.num_outputs > 1:
        raise NotImplementedError("BatchNormalization in training mode (running-stat outputs)")
    x = inputs[0]
    eps = node.attr("epsilon", 1e-5)
    m, (scale, bias, mean, var) = lift(*inputs[1:5])
    # Why fold: the per-channel scale and shift are weight expressions; computing them in
    # numpy leaves one multiply-add on the activation.
    inv = scale / m.sqrt(var + np.asarray(eps, var.dtype))
    shift = bias - mean * inv
    shape = (-1,) + (1,) * (np.ndim(x) - 2)
    return x * inv.reshape(shape) + shift.reshape(shape)


def _normalize(x: Value, axes: tuple[int, ...], eps: float) -> tuple[Value, Value, Value]:
    m = xp(x)
    mean = m.mean(x, axis=axes, keepdims=True)
    d = x - mean
    inv = 1 / m.sqrt(m.mean(d * d, axis=axes, keepdims=True) + np.asarray(eps, x.dtype))
    return d * inv, mean, inv


@register("LayerNormalization", since=17)
def layer_norm(node: Node, inputs: Inputs) -> Value | list[Value]:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = node.attr("axis", -1) % np.ndim(x)
    y, mean, inv = _normalize(x, tuple(range(axis, np.ndim(x))), node.attr("epsilon", 1e-5))
    y = y * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv][: max(node.num_outputs, 1)]


@register("InstanceNormalization")
def instance_norm(node: Node, inputs: Inputs) -> Value:
    x, scale, bias = inputs[0], inputs[1], inputs[2]
    y, _, _ = _normalize(x, tuple(range(2, np.ndim(x))), node.attr("epsilon", 1e-5))
    shape = (-1,) + (1,) * (np.ndim(x) - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


def _softmax_rule(fn, node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    if node.opset >= 13:
        return fn(x, axis=node.attr("axis", -1))
    # Before opset 13 the input is coerced to 2-D at `axis` and normalized over the tail.
    axis = node.attr("axis", 1) % np.ndim(x)
    shape = np.shape(x)
    y = fn(x.reshape(int(np.prod(shape[:axis])), -1), axis=1)
    return y.reshape(shape)


@register("Softmax")
def softmax(node: Node, inputs: Inputs) -> Value:
    return _softmax_rule(jax.nn.softmax, node, inputs)


@register("LogSoftmax")
def log_softmax(node: Node, inputs: Inputs) -> Value:
    return _softmax_rule(jax.nn.log_softmax, node, inputs)
