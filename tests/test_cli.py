"""The `jaxptq` command on real models: conversions, converter_lite flags, eval, errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxptq.cli import main
from jaxptq.plan import QuantPlan

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"


@pytest.fixture(scope="module")
def mnist(shared_data, tmp_path_factory):
    """mnist-8 raised to opset 13 (the importer's minimum) and 16 real digits as PNGs."""
    import onnx
    from onnx import version_converter

    from jaxptq.datasets import load_mnist_5k

    root = tmp_path_factory.mktemp("mnist")
    model = version_converter.convert_version(onnx.load(shared_data / "models/mnist-8.onnx"), 13)
    model.ir_version = 7  # opset 13 needs IR 7; the converter keeps the file's IR 3
    onnx.save(model, root / "mnist.onnx")
    x, _ = load_mnist_5k(shared_data / "mnist_5k.csv.gz")
    digits = root / "digits"
    digits.mkdir()
    for i in range(16):
        Image.fromarray(x[i * 311, 0]).save(digits / f"{i:02d}.png")
    return root


def _cfg(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def _dynamic_cfg(root: pathlib.Path, **common: str) -> str:
    lines = ["[common_quant_param]", "quant_type=DYNAMIC_QUANT", "bit_num=8"]
    lines += [f"{key}={value}" for key, value in common.items()]
    lines += [
        "[data_preprocess_param]",
        f"calibrate_path=Input3:{root / 'digits'}",
        "calibrate_size=8",
        "input_type=IMAGE",
        "image_to_format=GRAY",
    ]
    return "\n".join(lines) + "\n"


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([*argv, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def converted(mnist):
    """One successful conversion; its folder is the target of the error cases below."""
    cfg = _cfg(mnist / "dyn.cfg", _dynamic_cfg(mnist))
    out = mnist / "out"
    code = main(["convert", "--model", str(mnist / "mnist.onnx"), "--config", str(cfg),
                 "--output", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    return out


def test_convert_dynamic_writes_outputs_and_summary(converted):
    summary = json.loads((converted / "summary.json").read_text())
    assert summary["quant_type"] == "DYNAMIC_QUANT"
    # min_quant_weight_channel applies to weight quantization only: all three sites run int8.
    assert summary["sites_quantized"] == ["Convolution28", "Convolution110", "Times212"]
    assert summary["weight_bytes_after"] < summary["weight_bytes_before"] / 3
    assert summary["cosine_mean"] > 0.9999 and summary["cosine_min"] > 0.9995
    assert summary["top1_agreement"] == 1.0
    for name in summary["files"]:
        assert (converted / name.rstrip("/")).exists()
    assert (converted / "plan" / "plan.json").is_file()
    assert len(list(converted.glob("model.stablehlo.*"))) == 1


def _convert_full_quant(mnist, tmp_path, capsys, full_quant_param: str) -> tuple[str, pathlib.Path]:
    """Converts MNIST with FULL_QUANT (MAX_MIN), its debug report on; (stdout, debug folder)."""
    debug = tmp_path / "debug"
    cfg = _cfg(
        tmp_path / "full.cfg",
        _dynamic_cfg(mnist, debug_info_save_path=str(debug)).replace("DYNAMIC_QUANT", "FULL_QUANT")
        + f"[full_quant_param]\nactivation_quant_method=MAX_MIN\n{full_quant_param}\n",
    )
    code, out, err = _run(["convert", "--model", str(mnist / "mnist.onnx"), "--config",
                           str(cfg), "--output", str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 0, err
    return out, debug


def test_convert_full_quant_with_debug_report(mnist, tmp_path, capsys):
    out, debug = _convert_full_quant(mnist, tmp_path, capsys, "per_channel=true")
    assert "FULL_QUANT for generic: 3 sites quantized, 0 skipped" in out
    cos = float(out.split("mean ")[1].split(",")[0])
    assert cos > 0.999
    with open(debug / "quant_param.csv", newline="") as f:
        params = list(csv.DictReader(f))
    assert len(params) == 6  # each site: its static input and its weight
    assert len(list(debug.glob("report_*.csv"))) == 8  # one per calibration round


def test_a_target_plan_lists_the_outputs_it_quantizes(mnist, tmp_path, capsys):
    """For DSP the plan also quantizes the convolutions' outputs that reach MaxPool, and
    quant_param.csv lists them with their own scale and zero point."""
    _, debug = _convert_full_quant(mnist, tmp_path, capsys, "target_device=DSP")
    plan = QuantPlan.load(tmp_path / "out" / "plan")
    outputs = {s.name: s for s in plan.sites if s.out_act_scale is not None}
    assert outputs and all(plan[name].primitive == "conv_general_dilated" for name in outputs)
    with open(debug / "quant_param.csv", newline="") as f:
        params = list(csv.DictReader(f))
    assert len(params) == 6 + len(outputs)
    per_tensor = [p for p in params if " " not in p["Scale"]]  # not the weights' rows
    for name, sp in outputs.items():
        assert any(
            p["NodeName"] == name
            and np.isclose(float(p["Scale"]), sp.out_act_scale, rtol=1e-7)
            and int(p["ZeroPoint"]) == sp.out_act_zero_point
            for p in per_tensor
        )


def test_legacy_weight_quant_flags(mnist, tmp_path, capsys):
    out = tmp_path / "w"
    code, stdout, err = _run(
        ["--fmk=ONNX", f"--modelFile={mnist / 'mnist.onnx'}", f"--outputFile={out}",
         "--quantType=WeightQuant", "--bitNum=4", "--quantWeightSize=0",
         "--quantWeightChannel=10"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quant_type"] == "WEIGHT_QUANT"
    assert summary["sites_skipped"] == {
        "Convolution28": "weight has 8 output channels < min_quant_weight_channel=10"
    }
    assert summary["average_bits"] < 8
    # 4-bit weights, compared on random inputs (no calibration data): measured 0.969.
    assert summary["compared_on"].endswith("random inputs (no calibrate_path)")
    assert summary["cosine_mean"] > 0.95
    assert "1 skipped" in stdout and "skipped Convolution28" in stdout


def test_legacy_post_training_flat_config(mnist, tmp_path, capsys):
    cfg = _cfg(
        tmp_path / "pt.cfg",
        f"image_path={mnist / 'digits'}\nbatch_count=4\nmethod_x=MAX_MIN\nthread_num=1\n",
    )
    out = tmp_path / "pt"
    code, stdout, err = _run(
        ["--fmk=ONNX", f"--modelFile={mnist / 'mnist.onnx'}", f"--outputFile={out}",
         "--quantType=PostTraining", f"--configFile={cfg}"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quant_type"] == "FULL_QUANT" and summary["compared_on"].startswith("4 ")
    assert summary["cosine_min"] > 0.99


def test_eval_reports_benchmark_metrics(mnist, converted, capsys):
    code, out, err = _run(["eval", "--model", str(mnist / "mnist.onnx"), "--quantized",
                           str(converted), "--data", str(mnist / "digits"), "--json",
                           "--repeat", "2"], capsys)  # fmt: skip
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["samples"] == 16
    assert metrics["cosine_mean"] > 0.9999
    assert 0.0 <= metrics["mean_bias"] < 0.1
    assert metrics["top1_agreement"] == 1.0
    assert metrics["latency_ms_float"] > 0 and metrics["latency_ms_quantized"] > 0


def test_help_explains_every_option(capsys):
    assert main(["convert", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--config", "--output", "--data-format", "--onnx-form", "--verbose"):
        assert flag in text
    assert main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--quantized", "--data", "--limit", "--repeat", "--json"):
        assert flag in text


def _digest(path: pathlib.Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _bad_cases(root: pathlib.Path, tmp: pathlib.Path) -> list[tuple[str, list[str], str]]:
    """(id, extra argv or config, expected message part) for each malformed input."""
    model = str(root / "mnist.onnx")
    digits = root / "digits"
    bins = tmp / "bins"
    bins.mkdir()
    np.zeros((1, 28, 27), np.float32).tofile(bins / "short.bin")
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    big = tmp / "big"
    big.mkdir()
    Image.fromarray(np.zeros((32, 30), np.uint8)).save(big / "a.png")
    empty = tmp / "empty"
    empty.mkdir()
    not_onnx = tmp / "garbage.onnx"
    not_onnx.write_bytes(b"this is not a protobuf")

    def cfg(name: str, text: str) -> str:
        return str(_cfg(tmp / f"{name}.cfg", text))

    base = _dynamic_cfg(root)
    return [
        ("unknown-key", ["--config", cfg("k", base + "calibrate_sise=3\n")],
         "unknown key `calibrate_sise` in [data_preprocess_param]; did you mean `calibrate_size`"),
        ("out-of-range", ["--config", cfg("r", base.replace("bit_num=8", "bit_num=9"))],
         ":3: [common_quant_param] `bit_num` = 9 is not supported with DYNAMIC_QUANT"),
        ("wrong-type", ["--config", cfg("t", base.replace("size=8", "size=eight"))],
         "`calibrate_size` must be an integer, got 'eight'"),
        ("missing-folder", ["--config", cfg("m", base.replace(str(digits), str(tmp / "no")))],
         "calibration folder"),
        ("empty-folder", ["--config", cfg("e", base.replace(str(digits), str(empty)))],
         "has no IMAGE files"),
        ("two-folders-one-input",
         ["--config", cfg("2", base.replace(f"Input3:{digits}", f"Input3:{digits},{digits}"))],
         "lists 2 folders but the model has 1 input(s): Input3"),
        ("wrong-size-bin",
         ["--config", cfg("b", base.replace(str(digits), str(bins)).replace("IMAGE", "BIN"))],
         "short.bin: 3024 bytes, expected 3136 bytes (float32 [1, 28, 28, 1] NHWC"),
        ("unreadable-image", ["--config", cfg("u", base.replace(str(digits), str(broken)))],
         "a.png: cannot read it as an image"),
        ("image-size", ["--config", cfg("s", base.replace(str(digits), str(big)))],
         "preprocessed to height x width x channels 32x30x1, but input `Input3` wants 28x28x1"),
        ("unknown-input", ["--config", cfg("n", base.replace("Input3:", "Input4:"))],
         "names input `Input4`, which the model does not have"),
        ("full-without-data",
         ["--config", cfg("f", "[common_quant_param]\nquant_type=FULL_QUANT\n")],
         "FULL_QUANT needs calibration data"),
        ("skip-unknown-node",
         ["--config", cfg("x", base + "[common_quant_param]\nskip_quant_node=Conv28\n")],
         "`skip_quant_node` names `Conv28`, which matches no site"),
        ("missing-config", ["--config", str(tmp / "none.cfg")], "none.cfg' does not exist"),
        ("missing-model", ["--model", str(tmp / "none.onnx")], "none.onnx' does not exist"),
        ("not-onnx", ["--model", str(not_onnx)], "garbage.onnx"),
        ("unknown-section", ["--config", cfg("sec", base + "[full_quant]\nper_channel=1\n")],
         "unknown section [full_quant]"),
        ("legacy-fmk", ["--fmk=TFLITE", f"--modelFile={model}"],
         "--fmk=TFLITE is not supported"),
        ("legacy-bits", ["--fmk=ONNX", f"--modelFile={model}", "--quantType=WeightQuant",
                         "--bitNum=17"], "`bit_num` (--bitNum) = 17 is out of range 0..16"),
        ("legacy-nothing", ["--fmk=ONNX", f"--modelFile={model}"], "nothing to quantize"),
        ("output-is-model", ["--output", model], "is the model file itself"),
    ]  # fmt: skip


def test_malformed_inputs_fail_with_their_reason_and_touch_nothing(
    mnist, converted, tmp_path, capsys
):
    model = mnist / "mnist.onnx"
    before = _digest(model) | _digest(converted)
    cases = _bad_cases(mnist, tmp_path)
    assert len(cases) >= 20
    good_cfg = str(mnist / "dyn.cfg")
    for name, args, expected in cases:
        if args[0].startswith("--fmk"):
            argv = [*args, f"--outputFile={converted}"]
        else:
            argv = dict(zip(args[::2], args[1::2], strict=True))
            argv = ["convert", "--model", argv.get("--model", str(model)),
                    "--config", argv.get("--config", good_cfg),
                    "--output", argv.get("--output", str(converted))]  # fmt: skip
        code, out, err = _run(argv, capsys)
        assert code == 1, (name, out, err)
        lines = err.strip().splitlines()
        assert lines[-1].startswith("jaxptq: error: "), (name, err)
        assert expected in lines[-1], (name, lines[-1])
        assert "Traceback" not in err, name
        assert _digest(model) | _digest(converted) == before, name


def test_refuses_a_foreign_output_folder(mnist, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = _run(["convert", "--model", str(mnist / "mnist.onnx"), "--config",
                         str(mnist / "dyn.cfg"), "--output", str(foreign)], capsys)  # fmt: skip
    assert code == 1 and "was not written by jaxptq" in err
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_efficientnet_full_quant_cli_end_to_end(shared_data, tmp_path):
    """The documentation's full-quant config (paths changed) on 6 ImageNet photos."""
    from jaxptq.datasets import imagenet_split

    calib, _, _ = imagenet_split(shared_data / "imagenet")
    images = tmp_path / "images"
    images.mkdir()
    for f in calib[:6]:
        os.symlink(f, images / f.name)
    debug = tmp_path / "debug"
    text = (CONFIGS / "full_quant_cpu.cfg").read_text()
    text = text.replace(
        "calibrate_path=input_name_1:/mnt/image/input_1_dir,input_name_2:input_2_dir",
        f"calibrate_path=input:{images}",
    ).replace("calibrate_size=100", "calibrate_size=6")
    text = text.replace("bit_num=8", f"bit_num=8\ndebug_info_save_path={debug}")
    cfg = _cfg(tmp_path / "full_quant.cfg", text)
    model = shared_data / "models" / "efficientnet_lite0.onnx"
    digest = _digest(model)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxptq.cli", "convert", "--model", str(model), "--config",
         str(cfg), "--output", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(model) == digest
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quant_type"] == "FULL_QUANT"
    assert (
        len(summary["sites_quantized"]) == 50 and summary["sites_skipped"] == {}
    )  # 49 Conv + Gemm
    assert summary["weight_bytes_after"] < 0.3 * summary["weight_bytes_before"]
    # Measured: cosine mean 0.997 (min 0.992), 15/16 top-1 agreement.
    assert summary["cosine_mean"] > 0.99 and summary["cosine_min"] > 0.98
    assert summary["top1_agreement"] >= 0.8
    assert "sites quantized" in proc.stdout and "output cosine similarity" in proc.stdout
    assert (out / "model.onnx").is_file() and len(list(out.glob("model.stablehlo.*"))) == 1

    def rows(name):
        with open(debug / name, newline="") as f:
            return list(csv.DictReader(f))

    summary_rows = rows("output_summary.csv")
    assert list(summary_rows[0]) == ["Round", "TensorName", "CosineSimilarity"]
    assert len(summary_rows) == 6
    assert all(0.98 < float(r["CosineSimilarity"]) <= 1.0 for r in summary_rows)
    assert {r["TensorName"] for r in summary_rows} == {"logits"}
    for r in range(6):
        report = rows(f"report_{r}.csv")
        assert len(report) == 6 * (len(summary["sites_quantized"]) + len(summary["sites_skipped"]))
        for row in report:
            assert -1.0 <= float(row["CosineSimilarity"]) <= 1.0
            assert 0.0 <= float(row["Clip"]) <= 1.0
    params = rows("quant_param.csv")
    assert len(params) == 2 * len(summary["sites_quantized"])  # input + weight per site
    assert {p["NodeType"] for p in params} <= {"Conv", "Gemm", "MatMul"}
    pictures = [debug / "cosine_similarity.png", *(debug / "histograms").glob("*.png")]
    assert len(pictures) == 1 + len(summary["sites_quantized"]) + len(summary["sites_skipped"])
    for p in pictures:
        with Image.open(p) as img:
            assert img.format == "PNG" and min(img.size) > 0
