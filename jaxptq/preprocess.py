"""Calibration data from folders, as `[data_preprocess_param]` describes it.

Each model input reads its own folder (`calibrate_path = input_name:dir[,input2:dir2]`);
with several inputs, the i-th files of every folder in sorted name order form sample i.
IMAGE files are decoded with Pillow, converted (RGB/GRAY/BGR), resized, centre-cropped and
normalized `(x - mean) / std` in that order, as MindSpore Lite does, then laid out as the
model input wants (NCHW or NHWC, read from its declared shape unless `data_format` says).
BIN files are raw buffers of the input's dtype and shape, NHWC for 4-D inputs unless
`data_format` (converter_lite's `--inputDataFormat`) says otherwise.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from jaxptq.config import DataPreprocessParam, closest

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
BIN_SUFFIXES = (".bin",)
LAYOUTS = ("NCHW", "NHWC")
_SECTION = "[data_preprocess_param]"


class CalibrationDataError(ValueError):
    """A calibration folder or file does not fit the model input it is meant for."""


class InputLike(Protocol):
    """What preprocessing needs to know about a model input (e.g. an ONNX `InputSpec`)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int | None, ...] | None: ...

    @property
    def dtype(self) -> Any: ...


def calibration_folders(
    calibrate_path: str | None, input_names: Sequence[str]
) -> dict[str, pathlib.Path]:
    """Parses `calibrate_path` into one existing folder per model input.

    Entries are `input_name:dir`; an entry without a known input name (converter_lite r1.x
    `image_path`) goes to the next input without a folder, in input order.
    """
    if not calibrate_path:
        raise CalibrationDataError(
            f"{_SECTION} `calibrate_path` is not set: give one folder per model input as "
            f"`{input_names[0] if input_names else 'input'}:/path/to/dir`."
        )
    named: dict[str, pathlib.Path] = {}
    positional: list[pathlib.Path] = []
    for entry in (e.strip() for e in calibrate_path.split(",")):
        if not entry:
            continue
        # Longest input name first: ONNX names may contain ':' themselves ("x:0").
        owner = next(
            (n for n in sorted(input_names, key=len, reverse=True) if entry.startswith(n + ":")),
            None,
        )
        if owner is not None:
            if owner in named:
                raise CalibrationDataError(
                    f"{_SECTION} `calibrate_path` gives input `{owner}` two folders."
                )
            named[owner] = pathlib.Path(entry[len(owner) + 1 :])
            continue
        head, sep, rest = entry.partition(":")
        if sep and not pathlib.Path(entry).exists() and "/" not in head:
            hint = closest(head, list(input_names))
            raise CalibrationDataError(
                f"{_SECTION} `calibrate_path` names input `{head}`, which the model does not "
                f"have; its inputs are {', '.join(f'`{n}`' for n in input_names)}"
                + (f" (did you mean `{hint[0]}`?)" if hint else "")
                + "."
            )
        positional.append(pathlib.Path(entry))
    free = [n for n in input_names if n not in named]
    if len(positional) > len(free):
        raise CalibrationDataError(
            f"{_SECTION} `calibrate_path` lists {len(named) + len(positional)} folders but the "
            f"model has {len(input_names)} input(s): {', '.join(input_names)}."
        )
    named.update(zip(free, positional, strict=False))
    missing = [n for n in input_names if n not in named]
    if missing:
        raise CalibrationDataError(
            f"{_SECTION} `calibrate_path` has no folder for input(s) "
            f"{', '.join(f'`{n}`' for n in missing)}; add `{missing[0]}:/path/to/dir`."
        )
    for name, folder in named.items():
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise CalibrationDataError(
                f"calibration folder {str(folder)!r} for input `{name}` {what} "
                f"({_SECTION} `calibrate_path`)."
            )
    return {n: named[n] for n in input_names}


def list_files(folder: pathlib.Path, input_type: str) -> list[pathlib.Path]:
    """The calibration files of one folder in sorted name order; hidden files are skipped."""
    suffixes = IMAGE_SUFFIXES if input_type == "IMAGE" else BIN_SUFFIXES
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )
    if not files:
        raise CalibrationDataError(
            f"calibration folder {str(folder)!r} has no {input_type} files "
            f"({', '.join(suffixes)}); {_SECTION} `input_type` = {input_type}."
        )
    return files


