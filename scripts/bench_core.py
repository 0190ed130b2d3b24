"""fp32 vs every quantization mode through XLA, in one process: latency at batch 1 and 32,
parameter bytes, accuracy. Prints ratios (fp32 time / quantized time: > 1 means faster).

    .venv/bin/python scripts/bench_core.py [--models lenet5 mlp convnet effnet] [--repeats 30]

`convnet` is a larger conv net (six 3x3 convs, 64-256 channels, 32x32x3 input; random
weights, so it reports output cosine instead of accuracy). `effnet` is the shared
EfficientNet-Lite0 imported from ONNX (needs ../shared/data), evaluated on real photos;
its fp32 baseline is given twice: plain XLA on the imported function, and the same float
graph through jaxptq's rewrite (whose depthwise lowering XLA:CPU needs), which is the fair
reference for the quantized programs.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from _timing import interleaved_times_ms
from flax import nnx

import jaxptq
from jaxptq.accuracy_control import with_reverted_sites
from jaxptq.models import digits

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES: dict[str, dict[str, Any]] = {
    "WEIGHT 8-bit": {"quant_type": "WEIGHT_QUANT", "bit_num": 8, "min_quant_weight_channel": 0},
    "WEIGHT 4-bit": {"quant_type": "WEIGHT_QUANT", "bit_num": 4, "min_quant_weight_channel": 0},
    "FULL MAX_MIN": {"quant_type": "FULL_QUANT"},
    "DYNAMIC ALWC": {"quant_type": "DYNAMIC_QUANT", "quant_strategy": "ALWC"},
    "DYNAMIC ACWL": {"quant_type": "DYNAMIC_QUANT", "quant_strategy": "ACWL"},
}


class ConvNet(nnx.Module):
    """A larger conv net for latency: 32x32x3 -> 6 convs (64..256 ch) -> dense."""

    def __init__(self, rngs: nnx.Rngs):
        chans = [3, 64, 64, 128, 128, 256, 256]
        self.convs = nnx.List(
            [
                nnx.Conv(
                    chans[i],
                    chans[i + 1],
                    (3, 3),
                    strides=(2, 2) if i in (2, 4) else (1, 1),
                    rngs=rngs,
                )
                for i in range(6)
            ]
        )
        self.head = nnx.Linear(256, 100, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.head(x.mean(axis=(1, 2)))


def interleaved_latency_ms(
    fns: list[Callable[[Any], Any]], x: Any, repeats: int, min_s: float = 1.0
) -> list[float]:
    """Median wall time of each of `fns` on `x`, all timed in the same loop
    (`_timing.interleaved_times_ms`)."""
    runs = [functools.partial(_ready, f, x) for f in fns]
    return [float(t) for t in np.median(interleaved_times_ms(runs, repeats, min_s), axis=0)]


def _ready(fn: Callable[[Any], Any], x: Any) -> Any:
    return jax.block_until_ready(fn(x))


def compiled_int8_ops(fn: Callable[[Any], Any], x: Any) -> int:
    """Dots, convolutions and library calls with an `s8` operand in XLA's optimized HLO: the
    integer arithmetic the backend really runs (on GPU, cuDNN/cuBLAS custom calls)."""
    text = jax.jit(lambda v: fn(v)).lower(x).compile().as_text() or ""
    dtypes = dict(re.findall(r"%([\w.\-]+) = \(?(\w+)\[", text))
    calls = re.findall(r"\b(?:convolution|dot|custom-call)\(([^)]*)\)", text)
    return sum(
        any(dtypes.get(name) == "s8" for name in re.findall(r"%([\w.\-]+)", operands))
        for operands in calls
    )


def _ms(ms: float) -> str:
    """Three significant digits: the digits models run in tens of microseconds."""
    return f"{ms:.{max(1, 2 - int(np.floor(np.log10(ms))))}f}" if ms < 100 else f"{ms:.1f}"


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def digits_case(name: str) -> dict[str, Any]:
    x_train, _, x_test, y_test = digits.load_digits_split()
    model = digits.pretrained(name)
    return {
        "fn": model,
        "calib": [x_train[i : i + 10] for i in range(0, 100, 10)],
        "x1": x_test[:1],
        "x32": x_test[:32],
        "eval": (x_test, y_test),
        "rows": False,
    }


def convnet_case() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(132, 32, 32, 3)).astype(np.float32)
    return {
        "fn": ConvNet(nnx.Rngs(0)),
        "calib": [x[i : i + 10] for i in range(0, 100, 10)],
        "x1": x[100:101],
        "x32": x[100:132],
        "eval": None,
        "rows": False,
    }


def effnet_case(data: pathlib.Path, eval_photos: int) -> dict[str, Any]:
    from jaxptq import datasets

    calib, evals, labels = datasets.imagenet_split(data / "imagenet")
    fn = jaxptq.import_onnx(data / "models" / "efficientnet_lite0.onnx")
    xc = datasets.load_imagenet_images(calib)
    xe = datasets.load_imagenet_images(evals[:eval_photos])
    ye = np.asarray([labels[f] for f in evals[:eval_photos]])
    return {
        "fn": fn,
        "calib": [xc[i : i + 1] for i in range(len(xc))],
        "x1": xe[:1],
        "x32": xe[:32],
        "eval": (xe, ye),
        "rows": True,
    }


def batched(fn: Callable[[Any], Any], rows: bool) -> Callable[[Any], Any]:
    """A function of a batch: models that fix batch 1 run row by row under vmap."""
    if not rows:
        return fn
    return jax.jit(jax.vmap(lambda r: fn(r[None])[0]))


def top1(fn: Callable[[Any], Any], data: tuple[np.ndarray, np.ndarray]) -> float:
    x, y = data
    preds = np.concatenate(
        [np.argmax(np.asarray(fn(x[i : i + 32])), -1) for i in range(0, len(x), 32)]
    )
    return float(np.mean(preds == y) * 100)


def run_case(
    label: str,
    case: dict[str, Any],
    repeats: int,
    target_device: str | None = None,
    modes: list[str] | None = None,
) -> None:
    fn = case["fn"]
    rows = case["rows"]
    float_xla = batched(jax.jit(fn), rows) if rows else jax.jit(fn)
    results: list[dict[str, Any]] = []
    base = {"name": "fp32 (plain XLA)", "fn": float_xla}
    qfns: dict[str, Any] = {}
    plan_time: dict[str, float] = {}
    for mode, config in MODES.items():
        if modes and mode not in modes:
            continue
        if config["quant_type"] == "FULL_QUANT" and target_device:
            config = {**config, "target_device": target_device}
        start = time.perf_counter()
        qfns[mode] = jaxptq.ptq(fn, case["calib"], config)
        plan_time[mode] = time.perf_counter() - start
    any_q = next(iter(qfns.values()))
    float_rewrite = with_reverted_sites(any_q, [s.name for s in any_q.plan.sites], "float")
    total_before = any_q.plan.weight_bytes()[0]
    results.append(base)
    results.append({"name": "fp32 (jaxptq graph)", "fn": batched(float_rewrite, rows)})
    for mode, qfn in qfns.items():
        results.append({"name": mode, "fn": batched(qfn, rows), "plan": qfn.plan})
    ref_fn = results[1]["fn"]
    y_ref = np.asarray(ref_fn(case["x32"]))
    # Inputs already on the device, as XLA latency is usually taken: a NumPy batch costs the
    # same host copy on every call of every program (12 us of the MLP's 28 us), which only
    # pulls every ratio towards 1.
    x1, x32 = jax.device_put(case["x1"]), jax.device_put(case["x32"])
    print(f"\n### {label}\n")
    print(
        "| program | batch 1 ms | x fp32 | batch 32 ms | x fp32 | x plain XLA | weight bytes "
        "| int8 sites | i8 ops compiled | accuracy | cosine vs fp32 | ptq s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fns = [r["fn"] for r in results]
    b1 = interleaved_latency_ms(fns, x1, repeats)
    b32 = interleaved_latency_ms(fns, x32, max(3, repeats // 3))
    # results[0] is plain XLA, results[1] the float graph ("x fp32")
    for r, ms1, ms32 in zip(results, b1, b32, strict=True):
        plan = r.get("plan")
        weight_bytes = plan.weight_bytes()[1] if plan else total_before
        int8_sites = sum(s.int8_compute for s in plan.sites) if plan else 0
        int8_ops = compiled_int8_ops(r["fn"], case["x32"])
        acc = f"{top1(r['fn'], case['eval']):.2f}" if case["eval"] else "-"
        cos = cosine(y_ref, r["fn"](case["x32"]))
        ptq_s = f"{plan_time[r['name']]:.1f}" if r["name"] in plan_time else "-"
        print(
            f"| {r['name']} | {_ms(ms1)} | {b1[1] / ms1:.2f} | {_ms(ms32)} "
            f"| {b32[1] / ms32:.2f} | {b32[0] / ms32:.2f} "
            f"| {weight_bytes:,} | {int8_sites} | {int8_ops} | {acc} | {cos:.5f} | {ptq_s} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["lenet5", "mlp", "convnet", "effnet"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--eval-photos", type=int, default=900)
    parser.add_argument(
        "--target-device",
        choices=["CPU", "NVGPU", "none"],
        default=None,
        help="FULL_QUANT's target_device (default: NVGPU on a GPU, none elsewhere)",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=None, help="default: every mode"
    )
    parser.add_argument(
        "--sync-dispatch",
        action="store_true",
        help="run CPU programs on the calling thread (jax_cpu_enable_async_dispatch=False): "
        "for the sub-millisecond digits models the asynchronous hand-off to XLA's worker "
        "thread (tens to ~110 us a call on the 2-core VM) is larger than the programs",
    )
    args = parser.parse_args(argv)
    if args.sync_dispatch:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    target = args.target_device or ("NVGPU" if jax.default_backend() == "gpu" else "none")
    target_device = None if target == "none" else target
    print(
        f"jaxptq bench_core: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"load average {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}; "
        f"{'synchronous' if args.sync_dispatch else 'asynchronous'} CPU dispatch"
    )
    print(
        "x fp32 = fp32 (jaxptq graph) time / this program's time; x plain XLA = plain XLA's"
        " batch-32 time / this program's; > 1 is faster. Every program of a model is timed in"
        f" one shuffled loop. FULL_QUANT target_device: {target_device}."
    )
    for name in args.models:
        if name in digits.MODELS:
            run_case(
                f"{name} (digits, 359 test images)",
                digits_case(name),
                args.repeats,
                target_device,
                args.modes,
            )
        elif name == "convnet":
            run_case(
                "convnet (32x32x3, random weights)",
                convnet_case(),
                args.repeats,
                target_device,
                args.modes,
            )
        elif name == "effnet":
            if not (args.data / "models" / "efficientnet_lite0.onnx").is_file():
                print(f"\n(skipping effnet: {args.data} has no models/efficientnet_lite0.onnx)")
                continue
            case = effnet_case(args.data, args.eval_photos)
            run_case(
                f"EfficientNet-Lite0 (ONNX, {len(case['eval'][1])} photos)",
                case,
                max(3, args.repeats // 5),
                target_device,
                args.modes,
            )


if __name__ == "__main__":
    main()
