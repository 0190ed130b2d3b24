"""The bundled default: LeNet-5 and an MLP in Flax nnx, trained with optax on real digits.

The demo, the examples and the tests quantize these. Training takes seconds on a CPU and
the trained weights are cached on disk (keyed by everything that affects them), so the
suite trains each model once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

DEFAULT_CACHE = pathlib.Path(os.environ.get("JAXPTQ_CACHE", pathlib.Path.cwd() / ".cache"))


class LeNet5(nnx.Module):
    """LeNet-5 (two 5x5 conv + pool stages, three dense layers) for NHWC digit images."""

    def __init__(self, *, rngs: nnx.Rngs, image_size: int = 8, num_classes: int = 10):
        self.conv1 = nnx.Conv(1, 6, (5, 5), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="SAME", rngs=rngs)
        flat = 16 * (image_size // 4) ** 2
        self.fc1 = nnx.Linear(flat, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.fc3 = nnx.Linear(84, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.fc3(x)


class MLP(nnx.Module):
    """Two hidden layers over the flattened image."""

    def __init__(self, *, rngs: nnx.Rngs, image_size: int = 8, hidden: int = 128):
        self.fc1 = nnx.Linear(image_size * image_size, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.fc3 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.fc3(x)


MODELS: dict[str, Callable[..., nnx.Module]] = {"lenet5": LeNet5, "mlp": MLP}


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 handwritten digits as NHWC float32 in [0, 1].

    Returns (x_train, y_train, x_test, y_test) from a fixed shuffled split.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - the test and demo extras install it
        raise ImportError(
            "the digits data set needs scikit-learn: pip install scikit-learn"
        ) from err
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def accuracy(fn: Callable[[Any], Any], x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy in percent."""
    preds = [np.asarray(jnp.argmax(fn(x[i : i + batch]), axis=-1)) for i in range(0, len(x), batch)]
    return float(np.mean(np.concatenate(preds) == y) * 100.0)


def train(
    model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int = 1500,
    batch: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> nnx.Module:
    """Adam on softmax cross-entropy; deterministic for a given seed."""
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model: nnx.Module, optimizer: nnx.Optimizer, xb: jax.Array, yb: jax.Array) -> None:
        def loss_fn(m: nnx.Module) -> jax.Array:
            logits = m(xb)  # type: ignore[operator]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, grads)

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch)
        step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    return model


def pretrained(
    name: str = "lenet5", cache_dir: str | os.PathLike[str] | None = None, **train_kwargs: Any
) -> nnx.Module:
    """A model trained on the digits split, loaded from the cache when it is there."""
    if name not in MODELS:
        raise ValueError(f"unknown model `{name}`; choose one of {', '.join(MODELS)}.")
    settings = {**(train.__kwdefaults__ or {}), **train_kwargs}
    key = hashlib.sha256(json.dumps([name, settings], sort_keys=True).encode()).hexdigest()
    folder = pathlib.Path(cache_dir or DEFAULT_CACHE)
    path = folder / f"{name}-{key[:12]}.npz"
    model = MODELS[name](rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    if path.is_file():
        with np.load(path, allow_pickle=False) as npz:
            loaded = [jnp.asarray(npz[f"a{i}"]) for i in range(len(leaves))]
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, loaded))
    x_train, y_train, _, _ = load_digits_split()
    model = train(model, x_train, y_train, **train_kwargs)
    leaves = jax.tree_util.tree_leaves(nnx.state(model))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(str(tmp), **{f"a{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})  # type: ignore[arg-type]
    os.replace(tmp, path)
    return model
