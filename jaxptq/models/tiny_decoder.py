"""A tiny character-level Flax decoder whose attention runs through a pluggable KV cache."""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import logging
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from jaxptq.kvcache import (
    ChannelScales,
    FloatKV,
    FloatKVCache,
    KVCache,
    KVState,
    calibrate_channel_scales,
    channel_amax,
    merge_amax,
)

logger = logging.getLogger(__name__)

Array = jax.Array

# Newline plus printable ASCII; anything else reads as "?" so any text encodes.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {c: i for i, c in enumerate(VOCAB)}
TRAIN_MODULES = ("argparse", "textwrap", "inspect", "functools", "collections")
# Part of the on-disk weight cache key: bump it when the training code changes.
_TRAIN_RECIPE = "adam-warmup-cosine-v1"


def encode(text: str) -> np.ndarray:
    """Character ids of `text` (int32)."""
    unknown = _INDEX["?"]
    return np.array([_INDEX.get(c, unknown) for c in text], np.int32)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Text of character ids."""
    return "".join(VOCAB[int(i)] for i in ids)


def stdlib_docstrings(modules: Sequence[str] = TRAIN_MODULES) -> str:
    """English text available offline: the docstrings of some standard-library modules."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and getattr(obj, "__module__", None) == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def zen_of_python() -> str:
    """The Zen of Python (`import this`), a held-out passage the training text lacks."""
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints it once
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Shape of the decoder; small enough to train in seconds on two CPU cores."""

    vocab_size: int = len(VOCAB)
    d_model: int = 64
    num_heads: int = 2
    num_layers: int = 2
    # Cache length, and the training sequence length.
    max_len: int = 64
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


class Attention(nnx.Module):
    """Causal multi-head self-attention; keys and values go through the cache."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, rngs=rngs)
        self.out = nnx.Linear(cfg.d_model, cfg.d_model, rngs=rngs)

    def __call__(
        self, x: Array, state: KVState, pos: Array | int, cache: KVCache
    ) -> tuple[Array, KVState]:
        b, s, d = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        state = cache.write(state, k, v, pos)
        keys, values = cache.read(state)
        logits = jnp.einsum("bshd,bthd->bhst", q, keys) / math.sqrt(self.head_dim)
        # The buffer has max_len rows; a query sees written rows up to its own position.
        visible = jnp.arange(keys.shape[1])[None, :] <= (pos + jnp.arange(s))[:, None]
        logits = jnp.where(visible, logits, jnp.finfo(logits.dtype).min)
        out = jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(logits, axis=-1), values)
        return self.out(out.reshape(b, s, d)), state


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.up = nnx.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, rngs=rngs)
        self.down = nnx.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, rngs=rngs)

    def __call__(
        self, x: Array, state: KVState, pos: Array | int, cache: KVCache
    ) -> tuple[Array, KVState]:
        h, state = self.attn(self.ln1(x), state, pos, cache)
        x = x + h
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x)))), state


