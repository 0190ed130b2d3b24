"""The `jaxptq` command: a converter_lite drop-in that parses arguments and calls the API.

    jaxptq convert --model net.onnx --config full_quant.cfg --output net_int8
    jaxptq eval --model net.onnx --quantized net_int8 --data images/
    jaxptq --fmk=ONNX --modelFile=net.onnx --outputFile=net_int8 --configFile=full_quant.cfg
    jaxptq --fmk=ONNX --modelFile=net.onnx --outputFile=net_int8 --quantType=WeightQuant \\
        --bitNum=8 --quantWeightSize=0 --quantWeightChannel=16

Every error ends the command with a non-zero exit code and one line saying why; the model
file is never written, and the output folder is only replaced once everything succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

OUTPUT_MARKER = "summary.json"  # marks a folder this command wrote and may replace
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
_LEGACY_FLAGS = ("--fmk", "--modelFile", "--outputFile", "--quantType", "--configFile")


class CliError(Exception):
    """A problem with the command line itself (paths, flags), reported in one line."""


# --- argument parsing --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxptq",
        description=(
            "Post-training quantization of ONNX models with MindSpore Lite converter configs. "
            "converter_lite's flags (--fmk=ONNX --modelFile=... --outputFile=... "
            "--configFile=... or --quantType=WeightQuant --bitNum=...) work too."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{convert,eval}")
    conv = sub.add_parser(
        "convert",
        help="quantize a model as a config file says",
        description=(
            "Import an ONNX model, read calibration data per [data_preprocess_param], "
            "calibrate and quantize per the config, and write the result to --output: the "
            "plan (plan/), ONNX (model.onnx) for the config's target_device, the XLA "
            "program (model.stablehlo.npz) for CPU/NVGPU, the config used (config.cfg) and "
            "a summary (summary.json)."
        ),
    )
    conv.add_argument("--model", required=True, help="the float ONNX model file")
    conv.add_argument(
        "--config",
        required=True,
        help="MindSpore Lite converter config (INI sections, or an r1.x flat file)",
    )
    conv.add_argument(
        "--output",
        required=True,
        help="output folder; replaced only if it is absent, empty or an earlier jaxptq output",
    )
    _common_flags(conv)
    conv.add_argument(
        "--onnx-form",
        choices=("qdq", "qoperator"),
        default="qdq",
        help="ONNX form: QuantizeLinear/DequantizeLinear pairs (default) or QLinear* ops",
    )
    ev = sub.add_parser(
        "eval",
        help="compare float and quantized outputs on data",
        description=(
            "Run the float model and the quantized one (from `jaxptq convert`'s output) on "
            "a data folder and report cosine similarity, MindSpore benchmark's mean bias "
            "(mean relative error), top-1 agreement and latency."
        ),
    )
    ev.add_argument("--model", required=True, help="the float ONNX model file")
    ev.add_argument("--quantized", required=True, help="the output folder of `jaxptq convert`")
    ev.add_argument(
        "--data",
        required=True,
        help="data folder (one input) or `input_name:dir[,input2:dir2]`, read with the "
        "config's [data_preprocess_param] (input_type, resize, normalize, ...)",
    )
    ev.add_argument(
        "--config",
        help="config whose [data_preprocess_param] reads --data (default: the one saved "
        "with the quantized model)",
    )
    ev.add_argument("--limit", type=int, default=None, help="use at most this many samples")
    ev.add_argument(
        "--repeat", type=int, default=5, help="timed runs per model for the latency (default 5)"
    )
    ev.add_argument("--json", action="store_true", help="print the results as one JSON object")
    _common_flags(ev)
    return parser


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-format",
        "--inputDataFormat",
        dest="data_format",
        choices=("NCHW", "NHWC"),
        default=None,
        help="layout of 4-D model inputs (default: read from the input's declared shape); "
        ".bin files are read in this layout (default NHWC, as converter_lite)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log details and show tracebacks on error"
    )


def _legacy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxptq",
        description="converter_lite-compatible flags (MindSpore Lite r1.x-r2.x).",
    )
    p.add_argument("--fmk", required=True, help="source framework; only ONNX is supported")
    p.add_argument("--modelFile", required=True, help="the float model file")
    p.add_argument("--outputFile", required=True, help="output folder")
    p.add_argument("--configFile", "--config_file", dest="configFile", help="converter config file")
    p.add_argument(
        "--quantType",
        choices=("WeightQuant", "PostTraining"),
        help="r1.x: WeightQuant (with --bitNum...) or PostTraining (with --configFile)",
    )
    p.add_argument("--bitNum", type=int, default=8, help="WeightQuant bits, 1..16 (default 8)")
    p.add_argument(
        "--quantWeightSize", type=int, default=0, help="WeightQuant min weight size (default 0)"
    )
    p.add_argument(
        "--quantWeightChannel",
        type=int,
        default=16,
        help="WeightQuant min output channels (default 16)",
    )
    _common_flags(p)
    return p


def _is_legacy(argv: Sequence[str]) -> bool:
    return (
        bool(argv)
        and argv[0] not in ("convert", "eval", "-h", "--help")
        and any(a.split("=", 1)[0] in _LEGACY_FLAGS for a in argv)
    )


def _legacy_to_convert(ns: argparse.Namespace) -> argparse.Namespace:
    """converter_lite flags restated as `convert` arguments (config built from flags)."""
    if ns.fmk.upper() != "ONNX":
        raise CliError(f"--fmk={ns.fmk} is not supported; jaxptq reads ONNX models (--fmk=ONNX).")
    config: Any = ns.configFile
    if ns.quantType == "WeightQuant":
        if ns.configFile:
            raise CliError("--quantType=WeightQuant takes --bitNum etc., not --configFile.")
        from jaxptq.config import ConfigError, QuantConfig

        flags = {
            "bit_num": "--bitNum",
            "min_quant_weight_size": "--quantWeightSize",
            "min_quant_weight_channel": "--quantWeightChannel",
        }
        try:
            config = QuantConfig.create(
                quant_type="WEIGHT_QUANT",
                bit_num=ns.bitNum,
                min_quant_weight_size=ns.quantWeightSize,
                min_quant_weight_channel=ns.quantWeightChannel,
            )
        except ConfigError as err:
            message = str(err)
            for key, flag in flags.items():
                message = message.replace(f"`{key}`", f"`{key}` ({flag})")
            raise ConfigError(message) from None
    elif not ns.configFile:
        raise CliError(
            "nothing to quantize: give --configFile=FILE, or --quantType=WeightQuant --bitNum=N."
        )
    return argparse.Namespace(
        command="convert",
        model=ns.modelFile,
        config=config,
        output=ns.outputFile,
        data_format=ns.data_format,
        no_progress=ns.no_progress,
        verbose=ns.verbose,
        onnx_form="qdq",
    )


# --- shared steps ------------------------------------------------------------------------------


def _load_model(path: str) -> Any:
    import jaxptq

    p = pathlib.Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise CliError(f"model file {path!r} {what}.")
    return jaxptq.import_onnx(str(p))


def _load_config(config: Any) -> Any:
    from jaxptq.config import QuantConfig

    return config if isinstance(config, QuantConfig) else QuantConfig.from_ini(config)


def _check_output(path: str, model: str) -> pathlib.Path:
    out = pathlib.Path(path)
    if out.resolve() == pathlib.Path(model).resolve():
        raise CliError(f"--output {path!r} is the model file itself; choose another path.")
    if out.exists():
        if not out.is_dir():
            raise CliError(f"output {path!r} exists and is a file; give a folder path.")
        if any(out.iterdir()) and not (out / OUTPUT_MARKER).is_file():
            raise CliError(
                f"output folder {path!r} is not empty and was not written by jaxptq; "
                "choose another path or empty it."
            )
    parent = out.resolve().parent
    if not parent.is_dir():
        raise CliError(f"the folder {str(parent)!r} for output {path!r} does not exist.")
    if not os.access(parent, os.W_OK):
        raise CliError(f"cannot write in {str(parent)!r} (for output {path!r}).")
    return out


def _random_inputs(fn: Any, count: int = 2) -> list[tuple[np.ndarray, ...]]:
    """Inputs for tracing (and a rough similarity) when no calibration data is given."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(count):
        sample = []
        for spec in fn.input_specs:
            if spec.shape is None:
                raise CliError(
                    f"input `{spec.name}` declares no shape; give calibration data "
                    "([data_preprocess_param] calibrate_path) to trace the model."
                )
            shape = tuple(1 if d is None else d for d in spec.shape)
            sample.append(rng.standard_normal(shape).astype(spec.dtype))
        samples.append(tuple(sample))
    return samples