def input_layout(spec: InputLike, data_format: str | None = None) -> str:
    """NCHW or NHWC for a 4-D input: `data_format` if given, else guessed from the shape."""
    if data_format is not None:
        layout = data_format.upper()
        if layout not in LAYOUTS:
            raise CalibrationDataError(
                f"data format {data_format!r} is not valid; choose one of {', '.join(LAYOUTS)}."
            )
        return layout
    shape = spec.shape
    if shape is not None and len(shape) == 4:
        channels = (1, 3, 4)
        if shape[3] in channels and shape[1] not in channels:
            return "NHWC"
    return "NCHW"  # ONNX's convention, and what a channel-first shape says


def _hwc_target(spec: InputLike, layout: str) -> tuple[int | None, int | None, int | None]:
    """(height, width, channels) the input declares; None where unknown."""
    shape = spec.shape
    if shape is None or len(shape) != 4:
        return None, None, None
    if layout == "NCHW":
        return shape[2], shape[3], shape[1]
    return shape[1], shape[2], shape[3]


_RESAMPLE = {"LINEAR": "BILINEAR", "NEAREST": "NEAREST", "CUBIC": "BICUBIC"}


def load_image(
    path: pathlib.Path,
    param: DataPreprocessParam,
    spec: InputLike,
    data_format: str | None = None,
) -> np.ndarray:
    """One image file as a batch of one, ready for the model input `spec`."""
    from PIL import Image, UnidentifiedImageError

    layout = input_layout(spec, data_format)
    try:
        with Image.open(path) as opened:
            opened.load()
            mode = "L" if param.image_to_format == "GRAY" else "RGB"
            img = opened.convert(mode)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise CalibrationDataError(f"{path}: cannot read it as an image ({err}).") from None
    if (param.resize_width is None) != (param.resize_height is None):
        raise CalibrationDataError(
            f"{_SECTION} `resize_width` and `resize_height` must be set together."
        )
    if param.resize_width is not None and param.resize_height is not None:
        resample = getattr(Image.Resampling, _RESAMPLE[param.resize_method])
        img = img.resize((param.resize_width, param.resize_height), resample)
    if (param.center_crop_width is None) != (param.center_crop_height is None):
        raise CalibrationDataError(
            f"{_SECTION} `center_crop_width` and `center_crop_height` must be set together."
        )
    if param.center_crop_width is not None and param.center_crop_height is not None:
        cw, ch = param.center_crop_width, param.center_crop_height
        w, h = img.size
        if cw > w or ch > h:
            raise CalibrationDataError(
                f"{path}: centre crop {cw}x{ch} is larger than the image ({w}x{h} after "
                f"resizing); lower {_SECTION} `center_crop_width`/`center_crop_height`."
            )
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img, np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if param.image_to_format == "BGR":
        x = x[:, :, ::-1]
    x = _normalize(x, param, path)
    height, width, channels = _hwc_target(spec, layout)
    got = (x.shape[0], x.shape[1], x.shape[2])
    want = (height, width, channels)
    if any(w is not None and w != g for w, g in zip(want, got, strict=True)):
        shown = "x".join("?" if v is None else str(v) for v in want)
        raise CalibrationDataError(
            f"{path}: preprocessed to height x width x channels {got[0]}x{got[1]}x{got[2]}, "
            f"but input `{spec.name}` wants {shown} ({layout}); set {_SECTION} "
            "`resize_width`/`resize_height`/`center_crop_*` or `image_to_format`."
        )
    if layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return _cast(x[None], spec.dtype)


