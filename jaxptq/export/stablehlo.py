"""StableHLO artifacts: the integer program serialized with `jax.export`, weights beside it.

One `.npz` file holds the serialized `jax.export.Exported` (as bytes) and every runtime
array of the program: integer weights (packed sub-8-bit weights stay packed), scales and
float constants. They stay arguments of the module rather than constants baked into the
HLO, as in `QuantizedFunction` itself, so the module text stays small and readable.
Loading uses `allow_pickle=False`: an artifact can never run code.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import export as jax_export

from jaxptq import atomic
from jaxptq.rewrite import QuantizedFunction

FORMAT = "jaxptq-stablehlo-1"
_MODULE = "__exported__"
_FORMAT_KEY = "__format__"


def export_stablehlo(
    qfn: QuantizedFunction, path: str | os.PathLike[str], *example_args: Any
) -> pathlib.Path:
    """Serializes `qfn` at the shapes of `example_args` into one file.

    Args:
        qfn: the result of `jaxptq.ptq`.
        path: the file to write (atomically; `.npz` contents whatever the suffix).
        *example_args: positional arguments like the ones `qfn` will be called with.

    Returns:
        The path written.

    Example:
        >>> jaxptq.export_stablehlo(qfn, "lenet_int8.npz", x[:1])
        >>> f = jaxptq.load_stablehlo("lenet_int8.npz")
        >>> np.testing.assert_array_equal(f(x[:1]), qfn(x[:1]))
    """
    if not example_args:
        raise TypeError("export_stablehlo needs example arguments to fix the input shapes.")
    graph = qfn._graphs.get(example_args)
    program = qfn._program(graph)
    params = program.params
    flat = jax.tree_util.tree_leaves(example_args)
    exported = jax_export.export(program.jitted)(*params, *flat)
    param_leaves = jax.tree_util.tree_leaves(params)
    arrays = {f"p{i}": np.asarray(a) for i, a in enumerate(param_leaves)}
    arrays[_MODULE] = np.frombuffer(bytes(exported.serialize()), np.uint8)
    arrays[_FORMAT_KEY] = np.frombuffer(FORMAT.encode(), np.uint8)
    return atomic.write_file(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


class StableHLOFunction:
    """A loaded artifact: call it like the quantized function it came from.

    Attributes:
        exported: the `jax.export.Exported`; `.mlir_module()` is its StableHLO text.
    """

    def __init__(self, exported: jax_export.Exported, params: list[np.ndarray]):
        self.exported = exported
        self._params = jax.device_put(params)
        self._n_params = len(params)

    def __call__(self, *args: Any) -> Any:
        flat = jax.tree_util.tree_leaves(args)
        leaves = list(self._params) + list(flat)
        n_expected = len(self.exported.in_avals)
        if len(leaves) != n_expected:
            raise TypeError(
                f"the artifact takes {n_expected - self._n_params} input array(s), got {len(flat)}."
            )
        call_args, call_kwargs = jax.tree_util.tree_unflatten(self.exported.in_tree, leaves)
        return self.exported.call(*call_args, **call_kwargs)

    def mlir_module(self) -> str:
        return self.exported.mlir_module()


def load_stablehlo(path: str | os.PathLike[str]) -> Callable[..., Any]:
    """Reads an artifact written by `export_stablehlo`; returns a `StableHLOFunction`."""
    file = pathlib.Path(path)
    with np.load(file, allow_pickle=False) as npz:
        if _FORMAT_KEY not in npz.files or _MODULE not in npz.files:
            raise ValueError(f"{file} is not a jaxptq StableHLO artifact (no module inside).")
        fmt = npz[_FORMAT_KEY].tobytes().decode()
        if fmt != FORMAT:
            raise ValueError(f"{file}: artifact format {fmt!r}, expected {FORMAT!r}.")
        module = npz[_MODULE].tobytes()
        count = sum(1 for k in npz.files if k.startswith("p"))
        params = [npz[f"p{i}"] for i in range(count)]
    exported = jax_export.deserialize(bytearray(module))
    return StableHLOFunction(exported, params)
