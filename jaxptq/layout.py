"""Axis bookkeeping for sites: which weight axes contract, and where a per-channel array
lands in the site's output.

A rule table keyed by primitive; each rule reads the equation's dimension numbers, so
every layout (NHWC/HWIO Flax convs, NCHW/OIHW ONNX convs, einsum dot_generals) is handled
by one code path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax import lax

from jaxptq.graph import Site


@dataclasses.dataclass(frozen=True)
class SiteLayout:
    """How a site's operands map to its output.

    `weight_contracting` are the weight axes summed over; the others keep per-channel
    scales. `*_to_out` give, for each operand axis that survives into the output, its
    output axis (contracting axes map to None).
    """

    weight_contracting: tuple[int, ...]
    act_contracting: tuple[int, ...]
    weight_to_out: tuple[int | None, ...]
    act_to_out: tuple[int | None, ...]
    out_ndim: int

    @property
    def weight_channel_axes(self) -> tuple[int, ...]:
        return tuple(a for a, o in enumerate(self.weight_to_out) if o is not None)


def _dot_layout(site: Site) -> SiteLayout:
    (lc, rc), (lb, rb) = site.node.params["dimension_numbers"]
    lhs, rhs = site.node.inputs[:2]
    nl, nr = len(lhs.aval.shape), len(rhs.aval.shape)
    l_free = [a for a in range(nl) if a not in lc and a not in lb]
    r_free = [a for a in range(nr) if a not in rc and a not in rb]
    nb = len(lb)
    lhs_map: list[int | None] = [None] * nl
    rhs_map: list[int | None] = [None] * nr
    for i, (a, b) in enumerate(zip(lb, rb, strict=True)):
        lhs_map[a], rhs_map[b] = i, i
    for i, a in enumerate(l_free):
        lhs_map[a] = nb + i
    for i, a in enumerate(r_free):
        rhs_map[a] = nb + len(l_free) + i
    out_ndim = nb + len(l_free) + len(r_free)
    contract = (tuple(lc), tuple(rc))
    w = site.weight_index
    return SiteLayout(
        weight_contracting=contract[w],
        act_contracting=contract[1 - w],
        weight_to_out=tuple((lhs_map, rhs_map)[w]),
        act_to_out=tuple((lhs_map, rhs_map)[1 - w]),
        out_ndim=out_ndim,
    )


def _conv_layout(site: Site) -> SiteLayout:
    if site.weight_index != 1:
        raise NotImplementedError("convolution whose weight is the lhs operand")
    lhs_spec, rhs_spec, out_spec = site.node.params["dimension_numbers"]
    nd = len(lhs_spec)
    w_map: list[int | None] = [None] * nd
    w_map[rhs_spec[0]] = out_spec[1]
    x_map: list[int | None] = [None] * nd
    x_map[lhs_spec[0]] = out_spec[0]
    return SiteLayout(
        weight_contracting=tuple(a for a in range(nd) if a != rhs_spec[0]),
        act_contracting=tuple(a for a in range(nd) if a != lhs_spec[0]),
        weight_to_out=tuple(w_map),
        act_to_out=tuple(x_map),
        out_ndim=nd,
    )


_LAYOUT_RULES: dict[object, Callable[[Site], SiteLayout]] = {
    lax.conv_general_dilated_p: _conv_layout,
    lax.dot_general_p: _dot_layout,
}


def site_layout(site: Site) -> SiteLayout:
    return _LAYOUT_RULES[site.node.primitive](site)


def to_output(arr: Any, axis_map: tuple[int | None, ...], out_ndim: int) -> Any:
    """Re-lays an operand-shaped array (contracting axes of size 1) for broadcasting
    against the site's output. Works on NumPy and traced arrays alike."""
    kept = sorted((o, a) for a, o in enumerate(axis_map) if o is not None)
    order = [a for _, a in kept] + [a for a, o in enumerate(axis_map) if o is None]
    shape = [1] * out_ndim
    for o, a in kept:
        shape[o] = arr.shape[a]
    return arr.transpose(order).reshape(shape)
