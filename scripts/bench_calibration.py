"""Calibration speed and memory on EfficientNet-Lite0: jaxptq vs onnxruntime.

Usage:
    .venv/bin/python scripts/bench_calibration.py [--data ../shared/data] [--part all]

Parts:
    search  KL threshold search time per tensor on real 2048-bin histograms of all 49 Conv
            outputs (100 calibration photos, activations from onnxruntime): jaxptq's one
            program over all sites (compile reported apart) vs onnxruntime's
            `HistogramCollector.get_entropy_threshold`, one tensor at a time.
    memory  Peak RSS of a KL calibration over 100 and 400 photos, each in a fresh process:
            jaxptq `calibrate(..., "KL")` streaming a lazily loaded photo sequence, vs
            onnxruntime `create_calibrator(..., CalibrationMethod.Entropy)` + `collect_data`.
    ptq     Whole PTQ per method: `jaxptq.ptq` (compile time apart, and calibration against
            the bare fp32 forward passes) vs onnxruntime `quantize_static` with MinMax,
            Entropy (its 128 bins, and 2048 set through its calibrator) and Percentile.

The 400-photo set is the 100 calibration photos of the shared split plus the first 300
evaluation photos. Prints a Markdown section for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference

from jaxptq import datasets

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "models/efficientnet_lite0.onnx"
NUM_BINS = 2048


def conv_output_model(path: pathlib.Path) -> tuple[onnx.ModelProto, list[str]]:
    """The model with every Conv output added as a graph output, and those output names."""
    model = onnx.load(str(path))
    infos = {v.name: v for v in shape_inference.infer_shapes(model).graph.value_info}
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    model.graph.output.extend(infos[c] for c in convs)
    return model, convs


def photo_files(data: pathlib.Path, count: int) -> list[pathlib.Path]:
    calib, evals, _ = datasets.imagenet_split(data / "imagenet")
    files = (calib + evals)[:count]
    if len(files) < count:
        raise SystemExit(f"only {len(files)} photos under {data / 'imagenet'}, asked {count}")
    return files


class Photos(Sequence):
    """Batches of preprocessed photos, loaded from disk on each access (nothing kept)."""

    def __init__(self, files: list[pathlib.Path], batch: int = 10):
        self.files, self.batch = files, batch

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch)

    def __getitem__(self, k: int) -> Any:  # type: ignore[override]
        if not 0 <= k < len(self):
            raise IndexError(k)
        return (datasets.load_imagenet_images(self.files[k * self.batch : (k + 1) * self.batch]),)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------------------- search


def real_histograms(data: pathlib.Path) -> dict[str, Any]:
    """|x| (jaxptq) and x (onnxruntime) 2048-bin histograms of every Conv output, and the
    KL method's own: 4096 bins of |x| over the power of two at or above max|x|."""
    import onnxruntime as ort

    model, convs = conv_output_model(data / MODEL)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    photos = Photos(photo_files(data, 100), batch=1)
    lo = np.full(len(convs), np.inf, np.float32)
    hi = np.full(len(convs), -np.inf, np.float32)
    for (x,) in photos:  # pass 1: ranges
        for k, a in enumerate(session.run(convs, {"input": x})):
            lo[k], hi[k] = min(lo[k], a.min()), max(hi[k], a.max())
    absmax = np.maximum(np.abs(lo), hi)
    top = 2.0 ** np.ceil(np.log2(absmax.astype(np.float64)))
    abs_h = np.zeros((len(convs), NUM_BINS), np.int64)
    sym_h = np.zeros((len(convs), NUM_BINS), np.int64)
    pow2_h = np.zeros((len(convs), 2 * NUM_BINS), np.int64)
    for (x,) in photos:  # pass 2: fixed-range histograms
        for k, a in enumerate(session.run(convs, {"input": x})):
            abs_h[k] += np.histogram(np.abs(a), NUM_BINS, range=(0.0, float(absmax[k])))[0]
            sym_h[k] += np.histogram(a, NUM_BINS, range=(-float(absmax[k]), float(absmax[k])))[0]
            pow2_h[k] += np.histogram(np.abs(a), 2 * NUM_BINS, range=(0.0, top[k]))[0]
    stops = np.array([np.flatnonzero(h)[-1] + 1 for h in pow2_h])
    return {
        "names": convs,
        "lo": lo,
        "hi": hi,
        "absmax": absmax,
        "abs": abs_h,
        "sym": sym_h,
        "pow2": pow2_h,
        "pow2_stops": stops,
    }


