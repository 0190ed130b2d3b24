"""Quantize a Flax linen model: pass `functools.partial(model.apply, variables)`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import jaxptq
from jaxptq.models import digits


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(16, (3, 3), name="conv")(x))
        x = nn.max_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64, name="fc")(x))
        return nn.Dense(10, name="head")(x)


def train(x: np.ndarray, y: np.ndarray, steps: int = 800) -> dict:
    model = SmallCNN()
    params = model.init(jax.random.key(0), x[:1])
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params: dict, state: optax.OptState, xb: jax.Array, yb: jax.Array) -> tuple:
        def loss(p: dict) -> jax.Array:
            logits = model.apply(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 64)
        params, state = step(params, state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    return params


def main() -> dict[str, float]:
    x_train, y_train, x_test, y_test = digits.load_digits_split()
    variables = train(x_train, y_train)
    fn = functools.partial(SmallCNN().apply, variables)

    calib = [x_train[i : i + 10] for i in range(0, 100, 10)]
    qfn = jaxptq.ptq(fn, calib, {"quant_type": "FULL_QUANT", "activation_quant_method": "KL"})

    print(qfn.plan)  # sites are named by module path: SmallCNN/conv, SmallCNN/fc, ...
    fp32, int8 = digits.accuracy(fn, x_test, y_test), digits.accuracy(qfn, x_test, y_test)
    print(f"top-1: fp32 {fp32:.2f}%  int8 {int8:.2f}%")
    return {"fp32": fp32, "int8": int8, "int8_sites": len(qfn.plan.quantized_sites)}


if __name__ == "__main__":
    main()
