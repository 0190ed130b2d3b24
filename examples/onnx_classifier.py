"""Quantize an ONNX image classifier to int8 with a folder of images; print fp32 vs int8
top-1 agreement.

    python examples/onnx_classifier.py [MODEL.onnx] [--images DIR] [--calib 100] [--eval 200]

Defaults: the shared EfficientNet-Lite0 and ImageNet photos (../shared/data); images are
preprocessed as that model expects (short side 256, centre crop 224, (p - 127) / 128).
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

import jaxptq
from jaxptq import datasets

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default=SHARED / "models" / "efficientnet_lite0.onnx")
    parser.add_argument("--images", type=pathlib.Path, default=SHARED / "imagenet")
    parser.add_argument("--calib", type=int, default=100, help="calibration images")
    parser.add_argument("--eval", type=int, default=200, help="evaluation images")
    parser.add_argument("--method", default="MAX_MIN", help="MAX_MIN, KL or REMOVAL_OUTLIER")
    args = parser.parse_args(argv)

    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    calib_files = files[:: max(1, len(files) // args.calib)][: args.calib]
    eval_files = [f for f in files if f not in set(calib_files)][: args.eval]
    fn = jaxptq.import_onnx(args.model)
    x_calib = datasets.load_imagenet_images(calib_files)
    qfn = jaxptq.ptq(
        fn,
        [x_calib[i : i + 1] for i in range(len(x_calib))],
        {"quant_type": "FULL_QUANT", "activation_quant_method": args.method},
    )
    print(qfn.plan.table().splitlines()[-1])

    # The model fixes batch 1: run rows under vmap.
    float_rows = jax.jit(jax.vmap(lambda r: fn(r[None])[0]))
    quant_rows = jax.jit(jax.vmap(lambda r: qfn(r[None])[0]))
    agree, cos = [], []
    for i in range(0, len(eval_files), 25):
        x = datasets.load_imagenet_images(eval_files[i : i + 25])
        y, y_q = np.asarray(float_rows(x)), np.asarray(quant_rows(x))
        agree.append(np.argmax(y, -1) == np.argmax(y_q, -1))
        cos.append(np.sum(y * y_q, -1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(y_q, axis=-1))
    agreement = float(np.mean(np.concatenate(agree)) * 100)
    cosine = float(np.mean(np.concatenate(cos)))
    print(
        f"{len(eval_files)} images: fp32 vs int8 top-1 agreement {agreement:.2f}%, "
        f"mean output cosine {cosine:.5f}"
    )
    return {"agreement": agreement, "cosine": cosine}


if __name__ == "__main__":
    main()
