"""One streaming pass: rows re-cut into fixed microbatches, one jitted step per microbatch.

Why fixed microbatches: every row is evaluated by the same compiled program at the same
position whatever the caller's batch sizes (one batch of 100, 100 batches of 1, uneven
splits), so activations and hence every statistic are bitwise identical across splits,
and only one program is compiled. The last microbatch is padded by repeating its last
row, and the padded rows are masked out of every statistic.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxptq.calibrate import sharding
from jaxptq.calibrate.observers import Observer, Stats, nonfinite_rows, site_batch

logger = logging.getLogger(__name__)

# Rows each device evaluates per step: small enough for big activations, large enough
# to keep a step's overhead low. Fixed, so results never depend on the caller's batches.
ROWS_PER_DEVICE = 16

_IN_FLIGHT = 2  # steps queued on the devices at most: overlap without unbounded inputs

Batch = tuple[np.ndarray, ...]
SiteFn = Callable[..., Mapping[str, jax.Array]]


class Microbatch(NamedTuple):
    args: Batch  # each (rows, ...), padded
    num_valid: int  # leading rows that are real
    batch_index: np.ndarray  # (num_valid,) the caller's batch each real row came from


class PassResult(NamedTuple):
    stats: dict[str, Stats]
    num_rows: int
    nonfinite: tuple[str, int] | None  # (site, batch index) of the first NaN/Inf seen


def as_batch(item: Any, index: int) -> Batch:
    """A batch as a tuple of host arrays sharing the leading (row) axis."""
    parts = item if isinstance(item, tuple | list) else (item,)
    arrays = tuple(np.asarray(a) for a in parts)
    if not arrays or any(a.ndim == 0 for a in arrays):
        raise ValueError(
            f"batch {index}: expected a tuple of arrays with a leading batch axis, got "
            f"{[np.shape(a) for a in arrays]}."
        )
    sizes = {a.shape[0] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"batch {index}: arguments disagree on the batch size: {sorted(sizes)}.")
    return arrays


def _signature(batch: Batch) -> tuple[Any, ...]:
    return tuple((a.shape[1:], a.dtype) for a in batch)


def _pad(arrays: list[Batch], rows: int) -> Batch:
    out = []
    for parts in zip(*arrays, strict=True):
        a = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if a.shape[0] < rows:
            a = np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], axis=0)])
        out.append(a)
    return tuple(out)


def microbatches(
    batches: Iterable[Any], rows: int, on_batch: Callable[[], None] | None = None
) -> Iterator[Microbatch]:
    """Re-cuts the caller's batches into microbatches of exactly `rows` rows.

    A batch whose argument shapes (past the row axis) or dtypes differ from the rows
    pending closes the pending microbatch first, so such data still streams (with one
    compiled program per signature).
    """
    pending: list[Batch] = []
    owners: list[np.ndarray] = []
    count = 0
    for index, item in enumerate(batches):
        batch = as_batch(item, index)
        if pending and _signature(batch) != _signature(pending[0]):
            yield Microbatch(_pad(pending, rows), count, np.concatenate(owners))
            pending, owners, count = [], [], 0
        n, start = batch[0].shape[0], 0
        while start < n:
            take = min(rows - count, n - start)
            pending.append(tuple(a[start : start + take] for a in batch))
            owners.append(np.full(take, index))
            count, start = count + take, start + take
            if count == rows:
                yield Microbatch(_pad(pending, rows), count, np.concatenate(owners))
                pending, owners, count = [], [], 0
        if on_batch is not None:
            on_batch()
    if count:
        yield Microbatch(_pad(pending, rows), count, np.concatenate(owners))


def _local_step(
    site_fn: SiteFn, observer: Observer, names: list[str], num_devices: int, axis: str | None
) -> Callable[..., Any]:
    def step(stats: dict[str, Stats], valid: jax.Array, *args: jax.Array) -> Any:
        acts = site_fn(*args)
        new, flags = {}, []
        for name in names:
            # Behind a barrier: it kept every statistic's fusion from re-reading an
            # activation through a transpose (KL, 48 photos: 11.2 -> 8.4 s). Since
            # convolution inputs are observed channels last (probe.site_inputs) it no
            # longer changes EfficientNet-Lite0's step; other transposed inputs may need it.
            x = jax.lax.optimization_barrier(jnp.asarray(acts[name], jnp.float32))
            batch = site_batch(x, valid)
            new[name] = observer.update(stats[name], batch, axis)
            flags.append(nonfinite_rows(batch))
        local = jnp.stack(flags)
        if axis is None:
            return new, local
        # Every device's row flags, replicated: each writes its block, a psum joins them.
        local = local.astype(jnp.int32)
        block = jax.lax.axis_index(axis) * local.shape[1]
        rows = jnp.zeros((len(names), num_devices * local.shape[1]), jnp.int32)
        rows = jax.lax.dynamic_update_slice(rows, local, (0, block))
        return new, jax.lax.psum(rows, axis) > 0

    return step


@functools.lru_cache(maxsize=8)
def _compiled_step(
    site_fn: SiteFn, observer: Observer, names: tuple[str, ...], mesh: Any, num_args: int
) -> Callable[..., Any]:
    """Kept across calls, so calibrating the same function again reuses its programs."""

    def make_local(axis: str | None) -> Callable[..., Any]:
        return _local_step(site_fn, observer, list(names), mesh.size, axis)

    return sharding.sharded_step(make_local, mesh, num_args)


def site_shapes(site_fn: SiteFn, args: Batch) -> dict[str, tuple[int, ...]]:
    """Every site's activation shape for one device's rows, checked to lead with rows."""
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    out = jax.eval_shape(site_fn, *specs)
    if not isinstance(out, Mapping) or not out:
        raise TypeError(
            f"`site_activations` must return a non-empty dict {{site name: activation}}, "
            f"got {type(out).__name__}."
        )
    rows = args[0].shape[0]
    shapes = {}
    for name in sorted(out):
        shape = tuple(out[name].shape)
        if not shape or shape[0] != rows:
            raise ValueError(
                f"site `{name}`: activation shape {shape} does not lead with the batch axis "
                f"({rows} rows in); every activation needs one row per input row "
                f"(wrap a single-example function in `jax.vmap`)."
            )
        shapes[name] = shape
    return shapes


def run_pass(
    site_fn: SiteFn,
    observer: Observer,
    init_stats: Callable[[dict[str, tuple[int, ...]]], dict[str, Stats]],
    batches: Iterable[Any],
    mesh: jax.sharding.Mesh,
    *,
    rows_per_device: int = ROWS_PER_DEVICE,
    desc: str = "calibrate",
    progress: bool = True,
    drain: Callable[[dict[str, Stats]], dict[str, Stats]] | None = None,
    drain_elements: int | None = None,
) -> PassResult:
    """Streams `batches` through one jitted step that folds every site into `observer`.

    Args:
        site_fn: traceable `(*batch_args) -> {site: activation}`.
        observer: the statistic kept for every site.
        init_stats: builds the empty per-site statistics from the sites' shapes (known
            after tracing the first microbatch).
        batches: tuples of arrays with a leading batch axis.
        mesh: the 1-D data mesh the rows are split over.
        rows_per_device: microbatch rows per device.
        desc: progress bar label.
        progress: show a tqdm bar over the caller's batches.
        drain: called with the statistics (returning fresh ones) before any site would
            have folded in more than `drain_elements` elements since the last drain.
        drain_elements: see `drain`.
    """
    rows = rows_per_device * sharding.local_device_count(mesh)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress)
    names: list[str] = []
    stats: dict[str, Stats] = {}
    step: Callable[..., Any] | None = None
    flags: list[tuple[jax.Array, int, np.ndarray]] = []  # no inputs kept: memory stays flat
    num_rows, since_drain, per_row = 0, 0, 1
    try:
        for mb in microbatches(batches, rows, on_batch=bar.update):
            if step is None:
                local = tuple(a[:rows_per_device] for a in mb.args)
                shapes = site_shapes(site_fn, local)
                names = list(shapes)
                per_row = max(int(np.prod(s[1:], dtype=np.int64)) for s in shapes.values())
                stats = sharding.put_replicated(mesh, init_stats(shapes))
                step = _compiled_step(site_fn, observer, tuple(names), mesh, len(mb.args))
                logger.debug(
                    "calibration pass %r: %d sites, %d rows a step", desc, len(names), rows
                )
            if drain is not None and drain_elements is not None:
                if (since_drain + mb.num_valid) * per_row > drain_elements:
                    stats = sharding.put_replicated(mesh, drain(stats))
                    since_drain = 0
                since_drain += mb.num_valid
            valid = np.arange(rows) < mb.num_valid
            placed = sharding.put_rows(mesh, (valid, *mb.args))
            stats, row_flags = step(stats, *placed)
            flags.append((row_flags, mb.num_valid, mb.batch_index))
            if len(flags) > _IN_FLIGHT:
                # Dispatch is asynchronous: unchecked, the loop would queue every
                # microbatch's inputs ahead of a slow model, and memory would grow with
                # the calibration set.
                flags[-1 - _IN_FLIGHT][0].block_until_ready()
            num_rows += mb.num_valid
    finally:
        bar.close()
    columns = sharding.local_rows(mesh, rows_per_device)
    return PassResult(stats, num_rows, _first_nonfinite(flags, names, columns))


def _first_nonfinite(
    flags: list[tuple[jax.Array, int, np.ndarray]], names: list[str], columns: np.ndarray
) -> tuple[str, int] | None:
    """Checked on the host after the pass, so the steps never wait on a device flag.

    Returns the site and the caller's batch index of the first bad row; the batch index
    is -1 when the row belongs to another process.
    """
    for row_flags, num_valid, batch_index in flags:
        every = sharding.fetch_replicated(row_flags)
        bad = every[:, columns][:, :num_valid]
        if bad.any():
            site, row = min(np.argwhere(bad).tolist(), key=lambda sr: (sr[1], sr[0]))
            return names[site], int(batch_index[row])
        if every.any():
            return names[int(np.argwhere(every)[0, 0])], -1
    return None
