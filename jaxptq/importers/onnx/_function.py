"""`OnnxFunction`: an ONNX graph as a traceable JAX callable, one named scope per node."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from jaxptq.importers.onnx import _loader
from jaxptq.importers.onnx._dtypes import canonical
from jaxptq.importers.onnx._errors import OnnxImportError, OnnxNodeError, UnsupportedOnnxError
from jaxptq.importers.onnx._registry import Handler, Node, Value, lookup
from jaxptq.importers.onnx._values import for_jax, is_static


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input as declared: shape (None for dynamic dims; None if unknown) and dtype."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Step:
    node: Node
    handler: Handler
    inputs: tuple[str, ...]  # "" for an omitted optional input
    outputs: tuple[str, ...]
    release: tuple[str, ...]  # values no later step reads


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or `OpType_index` for an unnamed one: the scope its ops trace under."""
    return node.name or f"{node.op_type}_{index}"


def site_scope(name: str) -> str:
    """A name as a JAX name stack keeps it: empty parts dropped, so node `/block/Conv`
    names site `block/Conv`."""
    return "/".join(p for p in name.split("/") if p)


def nodes_by_site_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Each node of `model` under the name its sites get."""
    return {site_scope(node_label(n, i)): n for i, n in enumerate(model.graph.node)}


class OnnxFunction:
    """An imported ONNX graph; call it with the graph inputs in graph order.

    Initializers and `Constant` nodes stay numpy arrays, so under `jax.make_jaxpr` they are
    jaxpr constants; nodes whose inputs are all constant are computed at trace time.

    Attributes:
        input_names: graph inputs that are not initializers, in graph order.
        output_names: graph outputs in graph order.
        input_specs: one `InputSpec` per input name.
        model: the ModelProto as given or read (never modified).
        opset: the model's `ai.onnx` opset version.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        opset: int,
        base_dir: os.PathLike | None,
        label: str,
    ):
        self.model = model
        self.opset = opset
        self._label = label
        base = None if base_dir is None else pathlib.Path(base_dir)
        g = model.graph
        self._consts: dict[str, np.ndarray] = {
            t.name: _loader.tensor_to_numpy(t, base, label) for t in g.initializer
        }
        if g.sparse_initializer:
            raise NotImplementedError(f"{label}: sparse initializers are not supported")
        specs = []
        for vi in g.input:
            if vi.name not in self._consts:
                shape, dtype = _loader.input_spec(vi, label)
                specs.append(InputSpec(vi.name, shape, dtype))
        self.input_specs: tuple[InputSpec, ...] = tuple(specs)
        self.input_names: tuple[str, ...] = tuple(s.name for s in specs)
        self.output_names: tuple[str, ...] = tuple(o.name for o in g.output)
        self._steps = self._plan(base)

    def site_op_types(self) -> dict[str, str]:
        """The op type of each node under the name its sites get."""
        return {name: n.op_type for name, n in nodes_by_site_name(self.model).items()}

    def _plan(self, base: pathlib.Path | None) -> tuple[_Step, ...]:
        """Checks support and wiring over the whole graph before anything runs."""
        g = self.model.graph
        unsupported: dict[str, list[str]] = {}
        defined = set(self._consts) | set(self.input_names)
        steps: list[tuple[Node, Handler | None, tuple[str, ...], tuple[str, ...]]] = []
        for i, n in enumerate(g.node):
            name = node_label(n, i)
            handler = None
            if n.domain in _loader.DEFAULT_DOMAINS:
                handler = lookup(n.op_type, self.opset)
            if handler is None:
                default = n.domain in _loader.DEFAULT_DOMAINS
                key = n.op_type if default else f"{n.domain}::{n.op_type}"
                unsupported.setdefault(key, []).append(name)
            for x in n.input:
                if x and x not in defined:
                    raise OnnxImportError(
                        f"{self._label}: node `{name}` ({n.op_type}) reads `{x}`, which no "
                        "graph input, initializer or earlier node defines (truncated file or "
                        "graph not topologically sorted?)"
                    )
            defined.update(o for o in n.output if o)
            outs = list(n.output)
            while outs and not outs[-1]:
                outs.pop()
            attrs = _loader.parse_attrs(n, base, self._label)
            node = Node(name, n.op_type, self.opset, attrs, len(outs))
            steps.append((node, handler, tuple(n.input), tuple(outs)))
        if unsupported:
            listing = "; ".join(
                f"{op} (nodes: {', '.join(names)})" for op, names in sorted(unsupported.items())
            )
            raise UnsupportedOnnxError(
                f"{self._label} (ai.onnx opset {self.opset}) uses {len(unsupported)} op "
                f"type(s) jaxptq cannot import: {listing}. "
                "See `jaxptq.importers.onnx.supported_op_types()`.",
                ops=unsupported,
                opset=self.opset,
            )
        for o in self.output_names:
            if o not in defined:
                raise OnnxImportError(f"{self._label}: graph output `{o}` is never computed")
        last_use: dict[str, int] = {}
        for i, (_, _, ins, _) in enumerate(steps):
            for x in ins:
                last_use[x] = i
        keep = set(self.output_names) | set(self._consts)
        return tuple(
            _Step(
                node,
                h,
                ins,
                outs,
                tuple(x for x in set(ins) if x and last_use[x] == i and x not in keep),
            )
            for i, (node, h, ins, outs) in enumerate(steps)
            if h is not None
        )

    def _check_args(self, args: Sequence[Any]) -> list[jax.Array]:
        if len(args) != len(self.input_specs):
            raise TypeError(
                f"{self._label} takes {len(self.input_specs)} input(s) "
                f"{list(self.input_names)}, got {len(args)}"
            )
        out = []
        for spec, a in zip(self.input_specs, args, strict=True):
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                a = np.asarray(a)
            got = np.dtype(a.dtype)
            # The declared dtype, or what JAX uses for it (int32 for int64 with x64 off).
            if got not in (spec.dtype, canonical(spec.dtype)):
                raise TypeError(f"input `{spec.name}`: expected dtype {spec.dtype}, got {got}")
            if spec.shape is not None:
                shape = tuple(a.shape)
                ok = len(shape) == len(spec.shape) and all(
                    d is None or d == s for d, s in zip(spec.shape, shape, strict=True)
                )
                if not ok:
                    declared = tuple("?" if d is None else d for d in spec.shape)
                    raise ValueError(
                        f"input `{spec.name}`: expected shape {declared} (? = any), got {shape}"
                    )
            out.append(jnp.asarray(for_jax(a)) if is_static(a) else a)
        return out

    def __call__(self, *args: Any) -> jax.Array | tuple[jax.Array, ...]:
        env: dict[str, Value] = dict(self._consts)
        env.update(zip(self.input_names, self._check_args(args), strict=True))
        for step in self._steps:
            ins = [env[x] if x else None for x in step.inputs]
            outs = _run(step, ins)
            for name, v in zip(step.outputs, outs, strict=False):
                if name:
                    env[name] = v
            for x in step.release:
                env.pop(x, None)
        res = tuple(jnp.asarray(for_jax(env[o])) for o in self.output_names)
        return res[0] if len(res) == 1 else res

    def __repr__(self) -> str:
        ins = ", ".join(
            f"{s.name}: {s.dtype}{list(s.shape) if s.shape else ''}" for s in self.input_specs
        )
        return f"OnnxFunction({self._label}, opset={self.opset}, inputs=[{ins}])"


