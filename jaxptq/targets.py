"""Target profiles: the integer conventions each backend accepts.

Where each rule comes from:
- `CPU`: onnxruntime on x86 fuses QDQ into integer kernels for U8 activations x S8
  weights (its MLAS kernels); signed activations left half the convolutions in float
  in our measurement, so CPU uses unsigned asymmetric activations.
- `NVGPU`: TensorRT takes symmetric signed int8 activations and per-channel symmetric
  weights (its explicit-quantization docs require zero points of 0).
- `DSP`: Hexagon-style fixed-point DSP toolchains take uint8 asymmetric activations,
  int8 symmetric per-channel weights and int32 biases.
- `ASCEND`: the Ascend AMCT/ATC int8 flow takes int8 activations with an offset,
  int8 symmetric per-channel weights and int32 biases.

`jaxptq.export_onnx` writes these conventions into the model (docs/export.md has the table);
`TargetProfile.cannot_express` is what the FULL_QUANT pass checks at quantization time.
"""

from __future__ import annotations

import dataclasses

from jaxptq.graph import Site
from jaxptq.layout import site_layout


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    name: str
    act_unsigned: bool  # activations exported as uint8 (zero point shifted by 128)
    act_symmetric: bool  # activation zero point fixed at 0
    per_channel_weights: bool = True
    bias_int32: bool = True
    # Every int8 site's output is int8 too, where it feeds a float op (`passes.full`):
    # the named targets' kernels take int8 in and give int8 out.
    quantize_outputs: bool = True

    def cannot_express(self, site: Site, per_channel: bool) -> str | None:
        """Why this target's integer kernels cannot run `site`, or None.

        Per-channel weight scales must vary along one axis: ONNX DequantizeLinear, QLinearConv
        and TensorRT take one `axis`, so e.g. a (D, heads, head_dim) kernel is left float.
        """
        try:
            axes = site_layout(site).weight_channel_axes
        except NotImplementedError as err:
            return f"not supported: {err}"
        if per_channel and self.per_channel_weights and len(axes) > 1:
            return (
                f"target {self.name} takes per-channel weight scales along one axis; this "
                f"weight keeps axes {axes} (reshape it to 2-D or set per_channel=false)"
            )
        return None


TARGETS: dict[str | None, TargetProfile] = {
    None: TargetProfile(
        "GENERIC", act_unsigned=False, act_symmetric=False, bias_int32=False, quantize_outputs=False
    ),
    "ASCEND": TargetProfile("ASCEND", act_unsigned=False, act_symmetric=False),
    "CPU": TargetProfile("CPU", act_unsigned=True, act_symmetric=False, bias_int32=False),
    "DSP": TargetProfile("DSP", act_unsigned=True, act_symmetric=False),
    "NVGPU": TargetProfile("NVGPU", act_unsigned=False, act_symmetric=True, bias_int32=False),
}
