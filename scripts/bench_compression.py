"""Compression benchmark on EfficientNet-Lite0: sizes, top-1 and search times per setting.

Settings: fp32, 8-bit and 4-bit weights, mixed bits at the default `init_scale`, mixed bits
auto-tuned, and accuracy control (max_drop 0.1 point of top-1) over one of them. Sizes are
the saved plan folder (what a deployment ships: packed integer weights, scales, JSON), the
integer bytes the lowered program takes as arguments, the StableHLO text of the program
(weights travel as arguments, so it holds no weights), and the ONNX export when
`jaxptq.export.export_onnx` can write it.

Usage:
    .venv/bin/python scripts/bench_compression.py --eval-photos 120 --json out.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import jaxptq
from jaxptq import datasets
from jaxptq.accuracy_control import ptq_with_accuracy_control

SETTINGS: dict[str, dict[str, Any]] = {
    "8-bit": {"bit_num": 8},
    "4-bit": {"bit_num": 4},
    "mixed (init_scale 0.02)": {"bit_num": 0},
    "mixed (auto_tune)": {"bit_num": 0, "auto_tune": True},
}


def batched(fn1: Callable[..., Any]) -> Callable[[jax.Array], jax.Array]:
    """The imported model takes one image ([1,3,224,224]); vmap it over a batch."""
    return lambda x: jax.vmap(lambda xi: fn1(xi[None])[0])(x)


def folder_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def predict(fn: Callable[[Any], Any], batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(fn(b)) for b in batches])


def row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(pathlib.Path(__file__).parents[2] / "shared/data"))
    parser.add_argument("--eval-photos", type=int, default=120, help="spread over the 900")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--tune-photos", type=int, default=16, help="calibration photos")
    parser.add_argument("--ac-setting", default="4-bit", choices=sorted(SETTINGS))
    parser.add_argument("--ac-max-drop", type=float, default=0.1)
    parser.add_argument("--ac-ranking-batches", type=int, default=1, help="of 4 photos")
    parser.add_argument("--skip", nargs="*", default=[], help="settings to leave out")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    data = pathlib.Path(args.data)
    model_path = data / "models" / "efficientnet_lite0.onnx"
    fn = batched(jaxptq.import_onnx(model_path))
    calib_files, eval_files, labels = datasets.imagenet_split(data / "imagenet")
    step = max(1, len(eval_files) // args.eval_photos)
    picked = eval_files[::step][: args.eval_photos]
    x_eval = datasets.load_imagenet_images(picked)
    y_eval = np.array([labels[f] for f in picked])
    batches = [x_eval[i : i + args.batch] for i in range(0, len(x_eval), args.batch)]
    x_tune = datasets.load_imagenet_images(calib_files[: args.tune_photos])
    calib = [x_tune]  # weight-only modes trace on it; auto_tune measures its cosine on it

    jit_fn = jax.jit(fn)

    def top1(f: Callable[[Any], Any], _: Any = None) -> float:
        f = jit_fn if f is fn else f  # the float model runs jitted too
        return float(np.mean(predict(f, batches).argmax(1) == y_eval) * 100)

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    logits_fp = predict(jit_fn, batches)
    float_weights = None
    rows.append(
        {
            "setting": "fp32",
            "top1": float(np.mean(logits_fp.argmax(1) == y_eval) * 100),
            "onnx_bytes": model_path.stat().st_size,
            "eval_s": time.perf_counter() - t0,
        }
    )
    print(rows[-1], flush=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_compression."))
    for name, config in SETTINGS.items():
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        qfn = jaxptq.ptq(fn, calib, config)
        search_s = time.perf_counter() - t0
        plan = qfn.plan
        folder = tmp / name.replace(" ", "_").replace("(", "").replace(")", "")
        plan.save(folder)
        lowered = qfn.lower(x_eval[: args.batch])
        int_args = sum(
            int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
            for a in jax.tree_util.tree_leaves(lowered.args_info)
            if np.issubdtype(a.dtype, np.integer)
        )
        float_weights, stored = plan.weight_bytes()
        t0 = time.perf_counter()
        logits = predict(qfn, batches)
        row = {
            "setting": name,
            "avg_bits": plan.average_bits(),
            "bits_histogram": dict(
                sorted(
                    {
                        b: sum(1 for s in plan.sites if s.bits == b)
                        for b in {s.bits for s in plan.sites}
                    }.items()
                )
            ),
            "plan_bytes": folder_bytes(folder),
            "weight_bytes": stored,
            "int_arg_bytes": int_args,
            "stablehlo_bytes": len(lowered.as_text().encode()),
            "top1": float(np.mean(logits.argmax(1) == y_eval) * 100),
            "agree_fp32": float(np.mean(logits.argmax(1) == logits_fp.argmax(1)) * 100),
            "cosine": row_cosine(logits_fp, logits),
            "plan_s": search_s,
            "eval_s": time.perf_counter() - t0,
            "notes": plan.notes,
        }
        try:
            from jaxptq.export import export_onnx

            path = export_onnx(qfn, folder.with_suffix(".onnx"), x_eval[:1])
            row["onnx_bytes"] = path.stat().st_size
        except Exception as err:  # noqa: BLE001 - report, don't stop the benchmark
            row["onnx_bytes"] = f"n/a ({type(err).__name__}: {str(err)[:80]})"
        rows.append(row)
        print(row, flush=True)
    rows[0]["weight_bytes"] = float_weights

    t0 = time.perf_counter()
    result = ptq_with_accuracy_control(
        fn,
        [x_tune[i : i + 4] for i in range(0, len(x_tune), 4)],
        None,
        top1,
        max_drop=args.ac_max_drop,
        config=SETTINGS[args.ac_setting],
        ranking_subset_size=args.ac_ranking_batches,
        minimize=False,
    )
    ac = {
        "setting": f"accuracy control over {args.ac_setting} (max_drop {args.ac_max_drop})",
        "seconds": time.perf_counter() - t0,
        "float": result.float_metric,
        "quantized": result.quant_metric,
        "final": result.final_metric,
        "met": result.met,
        "reverted": result.reverted,
        "avg_bits": result.qfn.plan.average_bits(),
        "validations": len(result.history),
    }
    print(ac, flush=True)
    report = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}",
        "eval_photos": len(picked),
        "tune_photos": len(x_tune),
        "rows": rows,
        "accuracy_control": ac,
    }
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
