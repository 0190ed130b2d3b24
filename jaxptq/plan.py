"""QuantPlan: every quantization decision, the one artifact rewrite, export and reports read.

A plan saves as a folder holding `plan.json` (decisions, scales as lists) and
`arrays.npz` (integer weights, packed below 8 bits when `enable_encode`). Loading reads
the npz with `allow_pickle=False`, so a plan file can never run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from jaxptq import atomic, qmath
from jaxptq.config import QuantConfig

PLAN_VERSION = 1


@dataclasses.dataclass(eq=False)
class SitePlan:
    """What happens at one site. Arrays are NumPy; shapes follow the weight."""

    name: str
    primitive: str
    weight_shape: tuple[int, ...]
    skip_reason: str | None = None  # None means the site is quantized
    bits: int | None = None
    channel_axes: tuple[int, ...] = ()  # weight axes that carry their own scale
    weight_scale: np.ndarray | None = None  # weight-shaped, contracting axes of size 1
    weight_q: np.ndarray | None = None  # signed integers in the smallest dtype
    # "static": calibrated scale / zero point; "dynamic_tensor" / "dynamic_row": at run time.
    act_mode: str | None = None
    act_scale: float | None = None
    act_zero_point: int | None = None
    act_range: tuple[float, float] | None = None
    act_symmetric: bool = False
    # The site's output quantized to int8 too (after its bias and clip), for a target whose
    # integer kernels produce int8 where the output feeds a float op (`passes.full`).
    out_act_scale: float | None = None
    out_act_zero_point: int | None = None
    out_act_range: tuple[float, float] | None = None
    bias_correction: np.ndarray | None = None  # broadcastable to the site's output

    @property
    def quantized(self) -> bool:
        return self.skip_reason is None

    @property
    def int8_compute(self) -> bool:
        """True when the site runs as an i8 x i8 -> i32 dot or convolution."""
        return self.quantized and self.act_mode is not None

    @property
    def weight_elements(self) -> int:
        return int(np.prod(self.weight_shape))

    def weight_bytes(self, packed: bool) -> int:
        """Stored size of the weight: packed bits, the integer dtype, or float32."""
        if not self.quantized or self.bits is None:
            return 4 * self.weight_elements
        if packed and self.bits < 8:
            body = qmath.packed_size(self.weight_elements, self.bits)
        else:
            body = qmath.storage_dtype(self.bits).itemsize * self.weight_elements
        assert self.weight_scale is not None
        return body + 4 * self.weight_scale.size


_ARRAY_FIELDS = ("weight_scale", "weight_q", "bias_correction")


@dataclasses.dataclass(eq=False)
class AddPlan:
    """A residual Add the program runs on int8 codes, as a target's `QLinearAdd` does
    (`jaxptq.qadd`): its inputs' quantization and its output's."""

    name: str  # the add's scope: the ONNX Add node's name
    input_scales: tuple[float, float]
    input_zero_points: tuple[int, int]
    out_scale: float
    out_zero_point: int
    out_range: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AddPlan:
        return cls(
            d["name"],
            (float(d["input_scales"][0]), float(d["input_scales"][1])),
            (int(d["input_zero_points"][0]), int(d["input_zero_points"][1])),
            float(d["out_scale"]),
            int(d["out_zero_point"]),
            (float(d["out_range"][0]), float(d["out_range"][1])),
        )


@dataclasses.dataclass(eq=False)
class QuantPlan:
    """The decisions of one `ptq` run: one `SitePlan` per site, in program order, and the
    Adds run on codes."""

    config: QuantConfig
    sites: list[SitePlan]
    notes: list[str] = dataclasses.field(default_factory=list)
    adds: list[AddPlan] = dataclasses.field(default_factory=list)

    @property
    def quant_type(self) -> str:
        return self.config.quant_type

    @property
    def packed(self) -> bool:
        return self.config.common_quant_param.enable_encode

    def __getitem__(self, name: str) -> SitePlan:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)

    @property
    def quantized_sites(self) -> list[SitePlan]:
        return [s for s in self.sites if s.quantized]

    def weight_bytes(self) -> tuple[int, int]:
        """(float32 bytes, stored bytes) over all site weights."""
        before = sum(4 * s.weight_elements for s in self.sites)
        after = sum(s.weight_bytes(self.packed) for s in self.sites)
        return before, after

    def average_bits(self) -> float:
        """Mean bits per weight element over all sites (float sites count as 32)."""
        total = sum(s.weight_elements for s in self.sites)
        bits = sum(
            s.weight_elements * (s.bits if s.quantized and s.bits else 32) for s in self.sites
        )
        return bits / max(total, 1)

    def table(self) -> str:
        """A readable table: one row per site."""
        header = ("site", "op", "weight", "bits", "axes", "activation", "note")
        rows = [header]
        for s in self.sites:
            op = {"dot_general": "dot", "conv_general_dilated": "conv"}.get(
                s.primitive, s.primitive
            )
            if s.act_mode == "static":
                act = f"s={s.act_scale:.3g} zp={s.act_zero_point}"
                if s.out_act_scale is not None:
                    act += f" -> s={s.out_act_scale:.3g} zp={s.out_act_zero_point}"
            else:
                act = s.act_mode or "float"
            rows.append(
                (
                    s.name,
                    op,
                    "x".join(map(str, s.weight_shape)),
                    str(s.bits) if s.quantized else "-",
                    ",".join(map(str, s.channel_axes)) if s.quantized else "-",
                    act if s.quantized else "-",
                    s.skip_reason or ("bias corrected" if s.bias_correction is not None else ""),
                )
            )
        for a in self.adds:
            pairs = zip(a.input_scales, a.input_zero_points, strict=True)
            act = " + ".join(f"s={s:.3g} zp={z}" for s, z in pairs)
            act += f" -> s={a.out_scale:.3g} zp={a.out_zero_point}"
            rows.append((a.name, "add", "-", "8", "-", act, "on int8 codes"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        before, after = self.weight_bytes()
        n = len(self.quantized_sites)
        lines.append(
            f"{self.quant_type}: {n}/{len(self.sites)} sites quantized, weights {before:,} -> "
            f"{after:,} bytes ({after / max(before, 1):.1%}), {self.average_bits():.2f} bits/weight"
            + (f", {len(self.adds)} Adds on int8 codes" if self.adds else "")
        )
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the plan folder atomically (a temporary folder, then a rename)."""
        meta, arrays = self._to_json_and_arrays()
        with atomic.folder(path) as tmp:
            (tmp / "plan.json").write_text(json.dumps(meta, indent=1))
            np.savez(str(tmp / "arrays.npz"), **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> QuantPlan:
        folder = pathlib.Path(path)
        meta_file = folder / "plan.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder} is not a saved QuantPlan: `plan.json` is missing.")
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != PLAN_VERSION:
            raise ValueError(
                f"{meta_file}: plan version {meta.get('version')!r}, expected {PLAN_VERSION}."
            )
        with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        config = QuantConfig.create(**meta["config"])
        sites = [
            _site_from_json(i, d, arrays, config.common_quant_param.enable_encode)
            for i, d in enumerate(meta["sites"])
        ]
        adds = []
        for i, d in enumerate(meta.get("adds", [])):
            try:
                adds.append(AddPlan.from_json(d))
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{meta_file}: `adds[{i}]` is not an Add plan ({type(err).__name__}: "
                    f"{err}); expected the fields {[f.name for f in dataclasses.fields(AddPlan)]}."
                ) from err
        return cls(config, sites, list(meta.get("notes", [])), adds)

    def _to_json_and_arrays(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays: dict[str, np.ndarray] = {}
        sites = []
        for i, s in enumerate(self.sites):
            d: dict[str, Any] = {}
            for f in dataclasses.fields(s):
                value = getattr(s, f.name)
                if f.name in _ARRAY_FIELDS:
                    if value is not None:
                        if (
                            f.name == "weight_q"
                            and self.packed
                            and s.bits is not None
                            and s.bits < 8
                        ):
                            arrays[f"{i}.weight_q.packed"] = qmath.pack(value, s.bits)
                        else:
                            arrays[f"{i}.{f.name}"] = value
                    continue
                d[f.name] = list(value) if isinstance(value, tuple) else value
            sites.append(d)
        config = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.config.to_flat().items()
        }
        return {
            "version": PLAN_VERSION,
            "config": config,
            "sites": sites,
            "notes": self.notes,
            "adds": [a.to_json() for a in self.adds],
        }, arrays


def _site_from_json(
    i: int, d: dict[str, Any], arrays: dict[str, np.ndarray], packed: bool
) -> SitePlan:
    kwargs = dict(d)
    for key in ("weight_shape", "channel_axes", "act_range", "out_act_range"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    for name in _ARRAY_FIELDS:
        if f"{i}.{name}" in arrays:
            kwargs[name] = arrays[f"{i}.{name}"]
    if f"{i}.weight_q.packed" in arrays:
        count = int(np.prod(kwargs["weight_shape"]))
        q = qmath.unpack(arrays[f"{i}.weight_q.packed"], kwargs["bits"], count)
        kwargs["weight_q"] = np.asarray(q).reshape(kwargs["weight_shape"])
    return SitePlan(**kwargs)
