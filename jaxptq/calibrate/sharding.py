"""Data-parallel calibration: rows split over a 1-D device mesh, statistics all-reduced.

With several devices each step runs under `jax.shard_map` over a mesh with one axis,
`"data"` (one device: a plain `jit`, see `sharded_step`): every device
evaluates the sites on its share of the rows and the observers combine the device-local
statistics with `psum` / `pmin` / `pmax` over that axis, so the statistics that come out
are replicated and equal to a single-device run's (each device always evaluates the same
number of rows, so a row is computed by the same program at the same position either way).

Several hosts: start every process with `jax.distributed.initialize(...)`, then call
`calibrate(..., devices=jax.devices())` in every process, each feeding its own share of
the calibration set (the same number of batches of the same sizes in every process).
The mesh then spans all hosts' devices, each process's rows go to its local devices
(`jax.make_array_from_process_local_data`), and the all-reduces cross hosts, so every
process gets the same, complete statistics::

    jax.distributed.initialize()  # coordinator address etc. from the environment
    my_batches = batches[jax.process_index() :: jax.process_count()]
    result = calibrate(site_fn, my_batches, "KL", devices=jax.devices())
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None) -> Mesh:
    """A 1-D mesh named `"data"`; `None` means every local device of this process."""
    devs = list(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("`devices` is empty; pass at least one jax.Device or None.")
    return Mesh(np.array(devs), (AXIS,))


def local_device_count(mesh: Mesh) -> int:
    """How many of the mesh's devices this process feeds."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def local_rows(mesh: Mesh, rows_per_device: int) -> np.ndarray:
    """Where this process's rows sit along a step's global row axis, in local order."""
    mine = [k for k, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    return (np.asarray(mine)[:, None] * rows_per_device + np.arange(rows_per_device)).ravel()


def sharded_step(
    make_local: Callable[[str | None], Callable[..., Any]], mesh: Mesh, num_args: int
) -> Callable[..., Any]:
    """Jits `local_step(stats, valid, *args) -> (stats, row_flags)` over the data mesh.

    `make_local(axis_name)` builds the step; its observers combine over `axis_name`.
    `stats` is replicated, `valid` and `args` are split along their leading (row) axis,
    and `row_flags` (sites, rows) is gathered back to every device. A one-device mesh
    gets a plain `jit` with no axis: the same step under `shard_map` ran 20-25% slower on
    XLA:CPU (EfficientNet-Lite0's KL step: 1.17 s against 0.93 s for 16 photos), and with
    one device there is nothing to combine.
    """
    if mesh.size == 1:
        return jax.jit(make_local(None), donate_argnums=0)
    rows = P(AXIS)
    step = jax.shard_map(
        make_local(AXIS),
        mesh=mesh,
        in_specs=(P(), rows) + (rows,) * num_args,
        out_specs=(P(), P()),
        # The site functions re-bind raw primitives (jaxptq.graph.evaluate), which mix
        # replicated weights with row-split activations without `pvary`.
        check_vma=False,
    )
    return jax.jit(step, donate_argnums=0)


def put_rows(mesh: Mesh, arrays: Sequence[np.ndarray]) -> list[jax.Array]:
    """This process's rows of each array, placed on its devices of the mesh."""
    sharding = NamedSharding(mesh, P(AXIS))
    return [jax.make_array_from_process_local_data(sharding, a) for a in arrays]


def put_replicated(mesh: Mesh, tree: Any) -> Any:
    """The same values on every device of the mesh (every process passes the same)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def fetch_replicated(tree: Any) -> Any:
    """Host copies of replicated arrays, read from a local device (works across hosts)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
