"""`export_onnx`: a quantized function as an ONNX model (QDQ or QOperator), for one target."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import onnx

from jaxptq import atomic
from jaxptq.export._context import SiteRef
from jaxptq.export._outputs import planned_outputs
from jaxptq.export._rewrite_onnx import fusable_outputs, quantize_graph
from jaxptq.importers.onnx._function import nodes_by_site_name, site_scope
from jaxptq.rewrite import QuantizedFunction
from jaxptq.targets import TARGETS, TargetProfile

logger = logging.getLogger(__name__)

FORMS = ("qdq", "qoperator")
# QuantizeLinear/DequantizeLinear per axis need opset 13; INT4 and INT16 weights need 21.
_MIN_OPSET = 13
_SUB_BYTE_OPSET = 21
_IR_FOR_OPSET = {13: 7, 21: 10}


def resolve_target(qfn: QuantizedFunction, target: str | None) -> TargetProfile:
    name = target if target is not None else qfn.plan.config.full_quant_param.target_device
    if name not in TARGETS:
        known = ", ".join(k for k in TARGETS if k is not None)
        raise ValueError(f"`target` = {name!r} is not a target profile; choose one of {known}.")
    return TARGETS[name]


def _code_type(target: TargetProfile) -> str:
    return "uint8" if target.act_unsigned else "int8"


def check_plan_fits(qfn: QuantizedFunction, target: TargetProfile) -> None:
    """A plan made for asymmetric activations cannot be exported to a symmetric target;
    one whose Adds run on codes of the other signedness still exports, with a warning."""
    planned = TARGETS[qfn.plan.config.full_quant_param.target_device]
    if qfn.plan.adds and planned.act_unsigned != target.act_unsigned:
        logger.warning(
            "the plan computes its %d Adds as %s's runtime does, on %s codes; %s's runtime "
            "rounds them on %s codes, so its outputs can differ slightly (ptq with "
            "target_device=%r agrees exactly)",
            len(qfn.plan.adds),
            planned.name,
            _code_type(planned),
            target.name,
            _code_type(target),
            target.name,
        )
    if not target.act_symmetric:
        return
    for sp in qfn.plan.quantized_sites:
        zero_points = {sp.act_zero_point, sp.out_act_zero_point} - {0, None}
        if sp.act_mode == "static" and zero_points:
            raise ValueError(
                f"target {target.name} takes symmetric activations (zero point 0), but site "
                f"`{sp.name}` has zero point {zero_points.pop()}: the plan was made for "
                f"target_device={qfn.plan.config.full_quant_param.target_device!r}. Run "
                f"`ptq` with target_device={target.name!r}."
            )


def source_path(fn: Any) -> pathlib.Path | None:
    """The file an imported ONNX model was read from, when known."""
    path = getattr(fn, "path", None)
    if path is not None:
        return pathlib.Path(path)
    label = getattr(fn, "_label", "")
    if isinstance(label, str) and label.startswith("`") and label.endswith("`"):
        return pathlib.Path(label[1:-1])
    return None


def _onnx_refs(qfn: QuantizedFunction, model: onnx.ModelProto) -> dict[str, SiteRef]:
    """Matches each site of an imported model to its Conv/Gemm/MatMul node by name."""
    graph = qfn._graphs.first()
    nodes = nodes_by_site_name(model)
    refs: dict[str, SiteRef] = {}
    for site, plan in zip(graph.sites, qfn.plan.sites, strict=True):
        if not plan.quantized:
            continue
        node = nodes.get(site_scope(site.name))
        if node is None:
            raise NotImplementedError(
                f"site `{site.name}` matches no ONNX node by name (a node that produced "
                "several sites, e.g. `name#1`, cannot be exported yet)."
            )
        refs[node.name] = _node_ref(node, site, plan)
    return refs


def _node_ref(node: onnx.NodeProto, site: Any, plan: Any) -> SiteRef:
    ndim = len(plan.weight_shape)
    same = tuple(range(ndim))
    if node.op_type == "Conv":
        return SiteRef(plan, site, 1, 0, same)
    if node.op_type in ("Gemm", "MatMul"):
        w = site.weight_index
        transposed = False
        if node.op_type == "Gemm":
            attr = "transB" if w == 1 else "transA"
            transposed = any(a.name == attr and a.i for a in node.attribute)
        return SiteRef(plan, site, w, 1 - w, tuple(reversed(same)) if transposed else same)
    raise NotImplementedError(
        f"site `{site.name}` comes from a {node.op_type} node; export handles the sites of "
        "Conv, Gemm and MatMul nodes."
    )


def _needed_opset(qfn: QuantizedFunction) -> int:
    """INT4 (bits <= 4) and INT16 (bits > 8) weight initializers need opset 21."""
    odd = any(sp.bits is not None and not 4 < sp.bits <= 8 for sp in qfn.plan.quantized_sites)
    return _SUB_BYTE_OPSET if odd else _MIN_OPSET


def _with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model at `opset` or above (converted by onnx's version converter when older)."""
    current = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= opset:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except Exception as err:  # the converter raises bare RuntimeErrors
        raise NotImplementedError(
            f"the model is at opset {current}; quantized export needs opset {opset}, and "
            f"onnx's version converter failed: {err}"
        ) from err
    converted.ir_version = max(converted.ir_version, _IR_FOR_OPSET.get(opset, 7))
    return converted