def bench_search(data: pathlib.Path, repeats: int, ort_tensors: int | None) -> dict[str, Any]:
    from onnxruntime.quantization.calibrate import HistogramCollector

    from jaxptq.calibrate import kl_divergences

    t = time.perf_counter()
    hists = real_histograms(data)
    collect_s = time.perf_counter() - t
    sites = len(hists["names"])

    t = time.perf_counter()
    kl_divergences(hists["abs"])  # compile + run
    first = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        kl_divergences(hists["abs"])
        runs.append(time.perf_counter() - t)
    jax_total = statistics.median(runs)
    method_search = functools.partial(  # what the KL method runs: 4096 bins, cut at max|x|
        kl_divergences, hists["pow2"], balanced=True, stops=hists["pow2_stops"]
    )
    method_search()  # compile
    method_runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        method_search()
        method_runs.append(time.perf_counter() - t)

    collector = HistogramCollector("entropy", False, NUM_BINS, 128, 99.999, "same")
    count = sites if ort_tensors is None else min(ort_tensors, sites)
    ort_times = []
    for k in range(count):
        t_max = np.float32(hists["absmax"][k])
        edges = np.linspace(-t_max, t_max, NUM_BINS + 1, dtype=np.float32)
        histogram = (hists["sym"][k], edges, hists["lo"][k], hists["hi"][k], t_max)
        t = time.perf_counter()
        collector.get_entropy_threshold(histogram, 128)
        ort_times.append(time.perf_counter() - t)
    jax_per = jax_total / sites
    ort_per = statistics.mean(ort_times)
    return {
        "sites": sites,
        "histogram_collect_s": collect_s,
        "jax_first_call_s": first,
        "jax_compile_s": first - jax_total,
        "jax_all_sites_ms": jax_total * 1e3,
        "jax_per_tensor_ms": jax_per * 1e3,
        "method_per_tensor_ms": statistics.median(method_runs) / sites * 1e3,
        "ort_tensors_timed": count,
        "ort_per_tensor_ms": ort_per * 1e3,
        "speedup": ort_per / jax_per,
        "jax_candidates": NUM_BINS - 128 + 1,
        "ort_candidates": NUM_BINS // 2 - 64 + 1,
    }


# ---------------------------------------------------------------------------- memory


def child_jaxptq(data: pathlib.Path, samples: int) -> dict[str, Any]:
    import jax

    from jaxptq.calibrate import calibrate
    from jaxptq.importers.onnx import import_onnx

    model, convs = conv_output_model(data / MODEL)
    fn = import_onnx(model)

    def sites(x: jax.Array) -> dict[str, jax.Array]:
        outs = jax.vmap(lambda xi: fn(xi[None]))(x)  # the file fixes batch 1
        return dict(zip(convs, outs[1:], strict=True))

    base = peak_rss_mb()
    t = time.perf_counter()
    result = calibrate(sites, Photos(photo_files(data, samples)), "KL", progress=False)
    seconds = time.perf_counter() - t
    assert result.num_samples == samples and len(result.ranges) == len(convs)
    return {"peak_rss_mb": peak_rss_mb(), "rss_before_mb": base, "seconds": seconds}


def child_ort(data: pathlib.Path, samples: int) -> dict[str, Any]:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    class Reader:
        def __init__(self) -> None:
            self.photos = iter(Photos(photo_files(data, samples), batch=1))

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.photos, None)
            return None if item is None else {"input": item[0]}

    base = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        calibrator = create_calibrator(
            str(data / MODEL),
            ["Conv"],
            augmented_model_path=os.path.join(tmp, "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": NUM_BINS},
        )
        calibrator.collect_data(Reader())
        collected = peak_rss_mb()
        ranges = calibrator.compute_data()
        seconds = time.perf_counter() - t
    assert len(ranges.data) >= 49
    return {
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": base,
        "after_collect_mb": collected,
        "seconds": seconds,
    }


