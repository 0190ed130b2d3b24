"""ONNX importer on real models (shared data, PyPI-shipped models) and on bad input."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib

import jax
import numpy as np
import onnx
import onnx.version_converter
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxptq
from jaxptq import datasets, import_onnx
from jaxptq.importers import onnx as onnx_importer
from jaxptq.importers.onnx import OnnxImportError, OnnxNodeError, UnsupportedOnnxError

ort = pytest.importorskip("onnxruntime")
rng = np.random.default_rng(0)


def ort_run(model: str | os.PathLike | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_rel_close(got, want, rel: float):
    """Every element within `rel` of the reference's largest magnitude (and elementwise)."""
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * float(np.abs(want).max()))


def conv_model(opset: int = 13, batch: int | str = 1) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm, with named nodes and real initializers."""
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "fc")
    nodes = [
        helper.make_node(
            "Conv", ["x", "w"], ["c"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc1", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])
    graph = helper.make_graph(nodes, "convnet", [x], [y], initializer=[w, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


# ---------------------------------------------------------------- real models (shared data)


@pytest.fixture(scope="module")
def effnet(shared_data):
    path = shared_data / "models" / "efficientnet_lite0.onnx"
    return path, import_onnx(path)


def test_efficientnet_lite0_matches_onnxruntime_on_photos(effnet, shared_data):
    path, fn = effnet
    _, evals, labels = datasets.imagenet_split(shared_data / "imagenet")
    files = evals[:4]
    x = datasets.load_imagenet_images(files)
    assert x.shape == (4, 3, 224, 224) and x.dtype == np.float32
    jitted = jax.jit(fn)
    got = np.concatenate([np.asarray(jitted(x[i : i + 1])) for i in range(len(x))])
    want = np.concatenate([ort_run(path, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    assert_rel_close(got, want, 1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    # The photos are real: the float model gets most of them right.
    assert np.mean(got.argmax(1) == np.array([labels[f] for f in files])) >= 0.75


def test_efficientnet_sites_are_constant_weights_named_by_node(effnet):
    """Every Conv is a conv_general_dilated whose rhs is a constvar, named by its node."""
    _, fn = effnet
    closed = jax.make_jaxpr(fn)(np.zeros((1, 3, 224, 224), np.float32))
    consts = set(closed.jaxpr.constvars)
    conv_names = [n.name for n in fn.model.graph.node if n.op_type == "Conv"]
    convs = [e for e in closed.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(conv_names) == 49
    assert sum(e.invars[1] in consts for e in convs) == len(conv_names) == len(convs)
    stacks = [str(e.source_info.name_stack) for e in convs]
    for name, stack in zip(conv_names, stacks, strict=True):
        assert name in stack, (name, stack)
    (gemm_name,) = [n.name for n in fn.model.graph.node if n.op_type == "Gemm"]
    (dot,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dot.invars[1] in consts and gemm_name in str(dot.source_info.name_stack)
    w = closed.consts[closed.jaxpr.constvars.index(dot.invars[1])]
    assert np.asarray(w).shape == (1280, 1000) and np.asarray(w).dtype == np.float32


def test_mnist8_matches_onnxruntime_on_real_digits(shared_data):
    path = shared_data / "models" / "mnist-8.onnx"
    original = onnx.load(path)
    with pytest.raises(UnsupportedOnnxError, match="opset 8.*convert_version"):
        import_onnx(path)
    fn = import_onnx(onnx.version_converter.convert_version(original, 13))
    assert fn.input_names == ("Input3",)  # initializers listed as inputs are not arguments
    x, y = datasets.load_mnist_5k(shared_data / "mnist_5k.csv.gz")
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.uint8
    digits = x[:16].astype(np.float32)
    jitted = jax.jit(fn)
    got = np.concatenate([np.asarray(jitted(d[None])) for d in digits])
    want = np.concatenate([ort_run(path, {"Input3": d[None]})[0] for d in digits])
    assert_rel_close(got, want, 1e-4)
    assert np.mean(got.argmax(1) == y[:16]) >= 0.9


# ---------------------------------------------------------------- API


def test_api_attributes_dynamic_batch_and_jit():
    assert jaxptq.import_onnx is onnx_importer.import_onnx
    assert "import_onnx" in jaxptq.__all__
    model = conv_model(batch="N")
    before = model.SerializeToString()
    fn = import_onnx(model)
    assert fn.model is model and fn.opset == 13
    assert fn.input_names == ("x",) and fn.output_names == ("y",)
    (spec,) = fn.input_specs
    assert spec.shape == (None, 3, 8, 8) and spec.dtype == np.float32
    jitted = jax.jit(fn)
    for n in (2, 5):
        x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
        x_copy = x.copy()
        assert_rel_close(jitted(x), ort_run(model, {"x": x})[0], 1e-5)
        np.testing.assert_array_equal(x, x_copy)
    assert model.SerializeToString() == before  # nothing the user passed is modified


def test_several_outputs_come_back_as_a_tuple():
    node = helper.make_node("Split", ["x"], ["a", "b"], name="split", axis=1)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_empty_tensor_value_info("a"), helper.make_empty_tensor_value_info("b")],
    )
    fn = import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    a, b = jax.jit(fn)(x)
    np.testing.assert_array_equal(np.asarray(a), x[:, :2])
    np.testing.assert_array_equal(np.asarray(b), x[:, 2:])


# ---------------------------------------------------------------- bad input


def test_not_onnx_file_names_the_file(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are plain words, not a protobuf\n" * 20)
    with pytest.raises(OnnxImportError, match="notes.onnx"):
        import_onnx(bad)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(OnnxImportError, match="empty.onnx"):
        import_onnx(empty)
    with pytest.raises(OnnxImportError, match="missing.onnx"):
        import_onnx(tmp_path / "missing.onnx")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file_names_the_file(tmp_path, fraction):
    data = conv_model().SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(OnnxImportError, match="cut.onnx"):
        import_onnx(cut)


def test_unsupported_ops_reported_together_before_running():
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v1", "i1"], name="topk_a"),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("TopK", ["r", "k"], ["v2", "i2"], name="topk_b"),
        helper.make_node("NonZero", ["x"], ["nz"]),
        helper.make_node("FancyOp", ["r"], ["f"], name="fancy", domain="com.example"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_empty_tensor_value_info("v1")],
        initializer=[numpy_helper.from_array(np.array([2], np.int64), "k")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    with pytest.raises(UnsupportedOnnxError) as info:
        import_onnx(model)
    err = info.value
    assert isinstance(err, NotImplementedError)
    assert err.opset == 17
    assert err.ops == {
        "TopK": ["topk_a", "topk_b"],
        "NonZero": ["NonZero_3"],
        "com.example::FancyOp": ["fancy"],
    }
    for text in ("opset 17", "TopK (nodes: topk_a, topk_b)", "NonZero_3", "FancyOp", "fancy"):
        assert text in str(err)


@pytest.mark.parametrize("opset", [10, 22])
def test_opset_outside_range_is_refused(opset):
    with pytest.raises(UnsupportedOnnxError, match=f"opset {opset}; jaxptq imports opsets 11"):
        import_onnx(conv_model(opset=opset))


def test_call_inputs_checked_against_declared():
    fn = import_onnx(conv_model())
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(TypeError, match=r"takes 1 input\(s\) \['x'\], got 2"):
        fn(x, x)
    with pytest.raises(TypeError, match="takes 1 input"):
        fn()
    shape_err = r"input `x`: expected shape \(1, 3, 8, 8\).*got \(3, 8, 8\)"
    with pytest.raises(ValueError, match=shape_err):
        fn(x[0])
    with pytest.raises(ValueError, match=r"input `x`: expected shape .*got \(1, 3, 9, 8\)"):
        fn(np.zeros((1, 3, 9, 8), np.float32))
    with pytest.raises(TypeError, match="input `x`: expected dtype float32, got uint8"):
        fn(x.astype(np.uint8))
    with pytest.raises(TypeError, match="input `x`: expected dtype float32, got float64"):
        fn(x.astype(np.float64))


def test_node_failure_names_node_and_op():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="bad_reshape")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_empty_tensor_value_info("y")],
        initializer=[numpy_helper.from_array(np.array([4, -1], np.int64), "s")],
    )
    fn = import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    with pytest.raises(OnnxNodeError, match=r"`bad_reshape` \(Reshape\)") as info:
        jax.jit(fn)(np.zeros((2, 3), np.float32))
    assert info.value.node_name == "bad_reshape" and info.value.op_type == "Reshape"


def _save_external(model: onnx.ModelProto, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    path = folder / "model.onnx"
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return path


def _relocate(path: pathlib.Path, location: str) -> None:
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(m.SerializeToString())


def test_external_data_inside_folder_loads(tmp_path):
    model = conv_model()
    path = _save_external(model, tmp_path / "m")
    fn = import_onnx(path)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert_rel_close(jax.jit(fn)(x), ort_run(model, {"x": x})[0], 1e-5)
    proto = onnx.load(str(path), load_external_data=False)
    with pytest.raises(OnnxImportError, match="base_dir"):
        import_onnx(proto)
    assert_rel_close(import_onnx(proto, base_dir=path.parent)(x), ort_run(model, {"x": x})[0], 1e-5)


def test_external_data_outside_folder_is_refused(tmp_path):
    path = _save_external(conv_model(), tmp_path / "m")
    outside = tmp_path / "secret.bin"
    outside.write_bytes((path.parent / "weights.bin").read_bytes())
    _relocate(path, "../secret.bin")
    with pytest.raises(OnnxImportError, match=r"outside the model's folder.*refused"):
        import_onnx(path)
    _relocate(path, str(outside))
    with pytest.raises(OnnxImportError, match="only relative locations"):
        import_onnx(path)
    (path.parent / "link.bin").symlink_to(outside)
    _relocate(path, "link.bin")
    with pytest.raises(OnnxImportError, match="outside the model's folder"):
        import_onnx(path)
    _relocate(path, "absent.bin")
    with pytest.raises(OnnxImportError, match="does not exist"):
        import_onnx(path)


# ---------------------------------------------------------------- models shipped in PyPI wheels


def _package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.skip(f"`{name}` is not installed (test extra); its shipped ONNX models are used")
    return pathlib.Path(spec.origin).parent


def _render(text: str, size: tuple[int, int], xy: tuple[int, int], font_size: int = 28):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(img)
    draw.text(xy, text, fill="black", font=font)
    return img, draw.textbbox(xy, text, font=font)


def _ocr_input(img) -> np.ndarray:
    """PaddleOCR's normalization, as rapidocr applies it: (p / 255 - 0.5) / 0.5, NCHW."""
    return ((np.asarray(img, np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5)[None]


@pytest.fixture(scope="module")
def ocr_models():
    return _package_dir("rapidocr_onnxruntime") / "models"


def test_rapidocr_recognizer_reads_rendered_text(ocr_models):
    path = ocr_models / "ch_PP-OCRv4_rec_infer.onnx"
    fn = import_onnx(path)
    meta = {p.key: p.value for p in fn.model.metadata_props}
    chars = ["blank", *meta["character"].splitlines(), " "]

    def ctc_decode(probs: np.ndarray) -> str:
        idx = probs[0].argmax(-1)
        keep = (idx != 0) & np.concatenate([[True], idx[1:] != idx[:-1]])
        return "".join(chars[i] for i in idx[keep]).strip()

    jitted = jax.jit(fn)
    for text in ["jaxptq 2024", "quantize int8"]:
        x = _ocr_input(_render(text, (320, 48), (8, 6), font_size=32)[0])
        got, want = np.asarray(jitted(x)), ort_run(path, {"x": x})[0]
        assert_rel_close(got, want, 2e-4)
        assert ctc_decode(got) == ctc_decode(want) == text


def test_rapidocr_detector_finds_rendered_text(ocr_models):
    path = ocr_models / "ch_PP-OCRv4_det_infer.onnx"
    img, box = _render("Post-training", (320, 96), (20, 30))
    x = _ocr_input(img)
    got = np.asarray(jax.jit(import_onnx(path))(x))
    want = ort_run(path, {"x": x})[0]
    assert_rel_close(got, want, 1e-4)
    prob = got[0, 0]
    inside = np.zeros(prob.shape, bool)
    inside[box[1] : box[3], box[0] : box[2]] = True
    assert prob[inside].mean() > 0.25 and prob[~inside].max() < 0.01


def test_rapidocr_direction_classifier_tells_upright_from_flipped(ocr_models):
    path = ocr_models / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    fn = jax.jit(import_onnx(path))
    img, _ = _render("Hello 2025", (192, 48), (6, 8))
    for image, label in [(img, 0), (img.rotate(180), 1)]:  # label_list ['0', '180']
        x = _ocr_input(image)
        got, want = np.asarray(fn(x)), ort_run(path, {"x": x})[0]
        assert_rel_close(got, want, 1e-4)
        assert got.argmax() == label


def test_magika_content_types_of_real_files(tmp_path):
    _package_dir("magika")
    from magika import Magika
    from PIL import Image

    root = pathlib.Path(__file__).resolve().parents[1]
    photo = tmp_path / "render.jpg"
    _render("a real JPEG made here", (160, 64), (4, 16))[0].save(photo, quality=90)
    packed = tmp_path / "pyproject.toml.gz"
    packed.write_bytes(gzip.compress((root / "pyproject.toml").read_bytes()))
    png = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png)
    files = {
        root / "jaxptq" / "datasets.py": "python",
        root / "pyproject.toml": "toml",
        photo: "jpeg",
        packed: "gzip",
        png: "png",
    }
    magika = Magika()
    cfg = magika._model_config
    rows = []
    for f in files:
        _, feats = magika._get_result_or_features_from_path(f)
        rows.append(feats.beg[: cfg.beg_size] + feats.end[-cfg.end_size :])
    x = np.asarray(rows, np.int32)
    fn = import_onnx(magika._model_path)
    got = np.asarray(jax.jit(fn)(x))
    assert_rel_close(got, ort_run(magika._model_path, {fn.input_names[0]: x})[0], 1e-5)
    labels = [magika._target_labels_space[i] for i in got.argmax(1)]
    assert labels == list(files.values())