def build_model(
    qfn: QuantizedFunction,
    target: TargetProfile,
    form: str,
    example_args: tuple = (),
    fuse_calib: Iterable[Any] | None = None,
) -> onnx.ModelProto:
    """The quantized ONNX model of `qfn`, in memory."""
    model = getattr(qfn.fn, "model", None)
    if isinstance(model, onnx.ModelProto):
        source = _with_opset(model, _needed_opset(qfn))
        refs = _onnx_refs(qfn, source)
        extra = planned_outputs(qfn.plan, qfn._graphs.first(), source, refs, target)
    else:
        from jaxptq.export.onnx_translate import translate

        # Output quantization is planned for imported models only (`passes.full`).
        planned = [f"site `{sp.name}`" for sp in qfn.plan.sites if sp.out_act_scale is not None]
        planned += [f"Add `{a.name}`" for a in qfn.plan.adds]
        if planned:
            raise NotImplementedError(
                f"{planned[0]} quantizes its output, which only an imported ONNX model's "
                "export expresses; this function is translated from its jaxpr."
            )
        source, refs = translate(qfn, example_args)
        source = _with_opset(source, _needed_opset(qfn))
        extra = {}
    if fuse_calib is not None:
        from jaxptq.export._fuse import calibrate_tensors

        wanted = {t: q for t, q in fusable_outputs(source, refs, target).items() if t not in extra}
        extra |= calibrate_tensors(
            source, [t for t, q in wanted.items() if q is None], fuse_calib, target
        )
        extra |= {t: q for t, q in wanted.items() if q is not None}
    return quantize_graph(source, refs, target, form, extra)


def export_onnx(
    qfn: QuantizedFunction,
    path: str | os.PathLike[str],
    *example_args: Any,
    target: str | None = None,
    form: str = "qdq",
    fuse_calib: Iterable[Any] | None = None,
) -> pathlib.Path:
    """Writes the quantized function as an ONNX model.

    An imported ONNX model keeps its nodes, names and wiring, with quantization inserted at
    each quantized Conv/Gemm/MatMul node; a Flax or plain JAX function is translated from
    its traced graph (pass `example_args` when `qfn` was called at several shapes).

    Args:
        qfn: the result of `jaxptq.ptq`.
        path: the `.onnx` file to write (atomically; never the source model's file).
        *example_args: inputs fixing the traced shapes of a JAX function (optional).
        target: `CPU`, `NVGPU`, `DSP` or `ASCEND` (see `jaxptq.targets`); defaults to the
            plan's `target_device`.
        form: `"qdq"` (QuantizeLinear/DequantizeLinear around float ops) or `"qoperator"`
            (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger).
        fuse_calib: calibration samples (as given to `ptq`). When set, the outputs of
            sites that no later site quantizes, and residual Adds of them, are quantized
            too, with ranges measured on the float model, so that onnxruntime runs every
            convolution and Add in integers (faster; rounds where the JAX program does not).

    Returns:
        The path written.

    Example:
        >>> qfn = jaxptq.ptq(jaxptq.import_onnx("net.onnx"), calib, {"quant_type": "FULL_QUANT"})
        >>> jaxptq.export_onnx(qfn, "net_int8.onnx", target="CPU")
    """
    if form not in FORMS:
        raise ValueError(f"`form` = {form!r} is not valid; choose one of {', '.join(FORMS)}.")
    profile = resolve_target(qfn, target)
    check_plan_fits(qfn, profile)
    out = pathlib.Path(path)
    src = source_path(qfn.fn)
    if src is not None and out.resolve() == src.resolve():
        raise ValueError(
            f"refusing to write the quantized model over its source model `{src}`; "
            "choose another `path`."
        )
    model = build_model(qfn, profile, form, example_args, fuse_calib)
    onnx.checker.check_model(model, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out, model.SerializeToString())
    logger.info("wrote %s (%s, target %s)", out, form, profile.name)
    return out