def run_child(kind: str, data: pathlib.Path, samples: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--samples", str(samples)]
    cmd += ["--data", str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 1024.0


def bench_memory(data: pathlib.Path, sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"jaxptq": {}, "onnxruntime": {}}
    for n in sizes:
        out["jaxptq"][n] = run_child("jaxptq", data, n)
    per_photo = 60.0  # MB onnxruntime holds per photo (Conv outputs + copies), until measured
    for n in sorted(sizes):
        need = per_photo * n
        if need > 0.7 * available_mb():
            out["onnxruntime"][n] = {
                "skipped": f"would need ~{need / 1024:.1f} GB (linear in samples), "
                f"{available_mb() / 1024:.1f} GB available"
            }
            continue
        out["onnxruntime"][n] = run_child("ort", data, n)
        if "peak_rss_mb" in out["onnxruntime"][n]:
            per_photo = out["onnxruntime"][n]["peak_rss_mb"] / n
    return out


# ---------------------------------------------------------------------------- ptq


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling, from its own monitoring events."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self) -> None:
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_secs: float, **_: str | int) -> None:
        if event in self.EVENTS:
            self.seconds += duration_secs


class PassClock:
    """Wall seconds inside jaxptq's streaming passes over the data (the calibration passes
    and the bias-correction pass), minus the compile time JAX reports inside them: what a
    pass costs beyond the forward it runs. Instruments the module attributes `ptq` calls
    through; the library itself is unchanged."""

    def __init__(self, clock: CompileClock) -> None:
        import jaxptq.calibrate as calibrate
        import jaxptq.passes.full as full

        self.clock = clock
        self.seconds = 0.0
        calibrate.run_pass = self._timed(calibrate.run_pass)  # type: ignore[attr-defined]
        full.apply_bias_correction = self._timed(full.apply_bias_correction)

    def _timed(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            compiled, start = self.clock.seconds, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.seconds += spent - (self.clock.seconds - compiled)

        return wrapper


def _ort_quantize(data: pathlib.Path, samples: list[np.ndarray], method: str) -> float:
    """Seconds of onnxruntime's `quantize_static` (QDQ, per-channel) with one method.

    "Entropy2048": Entropy with 2048 bins, set through its calibrator (`quantize_static`
    alone passes no `num_bins`, and Entropy then runs on 128 bins, where its only
    candidate is the full min/max range).
    """
    import importlib

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    # The module, not the package's `quantize` function of the same name.
    ort_quantize: Any = importlib.import_module("onnxruntime.quantization.quantize")

    class Reader:
        def __init__(self) -> None:
            self.items = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {"input": item}

    original = ort_quantize.create_calibrator

    def with_2048_bins(*args: Any, extra_options: Any = None, **kwargs: Any) -> Any:
        extra = {**(extra_options or {}), "num_bins": NUM_BINS}
        return original(*args, extra_options=extra, **kwargs)

    calib = getattr(CalibrationMethod, method.removesuffix("2048"))
    if method.endswith("2048"):
        ort_quantize.create_calibrator = with_2048_bins
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            quantize_static(
                str(data / MODEL),
                os.path.join(tmp, "q.onnx"),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                calibrate_method=calib,
            )
            return time.perf_counter() - t
    finally:
        ort_quantize.create_calibrator = original


JAXPTQ_RUNS = [("MAX_MIN", False), ("KL", False), ("REMOVAL_OUTLIER", False), ("KL", True)]
ORT_RUNS = ["MinMax", "Entropy", "Entropy2048", "Percentile"]
PEERS = {"MAX_MIN": "MinMax", "KL": "Entropy2048", "REMOVAL_OUTLIER": "Percentile"}


def whole_ptq(data: pathlib.Path) -> dict[str, Any]:
    """FULL_QUANT: `jaxptq.ptq` per method vs onnxruntime `quantize_static` per method
    (QDQ, per-channel), the same 100 calibration photos, plus the bare fp32 forward passes
    over them in the calibration's 16-row microbatches (the floor calibration cannot go
    below), timed after compilation. jaxptq's compile time is measured apart."""
    import jax

    import jaxptq
    from jaxptq.accuracy_control import with_reverted_sites

    clock = CompileClock()
    passes = PassClock(clock)
    files = photo_files(data, 100)
    photos = datasets.load_imagenet_images(files)
    samples = [photos[i : i + 1] for i in range(len(photos))]
    fn = jaxptq.import_onnx(data / MODEL)
    out: dict[str, Any] = {"jaxptq": {}, "onnxruntime": {}}
    qfn = None
    for method, bias_correction in JAXPTQ_RUNS:
        jax.clear_caches()  # every run compiles its own programs, as a fresh process would
        compiled_before, passes_before = clock.seconds, passes.seconds
        t = time.perf_counter()
        qfn = jaxptq.ptq(
            fn,
            samples,
            {
                "quant_type": "FULL_QUANT",
                "bias_correction": bias_correction,
                "activation_quant_method": method,
            },
        )
        wall = time.perf_counter() - t
        if passes.seconds == passes_before:
            raise RuntimeError("PassClock saw no pass: jaxptq no longer calls what it wraps")
        key = f"{method}{' + bias correction' if bias_correction else ''}"
        out["jaxptq"][key] = {
            "s": wall,
            "compile_s": clock.seconds - compiled_before,
            "passes_s": passes.seconds - passes_before,
        }
        print(key, out["jaxptq"][key], flush=True)
    assert qfn is not None
    floats = with_reverted_sites(qfn, [s.name for s in qfn.plan.sites], "float")
    rows = jax.jit(jax.vmap(lambda r: floats(r[None])[0]))
    t = time.perf_counter()
    jax.block_until_ready(rows(photos[:16]))
    out["forward_compile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(photos), 16):  # the calibration stream's microbatch size
        batch = photos[i : i + 16]
        if len(batch) < 16:
            batch = np.concatenate([batch, np.repeat(batch[-1:], 16 - len(batch), 0)])
        jax.block_until_ready(rows(batch))
    out["forward_s"] = time.perf_counter() - t
    for method in ORT_RUNS:
        out["onnxruntime"][method] = _ort_quantize(data, samples, method)
        print(method, out["onnxruntime"][method], flush=True)
    return out


def report_ptq(p: dict[str, Any]) -> list[str]:
    forward = p["forward_s"]
    lines = [
        "Whole PTQ, FULL_QUANT on the 100 calibration photos: `jaxptq.ptq` (trace, "
        "calibration, range selection, plan; each run starts from cleared JAX caches) and "
        "onnxruntime `quantize_static` (QDQ, per-channel). Passes: wall time inside the "
        "streaming passes over the photos (calibration, and bias correction where on) minus "
        "the compile time inside them; rest: the run minus compile and passes (graph, "
        "weights, range selection, plan). The floor is the bare fp32 forward passes over "
        f"the same 16-row microbatches: {forward:.2f} s (after a "
        f"{p['forward_compile_s']:.1f} s compile).",
        "",
        "| jaxptq method | wall s | compile s | passes s | passes / forward | rest s "
        "| onnxruntime peer | peer s | jaxptq / peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in p["jaxptq"].items():
        method = key.split(" ")[0]
        peer = PEERS[method]
        peer_s = p["onnxruntime"][peer]
        rest = r["s"] - r["compile_s"] - r["passes_s"]
        lines.append(
            f"| {key} | {r['s']:.1f} | {r['compile_s']:.1f} | {r['passes_s']:.1f} | "
            f"{r['passes_s'] / forward:.2f}x | {rest:.1f} | {peer} | {peer_s:.1f} | "
            f"**{r['s'] / peer_s:.2f}** |"
        )
    lines += [
        "",
        "onnxruntime, every method: "
        + ", ".join(f"{m} {s:.1f} s" for m, s in p["onnxruntime"].items())
        + " (Entropy2048: 2048 bins set through its calibrator; plain Entropy runs on 128).",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------- report


def machine() -> str:
    import jax
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    device = jax.devices()[0]
    backend = f"XLA:{device.platform.upper()} on {device.device_kind}"
    return (
        f"{os.cpu_count()}-core CPU ({cpu}); jax {jax.__version__} ({backend}), "
        f"onnxruntime {onnxruntime.__version__} (CPU); load average {load:.1f} at the end"
    )


def report(
    search: dict[str, Any] | None,
    memory: dict[str, Any] | None,
    ptq: dict[str, Any] | None,
    argv: str,
) -> str:
    lines = ["## Calibration (scripts/bench_calibration.py)", ""]
    command = f"python scripts/bench_calibration.py {argv}".strip()
    lines += [f"Command: `{command}`."]
    lines += [f"Machine: {machine()}.", ""]
    if search:
        s = search
        lines += [
            f"KL threshold search, {s['sites']} Conv outputs of EfficientNet-Lite0, 2048-bin "
            f"histograms from the 100 calibration photos (collected with onnxruntime in "
            f"{s['histogram_collect_s']:.1f} s):",
            "",
            "| | per tensor (ms) | candidates | notes |",
            "|---|---|---|---|",
            f"| jaxptq `kl_divergences` | {s['jax_per_tensor_ms']:.2f} | {s['jax_candidates']} "
            f"| all {s['sites']} sites in one program: {s['jax_all_sites_ms']:.1f} ms; "
            f"compile {s['jax_compile_s']:.2f} s apart |",
            f"| jaxptq KL method (4096 bins, power-of-two range, cut at max\\|x\\|) | "
            f"{s['method_per_tensor_ms']:.2f} | up to 3969 | the search `calibrate` runs |",
            f"| onnxruntime `get_entropy_threshold` | {s['ort_per_tensor_ms']:.1f} "
            f"| {s['ort_candidates']} | mean of {s['ort_tensors_timed']} tensors |",
            "",
            f"Speedup per tensor: **{s['speedup']:.0f}x** (jaxptq also scores twice the "
            f"candidates: |x| histogram, i = 128..2048).",
            "",
        ]
    if memory:
        lines += [
            "Peak RSS of a KL calibration (fresh process each; jaxptq streams lazily loaded "
            "photos, onnxruntime's calibrator holds every Conv output):",
            "",
            "| samples | jaxptq peak RSS (MB) | jaxptq time (s) | onnxruntime peak RSS (MB) "
            "| onnxruntime time (s) |",
            "|---|---|---|---|---|",
        ]
        for n in memory["jaxptq"]:
            j, o = memory["jaxptq"][n], memory["onnxruntime"].get(n, {})
            jr = f"{j['peak_rss_mb']:.0f}" if "peak_rss_mb" in j else str(j)
            js = f"{j['seconds']:.0f}" if "seconds" in j else ""
            orr = f"{o['peak_rss_mb']:.0f}" if "peak_rss_mb" in o else str(o.get("skipped", o))
            os_ = f"{o['seconds']:.0f}" if "seconds" in o else ""
            lines.append(f"| {n} | {jr} | {js} | {orr} | {os_} |")
        sizes = list(memory["jaxptq"])
        if len(sizes) == 2 and all("peak_rss_mb" in memory["jaxptq"][n] for n in sizes):
            a, b = (memory["jaxptq"][n]["peak_rss_mb"] for n in sizes)
            lines += ["", f"jaxptq peak RSS, {sizes[1]} vs {sizes[0]} samples: {b / a - 1:+.1%}."]
        lines.append("")
    if ptq:
        lines += report_ptq(ptq)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--part", choices=["all", "search", "memory", "ptq"], default="all")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ort-tensors", type=int, default=None, help="time only the first N")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 400])
    ap.add_argument("--child", choices=["jaxptq", "ort"], help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=100, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child = child_jaxptq if args.child == "jaxptq" else child_ort
        print(json.dumps(child(args.data, args.samples)))
        return
    search = memory = ptq = None
    if args.part in ("all", "search"):
        search = bench_search(args.data, args.repeats, args.ort_tensors)
        print(json.dumps(search, indent=1), flush=True)
    if args.part in ("all", "memory"):
        memory = bench_memory(args.data, args.sizes)
        print(json.dumps(memory, indent=1), flush=True)
    if args.part in ("all", "ptq"):
        ptq = whole_ptq(args.data)
        print(json.dumps(ptq, indent=1), flush=True)
    print(report(search, memory, ptq, " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
