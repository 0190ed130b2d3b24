"""Helpers that keep static values in numpy (folded at trace time) and the rest in jnp."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxptq.importers.onnx._dtypes import canonical
from jaxptq.importers.onnx._registry import Value


def is_static(v: object) -> bool:
    """True for values known at trace time (numpy arrays and scalars)."""
    return isinstance(v, np.ndarray | np.generic)


def xp(*vals: Value | None) -> ModuleType:
    """`np` when every given value is static, so the op folds to a constant; else `jnp`."""
    return np if all(v is None or is_static(v) for v in vals) else jnp


def for_jax(v: Any) -> Any:
    """Casts a static value to the dtype JAX would use, explicitly and silently.

    Why: x64 is off, and letting jnp narrow int64/float64 constants itself warns or trips
    strict dtype promotion. The value stays numpy so it still becomes a jaxpr constant.
    """
    if is_static(v):
        a = np.asarray(v)
        c = canonical(a.dtype)
        return a if c == a.dtype else a.astype(c)
    return v


def lift(*vals: Any) -> tuple[ModuleType, list[Any]]:
    """(`np`, values) when all are static; else (`jnp`, values cast for JAX)."""
    m = xp(*vals)
    if m is np:
        return np, [np.asarray(v) for v in vals]
    return jnp, [for_jax(v) for v in vals]


def static(v: Value | None, what: str) -> np.ndarray:
    """`v` as numpy, or a clear error when it is only known at run time."""
    if v is None:
        raise ValueError(f"{what} is missing")
    if not is_static(v):
        raise NotImplementedError(
            f"{what} must be known at trace time (a constant or computed from shapes); "
            "it depends on the model's inputs"
        )
    return np.asarray(v)


def ints(v: Value | None, what: str) -> list[int]:
    """A static integer tensor as a Python list."""
    return [int(i) for i in static(v, what).reshape(-1)]


def normalize_axes(axes: Sequence[int], rank: int, what: str = "axes") -> list[int]:
    """Negative axes counted from the end; out-of-range axes are an error."""
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(f"{what} {list(axes)} out of range for rank {rank}")
        out.append(a % rank)
    return out
