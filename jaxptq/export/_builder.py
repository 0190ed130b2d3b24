"""Adding nodes and initializers to an ONNX graph under names that never collide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from jaxptq.export._qparams import ActQuant


class GraphBuilder:
    """Collects new nodes and initializers for one graph; every name it makes is fresh.

    Q/DQ pairs on the same tensor with the same parameters are made once and shared, so
    two sites reading one activation with one scale quantize it once.
    """

    def __init__(self, taken: Sequence[str] = ()):
        self.taken: set[str] = set(taken)
        self.initializers: list[onnx.TensorProto] = []
        self._qdq: dict[tuple[str, float, int, str], list[str]] = {}

    @classmethod
    def for_graph(cls, graph: onnx.GraphProto) -> GraphBuilder:
        names = [t.name for t in graph.initializer]
        names += [v.name for v in (*graph.input, *graph.output, *graph.value_info)]
        for n in graph.node:
            names += [*n.input, *n.output, n.name]
        return cls(names)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def const(self, base: str, array: Any) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(
        self, op: str, inputs: Sequence[str], base: str, n_out: int = 1, **attrs: Any
    ) -> tuple[onnx.NodeProto, list[str]]:
        """A node named `base` (made fresh) with fresh output names `base_out{i}`; a (De)Q
        node's output is `..._q` / `..._dq`, short, as it is named twice in the file."""
        name = self.fresh(base)
        short = name.replace("_DequantizeLinear", "_dq").replace("_QuantizeLinear", "_q")
        out = short if short != name else f"{name}_out"
        outs = [self.fresh(f"{out}{i}" if n_out > 1 else out) for i in range(n_out)]
        return helper.make_node(op, list(inputs), outs, name=name, **attrs), outs

    def quantize(
        self, x: str, aq: ActQuant, nodes: list[onnx.NodeProto], site: str
    ) -> tuple[str, str, str]:
        """QuantizeLinear of `x`, made once per (tensor, parameters); returns the
        (quantized, scale, zero point) names."""
        key = (x, float(aq.scale), int(aq.zero_point), str(aq.dtype))
        if key not in self._qdq:
            s = self.const(f"{site}_x_scale", np.float32(aq.scale))
            z = self.const(f"{site}_x_zero_point", aq.zero_point)
            node, (q,) = self.node("QuantizeLinear", [x, s, z], f"{site}_x_QuantizeLinear")
            nodes.append(node)
            self._qdq[key] = [q, s, z, ""]
        q, s, z, _ = self._qdq[key]
        return q, s, z

    def qdq(self, x: str, aq: ActQuant, nodes: list[onnx.NodeProto], site: str) -> str:
        """x -> QuantizeLinear -> DequantizeLinear; returns the dequantized name."""
        q, s, z = self.quantize(x, aq, nodes, site)
        entry = self._qdq[(x, float(aq.scale), int(aq.zero_point), str(aq.dtype))]
        if not entry[3]:
            node, (dq,) = self.node("DequantizeLinear", [q, s, z], f"{site}_x_DequantizeLinear")
            nodes.append(node)
            entry[3] = dq
        return entry[3]

    def dequantize_const(
        self,
        base: str,
        q: np.ndarray,
        scale: np.ndarray,
        axis: int | None,
        nodes: list[onnx.NodeProto],
        zero_point: bool = True,
    ) -> str:
        """An integer initializer with its DequantizeLinear (zero point 0, per `axis`).

        `zero_point=False` leaves the optional zero point out (it defaults to 0): int32
        biases would otherwise store 4 more bytes a channel for nothing.
        """
        qn = self.const(f"{base}_quantized", q)
        sn = self.const(f"{base}_scale", np.asarray(scale, np.float32))
        inputs = [qn, sn]
        if zero_point:
            inputs.append(self.const(f"{base}_zero_point", np.zeros(np.shape(scale), q.dtype)))
        attrs = {} if axis is None else {"axis": int(axis)}
        node, (out,) = self.node("DequantizeLinear", inputs, f"{base}_DequantizeLinear", **attrs)
        nodes.append(node)
        return out
