"""Import, trace and jit time of EfficientNet-Lite0, and fp32 latency: XLA vs onnxruntime.

Usage:
    .venv/bin/python scripts/bench_import.py [--data ../shared/data] [--repeats 20]

Both runtimes run the same batch-dynamic copy of the model (the file fixes batch 1 and
reshapes to [1, -1]; the copy declares batch `N` and reshapes to [0, -1]) on the same
preprocessed ImageNet photos. Latency is the median over repeats, after compilation/warm-up.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import numpy as np
import onnx
from onnx import numpy_helper

from jaxptq import datasets
from jaxptq.importers.onnx import import_onnx

ROOT = pathlib.Path(__file__).resolve().parents[1]


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with batch `N` on inputs/outputs and Reshape targets [1, ...] -> [0, ...]."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for vi in list(g.input) + list(g.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    shapes = {n.input[1] for n in g.node if n.op_type == "Reshape"}
    for i, t in enumerate(g.initializer):
        if t.name in shapes:
            a = numpy_helper.to_array(t).copy()
            if a[0] == 1:
                a[0] = 0  # 0 = copy the input's batch dimension
                g.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    return out


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    import onnxruntime as ort

    path = args.data / "models" / "efficientnet_lite0.onnx"
    _, evals, _ = datasets.imagenet_split(args.data / "imagenet")
    photos = datasets.load_imagenet_images(evals[:32])

    t = time.perf_counter()
    fn = import_onnx(path)
    t_import = time.perf_counter() - t
    t = time.perf_counter()
    jax.make_jaxpr(fn)(photos[:1])
    t_trace = time.perf_counter() - t

    model = dynamic_batch(fn.model)
    fn_dyn = import_onnx(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    jitted = jax.jit(fn_dyn)
    rows = []
    for batch in (1, 32):
        x = photos[:batch]
        t = time.perf_counter()
        compiled = jitted.lower(x).compile()
        t_jit = time.perf_counter() - t
        y = np.asarray(compiled(x))
        ref = sess.run(None, {"input": x})[0]
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        for _ in range(3):
            compiled(x).block_until_ready()
            sess.run(None, {"input": x})
        reps = args.repeats if batch == 1 else max(3, args.repeats // 4)
        xla = median_ms(lambda c=compiled, x=x: c(x).block_until_ready(), reps)
        onnxrt = median_ms(lambda x=x: sess.run(None, {"input": x}), reps)
        rows.append((batch, t_jit, xla, onnxrt, err, reps))

    print(f"import_onnx: {t_import * 1e3:.0f} ms, make_jaxpr trace: {t_trace * 1e3:.0f} ms")
    print(
        "| batch | jit compile (s) | XLA (ms) | onnxruntime (ms) | XLA / ORT | max rel err | "
        "repeats |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch, t_jit, xla, onnxrt, err, reps in rows:
        print(
            f"| {batch} | {t_jit:.2f} | {xla:.1f} | {onnxrt:.1f} | {xla / onnxrt:.2f} | "
            f"{err:.1e} | {reps} |"
        )


if __name__ == "__main__":
    main()
