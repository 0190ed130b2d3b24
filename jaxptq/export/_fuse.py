"""Calibrating the extra tensors a runtime needs quantized to fuse every site into integer
kernels (`export_onnx(..., fuse_calib=...)`).

The plan quantizes what the JAX program quantizes: the input of each site. onnxruntime fuses
`DQ -> Conv -> Q` only when the output is quantized too, and a residual `Add` only when its
inputs and output are; a site whose output feeds an Add therefore stays a float convolution.
Quantizing those tensors as well (ranges measured by onnxruntime on the float model) makes
the whole network integer, at the price of rounding the JAX program does not do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from jaxptq.export._qparams import ActQuant, act_quant_from
from jaxptq.passes.full import activation_params
from jaxptq.targets import TargetProfile


def calibrate_tensors(
    model: onnx.ModelProto,
    names: Sequence[str],
    calib_data: Iterable[Any],
    target: TargetProfile,
) -> dict[str, ActQuant]:
    """Min/max of each named float tensor over `calib_data`, as the target's int8 params."""
    import onnxruntime as ort

    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
    )
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    count = 0
    for sample in calib_data:
        arrays = sample if isinstance(sample, tuple) else (sample,)
        if len(arrays) != len(inputs):
            raise ValueError(
                f"a calibration sample has {len(arrays)} arrays; the model takes "
                f"{len(inputs)} inputs {inputs}."
            )
        feed = {k: np.asarray(a) for k, a in zip(inputs, arrays, strict=True)}
        for n, v in zip(names, sess.run(list(names), feed), strict=True):
            lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
        count += 1
    if count == 0:
        raise ValueError("`fuse_calib` is empty: pass the calibration samples given to `ptq`.")
    out = {}
    for n in names:
        scale, zp = activation_params(lo[n], hi[n], target.act_symmetric)
        out[n] = act_quant_from(scale, zp, target)
    return out
