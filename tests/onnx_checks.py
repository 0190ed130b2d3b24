"""What the export tests ask of onnxruntime: run a model, compare outputs, count ops."""

from __future__ import annotations

import os
import pathlib
from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

# Signed activations run in onnxruntime's int8 kernels as they are, as in the signed
# targets' own runtimes; on x86 it otherwise converts each QDQ pair to uint8 on its own and
# leaves a convolution whose pairs came out different in float (docs/export.md).
SIGNED_INT8 = {"session.qdqisint8allowed": "1"}


def _options(**config: str) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    return so


def ort_run(path: str | os.PathLike[str], x: np.ndarray, **config: str) -> np.ndarray:
    sess = ort.InferenceSession(str(path), _options(**config), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def check_agreement(want: Any, got: np.ndarray, cos_min: float = 0.9999, top1: float = 0.995):
    """Row-wise cosine similarity and top-1 agreement of two (N, ..., C) outputs."""
    a = np.asarray(want, np.float64).reshape(-1, np.shape(want)[-1])
    b = np.asarray(got, np.float64).reshape(a.shape)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    agree = np.mean(a.argmax(1) == b.argmax(1))
    assert cos.min() >= cos_min, f"min cosine {cos.min():.6f}"
    assert agree >= top1, f"top-1 agreement {agree:.4f}"
    return cos.min(), agree


def ops(path: str | os.PathLike[str]) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def runtime_ops(path: pathlib.Path, tmp_path: pathlib.Path, **config: str) -> Counter:
    """The op types onnxruntime runs after its (hardware-independent) graph fusions."""
    so = _options(**config)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return ops(tmp_path / "optimized.onnx")
