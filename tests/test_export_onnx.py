"""ONNX export: every emitted model passes the full checker, runs in onnxruntime and agrees
with the JAX integer program; imported models keep their nodes; files are written safely."""

from __future__ import annotations

import copy
import os
import pathlib
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx
from onnx import TensorProto, helper, numpy_helper

from jaxptq import import_onnx
from jaxptq.api import ptq
from jaxptq.export import export_onnx
from jaxptq.plan import QuantPlan
from jaxptq.rewrite import QuantizedFunction
from tests.onnx_checks import SIGNED_INT8, check_agreement, ops, ort_run, runtime_ops

TARGETS = ("CPU", "DSP", "ASCEND", "NVGPU")
FORMS = ("qdq", "qoperator")


# --- LeNet-5 / MLP trained on digits ---------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_full(lenet, calib):
    """One asymmetric plan (CPU, DSP and ASCEND share it) and one symmetric (NVGPU)."""
    plans = {None: ptq(lenet, calib, {"quant_type": "FULL_QUANT"})}
    plans["NVGPU"] = ptq(lenet, calib, {"quant_type": "FULL_QUANT", "target_device": "NVGPU"})
    return plans


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("target", TARGETS)
def test_lenet_full_quant_every_target_and_form(lenet_full, digits_data, tmp_path, target, form):
    qfn = lenet_full["NVGPU" if target == "NVGPU" else None]
    x = digits_data[2][:256]
    path = export_onnx(qfn, tmp_path / "lenet.onnx", x, target=target, form=form)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    got = ort_run(path, x)
    check_agreement(qfn(x), got)
    counts = ops(path)
    if form == "qdq":
        assert counts["QuantizeLinear"] >= 5 and counts["Conv"] == 2 and counts["MatMul"] == 3
        weights = [
            t for t in onnx.load(str(path)).graph.initializer if t.name.endswith("_W_quantized")
        ]
        assert len(weights) == 5 and all(t.data_type == TensorProto.INT8 for t in weights)
    else:
        assert counts["ConvInteger"] + counts["QLinearConv"] == 2
        assert counts["MatMulInteger"] + counts["QLinearMatMul"] == 3
        assert "Conv" not in counts and "MatMul" not in counts
    x_type = TensorProto.UINT8 if target in ("CPU", "DSP") else TensorProto.INT8
    zps = [t for t in onnx.load(str(path)).graph.initializer if t.name.endswith("x_zero_point")]
    assert zps and all(t.data_type == x_type for t in zps)
    if target == "NVGPU":
        assert all(numpy_helper.to_array(t) == 0 for t in zps)
    # QDQ: an int32 bias where the target asks for it. QOperator: QLinearConv always takes
    # one; ConvInteger/MatMulInteger add a float bias after the rescale.
    int32_bias = [
        t
        for t in onnx.load(str(path)).graph.initializer
        if t.data_type == TensorProto.INT32 and "_B_" in t.name
    ]
    if form == "qdq":
        assert bool(int32_bias) == (target in ("DSP", "ASCEND"))
    else:
        assert bool(int32_bias) == (counts["QLinearConv"] > 0)


def test_mlp_full_quant_batch_is_free(mlp, calib, digits_data, tmp_path):
    qfn = ptq(mlp, calib, {"quant_type": "FULL_QUANT", "target_device": "CPU"})
    x = digits_data[2]
    for form in FORMS:
        path = export_onnx(qfn, tmp_path / f"mlp_{form}.onnx", x[:10], form=form)
        got = np.concatenate([ort_run(path, x[i : i + 100]) for i in range(0, len(x), 100)])
        check_agreement(qfn(x), got)
        # The exported model classifies real digits as well as the JAX int8 program.
        y = digits_data[3]
        assert abs(np.mean(got.argmax(1) == y) - np.mean(np.asarray(qfn(x)).argmax(1) == y)) < 0.01


