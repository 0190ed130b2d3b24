"""Quantize a Flax nnx model in a few lines: LeNet-5 trained on real digits, to int8."""

from __future__ import annotations

import jaxptq
from jaxptq.models import digits


def main() -> dict[str, float]:
    x_train, _, x_test, y_test = digits.load_digits_split()
    model = digits.pretrained("lenet5")  # trained with optax on first use, then cached

    calib = [x_train[i : i + 10] for i in range(0, 100, 10)]  # 100 real digits
    qmodel = jaxptq.ptq(model, calib, {"quant_type": "FULL_QUANT"})

    print(qmodel.plan)
    fp32, int8 = digits.accuracy(model, x_test, y_test), digits.accuracy(qmodel, x_test, y_test)
    print(f"top-1: fp32 {fp32:.2f}%  int8 {int8:.2f}%")
    return {"fp32": fp32, "int8": int8, "int8_sites": len(qmodel.plan.quantized_sites)}


if __name__ == "__main__":
    main()
