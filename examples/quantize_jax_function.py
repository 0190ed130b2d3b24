"""Quantize a plain JAX function whose weights are captured arrays (no Flax at all)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxptq
from jaxptq.models import digits


def init(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (64, 128)) * 0.1,
        "b1": jnp.zeros(128),
        "w2": jax.random.normal(k2, (128, 10)) * 0.1,
        "b2": jnp.zeros(10),
    }


def forward(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    with jax.named_scope("hidden"):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    with jax.named_scope("logits"):
        return h @ p["w2"] + p["b2"]


def main() -> dict[str, float]:
    x_train, y_train, x_test, y_test = digits.load_digits_split()
    params = init(jax.random.key(0))
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params: dict, state: optax.OptState, xb: jax.Array, yb: jax.Array) -> tuple:
        def loss(p: dict) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(forward(p, xb), yb).mean()

        updates, state = opt.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(0)
    for _ in range(600):
        idx = rng.integers(0, len(x_train), 64)
        params, state = step(params, state, x_train[idx], y_train[idx])

    def fn(x: jax.Array) -> jax.Array:  # the weights are closed over
        return forward(params, x)

    qfn = jaxptq.ptq(fn, [x_train[:100]], {"quant_type": "DYNAMIC_QUANT"})
    print(qfn.plan)  # sites named by jax.named_scope: hidden, logits
    fp32, int8 = digits.accuracy(fn, x_test, y_test), digits.accuracy(qfn, x_test, y_test)
    print(f"top-1: fp32 {fp32:.2f}%  int8 (dynamic) {int8:.2f}%")
    return {"fp32": fp32, "int8": int8, "int8_sites": len(qfn.plan.quantized_sites)}


if __name__ == "__main__":
    main()
