"""Residual Adds on int8 codes (`jaxptq.qadd`): the code table is onnxruntime's QLinearAdd,
bit for bit, and a plan for a target runs a real model's residual Add the runtime's way."""

from __future__ import annotations

import csv
import json
import pathlib
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from jaxptq import QuantPlan, apply_plan, export_onnx, import_onnx, ptq, qadd, requant
from jaxptq.plan import AddPlan
from tests.onnx_checks import SIGNED_INT8, ops, ort_run, runtime_ops


def _ort_qlinearadd(plan: AddPlan, signed: bool) -> np.ndarray:
    """onnxruntime's QLinearAdd over every pair of codes, as `qadd.code_table` indexes them."""
    dtype, np_dtype, shift = (
        (TensorProto.INT8, np.int8, 0) if signed else (TensorProto.UINT8, np.uint8, 128)
    )
    raw = (np.arange(256) - 128 + shift).astype(np_dtype)
    a, b = np.repeat(raw, 256)[None], np.tile(raw, 256)[None]
    (s_a, s_b), (z_a, z_b) = plan.input_scales, plan.input_zero_points
    params = [
        helper.make_tensor(name, TensorProto.FLOAT, [], [value])
        for name, value in (("s_a", s_a), ("s_b", s_b), ("s_c", plan.out_scale))
    ] + [
        helper.make_tensor(name, dtype, [], [value + shift])
        for name, value in (("z_a", z_a), ("z_b", z_b), ("z_c", plan.out_zero_point))
    ]
    node = helper.make_node(
        "QLinearAdd",
        ["a", "s_a", "z_a", "b", "s_b", "z_b", "s_c", "z_c"],
        ["c"],
        domain="com.microsoft",
    )
    io = [helper.make_tensor_value_info(n, dtype, [1, 65536]) for n in "abc"]
    graph = helper.make_graph([node], "qladd", io[:2], io[2:], params)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    c = sess.run(None, {"a": a, "b": b})[0].ravel()
    return (c.astype(np.int32) + 128 - shift).astype(np.uint8)