def _normalize(x: np.ndarray, param: DataPreprocessParam, path: pathlib.Path) -> np.ndarray:
    channels = x.shape[2]
    for key in ("normalize_mean", "normalize_std"):
        values = getattr(param, key)
        if values and len(values) not in (1, channels):
            raise CalibrationDataError(
                f"{_SECTION} `{key}` has {len(values)} values but {path.name} has "
                f"{channels} channel(s) after `image_to_format` = {param.image_to_format}."
            )
    if param.normalize_mean:
        x = x - np.asarray(param.normalize_mean, np.float32)
    if param.normalize_std:
        x = x / np.asarray(param.normalize_std, np.float32)
    return x


def _cast(x: np.ndarray, dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    return np.ascontiguousarray(x.astype(dtype))


def load_bin(path: pathlib.Path, spec: InputLike, data_format: str | None = None) -> np.ndarray:
    """One `.bin` file: a raw buffer of the input's dtype and shape (NHWC when 4-D)."""
    shape = spec.shape
    if shape is None or any(d is None for d in shape[1:]):
        raise CalibrationDataError(
            f"{path}: input `{spec.name}` declares shape {shape}; a .bin file needs every "
            "axis but the batch axis known."
        )
    model_shape = tuple(1 if d is None else int(d) for d in shape)
    buffer_layout = data_format.upper() if data_format else "NHWC"
    model_layout = input_layout(spec, data_format)
    file_shape = model_shape
    if len(model_shape) == 4 and buffer_layout != model_layout:
        n, c, h, w = model_shape if model_layout == "NCHW" else _nhwc_to_nchw(model_shape)
        file_shape = (n, h, w, c) if buffer_layout == "NHWC" else (n, c, h, w)
    dtype = np.dtype(spec.dtype)
    expected = int(np.prod(file_shape)) * dtype.itemsize
    found = os.path.getsize(path)
    if found != expected:
        layout = f" {buffer_layout}" if len(file_shape) == 4 else ""
        raise CalibrationDataError(
            f"{path}: {found} bytes, expected {expected} bytes ({dtype} "
            f"{list(file_shape)}{layout} for input `{spec.name}`)."
        )
    x = np.fromfile(path, dtype=dtype).reshape(file_shape)
    if file_shape != model_shape:
        x = x.transpose((0, 3, 1, 2) if model_layout == "NCHW" else (0, 2, 3, 1))
    return np.ascontiguousarray(x)


def _nhwc_to_nchw(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    n, h, w, c = shape
    return n, c, h, w


def load_calibration(
    param: DataPreprocessParam,
    inputs: Sequence[InputLike],
    *,
    data_format: str | None = None,
    progress: bool = False,
) -> list[tuple[np.ndarray, ...]]:
    """Reads up to `calibrate_size` samples, each a tuple with one array per model input.

    Args:
        param: the `[data_preprocess_param]` section.
        inputs: the model inputs in call order (name, declared shape, dtype).
        data_format: NCHW or NHWC, overriding the layout guessed from the input shapes.
        progress: show a progress bar.

    Returns:
        Samples with a leading batch axis of 1, in sorted file name order.

    Example:
        >>> fn = jaxptq.import_onnx("model.onnx")
        >>> samples = load_calibration(cfg.data_preprocess_param, fn.input_specs)
        >>> qfn = jaxptq.ptq(fn, samples, cfg)
    """
    names = [s.name for s in inputs]
    folders = calibration_folders(param.calibrate_path, names)
    files = {n: list_files(folders[n], param.input_type) for n in names}
    counts = {n: len(f) for n, f in files.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"`{n}` ({folders[n]}): {c}" for n, c in counts.items())
        raise CalibrationDataError(
            "calibration folders of a multi-input model must hold the same number of "
            f"{param.input_type} files, paired by sorted name; found {listed}."
        )
    count = min(param.calibrate_size, next(iter(counts.values())))
    if count < param.calibrate_size:
        logger.info("calibrate_size=%d but only %d samples found", param.calibrate_size, count)
    rows = range(count)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="reading calibration data", unit="sample")
    samples = []
    for i in rows:
        sample = []
        for spec in inputs:
            path = files[spec.name][i]
            if param.input_type == "IMAGE":
                sample.append(load_image(path, param, spec, data_format))
            else:
                sample.append(load_bin(path, spec, data_format))
        samples.append(tuple(sample))
    return samples
