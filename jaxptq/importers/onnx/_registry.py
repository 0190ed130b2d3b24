"""The op table: handlers keyed by op type and the opset range whose semantics they match."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

# A value flowing between nodes: numpy while static (weights, shapes), a JAX array otherwise.
Value = np.ndarray | jax.Array


@dataclasses.dataclass(frozen=True)
class Node:
    """What a handler sees of an ONNX node.

    Attributes:
        name: the node's name, or ``OpType_index`` when the node has none.
        op_type: the ONNX op type.
        opset: the model's ``ai.onnx`` opset version.
        attrs: attribute name -> Python value (ints, floats, strings, lists, numpy tensors).
        num_outputs: how many outputs the graph uses (trailing optional ones excluded).
    """

    name: str
    op_type: str
    opset: int
    attrs: Mapping[str, Any]
    num_outputs: int

    def attr(self, key: str, default: Any = None) -> Any:
        """The attribute `key`, or `default` when the node does not set it."""
        return self.attrs.get(key, default)


# A handler's inputs in node order, None for an omitted optional input. Typed `Any` because
# handlers index optional inputs positionally and check them for None themselves.
Inputs = Sequence[Any]
Handler = Callable[[Node, Inputs], Any]


@dataclasses.dataclass(frozen=True)
class _Entry:
    since: int
    until: int | None  # exclusive
    fn: Handler


_TABLE: dict[str, list[_Entry]] = {}


def register(*op_types: str, since: int = 1, until: int | None = None):
    """Registers a handler for `op_types` at opsets ``since <= opset < until``.

    Example:
        >>> @register("Squeeze", since=13)
        ... def squeeze(node, inputs): ...
    """

    def wrap(fn: Handler) -> Handler:
        for op in op_types:
            entries = _TABLE.setdefault(op, [])
            for e in entries:
                if (until is None or e.since < until) and (e.until is None or since < e.until):
                    raise ValueError(f"two handlers for `{op}` overlap at opsets {since}..")
            entries.append(_Entry(since, until, fn))
        return fn

    return wrap


def lookup(op_type: str, opset: int) -> Handler | None:
    """The handler for `op_type` at `opset`, or None when there is none."""
    for e in _TABLE.get(op_type, ()):
        if e.since <= opset and (e.until is None or opset < e.until):
            return e.fn
    return None


def supported_op_types() -> list[str]:
    """Sorted op types that have a handler at some opset."""
    return sorted(_TABLE)
