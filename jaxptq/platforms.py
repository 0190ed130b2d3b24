"""`lax.platform_dependent` that branches once: inside a branch, the platform is known.

A quantized convolution chooses its zero-point form per platform, then its convolution
form, then its integer dot; each choice is a `lax.platform_dependent`, which traces every
branch. Nested, that traced each site's CPU and GPU code up to eight times: 3.8 s of the
tracing of EfficientNet-Lite0's bias-correction step. A branch runs only on its platform,
so the choices made inside it can be made at trace time. (Which is why code reached from
a branch must not hide a cached `jax.jit` that is also called outside one: its cached
trace would keep the branch's choice.)
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

from jax import lax

# "cpu" or "default" while a branch of `dependent` is being traced, else None.
_BRANCH: contextvars.ContextVar[str | None] = contextvars.ContextVar("branch", default=None)


def _entered(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        token = _BRANCH.set(name)
        try:
            return fn(*args)
        finally:
            _BRANCH.reset(token)

    return run


def dependent(*args: Any, cpu: Callable[..., Any], default: Callable[..., Any]) -> Any:
    """`cpu(*args)` on XLA:CPU, `default(*args)` elsewhere, as `lax.platform_dependent`;
    inside a branch of an enclosing call, the matching function alone is traced."""
    branch = _BRANCH.get()
    if branch == "cpu":
        return cpu(*args)
    if branch == "default":
        return default(*args)
    return lax.platform_dependent(
        *args, cpu=_entered("cpu", cpu), default=_entered("default", default)
    )