def _read_data(config: Any, fn: Any, data_format: str | None, progress: bool) -> Any:
    from jaxptq.preprocess import load_calibration

    return load_calibration(
        config.data_preprocess_param, fn.input_specs, data_format=data_format, progress=progress
    )


def _compare(fn: Any, qfn: Any, samples: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """Cosine similarity, mean bias and top-1 agreement of the first output, per sample."""
    import jax

    from jaxptq.report import cosine_similarity, mean_bias

    float_fn = jax.jit(fn)
    cos, bias, agree = [], [], []
    for sample in samples:
        ref = jax.tree_util.tree_leaves(float_fn(*sample))
        out = jax.tree_util.tree_leaves(qfn(*sample))
        cos.append(min(float(cosine_similarity(a, b)) for a, b in zip(ref, out, strict=True)))
        bias.append(float(np.mean([mean_bias(b, a) for a, b in zip(ref, out, strict=True)])))
        r, o = np.asarray(ref[0]), np.asarray(out[0])
        if r.ndim >= 1 and r.shape[-1] > 1:
            agree.append(float(np.mean(r.argmax(-1) == o.argmax(-1))))
    return {
        "samples": len(samples),
        "cosine_mean": float(np.mean(cos)),
        "cosine_min": float(np.min(cos)),
        "mean_bias": float(np.mean(bias)),
        "top1_agreement": float(np.mean(agree)) if agree else None,  # no class axis
    }


# --- convert -----------------------------------------------------------------------------------


def _export(qfn: Any, sample: tuple[Any, ...], folder: pathlib.Path, form: str) -> list[str]:
    """Writes the deployable artifacts for the plan's target; returns what was written.

    ONNX (QDQ or QOperator, following the target profile) for every target; for CPU and
    NVGPU (and no target) also the XLA program, a serialized `jax.export` module
    (`model.stablehlo.npz`, `jaxptq.load_stablehlo` runs it).
    """
    from jaxptq.export import export_onnx, export_stablehlo

    export_onnx(qfn, folder / "model.onnx", *sample, form=form)
    written = ["model.onnx"]
    if qfn.plan.config.full_quant_param.target_device in (None, "CPU", "NVGPU"):
        export_stablehlo(qfn, folder / "model.stablehlo.npz", *sample)
        written.append("model.stablehlo.npz")
    return written


def _legacy_image_format(config: Any, fn: Any, data_format: str | None) -> Any:
    """r1.x fed images as they were: a one-channel model input reads them as GRAY."""
    from jaxptq.preprocess import input_layout

    spec = fn.input_specs[0]
    if spec.shape is None or len(spec.shape) != 4:
        return config
    layout = input_layout(spec, data_format)
    channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    return config.replace(image_to_format="GRAY") if channels == 1 else config


def _convert(ns: argparse.Namespace) -> int:
    import jaxptq
    from jaxptq import ini

    progress = not ns.no_progress
    config = _load_config(ns.config)
    out = _check_output(ns.output, ns.model)
    fn = _load_model(ns.model)
    if isinstance(ns.config, str) and ini.is_flat_config(ns.config):
        config = _legacy_image_format(config, fn, ns.data_format)
    quant_type = config.quant_type
    data = config.data_preprocess_param
    if data.calibrate_path:
        samples = _read_data(config, fn, ns.data_format, progress)
        source = f"{len(samples)} calibration samples"
    elif quant_type == "FULL_QUANT":
        raise CliError(
            "FULL_QUANT needs calibration data: set [data_preprocess_param] calibrate_path "
            f"(e.g. `{fn.input_names[0]}:/path/to/images`) in the config."
        )
    else:
        samples = _random_inputs(fn)
        source = f"{len(samples)} random inputs (no calibrate_path)"
    started = time.perf_counter()
    qfn = jaxptq.ptq(fn, samples, config, progress=progress)
    seconds = time.perf_counter() - started
    metrics = _compare(fn, qfn, samples)
    plan = qfn.plan
    from jaxptq import atomic

    with atomic.folder(out.resolve()) as tmp:
        plan.save(tmp / "plan")
        written = ["plan/", *_export(qfn, samples[0], tmp, ns.onnx_form)]
        config.to_ini(str(tmp / "config.cfg"))
        before, after = plan.weight_bytes()
        summary = {
            "tool": "jaxptq",
            "model": str(pathlib.Path(ns.model).resolve()),
            "quant_type": quant_type,
            "target_device": config.full_quant_param.target_device,
            "sites_quantized": [s.name for s in plan.sites if s.quantized],
            "sites_skipped": {s.name: s.skip_reason for s in plan.sites if not s.quantized},
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "average_bits": plan.average_bits(),
            "compared_on": source,
            "seconds": seconds,
            "files": [*written, "config.cfg", OUTPUT_MARKER],
            **metrics,
        }
        (tmp / OUTPUT_MARKER).write_text(json.dumps(summary, indent=1))
    _print_summary(summary, out)
    return EXIT_OK


def _print_summary(s: dict[str, Any], out: pathlib.Path) -> None:
    target = s["target_device"] or "generic"
    quantized, skipped = s["sites_quantized"], s["sites_skipped"]
    before, after = s["weight_bytes_before"], s["weight_bytes_after"]
    lines = [
        f"{s['quant_type']} for {target}: {len(quantized)} sites quantized, {len(skipped)} skipped",
        *(f"  skipped {name}: {reason}" for name, reason in skipped.items()),
        f"weights: {before:,} -> {after:,} bytes ({after / max(before, 1):.1%}), "
        f"{s['average_bits']:.2f} bits/weight",
        f"output cosine similarity on {s['compared_on']}: mean {s['cosine_mean']:.6f}, "
        f"min {s['cosine_min']:.6f}",
        f"wrote {out}: {', '.join(s['files'])}",
    ]
    print("\n".join(lines))


# --- eval --------------------------------------------------------------------------------------


def _eval(ns: argparse.Namespace) -> int:
    import jax

    import jaxptq

    folder = pathlib.Path(ns.quantized)
    if not (folder / "plan" / "plan.json").is_file():
        raise CliError(f"{ns.quantized!r} is not an output of `jaxptq convert` (no plan/).")
    plan = jaxptq.QuantPlan.load(folder / "plan")
    config = _load_config(ns.config) if ns.config else plan.config
    if ns.limit is not None and ns.limit < 1:
        raise CliError(f"--limit must be at least 1, got {ns.limit}.")
    fn = _load_model(ns.model)
    data_dir = ns.data
    if len(fn.input_names) == 1 and not data_dir.startswith(f"{fn.input_names[0]}:"):
        data_dir = f"{fn.input_names[0]}:{data_dir}"
    data = dataclasses.replace(
        config.data_preprocess_param, calibrate_path=data_dir, calibrate_size=ns.limit or 65535
    )
    samples = _read_data(
        dataclasses.replace(config, data_preprocess_param=data),
        fn,
        ns.data_format,
        not ns.no_progress,
    )
    qfn = jaxptq.apply_plan(fn, plan, samples[0])
    metrics = _compare(fn, qfn, samples)
    float_fn = jax.jit(fn)
    metrics["latency_ms_float"] = _latency(float_fn, samples[0], ns.repeat)
    metrics["latency_ms_quantized"] = _latency(qfn, samples[0], ns.repeat)
    if ns.json:
        print(json.dumps(metrics))
        return EXIT_OK
    print(
        f"{metrics['samples']} samples: cosine similarity mean {metrics['cosine_mean']:.6f} "
        f"(min {metrics['cosine_min']:.6f}), mean bias {100 * metrics['mean_bias']:.4f}%, "
        f"top-1 agreement {_percent(metrics['top1_agreement'])}\n"
        f"latency per call: float {metrics['latency_ms_float']:.3f} ms, quantized "
        f"{metrics['latency_ms_quantized']:.3f} ms"
    )
    return EXIT_OK


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _latency(f: Any, sample: tuple[Any, ...], repeat: int) -> float:
    import jax

    jax.block_until_ready(f(*sample))  # compile and warm up
    times = []
    for _ in range(max(repeat, 1)):
        t = time.perf_counter()
        jax.block_until_ready(f(*sample))
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


# --- entry point -------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `jaxptq` command; returns the exit code (0 on success)."""
    args = list(sys.argv[1:] if argv is None else argv)
    legacy = _is_legacy(args)
    try:
        ns = (_legacy_parser() if legacy else _parser()).parse_args(args)
    except SystemExit as exit_:  # argparse printed usage or help
        return int(exit_.code or 0)
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.WARNING,
        format="jaxptq: %(levelname)s: %(message)s",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            if legacy:
                ns = _legacy_to_convert(ns)
            return _convert(ns) if ns.command == "convert" else _eval(ns)
        except KeyboardInterrupt:
            print("jaxptq: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # every failure ends as one line (a traceback with -v)
            if ns.verbose:
                traceback.print_exc()
            print(f"jaxptq: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_ERROR


def _show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    print(f"jaxptq: warning: {' '.join(str(message).split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
