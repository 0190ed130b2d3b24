"""The examples run as a researcher would run them, and their numbers hold."""

from __future__ import annotations

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("script", "sites"),
    [("quantize_nnx.py", 5), ("quantize_linen.py", 3), ("quantize_jax_function.py", 2)],
)
def test_example_quantizes_with_small_drop(
    script: str, sites: int, capsys: pytest.CaptureFixture
) -> None:
    main = runpy.run_path(str(EXAMPLES / script))["main"]
    result = main()
    assert result["fp32"] >= 95.0
    assert result["fp32"] - result["int8"] <= 1.5
    assert result["int8_sites"] == sites
    out = capsys.readouterr().out
    assert "sites quantized" in out and "top-1" in out


def test_onnx_classifier_example(shared_data: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    main = runpy.run_path(str(EXAMPLES / "onnx_classifier.py"))["main"]
    model = shared_data / "models" / "efficientnet_lite0.onnx"
    args = [str(model), "--images", str(shared_data / "imagenet"), "--calib", "10", "--eval", "20"]
    result = main(args)
    assert result["agreement"] >= 90.0
    assert result["cosine"] >= 0.99
    assert "agreement" in capsys.readouterr().out