class TinyDecoder(nnx.Module):
    """Decoder-only transformer over characters with learned positions.

    The cache implementation is an argument of every call, so one set of trained weights
    runs with a float cache or an integer one.

    Example:
        >>> model = TinyDecoder(DecoderConfig(), rngs=nnx.Rngs(0))
        >>> states = model.init_cache(FloatKVCache(), batch=1)
        >>> logits, states = model(tokens, states, 0, FloatKVCache())
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.pos_embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.d_model))
        )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, rngs=rngs)

    def init_cache(
        self, cache: KVCache, batch: int, scales: Sequence[ChannelScales] | None = None
    ) -> list[KVState]:
        """Empty cache states, one per layer; `scales` are PER_CHANNEL calibrations."""
        cfg = self.cfg
        if scales is not None and len(scales) != cfg.num_layers:
            raise ValueError(
                f"got `scales` for {len(scales)} layers; the decoder has {cfg.num_layers}."
            )
        return [
            cache.init(
                batch,
                cfg.max_len,
                cfg.num_heads,
                cfg.head_dim,
                None if scales is None else scales[i],
            )
            for i in range(cfg.num_layers)
        ]

    def __call__(
        self, tokens: Array, states: Sequence[KVState], pos: Array | int, cache: KVCache
    ) -> tuple[Array, list[KVState]]:
        """Logits for `tokens` (batch, s) placed at positions `pos`..`pos`+s-1."""
        x = self.embed(tokens) + lax.dynamic_slice_in_dim(self.pos_embed[...], pos, tokens.shape[1])
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block(x, state, pos, cache)
            new_states.append(state)
        return self.head(self.ln_f(x)), new_states


@partial(jax.jit, static_argnames=("graphdef", "cache"))
def decode_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: Array,
    states: Sequence[KVState],
    pos: Array | int,
    cache: KVCache,
) -> tuple[Array, list[KVState]]:
    """One jitted call of the decoder: a prefill (s > 1 tokens) or a decode step (s = 1).

    `graphdef` and `params` come from `nnx.split(model)`; `cache` is static, so a float and an
    integer cache compile separately and each compiles once.
    """
    return nnx.merge(graphdef, params)(tokens, states, pos, cache)


@partial(jax.jit, static_argnames=("graphdef", "cache"))
def _decode_scan(graphdef, params, tokens, states, cache, forced):
    """Decodes one token a step; steps before `forced` read `tokens`, later ones the argmax.

    Teacher forcing (`forced` = len) and greedy generation (`forced` = prompt length) are one
    program, so each cache compiles it once per shape.
    """
    model = nnx.merge(graphdef, params)

    def body(carry, t):
        states, prev = carry
        token = jnp.where(t < forced, tokens[:, t], prev)
        logits, states = model(token[:, None], states, t, cache)
        best = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return (states, best), (logits[:, 0], token)

    _, (logits, fed) = lax.scan(body, (states, tokens[:, 0]), jnp.arange(tokens.shape[1]))
    return jnp.swapaxes(logits, 0, 1), fed.T


def teacher_forced_logits(
    model: TinyDecoder,
    cache: KVCache,
    tokens: Array | np.ndarray,
    scales: Sequence[ChannelScales] | None = None,
) -> Array:
    """Logits (batch, len, vocab) from feeding `tokens` one at a time through the cache.

    Token by token, not one prefill, so every query reads keys and values back from the
    cache exactly as autoregressive decoding does.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    _check_len(model, tokens.shape[1])
    graphdef, params = nnx.split(model)
    states = model.init_cache(cache, tokens.shape[0], scales)
    return _decode_scan(graphdef, params, tokens, states, cache, tokens.shape[1])[0]


def greedy_generate(
    model: TinyDecoder,
    cache: KVCache,
    prompt: Array | np.ndarray,
    steps: int,
    scales: Sequence[ChannelScales] | None = None,
) -> Array:
    """Greedy continuation ids (batch, steps) of `prompt` (batch, s), decoded token by token."""
    prompt = jnp.asarray(prompt, jnp.int32)
    n = prompt.shape[1]
    _check_len(model, n + steps)
    tokens = jnp.pad(prompt, ((0, 0), (0, steps)))
    graphdef, params = nnx.split(model)
    states = model.init_cache(cache, prompt.shape[0], scales)
    return _decode_scan(graphdef, params, tokens, states, cache, n)[1][:, n:]


def calibrate_kv_scales(
    model: TinyDecoder, tokens: Array | np.ndarray, bits: int = 8, batch: int = 16
) -> list[ChannelScales]:
    """PER_CHANNEL cache scales from a float prefill of calibration windows (n, len)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    _check_len(model, tokens.shape[1])
    graphdef, params = nnx.split(model)
    cache = FloatKVCache()
    amax: list[ChannelScales] | None = None
    for start in range(0, tokens.shape[0], batch):
        chunk = tokens[start : start + batch]
        states = model.init_cache(cache, chunk.shape[0])
        _, states = decode_step(graphdef, params, chunk, states, 0, cache)
        found = channel_amax([s for s in states if isinstance(s, FloatKV)], chunk.shape[1])
        amax = found if amax is None else merge_amax(amax, found)
    if amax is None:
        raise ValueError("`calibrate_kv_scales` got no calibration windows (tokens.shape[0] == 0).")
    return calibrate_channel_scales(amax, bits)


def windows(ids: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows (n, length) of an id sequence; a short tail is dropped."""
    n = len(ids) // length
    return np.asarray(ids[: n * length]).reshape(n, length)


