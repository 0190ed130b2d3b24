"""Export benchmark on EfficientNet-Lite0: onnxruntime latency and accuracy of jaxptq's exported
int8 models against onnxruntime's own `quantize_static` (QDQ and QOperator; ratios are to the
faster of the two at each batch size), and the StableHLO artifact through XLA against the
float program.

Usage: python scripts/bench_export.py [--eval 900] [--calib 100] [--repeats 20] [--target CPU]

Prints a Markdown table for docs/benchmarks.md. The model's batch axis is made symbolic first
(input/output dims and the Reshape before the classifier), so batch 32 runs too.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import onnx
import onnxruntime as ort
from _timing import interleaved_times_ms
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

import jaxptq
from jaxptq import datasets
from jaxptq.export import export_onnx, export_stablehlo, load_stablehlo
from jaxptq.targets import TARGETS

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("JAXPTQ_SHARED_DATA", ROOT.parent / "shared" / "data"))


def dynamic_batch(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    model = onnx.load(str(src))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Reshape" and n.input[1] in inits:
            shape = numpy_helper.to_array(inits[n.input[1]]).copy()
            shape[0] = 0  # copy the batch dimension
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(shape, n.input[1]))
    onnx.save(model, str(dst))
    return dst


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self.items = iter([{"input": x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def session(path: pathlib.Path, signed_int8: bool = False) -> ort.InferenceSession:
    """`signed_int8`: onnxruntime runs int8 activations in its int8 kernels as they are
    (`session.qdqisint8allowed`), as the signed targets' own runtimes do. By default on x86
    it converts each QDQ pair to uint8 on its own and leaves a convolution whose input and
    output pairs came out different in float (10 of EfficientNet-Lite0's 49 for NVGPU)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if signed_int8:
        so.add_session_config_entry("session.qdqisint8allowed", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_ms(run: Callable[[], Any], repeats: int) -> float:
    """Best of `repeats` runs: on a shared machine the minimum is the least noisy figure."""
    run()
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def paired_ratio(times: np.ndarray, ours: int, base: int) -> tuple[float, float, float]:
    """Median over rounds of `ours`' time over `base`'s in the same round, with a bootstrap
    95% interval: on this shared VM a model's median is twice its best, and the load moves
    within a run, so a ratio per round compares like with like."""
    ratios = times[:, ours] / times[:, base]
    rng = np.random.default_rng(0)
    boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(1000)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.median(ratios)), float(lo), float(hi)


def _first_rows(run: Callable[[np.ndarray], Any], x: np.ndarray, n: int) -> Any:
    return run(x[:n])


def _ready(fn: Callable[[Any], Any], x: Any) -> Any:
    return jax.block_until_ready(fn(x))


def predict(run: Callable[[np.ndarray], Any], x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([np.asarray(run(x[i : i + batch])) for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--eval", type=int, default=900)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--target",
        default="CPU",
        choices=["CPU", "NVGPU", "DSP", "ASCEND"],
        help="FULL_QUANT's target_device, which the exports follow (default CPU)",
    )
    args = ap.parse_args()

    calib_files, eval_files, labels = datasets.imagenet_split(DATA / "imagenet")
    xc = datasets.load_imagenet_images(calib_files[: args.calib])
    xe = datasets.load_imagenet_images(eval_files[: args.eval])
    y = np.array([labels[f] for f in eval_files[: args.eval]])
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_export."))
    float_path = dynamic_batch(DATA / "models" / "efficientnet_lite0.onnx", tmp / "float.onnx")

    t = time.perf_counter()
    ort_path, ort_qop_path = tmp / "ort_qdq.onnx", tmp / "ort_qoperator.onnx"
    for path, quant_format in ((ort_path, QuantFormat.QDQ), (ort_qop_path, QuantFormat.QOperator)):
        quantize_static(
            str(float_path),
            str(path),
            _Reader(xc),
            quant_format=quant_format,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    t_ort = (time.perf_counter() - t) / 2

    t = time.perf_counter()
    fn = jaxptq.import_onnx(float_path)
    qfn = jaxptq.ptq(
        fn,
        [xc[i : i + 1] for i in range(len(xc))],
        {"quant_type": "FULL_QUANT", "target_device": args.target},
    )
    t_ptq = time.perf_counter() - t
    # (`fuse_calib` adds nothing here: a plan for a target already quantizes every tensor
    # the runtime needs quantized to run the network in integers.)
    ours = {
        form: export_onnx(qfn, tmp / f"jaxptq_{form}.onnx", form=form)
        for form in ("qdq", "qoperator")
    }
    sizes = {
        k: os.path.getsize(p) for k, p in {"float": float_path, "ort": ort_path, **ours}.items()
    }

    signed = not TARGETS[args.target].act_unsigned
    sessions = {
        "fp32": session(float_path),
        "ort quantize_static QDQ": session(ort_path),
        "ort quantize_static QOperator": session(ort_qop_path),
        "jaxptq QDQ": session(ours["qdq"], signed),
        "jaxptq QOperator": session(ours["qoperator"], signed),
    }
    float_logits = predict(lambda b: sessions["fp32"].run(None, {"input": b})[0], xe)
    qfn_logits = predict(lambda b: qfn(b), xe)
    runs, all_logits = [], []
    for s in sessions.values():

        def run(b: np.ndarray, s: Any = s) -> np.ndarray:
            return s.run(None, {"input": b})[0]

        runs.append(run)
        all_logits.append(predict(run, xe))
    # batch 1 is cheap: five times the rounds
    all_times = [
        interleaved_times_ms(
            [functools.partial(_first_rows, r, xe, n) for r in runs],
            args.repeats * (5 if n == 1 else 1),
        )
        for n in (1, 32)
    ]
    rows = [
        (name, logits, [all_times[0][:, i].min(), all_times[1][:, i].min()])
        for i, (name, logits) in enumerate(zip(sessions, all_logits, strict=True))
    ]

    # StableHLO artifacts through XLA against the float program under jax.jit.
    float_jit = jax.jit(fn)
    hlo = {}
    for n in (1, 32):
        path = export_stablehlo(qfn, tmp / f"effnet_b{n}.shlo", xe[:n])
        hlo[n] = load_stablehlo(path)
    xla = []
    for n in (1, 32):
        x = xe[:n]
        t_f = latency_ms(functools.partial(_ready, float_jit, x), args.repeats)
        t_q = latency_ms(functools.partial(_ready, hlo[n], x), args.repeats)
        xla.append((t_f, t_q))
    hlo_logits = predict(lambda b: hlo[32](b) if len(b) == 32 else qfn(b), xe)

    def top1(logits: np.ndarray) -> float:
        return 100 * float(np.mean(logits.argmax(1) == y))

    def agree(a: np.ndarray, b: np.ndarray) -> float:
        return 100 * float(np.mean(a.argmax(1) == b.argmax(1)))

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return float(np.mean(c))

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"onnxruntime {ort.__version__}, jax {jax.__version__}; {len(xc)} calibration and "
        f"{len(xe)} evaluation photos; target {args.target}; quantize_static {t_ort:.0f} s, "
        f"jaxptq ptq {t_ptq:.0f} s"
    )
    print(
        f"file sizes: float {sizes['float']:,} B; onnxruntime QDQ {sizes['ort']:,} B "
        f"({sizes['ort'] / sizes['float']:.1%}); jaxptq QDQ {sizes['qdq']:,} B "
        f"({sizes['qdq'] / sizes['float']:.1%}); jaxptq QOperator {sizes['qoperator']:,} B "
        f"({sizes['qoperator'] / sizes['float']:.1%})\n"
    )
    print(
        "| onnxruntime CPU | top-1 % | agree fp32 % | agree jaxptq int8 (JAX) % | "
        "cos vs JAX int8 | batch 1 ms (best) | batch 32 ms (best) | b1 vs ORT's fastest "
        "int8 | b32 vs ORT's fastest int8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    # onnxruntime's fastest int8 model at each batch size (QDQ or QOperator)
    base = [min(rows[1][2][i], rows[2][2][i]) for i in range(2)]
    for name, logits, lat in rows:
        print(
            f"| {name} | {top1(logits):.2f} | {agree(logits, float_logits):.2f} | "
            f"{agree(logits, qfn_logits):.2f} | {cos(logits, qfn_logits):.5f} | "
            f"{lat[0]:.2f} | {lat[1]:.1f} | {lat[0] / base[0]:.2f}x | {lat[1] / base[1]:.2f}x |"
        )
    print(
        "\n| per round, vs onnxruntime's int8 model with the lower median | batch 1: median "
        "ratio (95% CI) | batch 32: median ratio (95% CI) |"
    )
    print("|---|---|---|")
    for i, name in enumerate(sessions):
        if not name.startswith("jaxptq"):
            continue
        cells = []
        for times in all_times:
            fastest = 1 + int(np.argmin(np.median(times[:, 1:3], axis=0)))
            median, lo, hi = paired_ratio(times, i, fastest)
            cells.append(f"{median:.3f}x ({lo:.3f}-{hi:.3f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    print(
        "\n| XLA CPU | top-1 % | batch 1 ms, best (float / int8) | "
        "batch 32 ms, best (float / int8) | int8 / float |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| StableHLO artifact (int8) vs jax.jit(float) | {top1(hlo_logits):.2f} | "
        f"{xla[0][0]:.2f} / {xla[0][1]:.2f} | {xla[1][0]:.1f} / {xla[1][1]:.1f} | "
        f"{xla[0][1] / xla[0][0]:.2f}x, {xla[1][1] / xla[1][0]:.2f}x |"
    )
    print(
        f"\nStableHLO artifact == qfn bit for bit: "
        f"{np.array_equal(np.asarray(hlo[32](xe[:32])), np.asarray(qfn(xe[:32])))}"
    )


if __name__ == "__main__":
    main()
