"""Calibration folders -> model inputs: images and .bin buffers, layouts, and clear errors."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest
from PIL import Image

from jaxptq.config import DataPreprocessParam
from jaxptq.importers.onnx import InputSpec
from jaxptq.preprocess import (
    CalibrationDataError,
    calibration_folders,
    input_layout,
    load_calibration,
)

NCHW_RGB = InputSpec("x", (1, 3, 6, 8), np.dtype(np.float32))
NHWC_RGB = InputSpec("x", (1, 6, 8, 3), np.dtype(np.float32))


def _rgb(seed: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _folder(root: pathlib.Path, name: str, images: list[np.ndarray]) -> pathlib.Path:
    d = root / name
    d.mkdir()
    for i, a in enumerate(images):
        Image.fromarray(a).save(d / f"{i:02d}.png")
    return d


def _param(path: str, **kw) -> DataPreprocessParam:
    return DataPreprocessParam(calibrate_path=path, **kw)


def test_gray_digits_are_exact(shared_data, tmp_path):
    from jaxptq.datasets import load_mnist_5k

    x, _ = load_mnist_5k(shared_data / "mnist_5k.csv.gz")
    d = _folder(tmp_path, "digits", [x[i, 0] for i in (0, 700, 1400)])
    spec = InputSpec("Input3", (1, 1, 28, 28), np.dtype(np.float32))
    samples = load_calibration(_param(f"Input3:{d}", image_to_format="GRAY"), [spec])
    assert len(samples) == 3
    for s, i in zip(samples, (0, 700, 1400), strict=True):
        assert s[0].shape == (1, 1, 28, 28) and s[0].dtype == np.float32
        np.testing.assert_array_equal(s[0][0], x[i].astype(np.float32))


def test_rgb_normalize_layouts_and_bgr(tmp_path):
    imgs = [_rgb(0), _rgb(1)]
    d = _folder(tmp_path, "rgb", imgs)
    norm = dict(normalize_mean=(10.0, 20.0, 30.0), normalize_std=(2.0, 4.0, 8.0))
    want = (imgs[1].astype(np.float32) - [10, 20, 30]) / [2, 4, 8]
    nchw = load_calibration(_param(f"x:{d}", **norm), [NCHW_RGB])
    np.testing.assert_allclose(nchw[1][0][0], want.transpose(2, 0, 1), rtol=1e-6)
    nhwc = load_calibration(_param(f"x:{d}", **norm), [NHWC_RGB])
    np.testing.assert_allclose(nhwc[1][0][0], want, rtol=1e-6)
    bgr = load_calibration(_param(str(d), image_to_format="BGR"), [NHWC_RGB])
    np.testing.assert_array_equal(bgr[0][0][0], imgs[0][:, :, ::-1].astype(np.float32))
    assert input_layout(NHWC_RGB) == "NHWC" and input_layout(NCHW_RGB) == "NCHW"
    assert input_layout(NHWC_RGB, "NCHW") == "NCHW"


def test_resize_then_center_crop_matches_pillow(tmp_path):
    img = _rgb(3, 20, 30)
    d = _folder(tmp_path, "big", [img])
    p = _param(
        f"x:{d}",
        resize_width=12,
        resize_height=10,
        resize_method="CUBIC",
        center_crop_width=8,
        center_crop_height=6,
    )
    got = load_calibration(p, [NCHW_RGB])[0][0][0]
    ref = Image.fromarray(img).resize((12, 10), Image.Resampling.BICUBIC).crop((2, 2, 10, 8))
    np.testing.assert_array_equal(got, np.asarray(ref, np.float32).transpose(2, 0, 1))


def test_bin_buffers_nhwc_by_default_and_multi_input_pairing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    rng = np.random.default_rng(0)
    nhwc = [rng.standard_normal((1, 6, 8, 3)).astype(np.float32) for _ in range(3)]
    ids = [np.arange(5, dtype=np.int64) * k for k in range(3)]
    for k in range(3):
        nhwc[k].tofile(a / f"s{k}.bin")
        ids[k].tofile(b / f"t{k}.bin")
    (a / "notes.txt").write_text("ignored")
    specs = [NCHW_RGB, InputSpec("ids", (1, 5), np.dtype(np.int64))]
    p = _param(f"ids:{b},x:{a}", input_type="BIN", calibrate_size=2)
    samples = load_calibration(p, specs)
    assert len(samples) == 2  # calibrate_size
    for k, (x, i) in enumerate(samples):
        np.testing.assert_array_equal(x, nhwc[k].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(i[0], ids[k])
    # With the layout stated (converter_lite --inputDataFormat), the buffer is read as is.
    p1 = _param(f"x:{a}", input_type="BIN")
    raw = load_calibration(p1, [NCHW_RGB], data_format="NCHW")[0][0]
    np.testing.assert_array_equal(raw, nhwc[0].reshape(1, 3, 6, 8))


def test_positional_folders_follow_input_order(tmp_path):
    d = _folder(tmp_path, "imgs", [_rgb(0)])
    folders = calibration_folders(str(d), ["x"])
    assert folders == {"x": d}
    specs = ["in:0", "in"]
    assert calibration_folders(f"in:0:{d},in:{d}", specs) == {"in:0": d, "in": d}


def _err(tmp_path: pathlib.Path, param: DataPreprocessParam, specs=(NCHW_RGB,), **kw) -> str:
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(param, list(specs), **kw)
    return str(info.value)


def test_folder_errors(tmp_path):
    assert "does not exist" in _err(tmp_path, _param(f"x:{tmp_path / 'nope'}"))
    assert "nope" in _err(tmp_path, _param(f"x:{tmp_path / 'nope'}"))
    (tmp_path / "empty").mkdir()
    msg = _err(tmp_path, _param(f"x:{tmp_path / 'empty'}"))
    assert "has no IMAGE files" in msg and ".png" in msg
    assert "`calibrate_path` is not set" in _err(tmp_path, DataPreprocessParam())
    d = _folder(tmp_path, "ok", [_rgb(0)])
    msg = _err(tmp_path, _param(f"y:{d}"))
    assert "names input `y`, which the model does not have" in msg and "`x`" in msg
    two = [NCHW_RGB, dataclasses.replace(NCHW_RGB, name="z")]
    assert "no folder for input(s) `z`" in _err(tmp_path, _param(f"x:{d}"), two)
    e = _folder(tmp_path, "more", [_rgb(1), _rgb(2)])
    msg = _err(tmp_path, _param(f"x:{d},z:{e}"), two)
    assert "same number" in msg and ": 1" in msg and ": 2" in msg


def test_file_errors(tmp_path):
    d = tmp_path / "bins"
    d.mkdir()
    np.zeros((1, 6, 8, 2), np.float32).tofile(d / "short.bin")
    msg = _err(tmp_path, _param(f"x:{d}", input_type="BIN"))
    assert "short.bin: 384 bytes, expected 576 bytes" in msg and "NHWC" in msg
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    msg = _err(tmp_path, _param(f"x:{bad}"))
    assert "broken.jpg: cannot read it as an image" in msg
    big = _folder(tmp_path, "big", [_rgb(0, 10, 12)])
    msg = _err(tmp_path, _param(f"x:{big}"))
    assert "10x12x3" in msg and "wants 6x8x3" in msg and "resize_width" in msg
    msg = _err(tmp_path, _param(f"x:{big}", center_crop_width=20, center_crop_height=6))
    assert "centre crop 20x6 is larger than the image (12x10" in msg
    ok = _folder(tmp_path, "ok", [_rgb(0)])
    msg = _err(tmp_path, _param(f"x:{ok}", normalize_mean=(1.0, 2.0)))
    assert "`normalize_mean` has 2 values" in msg and "3 channel(s)" in msg
    msg = _err(tmp_path, _param(f"x:{ok}", resize_width=8))
    assert "`resize_width` and `resize_height` must be set together" in msg
    gray = _err(tmp_path, _param(f"x:{ok}", image_to_format="GRAY"))
    assert "6x8x1" in gray and "wants 6x8x3" in gray
