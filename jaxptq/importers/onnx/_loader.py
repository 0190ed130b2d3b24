"""Reads and validates ONNX files: opset, attributes, external data kept inside its folder."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from jaxptq.importers.onnx._dtypes import np_dtype
from jaxptq.importers.onnx._errors import OnnxImportError, UnsupportedOnnxError

MIN_OPSET = 11
MAX_OPSET = 21
DEFAULT_DOMAINS = ("", "ai.onnx")


def load_model(
    source: str | os.PathLike | onnx.ModelProto, base_dir: str | os.PathLike | None
) -> tuple[onnx.ModelProto, pathlib.Path | None, str]:
    """Reads `source` without touching external data; returns (model, data folder, label).

    The label names the file (or the graph, for a ModelProto) in every later error.
    """
    if isinstance(source, onnx.ModelProto):
        label = f"ModelProto (graph `{source.graph.name}`)"
        return source, (pathlib.Path(base_dir) if base_dir is not None else None), label
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"import_onnx expects a path or an onnx.ModelProto, got {type(source).__name__}"
        )
    path = pathlib.Path(source)
    label = f"`{path}`"
    if not path.is_file():
        raise OnnxImportError(f"ONNX file {label} does not exist or is not a file")
    try:
        # Why load_external_data=False: locations are resolved and checked here, so that a
        # model file cannot make jaxptq read files outside its own folder.
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise OnnxImportError(
            f"{label} is not a readable ONNX model (truncated or not ONNX): {e}"
        ) from e
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.output:
        raise OnnxImportError(
            f"{label} is not an ONNX model: it parsed, but has no IR version, graph or outputs"
        )
    folder = pathlib.Path(base_dir) if base_dir is not None else path.parent
    return model, folder, label


def model_opset(model: onnx.ModelProto, label: str) -> int:
    """The `ai.onnx` opset version, refused unless within MIN_OPSET..MAX_OPSET."""
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if not versions:
        raise OnnxImportError(f"{label} imports no `ai.onnx` opset (opset_import is empty)")
    opset = max(versions)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedOnnxError(
            f"{label} uses ai.onnx opset {opset}; jaxptq imports opsets {MIN_OPSET} to "
            f"{MAX_OPSET}. Convert it first, e.g. "
            "`onnx.version_converter.convert_version(model, 13)`",
            ops={},
            opset=opset,
        )
    return opset


def _external_bytes(t: onnx.TensorProto, base_dir: pathlib.Path | None, label: str) -> bytes:
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    where = f"{label}: tensor `{t.name}` stores its data in external file `{loc}`"
    if base_dir is None:
        raise OnnxImportError(f"{where}; pass `base_dir=` (the folder holding the model)")
    root = base_dir.resolve()
    if not loc or os.path.isabs(loc) or pathlib.PurePath(loc).is_absolute():
        raise OnnxImportError(f"{where}: only relative locations inside {root} are allowed")
    full = (root / loc).resolve()  # resolves `..` and symlinks before the check
    if not full.is_relative_to(root):
        raise OnnxImportError(f"{where}, outside the model's folder {root}; refused")
    if not full.is_file():
        raise OnnxImportError(f"{where}, which does not exist")
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else -1
    with open(full, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if length >= 0 and len(data) != length:
        raise OnnxImportError(
            f"{where}: expected {length} bytes at offset {offset}, the file has {len(data)}"
        )
    return data


def tensor_to_numpy(t: onnx.TensorProto, base_dir: pathlib.Path | None, label: str) -> np.ndarray:
    """A TensorProto as a numpy array of its ONNX dtype; never mutates `t`."""
    np_dtype(t.data_type, f"{label}: tensor `{t.name}`")
    if t.data_location == onnx.TensorProto.EXTERNAL:
        inline = onnx.TensorProto()
        inline.CopyFrom(t)
        del inline.external_data[:]
        inline.data_location = onnx.TensorProto.DEFAULT
        inline.raw_data = _external_bytes(t, base_dir, label)
        t = inline
    try:
        return np.array(numpy_helper.to_array(t))
    except (ValueError, TypeError) as e:
        raise OnnxImportError(f"{label}: tensor `{t.name}` cannot be read: {e}") from e


def parse_attrs(
    node: onnx.NodeProto, base_dir: pathlib.Path | None, label: str
) -> Mapping[str, Any]:
    """Attribute name -> Python value (bytes decoded, tensors as numpy)."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.ref_attr_name:
            raise OnnxImportError(f"{label}: attribute references are only valid in functions")
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, onnx.TensorProto):
            v = tensor_to_numpy(v, base_dir, label)
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode("utf-8") for s in v]
        out[a.name] = v
    return out


def input_spec(
    vi: onnx.ValueInfoProto, label: str
) -> tuple[tuple[int | None, ...] | None, np.dtype]:
    """(declared shape with None for dynamic dims or None when unknown, numpy dtype)."""
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise NotImplementedError(f"{label}: graph input `{vi.name}` is not a tensor")
    dtype = np_dtype(tt.elem_type, f"{label}: graph input `{vi.name}`")
    if not tt.HasField("shape"):
        return None, dtype
    dims = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim
    )
    return dims, dtype
