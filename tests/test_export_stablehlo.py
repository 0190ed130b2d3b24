"""StableHLO artifacts: bit-exact reloads, integer ops in the module, packed weights kept."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from jaxptq import qmath
from jaxptq.api import ptq
from jaxptq.export import export_stablehlo, load_stablehlo


def _int_ops(text: str) -> list[str]:
    """The convolution / dot_general lines whose operands are 8-bit and result i32 (on
    XLA:CPU activations are u8 against i8 weights: jaxptq/u8s8.py)."""
    pattern = r"stablehlo\.(convolution|dot_general)"
    lines = [line for line in text.splitlines() if re.search(pattern, line)]
    return [line for line in lines if re.search(r"xu?i8>.*xi8>.*\) -> tensor<[0-9x]*xi32>", line)]


def _i8_argument_elements(text: str) -> int:
    """Elements of the main function's int8 arguments."""
    signature = re.search(r"func\.func public @main\(([^{]*)\)", text)
    assert signature is not None
    shapes = re.findall(r"tensor<([0-9x]+)xi8>", signature.group(1))
    return sum(int(np.prod([int(d) for d in shape.split("x")])) for shape in shapes)


def _i8_tensor_literals(text: str) -> list[str]:
    """8-bit constants that are not one repeated value (a weight would be a list or hex)."""
    literals = re.findall(r"dense<([^>]*)> : tensor<[0-9x]+xu?i8>", text)
    return [v for v in literals if v.startswith(("[", '"'))]


@pytest.mark.parametrize("quant_type", ["FULL_QUANT", "DYNAMIC_QUANT"])
def test_lenet_integer_program_reloads_bit_for_bit(lenet, calib, digits_data, tmp_path, quant_type):
    qfn = ptq(lenet, calib, {"quant_type": quant_type})
    x = digits_data[2][:64]
    path = export_stablehlo(qfn, tmp_path / "lenet.shlo", x)
    loaded = load_stablehlo(path)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(qfn(x)))
    # The reloaded program is the integer one: an 8-bit op for each of LeNet's 5 sites.
    # On XLA:CPU exactly 5 dots (its two convolutions are im2col dots, conv_forms.py); a
    # GPU program also convolves the zero point over each padded window (kernels.py).
    text = loaded.mlir_module()
    int_ops = len(_int_ops(text))
    assert int_ops == 5 if jax.default_backend() == "cpu" else int_ops >= 5, text[:2000]
    # Integer weights are arguments stored beside the module, never constants inside it
    # (scales and weight sums are its literals: `jaxptq.arg_pack`).
    weight_elements = sum(sp.weight_elements for sp in qfn.plan.quantized_sites)
    assert _i8_argument_elements(text) == weight_elements
    assert not _i8_tensor_literals(text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.shlo"]


def test_packed_4bit_weights_stay_packed(lenet, calib, digits_data, tmp_path):
    qfn = ptq(
        lenet, calib, {"quant_type": "WEIGHT_QUANT", "bit_num": 4, "min_quant_weight_channel": 0}
    )
    x = digits_data[2][:16]
    path = export_stablehlo(qfn, tmp_path / "lenet4.npz", x)
    loaded = load_stablehlo(path)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(qfn(x)))
    with np.load(path, allow_pickle=False) as npz:
        packed = sorted(
            npz[k].size for k in npz.files if k.startswith("p") and npz[k].dtype == np.uint8
        )
    want = sorted(qmath.packed_size(sp.weight_elements, 4) for sp in qfn.plan.quantized_sites)
    # two weights a byte, nothing unpacked alongside; the small ones share one buffer
    # (`jaxptq.arg_pack`), the 5040-byte one travels alone
    assert sum(packed) == sum(want) and max(want) in packed
    text = loaded.mlir_module()
    for n in packed:
        assert f"tensor<{n}xui8>" in text


def test_errors_name_the_problem(lenet, calib, digits_data, tmp_path):
    qfn = ptq(lenet, calib, {"quant_type": "WEIGHT_QUANT", "bit_num": 8})
    with pytest.raises(TypeError, match="example arguments"):
        export_stablehlo(qfn, tmp_path / "a.shlo")
    bogus = tmp_path / "bogus.npz"
    np.savez(bogus, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a jaxptq StableHLO artifact"):
        load_stablehlo(bogus)
    x = digits_data[2][:4]
    loaded = load_stablehlo(export_stablehlo(qfn, tmp_path / "b.shlo", x))
    with pytest.raises(TypeError, match="input array"):
        loaded(x, x)
