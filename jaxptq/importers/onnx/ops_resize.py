"""Resize (nearest and linear), one axis at a time with source indices computed in numpy.

Why per axis: nearest and (multi)linear interpolation are separable, and with static shapes
the source indices and weights are numpy constants, leaving gathers and a weighted sum.
"""

from __future__ import annotations

import math

import numpy as np

from jaxptq.importers.onnx._registry import Inputs, Node, Value, register
from jaxptq.importers.onnx._values import for_jax, normalize_axes, static, xp


def source_coords(out: int, size: int, scale: float, mode: str) -> np.ndarray:
    """Source coordinate of each output position along one axis (ONNX Resize formulas)."""
    x = np.arange(out, dtype=np.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else np.zeros_like(x)
    if mode == "half_pixel_symmetric":
        adjustment = out / (scale * size)
        offset = size / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    raise NotImplementedError(
        f"coordinate_transformation_mode `{mode}`; supported: half_pixel, pytorch_half_pixel, "
        "asymmetric, align_corners, half_pixel_symmetric"
    )


def nearest_index(coords: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Source index per output position for `nearest_mode`, clamped into the input."""
    if mode == "round_prefer_floor":
        idx = np.ceil(coords - 0.5)
    elif mode == "round_prefer_ceil":
        idx = np.floor(coords + 0.5)
    elif mode == "floor":
        idx = np.floor(coords)
    elif mode == "ceil":
        idx = np.ceil(coords)
    else:
        raise NotImplementedError(
            f"nearest_mode `{mode}`; supported: round_prefer_floor, round_prefer_ceil, floor, ceil"
        )
    return np.clip(idx, 0, size - 1).astype(np.int32)


def _along(w: np.ndarray, axis: int, rank: int, dtype) -> np.ndarray:
    return w.astype(dtype).reshape((-1,) + (1,) * (rank - axis - 1))


def _output_geometry(node: Node, x: Value, inputs: Inputs):
    rank = np.ndim(x)
    shape = np.shape(x)
    scales = inputs[2] if len(inputs) > 2 else None
    sizes = inputs[3] if len(inputs) > 3 else None
    scales = None if scales is None or np.size(scales) == 0 else static(scales, "`scales`")
    sizes = None if sizes is None or np.size(sizes) == 0 else static(sizes, "`sizes`")
    axes = normalize_axes(node.attr("axes", list(range(rank))), rank)
    out, factor = list(shape), [1.0] * rank
    if sizes is not None:
        for a, n in zip(axes, sizes.reshape(-1), strict=True):
            out[a], factor[a] = int(n), int(n) / shape[a]
    elif scales is not None:
        for a, s in zip(axes, scales.reshape(-1), strict=True):
            out[a], factor[a] = int(math.floor(shape[a] * float(s))), float(s)
    else:
        raise ValueError("Resize needs `scales` or `sizes`")
    return out, factor


@register("Resize", since=11)
def resize(node: Node, inputs: Inputs) -> Value:
    x = for_jax(inputs[0]) if xp(inputs[0]) is not np else inputs[0]
    mode = node.attr("mode", "nearest")
    ctm = node.attr("coordinate_transformation_mode", "half_pixel")
    if node.attr("antialias", 0):
        raise NotImplementedError("Resize with `antialias=1`")
    if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError("Resize `keep_aspect_ratio_policy` other than `stretch`")
    if mode not in ("nearest", "linear"):
        raise NotImplementedError(f"Resize mode `{mode}`; supported: nearest, linear")
    out, factor = _output_geometry(node, x, inputs)
    m, rank, dtype = xp(x), np.ndim(x), np.dtype(x.dtype)
    for a in range(rank):
        size = np.shape(x)[a]
        if out[a] == size and factor[a] == 1.0:
            continue
        coords = source_coords(out[a], size, factor[a], ctm)
        if mode == "nearest":
            idx = nearest_index(coords, size, node.attr("nearest_mode", "round_prefer_floor"))
            x = m.take(x, idx, axis=a)
            continue
        c = np.clip(coords, 0, size - 1)
        lo = np.floor(c).astype(np.int32)
        hi = np.minimum(lo + 1, size - 1)
        frac = c - lo
        x = m.take(x, lo, axis=a) * _along(1 - frac, a, rank, dtype) + m.take(
            x, hi, axis=a
        ) * _along(frac, a, rank, dtype)
    return x
