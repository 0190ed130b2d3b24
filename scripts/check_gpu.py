"""FULL_QUANT end to end on whatever backend JAX has (meant for a GPU; CI has none): the
digits LeNet-5 and MLP, asymmetric (no target) and symmetric (`NVGPU`) activations, with
and without bias correction. Prints accuracy and the int8 ops in XLA's optimized program.

    python scripts/check_gpu.py

Why it exists: XLA:GPU runs integer convolutions only as cuDNN calls whose result is
converted to float in the same call, and rejects some forms the CPU takes (an s32 result
with a bias folded in; a zero-point-padded VALID convolution that it turns into a
backward-filter call). Each of those failed here before `jaxptq.kernels` avoided it. An
int8 dot whose contracted length is not a multiple of 4 came back exactly doubled from
XLA:GPU's Triton gemm (jax 0.11.2, H100) until `jaxptq.u8s8.s8_dot_general` padded it; the
first table checks every length from 1 to 17 against an int64 reference.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import jax
import numpy as np

import jaxptq
from jaxptq import u8s8
from jaxptq.models import digits

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_core import compiled_int8_ops  # noqa: E402


def dot_lengths_exact() -> int:
    """Prints, per contracted length, whether `u8s8.dot` equals the int64 product."""
    rng = np.random.default_rng(0)
    wrong = []
    for k in range(1, 18):
        x = rng.integers(-128, 128, size=(8, k)).astype(np.int8)
        w = rng.integers(-128, 128, size=(k, 10)).astype(np.int8)
        got = np.asarray(jax.jit(u8s8.dot)(x, w)).astype(np.int64)
        if not np.array_equal(got, x.astype(np.int64) @ w.astype(np.int64)):
            wrong.append(k)
    print(f"int8 dots of contracted length 1..17 exact: {'all' if not wrong else f'not {wrong}'}")
    return len(wrong)


def main() -> int:
    failures = dot_lengths_exact()
    x_train, _, x_test, y_test = digits.load_digits_split()
    calib = [x_train[i : i + 10] for i in range(0, 100, 10)]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| model | target_device | bias correction | accuracy % | i8 ops compiled |")
    print("|---|---|---|---|---|")
    for name in ("lenet5", "mlp"):
        model = digits.pretrained(name)
        fp32 = float(np.mean(np.argmax(np.asarray(model(x_test)), -1) == y_test) * 100)
        print(f"| {name} | fp32 | - | {fp32:.2f} | 0 |")
        for target in (None, "NVGPU"):
            for bc in (False, True):
                config: dict[str, Any] = {"quant_type": "FULL_QUANT", "target_device": target}
                config["bias_correction"] = bc
                try:
                    qfn = jaxptq.ptq(model, calib, config)
                    pred = np.argmax(np.asarray(qfn(x_test)), -1)
                    acc = f"{np.mean(pred == y_test) * 100:.2f}"
                    ops = str(compiled_int8_ops(qfn, x_test[:32]))
                except Exception as err:  # a backend that rejects the program is the finding
                    failures += 1
                    acc, ops = "fails", " ".join(str(err).split())[:160]
                print(f"| {name} | {target} | {bc} | {acc} | {ops} |")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
