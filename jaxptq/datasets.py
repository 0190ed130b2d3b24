"""Loaders for the team's real data (ImageNet sample photos, MNIST digits) with the shared
preprocessing, so tests and benchmarks feed models the same inputs."""

from __future__ import annotations

import csv
import gzip
import os
import pathlib
from collections.abc import Sequence

import numpy as np

IMAGENET_SHORT_SIDE = 256
IMAGENET_CROP = 224


def _imagenet_dir(data_dir: str | os.PathLike) -> pathlib.Path:
    d = pathlib.Path(data_dir)
    for cand in (d, d / "imagenet"):
        if (cand / "index.csv").is_file():
            return cand
    raise FileNotFoundError(f"no `index.csv` in {d} or {d / 'imagenet'}")


def imagenet_split(
    data_dir: str | os.PathLike,
) -> tuple[list[pathlib.Path], list[pathlib.Path], dict[pathlib.Path, int]]:
    """The shared calibration/evaluation split of the ImageNet sample photos.

    Rows of ``index.csv`` whose 0-based row number is a multiple of 10 calibrate (100 photos);
    the other rows evaluate (900).

    Args:
        data_dir: the ``imagenet`` folder holding ``index.csv``, or the data root above it.

    Returns:
        (calibration files, evaluation files, label of every file: ILSVRC-2012 class index).

    Example:
        >>> calib, evals, labels = imagenet_split(shared_data / "imagenet")
        >>> y = np.array([labels[f] for f in evals])
    """
    root = _imagenet_dir(data_dir)
    calib: list[pathlib.Path] = []
    evals: list[pathlib.Path] = []
    labels: dict[pathlib.Path, int] = {}
    with open(root / "index.csv", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            path = root / row["file"]
            labels[path] = int(row["label"])
            (calib if i % 10 == 0 else evals).append(path)
    return calib, evals, labels


def preprocess_imagenet(image) -> np.ndarray:
    """One PIL image -> CHW float32: short side 256 (bilinear), centre crop 224, (p-127)/128."""
    from PIL import Image

    img = image.convert("RGB")
    w, h = img.size
    scale = IMAGENET_SHORT_SIDE / min(w, h)
    size = (max(IMAGENET_SHORT_SIDE, round(w * scale)), max(IMAGENET_SHORT_SIDE, round(h * scale)))
    img = img.resize(size, Image.Resampling.BILINEAR)
    left = (size[0] - IMAGENET_CROP) // 2
    top = (size[1] - IMAGENET_CROP) // 2
    img = img.crop((left, top, left + IMAGENET_CROP, top + IMAGENET_CROP))
    x = (np.asarray(img, np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_imagenet_images(files: Sequence[str | os.PathLike]) -> np.ndarray:
    """Loads and preprocesses photos as one NCHW float32 batch (see `preprocess_imagenet`)."""
    from PIL import Image

    out = np.empty((len(files), 3, IMAGENET_CROP, IMAGENET_CROP), np.float32)
    for i, f in enumerate(files):
        with Image.open(f) as img:
            out[i] = preprocess_imagenet(img)
    return out


def load_mnist_5k(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``mnist_5k.csv.gz`` (784 pixels 0..255 then the label, one digit per row).

    Returns:
        (x uint8 of shape (N, 1, 28, 28) NCHW, y int64 of shape (N,)).
    """
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 785:
        raise ValueError(
            f"{path}: expected rows of 785 values (784 pixels + label), got shape {data.shape}"
        )
    return data[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28), data[:, 784]
