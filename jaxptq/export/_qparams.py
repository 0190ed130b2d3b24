"""A site plan restated in ONNX's terms for one target: integer types, scales, zero points."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
from onnx import TensorProto

from jaxptq.plan import SitePlan
from jaxptq.targets import TargetProfile

# One dtype table; the ONNX element type of each NumPy integer type we emit.
ONNX_TYPE: dict[np.dtype, int] = {
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int16): TensorProto.INT16,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(ml_dtypes.int4): TensorProto.INT4,
    np.dtype(np.float32): TensorProto.FLOAT,
}


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """How an activation is quantized in the exported model (a QuantizeLinear's inputs)."""

    scale: np.float32
    zero_point: np.ndarray  # 0-d, uint8 or int8: its dtype is the quantized type

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype


def act_quant(plan: SitePlan, target: TargetProfile) -> ActQuant:
    """The int8-domain scale and zero point of a static site, shifted to uint8 when the
    target wants unsigned activations (same scale, zero point + 128, same rounding)."""
    if plan.act_scale is None or plan.act_zero_point is None:
        raise ValueError(f"site `{plan.name}` has no static activation scale to export")
    return act_quant_from(plan.act_scale, plan.act_zero_point, target)


def act_quant_from(scale: float, zero_point: int, target: TargetProfile) -> ActQuant:
    """An int8-domain (scale, zero point) in the target's activation type."""
    zp = int(zero_point)
    if target.act_unsigned:
        return ActQuant(np.float32(scale), np.array(zp + 128, np.uint8))
    return ActQuant(np.float32(scale), np.array(zp, np.int8))


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """An integer weight in the site's (JAX) layout with its DequantizeLinear parameters."""

    q: np.ndarray  # int4 / int8 / int16 values, same shape as the float weight
    scale: np.ndarray  # 1-D along `axis`, or 0-d
    axis: int | None  # the weight axis with its own scale, None for one scale per tensor


def weight_storage(bits: int) -> np.dtype:
    """The narrowest ONNX integer type holding `bits`-bit signed weights: a 4-bit model
    stores INT4 (opset 21), so the file is really smaller."""
    if bits <= 4:
        return np.dtype(ml_dtypes.int4)
    return np.dtype(np.int8) if bits <= 8 else np.dtype(np.int16)


def weight_quant(plan: SitePlan) -> WeightQuant:
    """Reads the integer weight and its scales off the plan, checking ONNX can hold them."""
    assert plan.weight_q is not None and plan.weight_scale is not None and plan.bits
    if len(plan.channel_axes) > 1:
        raise NotImplementedError(
            f"site `{plan.name}`: weight scales vary along axes {plan.channel_axes}; ONNX "
            "DequantizeLinear takes one axis. Quantize it per tensor or skip it."
        )
    q = np.asarray(plan.weight_q).astype(weight_storage(plan.bits))
    if plan.channel_axes:
        axis = plan.channel_axes[0]
        scale = plan.weight_scale.reshape(-1).astype(np.float32)
        return WeightQuant(q, scale, axis)
    return WeightQuant(q, np.asarray(plan.weight_scale, np.float32).reshape(()), None)


def channel_vector(arr: np.ndarray, channels: int, what: str) -> np.ndarray:
    """A per-output-channel array (any broadcastable layout) as a 1-D vector of `channels`."""
    flat = np.asarray(arr, np.float32)
    if flat.size == 1:
        return np.full(channels, flat.reshape(()), np.float32)
    if flat.size != channels:
        raise ValueError(f"{what} has shape {flat.shape}, expected {channels} channel values")
    return flat.reshape(channels)