def _random_plan(rng: np.random.Generator) -> AddPlan:
    scales = [float(np.float32(10 ** rng.uniform(-3, 0))) for _ in range(3)]
    zps = [int(rng.integers(-128, 128)) for _ in range(3)]
    return AddPlan("add", (scales[0], scales[1]), (zps[0], zps[1]), scales[2], zps[2], (-1.0, 1.0))


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_code_table_is_onnxruntimes_qlinearadd(signed):
    """Every pair of codes, for 20 random quantizations: exactly onnxruntime's codes
    (a plain float32 formula without fused multiply-adds missed on some)."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        plan = _random_plan(rng)
        np.testing.assert_array_equal(qadd.code_table(plan, signed), _ort_qlinearadd(plan, signed))


def _round_to_float32(v: Fraction) -> np.float32:
    """The float32 nearest to `v`, ties to even: the reference for one rounding."""
    guess = np.float32(float(v))
    candidates = [
        np.nextafter(guess, np.float32(-np.inf)),
        guess,
        np.nextafter(guess, np.float32(np.inf)),
    ]
    best = min(
        candidates,
        key=lambda c: (abs(Fraction(float(c)) - v), int(np.float32(c).view(np.int32)) & 1),
    )
    return np.float32(best)


finite32 = st.floats(-1e6, 1e6, width=32, allow_subnormal=False)


@settings(max_examples=300, deadline=None)
@given(st.integers(-300, 300), finite32, finite32)
def test_fma32_rounds_once(x, y, z):
    exact = Fraction(x) * Fraction(float(y)) + Fraction(float(z))
    got = qadd._fma32(np.float32(x), np.float32(y), np.float32(z))
    assert got == _round_to_float32(exact)


def test_apply_gives_the_table_codes_from_dequantized_inputs():
    rng = np.random.default_rng(3)
    plan = _random_plan(rng)
    args = qadd.add_args(plan, signed=False)
    codes = np.arange(256, dtype=np.uint8)
    a, b = np.repeat(codes, 256), np.tile(codes, 256)
    (s_a, s_b), (z_a, z_b) = plan.input_scales, plan.input_zero_points
    x_a = requant.dequantize(jnp.asarray(a), requant.dequantize_args(s_a, z_a))
    x_b = requant.dequantize(jnp.asarray(b), requant.dequantize_args(s_b, z_b))
    got = np.asarray(qadd.apply(args, [x_a, x_b]))
    want = np.asarray(requant.dequantize(jnp.asarray(args["table"]), args))
    np.testing.assert_array_equal(got, want)


def _residual(path: pathlib.Path) -> pathlib.Path:
    """Conv -> Relu -> Conv -> Add(skip) -> Conv -> GlobalAveragePool -> Flatten: a residual
    block whose Add reads two convolutions' outputs and feeds a third."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, s, shape).astype(np.float32), name)
        for name, s, shape in [
            ("w1", 0.3, (8, 3, 3, 3)),
            ("b1", 0.1, (8,)),
            ("w2", 0.2, (8, 8, 3, 3)),
            ("b2", 0.1, (8,)),
            ("w3", 0.2, (10, 8, 1, 1)),
        ]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv_a", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu_a"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv_b", pads=[1] * 4),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="skip"),
        helper.make_node("Conv", ["s", "w3"], ["c3"], name="conv_c"),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], name="flat"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])
    graph = helper.make_graph(nodes, "residual", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def residual(tmp_path) -> tuple[pathlib.Path, list[np.ndarray]]:
    """The residual block's file, and four calibration batches for it."""
    rng = np.random.default_rng(2)
    samples = [rng.normal(size=(8, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    return _residual(tmp_path / "residual.onnx"), samples


@pytest.mark.parametrize("target", ["DSP", "ASCEND"])
def test_target_plan_runs_the_residual_add_on_codes(tmp_path, residual, target):
    src, samples = residual
    fn = import_onnx(src)
    qfn = ptq(fn, samples, {"quant_type": "FULL_QUANT", "target_device": target})
    (add,) = qfn.plan.adds
    # its inputs: conv_b's output, and relu_a's, quantized as conv_b reads it
    assert add.name == "skip"
    assert add.input_scales[1] == qfn.plan["conv_b"].act_scale
    assert (add.out_scale, add.out_zero_point) == (
        qfn.plan["conv_c"].act_scale,
        qfn.plan["conv_c"].act_zero_point,
    )
    assert "skip" in str(qfn.plan) and "1 Adds on int8 codes" in str(qfn.plan)
    x = np.random.default_rng(3).normal(size=(64, 3, 8, 8)).astype(np.float32)
    want = np.asarray(qfn(x))
    # a saved plan keeps the Add and gives the same program
    qfn.plan.save(tmp_path / "plan")
    loaded = QuantPlan.load(tmp_path / "plan")
    assert [a.to_json() for a in loaded.adds] == [add.to_json()]
    np.testing.assert_array_equal(np.asarray(apply_plan(fn, loaded, samples[0])(x)), want)
    # onnxruntime runs it as QLinearAdd and computes the same logits; the QOperator form
    # writes the QLinearAdd itself, so int8 codes need no session option there
    options = SIGNED_INT8 if target == "ASCEND" else {}
    for form in ("qdq", "qoperator"):
        path = export_onnx(qfn, tmp_path / f"{form}.onnx", form=form)
        got = ort_run(path, x, **(options if form == "qdq" else {}))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert runtime_ops(tmp_path / "qdq.onnx", tmp_path, **options)["QLinearAdd"] == 1
    written = ops(tmp_path / "qoperator.onnx")
    assert written["QLinearAdd"] == 1 and written["Add"] == 0


def test_no_target_no_integer_adds(residual):
    """The GENERIC plan computes Adds in float, as the JAX program always did."""
    src, samples = residual
    qfn = ptq(import_onnx(src), samples, {"quant_type": "FULL_QUANT"})
    assert qfn.plan.adds == []


def test_debug_report_lists_the_adds_quantization(tmp_path, residual):
    src, samples = residual
    debug = tmp_path / "debug"
    config = {
        "quant_type": "FULL_QUANT",
        "target_device": "DSP",
        "debug_info_save_path": str(debug),
    }
    qfn = ptq(import_onnx(src), samples, config)
    with open(debug / "quant_param.csv", newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["NodeType"] == "Add"]
    (add,) = qfn.plan.adds
    assert (row["NodeName"], row["TensorName"], row["Dims"]) == ("skip", "s", "8 8 8 8")
    assert float(row["Scale"]) == pytest.approx(add.out_scale, rel=1e-7)
    assert int(row["ZeroPoint"]) == add.out_zero_point


def test_a_malformed_add_in_a_saved_plan_is_named(tmp_path, residual):
    src, samples = residual
    qfn = ptq(import_onnx(src), samples, {"quant_type": "FULL_QUANT", "target_device": "DSP"})
    qfn.plan.save(tmp_path / "plan")
    meta_file = tmp_path / "plan" / "plan.json"
    meta = json.loads(meta_file.read_text())
    del meta["adds"][0]["out_scale"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"plan.json: `adds\[0\]` is not an Add plan.*out_scale"):
        QuantPlan.load(tmp_path / "plan")
