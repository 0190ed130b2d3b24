"""The main job on the bundled default: LeNet-5 trained on real digits, quantized in every
mode, with accuracy, size, int8 sites and latency side by side.

Run with `scripts/demo` (sets up .venv) or `python -m jaxptq.demo`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxptq.api import ptq
from jaxptq.models import digits

MODES: dict[str, dict[str, Any]] = {
    "WEIGHT_QUANT 8-bit": {
        "quant_type": "WEIGHT_QUANT",
        "bit_num": 8,
        "min_quant_weight_channel": 0,
    },
    "WEIGHT_QUANT 4-bit": {
        "quant_type": "WEIGHT_QUANT",
        "bit_num": 4,
        "min_quant_weight_channel": 0,
    },
    "WEIGHT_QUANT mixed": {
        "quant_type": "WEIGHT_QUANT",
        "bit_num": 0,
        "min_quant_weight_channel": 0,
    },
    "FULL_QUANT MAX_MIN": {"quant_type": "FULL_QUANT"},
    "FULL_QUANT KL": {"quant_type": "FULL_QUANT", "activation_quant_method": "KL"},
    "DYNAMIC_QUANT ALWC": {"quant_type": "DYNAMIC_QUANT", "quant_strategy": "ALWC"},
    "DYNAMIC_QUANT ACWL": {"quant_type": "DYNAMIC_QUANT", "quant_strategy": "ACWL"},
}


def latency_ms(fn: Callable[[Any], Any], x: np.ndarray, repeats: int = 30) -> float:
    """Median wall time of one call, after compilation."""
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(digits.MODELS), default="lenet5")
    parser.add_argument("--batch", type=int, default=32, help="batch size for latency")
    args = parser.parse_args(argv)

    x_train, _, x_test, y_test = digits.load_digits_split()
    model = digits.pretrained(args.model)
    calib = [x_train[i : i + 10] for i in range(0, 100, 10)]
    x_lat = x_test[: args.batch]
    float_fn = jax.jit(model)
    fp32 = digits.accuracy(float_fn, x_test, y_test)
    fp32_ms = latency_ms(float_fn, x_lat)
    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(model))
    print(
        f"{args.model}: {n_params:,} parameters, trained on {len(x_train)} real digits, "
        f"tested on {len(x_test)}; latency at batch {args.batch}"
    )
    rows: list[dict[str, Any]] = [
        {
            "mode": "fp32",
            "top1": fp32,
            "agree": 100.0,
            "bytes": 4 * n_params,
            "int8": 0,
            "ms": fp32_ms,
        }
    ]
    ref = np.argmax(np.asarray(float_fn(x_test)), -1)
    for label, config in MODES.items():
        qfn = ptq(model, calib, config)
        plan = qfn.plan
        before, after = plan.weight_bytes()
        pred = np.argmax(np.asarray(qfn(x_test)), -1)
        rows.append(
            {
                "mode": label,
                "top1": float(np.mean(pred == y_test) * 100),
                "agree": float(np.mean(pred == ref) * 100),
                "bytes": 4 * n_params - before + after,
                "int8": sum(s.int8_compute for s in plan.sites),
                "ms": latency_ms(qfn, x_lat),
                "bits": plan.average_bits(),
            }
        )
    header = (
        f"{'mode':<20} {'top-1 %':>8} {'drop':>6} {'agree %':>8} {'bytes':>9} "
        f"{'size':>6} {'int8 sites':>10} {'ms':>7} {'vs fp32':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['mode']:<20} {r['top1']:8.2f} {fp32 - r['top1']:6.2f} {r['agree']:8.2f} "
            f"{r['bytes']:9,} {r['bytes'] / rows[0]['bytes']:6.1%} {r['int8']:10d} "
            f"{r['ms']:7.2f} {fp32_ms / r['ms']:7.2f}x"
        )
    return rows


if __name__ == "__main__":
    main()
