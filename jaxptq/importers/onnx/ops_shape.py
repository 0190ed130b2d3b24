"""Shape and layout handlers; shapes stay numpy so shape arithmetic folds at trace time."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxptq.importers.onnx._dtypes import canonical, np_dtype
from jaxptq.importers.onnx._registry import Inputs, Node, Value, register
from jaxptq.importers.onnx._values import ints, is_static, lift, normalize_axes, xp


@register("Identity", "Dropout")
def identity(node: Node, inputs: Inputs) -> Value | list[Value]:
    # Dropout at inference is the identity; its optional mask output is all True.
    x = inputs[0]
    if node.num_outputs > 1:
        return [x, np.ones(np.shape(x), np.bool_)]
    return x


@register("Constant")
def constant(node: Node, inputs: Inputs) -> Value:
    a = node.attrs
    if "value" in a:
        return a["value"]
    if "value_float" in a:
        return np.asarray(a["value_float"], np.float32)
    if "value_floats" in a:
        return np.asarray(a["value_floats"], np.float32)
    if "value_int" in a:
        return np.asarray(a["value_int"], np.int64)
    if "value_ints" in a:
        return np.asarray(a["value_ints"], np.int64)
    raise NotImplementedError(f"Constant with attributes {sorted(a)} is not supported")


@register("ConstantOfShape")
def constant_of_shape(node: Node, inputs: Inputs) -> Value:
    shape = ints(inputs[0], "`input` (the shape)")
    value = node.attr("value", np.zeros(1, np.float32))
    return np.full(shape, value.reshape(-1)[0], value.dtype)


@register("Shape")
def shape(node: Node, inputs: Inputs) -> Value:
    dims = np.asarray(np.shape(inputs[0]), np.int64)
    return dims[slice(node.attr("start", 0), node.attr("end", None))]


@register("Size")
def size(node: Node, inputs: Inputs) -> Value:
    return np.asarray(np.size(inputs[0]), np.int64)


@register("Cast")
def cast(node: Node, inputs: Inputs) -> Value:
    to = np_dtype(node.attr("to"), "`to`")
    x = inputs[0]
    return x.astype(to) if is_static(x) else x.astype(canonical(to))


@register("Reshape")
def reshape(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    target = ints(inputs[1], "`shape`")
    if not node.attr("allowzero", 0):
        target = [np.shape(x)[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@register("Flatten")
def flatten(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    axis = node.attr("axis", 1)
    axis = axis + np.ndim(x) if axis < 0 else axis  # range [-rank, rank]
    outer = int(np.prod(np.shape(x)[:axis]))
    return x.reshape(outer, -1) if outer else x.reshape(0, int(np.prod(np.shape(x)[axis:])))


@register("Transpose")
def transpose(node: Node, inputs: Inputs) -> Value:
    m, (x,) = lift(inputs[0])
    return m.transpose(x, node.attr("perm", None))


@register("Concat")
def concat(node: Node, inputs: Inputs) -> Value:
    m, xs = lift(*[x for x in inputs if x is not None])
    return m.concatenate(xs, axis=node.attr("axis"))


def _split(node: Node, x: Value, split: list[int] | None) -> list[Value]:
    axis = node.attr("axis", 0) % np.ndim(x)
    dim = np.shape(x)[axis]
    if split is None:
        n = node.attr("num_outputs", node.num_outputs)
        chunk = -(-dim // n)  # ceil: the last chunk is smaller when dim % n != 0
        split = [min(chunk, dim - i * chunk) for i in range(n)]
    if sum(split) != dim:
        raise ValueError(f"`split` {split} does not sum to dimension {dim} of axis {axis}")
    m = xp(x)
    return m.split(x, np.cumsum(split)[:-1].tolist(), axis=axis)


@register("Split", until=13)
def split_11(node: Node, inputs: Inputs) -> list[Value]:
    return _split(node, inputs[0], node.attr("split", None))


@register("Split", since=13)
def split_13(node: Node, inputs: Inputs) -> list[Value]:
    given = inputs[1] if len(inputs) > 1 else None
    return _split(node, inputs[0], None if given is None else ints(given, "`split`"))


@register("Slice", since=11)
def slice_(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    rank = np.ndim(x)
    starts = ints(inputs[1], "`starts`")
    ends = ints(inputs[2], "`ends`")
    axes = ints(inputs[3], "`axes`") if len(inputs) > 3 and inputs[3] is not None else None
    steps = ints(inputs[4], "`steps`") if len(inputs) > 4 and inputs[4] is not None else None
    axes = normalize_axes(axes, rank) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[slice] = [slice(None)] * rank
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        if st == 0:
            raise ValueError("`steps` must not be 0")
        dim = np.shape(x)[a]
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
        index[a] = slice(s, None if e < 0 else e, st)
    return x[tuple(index)]


@register("Gather")
def gather(node: Node, inputs: Inputs) -> Value:
    x, idx = inputs[0], inputs[1]
    axis = node.attr("axis", 0) % np.ndim(x)
    dim = np.shape(x)[axis]
    if is_static(idx):
        idx = np.where(idx < 0, idx + dim, idx)
    else:
        idx = jnp.where(idx < 0, idx + dim, idx)
    m, (x, idx) = lift(x, idx)
    return m.take(x, idx, axis=axis)


def _squeeze(x: Value, axes: list[int] | None) -> Value:
    if axes is None:
        axes = [i for i, d in enumerate(np.shape(x)) if d == 1]
    return xp(x).squeeze(x, axis=tuple(normalize_axes(axes, np.ndim(x))))


def _unsqueeze(x: Value, axes: list[int]) -> Value:
    rank = np.ndim(x) + len(axes)
    shape = list(np.shape(x))
    for a in sorted(normalize_axes(axes, rank)):
        shape.insert(a, 1)
    return x.reshape(shape)


@register("Squeeze", until=13)
def squeeze_11(node: Node, inputs: Inputs) -> Value:
    return _squeeze(inputs[0], node.attr("axes", None))


@register("Squeeze", since=13)
def squeeze_13(node: Node, inputs: Inputs) -> Value:
    given = inputs[1] if len(inputs) > 1 else None
    return _squeeze(inputs[0], None if given is None else ints(given, "`axes`"))


@register("Unsqueeze", until=13)
def unsqueeze_11(node: Node, inputs: Inputs) -> Value:
    return _unsqueeze(inputs[0], node.attr("axes"))


@register("Unsqueeze", since=13)
def unsqueeze_13(node: Node, inputs: Inputs) -> Value:
    return _unsqueeze(inputs[0], ints(inputs[1], "`axes`"))


@register("Expand")
def expand(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    # Why broadcast_shapes: Expand's target may hold 1 where the input is larger.
    shape = np.broadcast_shapes(np.shape(x), tuple(ints(inputs[1], "`shape`")))
    return xp(x).broadcast_to(x, shape)


@register("Tile")
def tile(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    return xp(x).tile(x, ints(inputs[1], "`repeats`"))


@register("Range")
def range_(node: Node, inputs: Inputs) -> Value:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    if all(is_static(v) for v in (start, limit, delta)):
        return np.arange(start, limit, delta).astype(np.asarray(start).dtype)
    raise NotImplementedError(
        "Range needs `start`, `limit` and `delta` known at trace time (output shape)"
    )


@register("Pad", since=11)
def pad(node: Node, inputs: Inputs) -> Value:
    x = inputs[0]
    rank = np.ndim(x)
    pads = ints(inputs[1], "`pads`")
    value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    given_axes = inputs[3] if len(inputs) > 3 else None
    axes = (
        list(range(rank))
        if given_axes is None
        else normalize_axes(ints(given_axes, "`axes`"), rank)
    )
    if len(pads) != 2 * len(axes):
        raise ValueError(f"`pads` has {len(pads)} values, expected {2 * len(axes)}")
    before, after = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        before[a], after[a] = pads[i], pads[i + len(axes)]
    # Negative pads crop; apply them as a slice first.
    crop = tuple(
        slice(max(-b, 0), np.shape(x)[i] - max(-e, 0))
        for i, (b, e) in enumerate(zip(before, after, strict=True))
    )
    x = x[crop]
    width = [(max(b, 0), max(e, 0)) for b, e in zip(before, after, strict=True)]
    mode = node.attr("mode", "constant")
    if mode == "constant":
        if value is None:
            return xp(x).pad(x, width)
        if is_static(value):
            cval = np.asarray(value).reshape(-1)[0].astype(x.dtype)
            return xp(x).pad(x, width, constant_values=cval)
        return jnp.pad(x, width, constant_values=jnp.reshape(value, (-1,))[0])
    if mode in ("reflect", "edge", "wrap"):
        return xp(x).pad(x, width, mode=mode)
    raise NotImplementedError(f"Pad mode `{mode}`; supported: constant, reflect, edge, wrap")