def test_lenet_weight_quant_4bit_is_int4_and_small(lenet, calib, digits_data, tmp_path):
    cfg = {"quant_type": "WEIGHT_QUANT", "bit_num": 4, "min_quant_weight_channel": 0}
    qfn = ptq(lenet, calib, cfg)
    x = digits_data[2][:256]
    path = export_onnx(qfn, tmp_path / "lenet4.onnx", x)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain == "") >= 21
    weights = [t for t in model.graph.initializer if t.name.endswith("_W_quantized")]
    assert len(weights) == 5 and all(t.data_type == TensorProto.INT4 for t in weights)
    # Weight-only: no activation quantization anywhere.
    assert ops(path)["QuantizeLinear"] == 0
    # onnxruntime's default fuses DQ -> MatMul into MatMulNBits with int8 activations
    # (accuracy level 4); level 0 keeps float activations, as the JAX program does.
    got = ort_run(path, x, **{"session.qdq_matmulnbits_accuracy_level": "0"})
    check_agreement(qfn(x), got, cos_min=0.99999)
    float_path = tmp_path / "lenet_f32.onnx"
    float_qfn = ptq(
        lenet,
        calib,
        {"quant_type": "WEIGHT_QUANT", "skip_quant_node": [s.name for s in qfn.plan.sites]},
    )
    export_onnx(float_qfn, float_path, x)
    assert os.path.getsize(path) < 0.2 * os.path.getsize(float_path)


# --- a transformer block in Flax ---------------------------------------------------------------


