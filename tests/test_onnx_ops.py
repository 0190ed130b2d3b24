"""Per-op checks of the ONNX importer: tiny one-node models run by onnxruntime and by jax.jit."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from jaxptq.importers.onnx import MAX_OPSET, MIN_OPSET, import_onnx, supported_op_types
from jaxptq.importers.onnx._dtypes import NP_TO_ONNX

ort = pytest.importorskip("onnxruntime")

RTOL = 1e-5
rng = np.random.default_rng(0)
I64_MAX, I64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def f32(*shape, lo=None):
    a = rng.standard_normal(shape).astype(np.float32)
    return np.abs(a) + np.float32(lo) if lo is not None else a


def i64(*values):
    return np.asarray(values, np.int64)


def I(a):  # noqa: E743 - a runtime graph input
    return ("in", np.asarray(a))


def C(a):  # an initializer
    return ("const", np.asarray(a))


def make_model(nodes, args, outputs, opset):
    """A model over `nodes`; `args` maps names to I(...)/C(...) tagged arrays."""
    ins, inits, feeds = [], [], {}
    for name, (kind, arr) in args.items():
        if kind == "in":
            ins.append(helper.make_tensor_value_info(name, NP_TO_ONNX[arr.dtype], arr.shape))
            feeds[name] = arr
        else:
            inits.append(numpy_helper.from_array(arr, name))
    graph = helper.make_graph(
        nodes,
        "g",
        ins,
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return model, feeds


def single(op, args, opset=17, n_out=1, **attrs):
    """A one-node model; `args` are I/C arrays in node-input order, None for omitted ones."""
    names, tagged = [], {}
    for i, a in enumerate(args):
        if a is None:
            names.append("")
        else:
            names.append(f"{a[0]}{i}")
            tagged[f"{a[0]}{i}"] = a
    outs = [f"y{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs, name=f"{op}_node", **attrs)
    return make_model([node], tagged, outs, opset)


def check(model, feeds, rtol=RTOL):
    """Runs `model` in onnxruntime and through `jax.jit(import_onnx(model))`; compares."""
    fn = import_onnx(model)
    got = jax.jit(fn)(*[feeds[n] for n in fn.input_names])
    got = got if isinstance(got, tuple) else (got,)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g)
        assert g.shape == w.shape, (g.shape, w.shape)
        if w.dtype.kind == "f":
            assert g.dtype == w.dtype, (g.dtype, w.dtype)
            scale = float(np.abs(w).max()) if w.size else 1.0
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(scale, 1e-6))
        else:
            assert g.dtype.kind == w.dtype.kind, (g.dtype, w.dtype)
            np.testing.assert_array_equal(g, w)


# (id, op, args, opset, n_out, attrs)
CASES = [
    # Conv: pads, strides, groups, dilations, auto_pad, 1-D, 3-D.
    (
        "conv_pads_stride",
        "Conv",
        [I(f32(1, 3, 9, 9)), C(f32(4, 3, 3, 3)), C(f32(4))],
        17,
        1,
        dict(pads=[1, 1, 1, 1], strides=[2, 2]),
    ),
    (
        "conv_groups_dil",
        "Conv",
        [I(f32(1, 4, 10, 10)), C(f32(6, 2, 3, 3))],
        17,
        1,
        dict(group=2, dilations=[2, 2], pads=[2, 1, 0, 2]),
    ),
    (
        "conv_depthwise",
        "Conv",
        [I(f32(2, 4, 8, 8)), C(f32(4, 1, 3, 3)), C(f32(4))],
        17,
        1,
        dict(group=4, pads=[1, 1, 1, 1]),
    ),
    (
        "conv_same_upper",
        "Conv",
        [I(f32(1, 2, 7, 8)), C(f32(3, 2, 2, 3))],
        17,
        1,
        dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    ),
    (
        "conv_same_lower",
        "Conv",
        [I(f32(1, 2, 7, 8)), C(f32(3, 2, 2, 3))],
        17,
        1,
        dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    ),
    (
        "conv_valid",
        "Conv",
        [I(f32(1, 2, 7, 7)), C(f32(3, 2, 3, 3))],
        17,
        1,
        dict(auto_pad="VALID", strides=[2, 2]),
    ),
    (
        "conv_1d",
        "Conv",
        [I(f32(2, 3, 11)), C(f32(5, 3, 3)), C(f32(5))],
        17,
        1,
        dict(pads=[1, 2], strides=[2], dilations=[2]),
    ),
    (
        "conv_1d_same",
        "Conv",
        [I(f32(1, 3, 10)), C(f32(2, 3, 4))],
        17,
        1,
        dict(auto_pad="SAME_UPPER", strides=[3]),
    ),
    (
        "conv_3d",
        "Conv",
        [I(f32(1, 2, 5, 6, 7)), C(f32(3, 2, 3, 3, 3))],
        17,
        1,
        dict(pads=[1, 1, 1, 1, 1, 1]),
    ),
    ("conv_runtime_weight", "Conv", [I(f32(1, 2, 6, 6)), I(f32(3, 2, 3, 3))], 17, 1, {}),
    # ConvTranspose.
    (
        "convT_stride_pad_outpad",
        "ConvTranspose",
        [I(f32(1, 4, 5, 5)), C(f32(4, 3, 3, 3)), C(f32(3))],
        17,
        1,
        dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    ),
    (
        "convT_groups_dil",
        "ConvTranspose",
        [I(f32(1, 4, 4, 4)), C(f32(4, 2, 3, 3))],
        17,
        1,
        dict(group=2, strides=[2, 2], dilations=[2, 1]),
    ),
    (
        "convT_output_shape",
        "ConvTranspose",
        [I(f32(1, 2, 4, 4)), C(f32(2, 3, 3, 3))],
        17,
        1,
        dict(strides=[2, 2], output_shape=[8, 8]),
    ),
    (
        "convT_same_upper",
        "ConvTranspose",
        [I(f32(1, 2, 4, 5)), C(f32(2, 3, 3, 3))],
        17,
        1,
        dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    ),
    ("convT_1d", "ConvTranspose", [I(f32(1, 2, 6)), C(f32(2, 3, 4))], 17, 1, dict(strides=[3])),
    # Gemm and MatMul.
    ("gemm", "Gemm", [I(f32(4, 5)), C(f32(5, 3)), C(f32(3))], 17, 1, {}),
    (
        "gemm_trans_alpha_beta",
        "Gemm",
        [I(f32(5, 4)), C(f32(3, 5)), C(f32(1, 3))],
        17,
        1,
        dict(transA=1, transB=1, alpha=0.5, beta=2.0),
    ),
    ("gemm_runtime_no_c", "Gemm", [I(f32(4, 5)), I(f32(3, 5))], 17, 1, dict(transB=1)),
    ("matmul_3d_const", "MatMul", [I(f32(2, 3, 4)), C(f32(4, 5))], 17, 1, {}),
    ("matmul_batched", "MatMul", [I(f32(2, 3, 4)), I(f32(2, 4, 5))], 17, 1, {}),
    ("matmul_vec", "MatMul", [I(f32(4)), C(f32(4, 3))], 17, 1, {}),
    (
        "einsum_bmm",
        "Einsum",
        [I(f32(2, 3, 4)), I(f32(2, 4, 5))],
        17,
        1,
        dict(equation="bij,bjk->bik"),
    ),
    (
        "einsum_attn_const",
        "Einsum",
        [I(f32(1, 2, 3, 4)), C(f32(1, 2, 5, 4))],
        17,
        1,
        dict(equation="bhqd,bhkd->bhqk"),
    ),
    # Elementwise binary with broadcasting.
    *[
        (f"{op.lower()}_bcast", op, [I(f32(2, 3, 4)), C(f32(3, 1, lo=0.5))], 17, 1, {})
        for op in ["Add", "Sub", "Mul", "Div"]
    ],
    ("add_runtime", "Add", [I(f32(2, 3)), I(f32(3))], 17, 1, {}),
    ("div_int_trunc", "Div", [I(i64(-7, 7, -8, 9)), C(i64(2, -2, 3, 4))], 17, 1, {}),
    ("pow_const2", "Pow", [I(f32(2, 3)), C(np.float32(2.0))], 17, 1, {}),
    ("pow_runtime", "Pow", [I(f32(2, 3, lo=0.1)), I(f32(2, 3))], 17, 1, {}),
    ("min3", "Min", [I(f32(2, 3)), C(f32(3)), I(f32(1, 3))], 17, 1, {}),
    ("max3", "Max", [I(f32(2, 3)), C(f32(3)), I(f32(1, 3))], 17, 1, {}),
    ("equal_int", "Equal", [I(i64(1, 2, 3)), C(i64(1, 0, 3))], 17, 1, {}),
    ("less", "Less", [I(f32(2, 3)), C(f32(3))], 17, 1, {}),
    ("greater", "Greater", [I(f32(2, 3)), C(f32(3))], 17, 1, {}),
    ("and", "And", [I(np.array([True, False, True])), C(np.array([True, True, False]))], 17, 1, {}),
    ("not", "Not", [I(np.array([True, False]))], 17, 1, {}),
    ("where", "Where", [I(f32(2, 3) > 0), I(f32(2, 3)), C(f32(3))], 17, 1, {}),
    # Unary and activations.
    ("sqrt", "Sqrt", [I(f32(2, 3, lo=0.1))], 17, 1, {}),
    ("reciprocal", "Reciprocal", [I(f32(2, 3, lo=0.1))], 17, 1, {}),
    ("log", "Log", [I(f32(2, 3, lo=0.1))], 17, 1, {}),
    *[
        (op.lower(), op, [I(f32(2, 3, 4))], 17, 1, {})
        for op in [
            "Exp",
            "Erf",
            "Tanh",
            "Sigmoid",
            "Relu",
            "Neg",
            "Abs",
            "Floor",
            "Ceil",
            "Identity",
            "HardSwish",
        ]
    ],
    ("hard_sigmoid", "HardSigmoid", [I(4 * f32(2, 3, 4))], 17, 1, dict(alpha=0.3, beta=0.6)),
    ("leaky_relu", "LeakyRelu", [I(f32(2, 3, 4))], 17, 1, dict(alpha=0.2)),
    ("prelu", "PRelu", [I(f32(2, 3, 4, 4)), C(f32(3, 1, 1))], 17, 1, {}),
    ("clip_min_max", "Clip", [I(f32(2, 3, 4)), C(np.float32(-0.5)), C(np.float32(0.7))], 11, 1, {}),
    ("clip_max_only", "Clip", [I(f32(2, 3, 4)), None, C(np.float32(0.3))], 13, 1, {}),
    ("clip_none", "Clip", [I(f32(2, 3))], 13, 1, {}),
    ("dropout_mask", "Dropout", [I(f32(2, 3)), C(np.float32(0.3))], 13, 2, {}),
    # Softmax family: opset < 13 coerces to 2-D at `axis`.
    ("softmax_11_axis1", "Softmax", [I(f32(2, 3, 4))], 11, 1, dict(axis=1)),
    ("softmax_13_axis1", "Softmax", [I(f32(2, 3, 4))], 13, 1, dict(axis=1)),
    ("softmax_13_default", "Softmax", [I(f32(2, 3, 4))], 13, 1, {}),
    ("log_softmax_11", "LogSoftmax", [I(f32(2, 3, 4))], 11, 1, dict(axis=1)),
    ("log_softmax_13", "LogSoftmax", [I(f32(2, 3, 4))], 13, 1, dict(axis=1)),
    # Normalization.
    (
        "batchnorm",
        "BatchNormalization",
        [I(f32(2, 3, 4, 4)), C(f32(3)), C(f32(3)), C(f32(3)), C(f32(3, lo=0.1))],
        15,
        1,
        dict(epsilon=1e-3),
    ),
    ("layernorm_last", "LayerNormalization", [I(f32(2, 3, 4)), C(f32(4)), C(f32(4))], 17, 1, {}),
    (
        "layernorm_axis1",
        "LayerNormalization",
        [I(f32(2, 3, 4)), C(f32(3, 4))],
        17,
        1,
        dict(axis=1, epsilon=1e-3),
    ),
    (
        "instancenorm",
        "InstanceNormalization",
        [I(f32(2, 3, 5, 5)), C(f32(3)), C(f32(3))],
        17,
        1,
        {},
    ),
    # Pooling.
    (
        "maxpool_pads",
        "MaxPool",
        [I(f32(1, 2, 7, 7))],
        17,
        1,
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ),
    (
        "maxpool_ceil",
        "MaxPool",
        [I(f32(1, 2, 8, 8))],
        17,
        1,
        dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    ),
    (
        "maxpool_dil",
        "MaxPool",
        [I(f32(1, 2, 8, 8))],
        17,
        1,
        dict(kernel_shape=[2, 2], dilations=[2, 2]),
    ),
    (
        "maxpool_same",
        "MaxPool",
        [I(f32(1, 2, 7, 7))],
        17,
        1,
        dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    ),
    ("maxpool_1d", "MaxPool", [I(f32(1, 2, 9))], 17, 1, dict(kernel_shape=[2], strides=[2])),
    (
        "avgpool_exclude_pad",
        "AveragePool",
        [I(f32(1, 2, 7, 7))],
        17,
        1,
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ),
    (
        "avgpool_include_pad",
        "AveragePool",
        [I(f32(1, 2, 7, 7))],
        17,
        1,
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    ),
    (
        "avgpool_ceil",
        "AveragePool",
        [I(f32(1, 2, 8, 8))],
        17,
        1,
        dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    ),
    (
        "avgpool_ceil_include_pad",
        "AveragePool",
        [I(f32(1, 2, 8, 8))],
        17,
        1,
        dict(
            kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1
        ),
    ),
    ("global_avgpool", "GlobalAveragePool", [I(f32(2, 3, 5, 4))], 17, 1, {}),
    ("global_maxpool", "GlobalMaxPool", [I(f32(2, 3, 5, 4))], 17, 1, {}),
    # Shape and layout.
    ("reshape_zero_minus1", "Reshape", [I(f32(2, 3, 4)), C(i64(0, -1))], 17, 1, {}),
    ("reshape_minus1_first", "Reshape", [I(f32(2, 3, 4)), C(i64(-1, 2, 2, 3))], 17, 1, {}),
    ("reshape_allowzero", "Reshape", [I(f32(0, 4)), C(i64(0, 2, 2))], 17, 1, dict(allowzero=1)),
    ("flatten_default", "Flatten", [I(f32(2, 3, 4, 5))], 17, 1, {}),
    ("flatten_axis0", "Flatten", [I(f32(2, 3, 4))], 17, 1, dict(axis=0)),
    ("flatten_axis_neg", "Flatten", [I(f32(2, 3, 4, 5))], 17, 1, dict(axis=-1)),
    ("transpose_default", "Transpose", [I(f32(2, 3, 4))], 17, 1, {}),
    ("transpose_perm", "Transpose", [I(f32(2, 3, 4))], 17, 1, dict(perm=[1, 2, 0])),
    ("concat", "Concat", [I(f32(2, 3)), C(f32(2, 1)), I(f32(2, 2))], 17, 1, dict(axis=-1)),
    ("split_11_attr", "Split", [I(f32(2, 3, 4))], 11, 2, dict(axis=1, split=[1, 2])),
    ("split_13_input", "Split", [I(f32(4, 3)), C(i64(2, 1, 1))], 13, 3, {}),
    ("split_13_even", "Split", [I(f32(2, 6))], 13, 2, dict(axis=-1)),
    ("split_18_num_outputs", "Split", [I(f32(7, 2))], 18, 3, dict(num_outputs=3)),
    ("slice_11_basic", "Slice", [I(f32(5, 6)), C(i64(1, 0)), C(i64(4, -1))], 11, 1, {}),
    (
        "slice_neg_steps_axes",
        "Slice",
        [I(f32(5, 6, 7)), C(i64(-1, 1)), C(i64(-6, 100)), C(i64(0, 2)), C(i64(-2, 3))],
        13,
        1,
        {},
    ),
    (
        "slice_full_reverse",
        "Slice",
        [I(f32(3, 5)), C(i64(-1)), C(i64(I64_MIN)), C(i64(1)), C(i64(-1))],
        13,
        1,
        {},
    ),
    ("slice_int64_max", "Slice", [I(f32(3, 5)), C(i64(2)), C(i64(I64_MAX)), C(i64(-1))], 13, 1, {}),
    ("gather_neg_idx", "Gather", [I(f32(5, 4)), C(i64([0, -1], [2, 3]))], 13, 1, {}),
    ("gather_scalar_axis1", "Gather", [I(f32(3, 5, 2)), C(np.int64(-1))], 13, 1, dict(axis=1)),
    ("gather_runtime_idx", "Gather", [I(f32(5, 4)), I(i64(4, -2, 0))], 13, 1, {}),
    ("squeeze_11", "Squeeze", [I(f32(2, 1, 3, 1))], 11, 1, dict(axes=[1])),
    ("squeeze_13_input", "Squeeze", [I(f32(2, 1, 3, 1)), C(i64(-1))], 13, 1, {}),
    ("squeeze_13_all", "Squeeze", [I(f32(1, 3, 1))], 13, 1, {}),
    ("unsqueeze_11", "Unsqueeze", [I(f32(2, 3))], 11, 1, dict(axes=[0, 3])),
    ("unsqueeze_13", "Unsqueeze", [I(f32(2, 3)), C(i64(1, -1))], 13, 1, {}),
    ("shape", "Shape", [I(f32(2, 3, 4))], 13, 1, {}),
    ("shape_start_end", "Shape", [I(f32(2, 3, 4, 5))], 15, 1, dict(start=1, end=-1)),
    ("size", "Size", [I(f32(2, 3, 4))], 13, 1, {}),
    (
        "cast_f2i_trunc",
        "Cast",
        [I(np.array([-2.7, -0.5, 0.5, 3.9], np.float32))],
        13,
        1,
        dict(to=onnx.TensorProto.INT32),
    ),
    ("cast_i2f", "Cast", [I(i64(-3, 0, 7))], 13, 1, dict(to=onnx.TensorProto.FLOAT)),
    (
        "cast_f2bool",
        "Cast",
        [I(np.array([0.0, 1.5, -2.0], np.float32))],
        13,
        1,
        dict(to=onnx.TensorProto.BOOL),
    ),
    ("expand_ones", "Expand", [I(f32(3, 1)), C(i64(2, 1, 4))], 13, 1, {}),
    ("tile", "Tile", [I(f32(2, 3)), C(i64(2, 1))], 13, 1, {}),
    # Pad.
    (
        "pad_constant_value",
        "Pad",
        [I(f32(1, 2, 3, 3)), C(i64(0, 0, 1, 2, 0, 0, 2, 1)), C(np.float32(1.5))],
        13,
        1,
        {},
    ),
    (
        "pad_reflect",
        "Pad",
        [I(f32(1, 2, 4, 4)), C(i64(0, 0, 2, 1, 0, 0, 1, 3))],
        13,
        1,
        dict(mode="reflect"),
    ),
    (
        "pad_edge",
        "Pad",
        [I(f32(1, 2, 4, 4)), C(i64(0, 0, 2, 1, 0, 0, 1, 3))],
        13,
        1,
        dict(mode="edge"),
    ),
    ("pad_negative", "Pad", [I(f32(3, 5)), C(i64(-1, 2, 1, -2))], 13, 1, {}),
    ("pad_18_axes", "Pad", [I(f32(2, 3, 4)), C(i64(1, 2, 3, 0)), None, C(i64(0, -1))], 18, 1, {}),
    # Reductions and ArgMax.
    ("reduce_mean_13_attr", "ReduceMean", [I(f32(2, 3, 4))], 13, 1, dict(axes=[1], keepdims=0)),
    ("reduce_mean_18_input", "ReduceMean", [I(f32(2, 3, 4)), C(i64(-1, 0))], 18, 1, {}),
    ("reduce_sum_11_attr", "ReduceSum", [I(f32(2, 3, 4))], 11, 1, dict(axes=[0, 2])),
    ("reduce_sum_13_input", "ReduceSum", [I(f32(2, 3, 4)), C(i64(-1))], 13, 1, dict(keepdims=0)),
    ("reduce_sum_13_noop", "ReduceSum", [I(f32(2, 3))], 13, 1, dict(noop_with_empty_axes=1)),
    ("reduce_sum_13_all", "ReduceSum", [I(f32(2, 3))], 13, 1, {}),
    ("reduce_max_13_all", "ReduceMax", [I(f32(2, 3, 4))], 13, 1, {}),
    ("reduce_max_18_input", "ReduceMax", [I(f32(2, 3, 4)), C(i64(1))], 18, 1, {}),
    ("reduce_min_18", "ReduceMin", [I(f32(2, 3, 4)), C(i64(0, 2))], 18, 1, dict(keepdims=0)),
    ("argmax", "ArgMax", [I(f32(2, 5, 3))], 13, 1, dict(axis=1, keepdims=0)),
    (
        "argmax_last_index",
        "ArgMax",
        [I(np.array([[1, 3, 3, 0], [2, 2, 1, 2]], np.float32))],
        13,
        1,
        dict(axis=1, select_last_index=1),
    ),
]


@pytest.mark.parametrize("name,op,args,opset,n_out,attrs", CASES, ids=[c[0] for c in CASES])
def test_op_matches_onnxruntime(name, op, args, opset, n_out, attrs):
    check(*single(op, args, opset=opset, n_out=n_out, **attrs))


RESIZE_CASES = [
    *[
        (
            f"nearest_{nm}_asym",
            dict(mode="nearest", nearest_mode=nm, coordinate_transformation_mode="asymmetric"),
            "scales",
        )
        for nm in ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
    ],
    *[
        (f"nearest_{nm}_half_pixel", dict(mode="nearest", nearest_mode=nm), "sizes")
        for nm in ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
    ],
    (
        "nearest_align_corners",
        dict(mode="nearest", coordinate_transformation_mode="align_corners"),
        "sizes",
    ),
    *[
        (f"linear_{ctm}_{kind}", dict(mode="linear", coordinate_transformation_mode=ctm), kind)
        for ctm in ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"]
        for kind in ["scales", "sizes"]
    ],
]


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("name,attrs,kind", RESIZE_CASES, ids=[c[0] for c in RESIZE_CASES])
def test_resize_matches_onnxruntime(name, attrs, kind, opset):
    x = I(f32(1, 2, 4, 5))
    empty = C(np.zeros(0, np.float32))
    if kind == "scales":
        args = [x, empty, C(np.array([1, 1, 2, 0.6], np.float32))]
    else:
        args = [x, empty, empty, C(i64(1, 2, 7, 3))]
    check(*single("Resize", args, opset=opset, **attrs))


@pytest.mark.parametrize("ctm", ["half_pixel", "half_pixel_symmetric"])
def test_resize_19_axes(ctm):
    args = [I(f32(1, 2, 4, 5)), None, C(np.array([1.5, 2.0], np.float32))]
    check(
        *single(
            "Resize", args, opset=19, mode="linear", axes=[2, 3], coordinate_transformation_mode=ctm
        )
    )


def test_constant_folding_chain_stays_static():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape resolves at trace time."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node(
            "Constant", [], ["w"], name="const_w", value=numpy_helper.from_array(f32(12, 5), "w")
        ),
        helper.make_node("MatMul", ["flat", "w"], ["y"], name="matmul"),
        helper.make_node(
            "ConstantOfShape",
            ["s"],
            ["ones"],
            name="cos",
            value=numpy_helper.from_array(np.array([2.0], np.float32), "v"),
        ),
        helper.make_node("Size", ["ones"], ["sz"], name="size"),
        helper.make_node("Cast", ["sz"], ["szf"], name="cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["y", "szf"], ["out"], name="mul"),
    ]
    args = {"x": I(f32(2, 3, 4)), "zero": C(np.int64(0)), "zero1": C(i64(0)), "minus1": C(i64(-1))}
    model, feeds = make_model(nodes, args, ["out"], 13)
    check(model, feeds)
    jaxpr = jax.make_jaxpr(import_onnx(model))(feeds["x"])
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    # Only the reshape, the matmul and the multiply touch the input; the rest folded.
    assert prims == ["reshape", "dot_general", "mul"], prims
    dot = jaxpr.jaxpr.eqns[1]
    assert dot.invars[1] in jaxpr.jaxpr.constvars  # the Constant node's value is a constvar


def test_range_from_shape():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
        helper.make_node("Range", ["zero", "n", "step"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Range", ["a", "b", "c"], ["rf2"]),
        helper.make_node("Add", ["x", "rf"], ["y0"]),
        helper.make_node("Mul", ["y0", "rf2"], ["y"]),
    ]
    args = {
        "x": I(f32(2, 4)),
        "one": C(np.int64(1)),
        "zero": C(np.int64(0)),
        "step": C(np.int64(1)),
        "a": C(np.float32(0.5)),
        "b": C(np.float32(2.5)),
        "c": C(np.float32(0.5)),
    }
    check(*make_model(nodes, args, ["y"], 13))


@pytest.mark.parametrize("opset", range(MIN_OPSET, MAX_OPSET + 1))
def test_every_supported_opset(opset):
    args = [I(f32(1, 2, 5, 5)), C(f32(3, 2, 3, 3)), C(f32(3))]
    check(*single("Conv", args, opset=opset, pads=[1, 1, 1, 1]))


def test_every_required_op_has_a_handler():
    required = """Conv ConvTranspose Gemm MatMul Add Sub Mul Div Pow Sqrt Reciprocal Exp Log Erf
    Tanh Sigmoid HardSigmoid HardSwish Relu LeakyRelu PRelu Clip Softmax LogSoftmax
    BatchNormalization LayerNormalization InstanceNormalization MaxPool AveragePool
    GlobalAveragePool GlobalMaxPool Reshape Flatten Transpose Concat Split Slice Gather Squeeze
    Unsqueeze Shape Size ConstantOfShape Constant Cast Where Equal Less Greater Not And Expand
    Tile Range Resize Pad ReduceMean ReduceSum ReduceMax ReduceMin ArgMax Min Max Neg Abs Floor
    Ceil Identity Dropout Einsum""".split()
    assert set(required) <= set(supported_op_types())
    tested = {c[1] for c in CASES} | {"Resize", "Range", "Constant", "ConstantOfShape"}
    assert set(required) <= tested, set(required) - tested
