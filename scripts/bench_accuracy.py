"""FULL_QUANT accuracy of EfficientNet-Lite0 (ONNX) on the shared ImageNet split, per
calibration method, with and without bias correction.

    .venv/bin/python scripts/bench_accuracy.py [--eval-photos 900] [--methods MAX_MIN KL ...]

Split (../shared/data/README.md): every 10th photo of index.csv calibrates (100 photos),
the other 900 evaluate. onnxruntime's quantize_static on the same split (the README's
figures): fp32 87.56%, MinMax 87.22% (agreement 98.33%), Entropy 87.22% (98.33%),
Percentile 86.89% (97.67%).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

import jaxptq
from jaxptq import datasets
from jaxptq.accuracy_control import with_reverted_sites

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rows(fn: Any) -> Any:
    return jax.jit(jax.vmap(lambda r: fn(r[None])[0]))


def logits(fn: Any, x: np.ndarray, batch: int = 25) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--eval-photos", type=int, default=900)
    parser.add_argument("--methods", nargs="+", default=["MAX_MIN", "KL", "REMOVAL_OUTLIER"])
    args = parser.parse_args(argv)
    calib, evals, labels = datasets.imagenet_split(args.data / "imagenet")
    evals = evals[: args.eval_photos]
    fn = jaxptq.import_onnx(args.data / "models" / "efficientnet_lite0.onnx")
    x_calib = datasets.load_imagenet_images(calib)
    x_eval = datasets.load_imagenet_images(evals)
    y = np.asarray([labels[f] for f in evals])
    samples = [x_calib[i : i + 1] for i in range(len(x_calib))]
    print(
        f"EfficientNet-Lite0, {len(calib)} calibration / {len(evals)} evaluation photos; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )

    reference = None
    print("| method | bias correction | top-1 % | agreement with fp32 % | mean cosine | ptq s |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        for bias_correction in (False, True):
            start = time.perf_counter()
            qfn = jaxptq.ptq(
                fn,
                samples,
                {
                    "quant_type": "FULL_QUANT",
                    "bias_correction": bias_correction,
                    "activation_quant_method": method,
                },
            )
            seconds = time.perf_counter() - start
            if reference is None:
                float_fn = with_reverted_sites(qfn, [s.name for s in qfn.plan.sites], "float")
                reference = logits(rows(float_fn), x_eval)
                top1 = np.mean(reference.argmax(-1) == y) * 100
                print(f"| fp32 | - | {top1:.2f} | 100.00 | 1.00000 | - |")
            out = logits(rows(qfn), x_eval)
            top1 = np.mean(out.argmax(-1) == y) * 100
            agree = np.mean(out.argmax(-1) == reference.argmax(-1)) * 100
            cos = np.mean(
                np.sum(out * reference, -1)
                / np.linalg.norm(out, axis=-1)
                / np.linalg.norm(reference, axis=-1)
            )
            print(
                f"| {method} | {bias_correction} | {top1:.2f} | {agree:.2f} | {cos:.5f} | "
                f"{seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