def _check_len(model: TinyDecoder, length: int) -> None:
    if length > model.cfg.max_len:
        raise ValueError(
            f"{length} positions exceed the decoder cache `max_len`={model.cfg.max_len}."
        )


def _loss(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    cache = FloatKVCache()
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits, _ = model(inputs, model.init_cache(cache, inputs.shape[0]), 0, cache)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train_tiny_decoder(
    text: str,
    cfg: DecoderConfig | None = None,
    *,
    steps: int = 400,
    batch: int = 16,
    learning_rate: float = 5e-3,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> TinyDecoder:
    """Trains the decoder with Adam on random windows of `text` (next-character loss).

    Args:
        text: training text.
        cfg: decoder shape; windows are `cfg.max_len` long.
        steps: Adam steps.
        batch: windows per step.
        learning_rate: peak of the warmup-cosine schedule.
        seed: initialization and window sampling.
        cache_dir: when given, the trained weights are kept there as `.npz` keyed by a hash
            of everything above, and a later call with the same inputs loads them.

    Returns:
        The trained model.
    """
    cfg = cfg or DecoderConfig()
    path = None
    if cache_dir is not None:
        key = json.dumps(
            [
                _TRAIN_RECIPE,
                dataclasses.asdict(cfg),
                steps,
                batch,
                learning_rate,
                seed,
                jax.__version__,
                hashlib.sha256(text.encode()).hexdigest(),
            ]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = pathlib.Path(cache_dir) / f"tiny_decoder-{digest}.npz"
        # Shapes only: a real initialization costs seconds of small compiles on CPU.
        graphdef, shapes = nnx.split(nnx.eval_shape(lambda: TinyDecoder(cfg, rngs=nnx.Rngs(0))))
        loaded = _load_params(path, shapes)
        if loaded is not None:
            logger.info("loaded trained tiny decoder from %s", path)
            return nnx.merge(graphdef, loaded)

    graphdef, params = nnx.split(TinyDecoder(cfg, rngs=nnx.Rngs(seed)))
    ids = encode(text)
    if len(ids) <= cfg.max_len + 1:
        raise ValueError(
            f"training text has {len(ids)} characters; need more than {cfg.max_len + 1}."
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - cfg.max_len - 1, size=(steps, batch))
    # Warmup then cosine decay: a few hundred steps reach a useful loss only with a high peak.
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 10, steps))

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(partial(_loss, graphdef))(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    offsets = np.arange(cfg.max_len + 1)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, ids[starts[i][:, None] + offsets])
        if i % 100 == 0 or i == steps - 1:
            logger.info("tiny decoder step %d loss %.3f", i, float(loss))
    if path is not None:
        _save_params(path, params)
    return nnx.merge(graphdef, params)


def _load_params(path: pathlib.Path, template: nnx.State) -> nnx.State | None:
    if not path.is_file():
        return None
    leaves, treedef = jax.tree.flatten(template)
    with np.load(path) as data:
        stored = [data[f"arr_{i}"] for i in range(len(data.files))]
    if [x.shape for x in stored] != [x.shape for x in leaves]:
        logger.warning("ignoring %s: its arrays do not match the decoder's parameters", path)
        return None
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in stored])


def _save_params(path: pathlib.Path, params: nnx.State) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, *[np.asarray(x) for x in jax.tree.leaves(params)])
    os.replace(tmp, path)  # atomic, so parallel test workers never read half a file