def _run(step: _Step, ins: list[Value | None]) -> list[Value]:
    node = step.node
    with jax.named_scope(node.name):
        try:
            if all(v is None or is_static(v) for v in ins):
                # Why: folding here keeps shape arithmetic and weight transforms numpy, so
                # Reshape targets are static and a site's weight is a plain constant.
                with jax.ensure_compile_time_eval():
                    out = node_outputs(step.handler(node, ins))
                out = [v if is_static(v) else np.asarray(v) for v in out]
            else:
                out = node_outputs(step.handler(node, ins))
        except OnnxNodeError:
            raise
        except Exception as e:
            raise OnnxNodeError(node.name, node.op_type, e) from e
    if len(out) < node.num_outputs:
        raise OnnxNodeError(
            node.name,
            node.op_type,
            NotImplementedError(
                f"produces {len(out)} output(s), the graph uses {node.num_outputs}"
            ),
        )
    return out


def node_outputs(out: Any) -> list[Value]:
    """A handler's result as a list of outputs."""
    if isinstance(out, list | tuple):
        return list(out)
    return [out]


def import_onnx(
    model: str | os.PathLike | onnx.ModelProto, *, base_dir: str | os.PathLike | None = None
) -> OnnxFunction:
    """Imports an ONNX model as a traceable pure-JAX function.

    Args:
        model: path to a ``.onnx`` file, or a ModelProto (left unmodified).
        base_dir: folder holding external-data files; defaults to the model file's folder.
            Locations that resolve outside it are refused.

    Returns:
        An `OnnxFunction`: call it with the graph inputs in order; it returns the output,
        or a tuple of outputs.

    Raises:
        OnnxImportError: the file is unreadable, truncated, not ONNX, or unsafe.
        UnsupportedOnnxError: unsupported opset, or op types (all listed at once).

    Example:
        >>> fn = import_onnx("model.onnx")
        >>> logits = jax.jit(fn)(images)
    """
    proto, folder, label = _loader.load_model(model, base_dir)
    opset = _loader.model_opset(proto, label)
    return OnnxFunction(proto, opset, folder, label)
