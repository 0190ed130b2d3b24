"""Isolated `i8 x i8 -> i32` dot_general and convolution against float32, on whatever backend
JAX has (CPU, or GPU when one is present), in one process. Prints the ratio float / int8
(> 1: int8 is faster) and the kernel XLA chose for each (from the optimized HLO).

    .venv/bin/python scripts/bench_int8_ops.py [--batch 32] [--repeats 30]

The layer shapes are those of `bench_core.py`'s convnet (NHWC, 3x3 kernels) plus a 1x1
convolution and two matmuls, so a whole-model ratio there can be read against its layers.
The int8 op is timed with the epilogue a quantized site has (`i32 -> f32` times a
per-channel scale): XLA:GPU runs an integer convolution only when it can fuse that
conversion into a cuDNN call, and reports UNIMPLEMENTED for a bare `s32` result.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def conv_cases(batch: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int]]:
    """(name, input shape, kernel shape, stride) of the convnet's six layers and a 1x1."""
    return [
        ("conv 3->64 32x32", (batch, 32, 32, 3), (3, 3, 3, 64), 1),
        ("conv 64->64 32x32", (batch, 32, 32, 64), (3, 3, 64, 64), 1),
        ("conv 64->128 /2", (batch, 32, 32, 64), (3, 3, 64, 128), 2),
        ("conv 128->128 16x16", (batch, 16, 16, 128), (3, 3, 128, 128), 1),
        ("conv 128->256 /2", (batch, 16, 16, 128), (3, 3, 128, 256), 2),
        ("conv 256->256 8x8", (batch, 8, 8, 256), (3, 3, 256, 256), 1),
        ("conv 1x1 256->1024 14x14", (batch, 14, 14, 256), (1, 1, 256, 1024), 1),
    ]


def dot_cases(batch: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    return [
        ("dot 1280->1000", (batch, 1280), (1280, 1000)),
        ("dot 4096->4096", (batch * 8, 4096), (4096, 4096)),
    ]


def median_ms(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def kernel_of(fn: Any, args: tuple[Any, ...]) -> str:
    """What the optimized HLO runs the op as: a library call's target, or a fusion."""
    text = fn.lower(*args).compile().as_text()
    targets = sorted(
        set(re.findall(r'custom_call_target="([^"]+)"', text))
        | set(re.findall(r'"kind":"(__\w+)"', text))  # XLA:CPU library fusions (YNNPACK)
    )
    if targets:
        return ",".join(targets)
    for word in ("convolution", "dot"):
        if re.search(rf"\b{word}\(", text):
            return f"XLA {word}"
    return "fusion"


def conv(x: Any, w: Any, stride: int, out_dtype: Any) -> Any:
    return lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        "SAME",
        dimension_numbers=CONV_DIMS,
        preferred_element_type=out_dtype,
    )


def dot(x: Any, w: Any, out_dtype: Any) -> Any:
    return lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)


def rescaled(acc: Any) -> Any:
    """The site epilogue: the i32 accumulator to float, times a per-output-channel scale."""
    scale = jnp.linspace(1e-3, 2e-3, acc.shape[-1], dtype=jnp.float32)
    return acc.astype(jnp.float32) * scale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(
        f"jaxptq bench_int8_ops: jax {jax.__version__} on {device.platform} ({device.device_kind})"
    )
    rng = np.random.default_rng(0)
    rows: list[tuple[str, Any, Any, tuple[Any, ...], tuple[Any, ...]]] = []
    for name, xs, ws, stride in conv_cases(args.batch):
        xf = rng.standard_normal(xs).astype(np.float32)
        wf = rng.standard_normal(ws).astype(np.float32)
        xi, wi = rng.integers(-128, 128, xs, np.int8), rng.integers(-127, 128, ws, np.int8)
        f32 = jax.jit(lambda x, w, s=stride: conv(x, w, s, jnp.float32))
        i8 = jax.jit(lambda x, w, s=stride: rescaled(conv(x, w, s, jnp.int32)))
        rows.append((name, f32, i8, (xf, wf), (xi, wi)))
    for name, xs, ws in dot_cases(args.batch):
        xf = rng.standard_normal(xs).astype(np.float32)
        wf = rng.standard_normal(ws).astype(np.float32)
        xi, wi = rng.integers(-128, 128, xs, np.int8), rng.integers(-127, 128, ws, np.int8)
        f32 = jax.jit(lambda x, w: dot(x, w, jnp.float32))
        i8 = jax.jit(lambda x, w: rescaled(dot(x, w, jnp.int32)))
        rows.append((name, f32, i8, (xf, wf), (xi, wi)))
    print(f"\nbatch {args.batch}, median of {args.repeats} after compile\n")
    print("| op | f32 ms | i8 ms | f32 / i8 | f32 kernel | i8 kernel |")
    print("|---|---|---|---|---|---|")
    for name, f32, i8, fargs, iargs in rows:
        fargs = tuple(jax.device_put(a) for a in fargs)
        iargs = tuple(jax.device_put(a) for a in iargs)
        try:
            i8_ms, i8_kernel = median_ms(i8, iargs, args.repeats), kernel_of(i8, iargs)
        except Exception as err:  # an unsupported int8 kernel is a finding, not a crash
            i8_ms, i8_kernel = float("nan"), f"fails: {' '.join(str(err).split())[:120]}"
        f32_ms = median_ms(f32, fargs, args.repeats)
        print(
            f"| {name} | {f32_ms:.3f} | {i8_ms:.3f} | {f32_ms / i8_ms:.2f} "
            f"| {kernel_of(f32, fargs)} | {i8_kernel} |"
        )


if __name__ == "__main__":
    main()