class Block(nnx.Module):
    """Pre-norm self-attention and a GELU MLP, the shape of a ViT/GPT block."""

    def __init__(self, d: int = 32, heads: int = 4, *, rngs: nnx.Rngs):
        self.heads = heads
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.qkv, self.out = nnx.Linear(d, 3 * d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
        self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + self.out(y.reshape(b, t, d))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


@pytest.mark.parametrize(
    "config",
    [
        *({"quant_type": "FULL_QUANT", "target_device": t} for t in TARGETS),
        {"quant_type": "DYNAMIC_QUANT", "quant_strategy": "ALWC"},  # one scale per tensor
        {"quant_type": "DYNAMIC_QUANT", "quant_strategy": "ACWL"},  # one scale per row
    ],
    ids=[*(f"full-{t}" for t in TARGETS), "dynamic-ALWC", "dynamic-ACWL"],
)
def test_transformer_block(config, tmp_path):
    rng = np.random.default_rng(0)
    block = Block(rngs=nnx.Rngs(0))
    samples = [rng.normal(size=(4, 8, 32)).astype(np.float32) for _ in range(4)]
    qfn = ptq(block, samples, config)
    x = rng.normal(size=(16, 8, 32)).astype(np.float32)
    signed = config.get("target_device") in ("ASCEND", "NVGPU")
    for form in FORMS:
        path = export_onnx(qfn, tmp_path / f"block_{form}.onnx", x[:4], form=form)
        assert ops(path)["Einsum"] == 2
        got = ort_run(path, x, **(SIGNED_INT8 if signed else {}))
        check_agreement(qfn(x), got, cos_min=0.99999)


# --- imported ONNX models --------------------------------------------------------------------


def _convnet(path: pathlib.Path) -> pathlib.Path:
    """Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm(transB)."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (16, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (16, 16, 3, 3)).astype(np.float32), "w2")
    fc = numpy_helper.from_array(rng.normal(0, 0.2, (10, 16)).astype(np.float32), "fc")
    fb = numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fb")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv_a", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu_a"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv_b", pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu_b"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="head", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])
    graph = helper.make_graph(nodes, "convnet", [x], [y], initializer=[w1, b1, w2, fc, fb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def convnet(tmp_path_factory):
    path = _convnet(tmp_path_factory.mktemp("convnet") / "convnet.onnx")
    rng = np.random.default_rng(2)
    samples = [rng.normal(size=(8, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    qfn = ptq(import_onnx(path), samples, {"quant_type": "FULL_QUANT", "target_device": "DSP"})
    return path, qfn, rng.normal(size=(64, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("form", FORMS)
def test_imported_model_keeps_nodes_and_names(convnet, tmp_path, form):
    src, qfn, x = convnet
    path = export_onnx(qfn, tmp_path / "q.onnx", form=form)
    model = onnx.load(str(path))
    names = {n.name: n.op_type for n in model.graph.node}
    for name in ("relu_b", "gap", "flat"):
        assert name in names
    if form == "qdq":
        assert names["conv_a"] == "Conv" and names["conv_b"] == "Conv" and names["head"] == "Gemm"
        # Gemm(transB=1): the integer weight keeps the initializer's (N, K) layout, axis 0.
        head = next(n for n in model.graph.node if n.name == "head")
        dq = next(n for n in model.graph.node if n.output[0] == head.input[1])
        w = next(t for t in model.graph.initializer if t.name == dq.input[0])
        assert tuple(w.dims) == (10, 16) and helper.get_attribute_value(dq.attribute[0]) == 0
    else:
        assert names["conv_a"] == "QLinearConv" and names["conv_b"] in (
            "QLinearConv",
            "ConvInteger",
        )
        assert names["head"] == "MatMulInteger"
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["y"]
    check_agreement(qfn(x), ort_run(path, x))


def test_round_trip_through_the_importer(convnet, tmp_path):
    src, qfn, x = convnet
    path = export_onnx(qfn, tmp_path / "q.onnx")
    again = import_onnx(path)
    check_agreement(qfn(x), np.asarray(again(x)))


def test_refuses_to_overwrite_the_source_model(convnet):
    src, qfn, _ = convnet
    before = src.read_bytes()
    with pytest.raises(ValueError, match="over its source model"):
        export_onnx(qfn, src)
    assert src.read_bytes() == before


def test_writes_atomically_and_leaves_no_temporary_files(convnet, tmp_path):
    _, qfn, _ = convnet
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    export_onnx(qfn, out)
    assert onnx.load(str(out)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_bad_arguments_are_named(convnet, lenet_full, tmp_path):
    _, qfn, _ = convnet
    with pytest.raises(ValueError, match="`form`"):
        export_onnx(qfn, tmp_path / "a.onnx", form="qlinear")
    with pytest.raises(ValueError, match="`target`"):
        export_onnx(qfn, tmp_path / "a.onnx", target="TPU")
    # An asymmetric plan cannot be exported for a target with symmetric activations.
    with pytest.raises(ValueError, match="NVGPU"):
        export_onnx(lenet_full[None], tmp_path / "a.onnx", target="NVGPU")
    # A plan quantizing a site's output (made for an imported model) on a translated graph.
    plan = copy.deepcopy(lenet_full[None].plan)
    plan.sites[0].out_act_scale, plan.sites[0].out_act_zero_point = 0.1, 0
    translated = QuantizedFunction(lenet_full[None].fn, plan, lenet_full[None]._graphs)
    with pytest.raises(NotImplementedError, match=f"`{plan.sites[0].name}` quantizes its output"):
        export_onnx(translated, tmp_path / "a.onnx")


class _Heads(nnx.Module):
    """A (D, heads, head_dim) kernel: per-channel scales would vary along two axes."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.proj = nnx.LinearGeneral(16, (4, 8), rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jax.nn.relu(self.proj(x)).reshape(x.shape[0], -1))


def test_target_skips_what_it_cannot_express(tmp_path):
    model = _Heads(rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    samples = [rng.normal(size=(8, 16)).astype(np.float32) for _ in range(2)]
    generic = ptq(model, samples, {"quant_type": "FULL_QUANT"})
    assert all(sp.quantized for sp in generic.plan.sites)
    qfn = ptq(model, samples, {"quant_type": "FULL_QUANT", "target_device": "DSP"})
    proj, head = qfn.plan.sites
    assert not proj.quantized and "along one axis" in str(proj.skip_reason)
    assert head.quantized
    x = rng.normal(size=(32, 16)).astype(np.float32)
    path = export_onnx(qfn, tmp_path / "heads.onnx", x)
    check_agreement(qfn(x), ort_run(path, x))
    # The skipped site stays a float contraction; the other is quantized for DSP (uint8).
    counts = ops(path)
    assert counts["Einsum"] == 1 and counts["MatMul"] == 1 and counts["QuantizeLinear"] == 1
    zps = [t for t in onnx.load(str(path)).graph.initializer if t.name.endswith("x_zero_point")]
    assert [t.data_type for t in zps] == [TensorProto.UINT8]


# --- EfficientNet-Lite0 on real photos (shared data) -------------------------------------------


@pytest.mark.slow
def test_efficientnet_lite0_exports_agree_and_shrink(shared_data, tmp_path):
    """Three targets, both forms, on 20 photos (10 calibrate); the 900-photo figures are in
    docs/benchmarks.md (scripts/bench_export.py)."""
    from jaxptq import datasets

    src = shared_data / "models" / "efficientnet_lite0.onnx"
    calib_files, eval_files, labels = datasets.imagenet_split(shared_data / "imagenet")
    xc = datasets.load_imagenet_images(calib_files[:10])
    xe = datasets.load_imagenet_images(eval_files[:20])
    fn = import_onnx(src)
    qfn = ptq(
        fn,
        [xc[i : i + 1] for i in range(len(xc))],
        {"quant_type": "FULL_QUANT", "target_device": "CPU"},
    )
    want = np.concatenate([np.asarray(qfn(xe[i : i + 1])) for i in range(len(xe))])
    # the 14 project convolutions feeding residual Adds or the next block, and the head
    assert sum(sp.out_act_scale is not None for sp in qfn.plan.sites) == 15
    # the 9 residual Adds run on codes, as onnxruntime's QLinearAdd
    assert len(qfn.plan.adds) == 9
    # ASCEND takes int8 codes, whose QLinearAdd rounds otherwise: its own plan
    qfn_ascend = ptq(
        fn,
        [xc[i : i + 1] for i in range(len(xc))],
        {"quant_type": "FULL_QUANT", "target_device": "ASCEND"},
    )
    want_ascend = np.concatenate([np.asarray(qfn_ascend(xe[i : i + 1])) for i in range(len(xe))])
    for target, form in [
        ("CPU", "qdq"),
        ("CPU", "qoperator"),
        ("DSP", "qdq"),
        ("ASCEND", "qoperator"),
        ("ASCEND", "qdq"),
    ]:
        source = qfn_ascend if target == "ASCEND" else qfn
        path = export_onnx(source, tmp_path / f"effnet_{form}.onnx", target=target, form=form)
        assert os.path.getsize(path) <= 0.27 * os.path.getsize(src)
        # QDQ int8 codes: see SIGNED_INT8; QOperator writes its integer ops itself
        options = SIGNED_INT8 if (target, form) == ("ASCEND", "qdq") else {}
        got = np.concatenate([ort_run(path, xe[i : i + 1], **options) for i in range(len(xe))])
        # The JAX program requantizes as QLinearConv does, quantizes the outputs of the 15
        # convolutions that feed residual Adds or the pool, and computes the residual Adds'
        # codes as QLinearAdd does: onnxruntime gives the same logits (measured: cosine
        # 1.000000 on every photo, docs/export.md).
        check_agreement(want_ascend if target == "ASCEND" else want, got, top1=1.0)
        if (target, form) == ("CPU", "qdq"):
            # onnxruntime runs all 49 convolutions as QLinearConv, with our int32 biases,
            # and all 9 residual Adds as QLinearAdd
            model = onnx.load(str(path))
            biases = [t for t in model.graph.initializer if t.data_type == TensorProto.INT32]
            runtime = runtime_ops(path, tmp_path)
            assert len(biases) == runtime["QLinearConv"] == 49
            assert runtime["QLinearAdd"] == 9
        y = np.array([labels[f] for f in eval_files[:20]])
        assert np.mean(got.argmax(1) == y) >= 0.75
    # NVGPU: symmetric int8 activations, so a ReLU6's lower bound is not the range's edge;
    # QLinearConv's codes are clipped by an integer Max, as the JAX requantize clamps them.
    qfn_nv = ptq(
        fn,
        [xc[i : i + 1] for i in range(len(xc))],
        {"quant_type": "FULL_QUANT", "target_device": "NVGPU"},
    )
    path = export_onnx(qfn_nv, tmp_path / "effnet_nvgpu_qdq.onnx")
    got = np.concatenate([ort_run(path, xe[i : i + 1], **SIGNED_INT8) for i in range(len(xe))])
    want = np.concatenate([np.asarray(qfn_nv(xe[i : i + 1])) for i in range(len(xe))])
    check_agreement(want, got, top1=1.0)  # measured: cosine 1.000000 on every photo
    path = export_onnx(qfn_nv, tmp_path / "effnet_nvgpu.onnx", form="qoperator")
    graph = onnx.load(str(src)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    readers = Counter(x for n in graph.node for x in n.input)
    conv_readers = Counter(x for n in graph.node if n.op_type == "Conv" for x in n.input)
    relu6_between_convs = sum(
        1
        for n in graph.node
        if n.op_type == "Clip"
        and producer.get(n.input[0]) == "Conv"
        and readers[n.output[0]] == conv_readers[n.output[0]] > 0
    )
    assert ops(path)["Max"] == relu6_between_convs == 32
    assert ops(path)["QLinearAdd"] == 9  # written as such, int8 codes in and out
    got = np.concatenate([ort_run(path, xe[i : i + 1]) for i in range(len(xe))])
    check_agreement(want, got, top1=1.0)  # measured: cosine 1.000000 on every photo
    qfn4 = ptq(fn, [xc[:1]], {"quant_type": "WEIGHT_QUANT", "bit_num": 4})
    path4 = export_onnx(qfn4, tmp_path / "effnet_w4.onnx")
    assert os.path.getsize(path4) <= 0.16 * os.path.getsize(src)
    got4 = np.concatenate(
        [
            ort_run(path4, xe[i : i + 1], **{"session.qdq_matmulnbits_accuracy_level": "0"})
            for i in range(4)
        ]
    )
    want4 = np.concatenate([np.asarray(qfn4(xe[i : i + 1])) for i in range(4)])
    check_agreement(want4, got4, cos_min=0.9999, top1=1.0)


def test_cpu_target_gemm_runs_as_onnxruntime_qgemm(convnet, tmp_path):
    # A float C kept the Gemm a float Gemm of its dequantized weight; with the bias as an Add
    # after it, onnxruntime takes the integer QGemm (CPU target: float biases).
    src, _, x = convnet
    rng = np.random.default_rng(2)
    samples = [rng.normal(size=(8, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    qfn = ptq(import_onnx(src), samples, {"quant_type": "FULL_QUANT", "target_device": "CPU"})
    path = export_onnx(qfn, tmp_path / "cpu.onnx")
    runtime = runtime_ops(path, tmp_path)
    assert runtime["QGemm"] == 1 and runtime["Gemm"] == 0
    check_agreement(qfn(x), ort_run(path, x))


def test_target_plan_quantizes_the_outputs_the_runtime_makes_int8(convnet, tmp_path):
    """conv_b's output reaches only GlobalAveragePool, so no later site quantizes it; a plan
    for a target quantizes it anyway, as the runtime's integer kernel does, and onnxruntime
    then computes every convolution in integers and the same codes as the JAX program."""
    src, qfn, x = convnet
    assert qfn.plan["conv_b"].out_act_scale is not None
    assert qfn.plan["conv_a"].out_act_scale is None  # conv_b quantizes it already
    qfn.plan.save(tmp_path / "plan")
    loaded = QuantPlan.load(tmp_path / "plan")["conv_b"]
    assert loaded.out_act_range == qfn.plan["conv_b"].out_act_range
    assert (loaded.out_act_scale, loaded.out_act_zero_point) == (
        qfn.plan["conv_b"].out_act_scale,
        qfn.plan["conv_b"].out_act_zero_point,
    )
    for form in FORMS:
        path = export_onnx(qfn, tmp_path / f"{form}.onnx", form=form)
        if form == "qdq":
            runtime = runtime_ops(path, tmp_path)
            assert runtime["QLinearConv"] == 2 and runtime["Conv"] + runtime["FusedConv"] == 0
        check_agreement(qfn(x), ort_run(path, x), cos_min=0.99999, top1=1.0)


def test_fuse_calib_lets_onnxruntime_run_every_conv_in_integers(convnet, tmp_path):
    src, _, x = convnet
    rng = np.random.default_rng(2)
    samples = [rng.normal(size=(8, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    qfn = ptq(import_onnx(src), samples, {"quant_type": "FULL_QUANT"})  # no target
    plain = export_onnx(qfn, tmp_path / "plain.onnx", target="DSP")
    before = runtime_ops(plain, tmp_path)
    # conv_b's output only reaches GlobalAveragePool: without its range it stays float.
    assert before["QLinearConv"] == 1 and before["Conv"] + before["FusedConv"] == 1
    fused = export_onnx(qfn, tmp_path / "fused.onnx", target="DSP", fuse_calib=samples)
    after = runtime_ops(fused, tmp_path)
    assert after["QLinearConv"] == 2 and after["Conv"] + after["FusedConv"] == 0
    # One more rounding than the JAX program: close, not identical.
    check_agreement(qfn(x), ort_run(fused, x), cos_min=0.999, top1=0.95)
