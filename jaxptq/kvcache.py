"""Attention key/value caches: float, and integer (quantize on write, dequantize on read)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from jaxptq.config import KVCacheQuantParam, QuantConfig

Array = jax.Array

# Keeps scales normal floats: XLA:CPU flushes subnormals, and a zero scale would divide by 0.
_MIN_SCALE = 1e-30


class FloatKV(NamedTuple):
    """Float cache state of one attention layer: keys and values, (batch, len, heads, dim)."""

    k: Array
    v: Array


class QuantKV(NamedTuple):
    """Integer cache state of one layer; scales broadcast against `k`/`v`.

    PER_TOKEN_HEAD scales have shape (batch, len, heads, 1); PER_CHANNEL scales (1, 1, heads,
    dim) are calibrated constants carried in the state so one compiled step serves every layer.
    """

    k: Array
    v: Array
    k_scale: Array
    v_scale: Array


class ChannelScales(NamedTuple):
    """Calibrated PER_CHANNEL scales (or absolute maxima) of one layer, each (heads, dim)."""

    k: Array
    v: Array


KVState = FloatKV | QuantKV


class KVCache(Protocol):
    """What a decoder needs from a cache; implementations are hashable, so `jit` treats them
    as static while the state they create is traced."""

    def init(
        self,
        batch: int,
        max_len: int,
        num_heads: int,
        head_dim: int,
        scales: ChannelScales | None = None,
    ) -> KVState: ...

    def write(self, state: KVState, k: Array, v: Array, pos: Array | int) -> KVState: ...

    def read(self, state: KVState) -> tuple[Array, Array]: ...


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed `bits`-bit integer (127 for 8 bits)."""
    return 2 ** (bits - 1) - 1


def token_head_scale(x: Array, bits: int) -> Array:
    """Dynamic scale per (…, head): the absolute maximum over the last (head-dim) axis.

    Args:
        x: keys or values, (..., heads, dim).
        bits: code width.

    Returns:
        Float32 scales of shape (..., heads, 1).
    """
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return jnp.maximum(amax / qmax(bits), _MIN_SCALE)


def quantize(x: Array, scale: Array, bits: int) -> Array:
    """Symmetric round-to-nearest into int8 containers; values beyond the range saturate."""
    q = jnp.round(x.astype(jnp.float32) / scale)
    return jnp.clip(q, -qmax(bits), qmax(bits)).astype(jnp.int8)


def dequantize(q: Array, scale: Array) -> Array:
    """Float32 values of integer codes `q` under `scale`."""
    return q.astype(jnp.float32) * scale


def _write_rows(buffer: Array, rows: Array, pos: Array | int) -> Array:
    """Writes `rows` (batch, s, ...) into `buffer` (batch, len, ...) from position `pos`."""
    start = (0, pos) + (0,) * (buffer.ndim - 2)
    return lax.dynamic_update_slice(buffer, rows.astype(buffer.dtype), start)


@dataclass(frozen=True)
class FloatKVCache:
    """The reference cache: keys and values stored as float32."""

    def init(
        self,
        batch: int,
        max_len: int,
        num_heads: int,
        head_dim: int,
        scales: ChannelScales | None = None,
    ) -> FloatKV:
        del scales  # a float cache needs none; accepted so decoders can pass them uniformly
        zeros = jnp.zeros((batch, max_len, num_heads, head_dim), jnp.float32)
        return FloatKV(zeros, zeros)

    def write(self, state: KVState, k: Array, v: Array, pos: Array | int) -> FloatKV:
        assert isinstance(state, FloatKV)
        return FloatKV(_write_rows(state.k, k, pos), _write_rows(state.v, v, pos))

    def read(self, state: KVState) -> tuple[Array, Array]:
        return state.k, state.v


@dataclass(frozen=True)
class QuantKVCache:
    """Integer cache: each key/value is quantized when written and dequantized when read.

    Example:
        >>> cache = QuantKVCache("PER_TOKEN_HEAD", bits=8)
        >>> state = cache.init(batch=1, max_len=16, num_heads=2, head_dim=32)
        >>> state = cache.write(state, k, v, pos=0)  # k, v: (1, s, 2, 32)
        >>> k_read, v_read = cache.read(state)
    """

    # PER_TOKEN_HEAD (scale per written token and head) or PER_CHANNEL (calibrated).
    granularity: str = "PER_TOKEN_HEAD"
    # Code width, 2..8, stored in int8 either way.
    bits: int = 8

    def __post_init__(self) -> None:
        KVCacheQuantParam(
            kv_enable=True, kv_granularity=self.granularity, kv_bits=self.bits
        ).validate()

    def init(
        self,
        batch: int,
        max_len: int,
        num_heads: int,
        head_dim: int,
        scales: ChannelScales | None = None,
    ) -> QuantKV:
        codes = jnp.zeros((batch, max_len, num_heads, head_dim), jnp.int8)
        if self.granularity == "PER_TOKEN_HEAD":
            if scales is not None:
                raise ValueError(
                    "PER_TOKEN_HEAD caches compute their scales at write time; got calibrated "
                    "`scales` too. Use `granularity`='PER_CHANNEL' or pass `scales`=None."
                )
            ones = jnp.ones((batch, max_len, num_heads, 1), jnp.float32)
            return QuantKV(codes, codes, ones, ones)
        if scales is None:
            raise ValueError(
                "a PER_CHANNEL cache needs `scales`, e.g. from `calibrate_channel_scales`."
            )
        expected = (num_heads, head_dim)
        for name, s in zip(("k", "v"), scales, strict=True):
            if s.shape != expected:
                raise ValueError(
                    f"PER_CHANNEL `scales.{name}` has shape {s.shape}; expected {expected} "
                    "(heads, head_dim) of this layer."
                )
        k_scale, v_scale = (s.astype(jnp.float32).reshape(1, 1, *expected) for s in scales)
        return QuantKV(codes, codes, k_scale, v_scale)

    def write(self, state: KVState, k: Array, v: Array, pos: Array | int) -> QuantKV:
        assert isinstance(state, QuantKV)
        if self.granularity == "PER_TOKEN_HEAD":
            k_scale, v_scale = token_head_scale(k, self.bits), token_head_scale(v, self.bits)
            return QuantKV(
                _write_rows(state.k, quantize(k, k_scale, self.bits), pos),
                _write_rows(state.v, quantize(v, v_scale, self.bits), pos),
                _write_rows(state.k_scale, k_scale, pos),
                _write_rows(state.v_scale, v_scale, pos),
            )
        return state._replace(
            k=_write_rows(state.k, quantize(k, state.k_scale, self.bits), pos),
            v=_write_rows(state.v, quantize(v, state.v_scale, self.bits), pos),
        )

    def read(self, state: KVState) -> tuple[Array, Array]:
        assert isinstance(state, QuantKV)
        return dequantize(state.k, state.k_scale), dequantize(state.v, state.v_scale)


def kv_cache_from_config(
    config: QuantConfig | KVCacheQuantParam | None,
) -> FloatKVCache | QuantKVCache:
    """The cache that `config`'s `[kv_cache_quant_param]` asks for (float when disabled).

    Example:
        >>> kv_cache_from_config(QuantConfig.create(kv_enable=True))
        QuantKVCache(granularity='PER_TOKEN_HEAD', bits=8)
    """
    if config is None:
        return FloatKVCache()
    param = config.kv_cache_quant_param if isinstance(config, QuantConfig) else config
    if not isinstance(param, KVCacheQuantParam):
        raise TypeError(
            f"`config` must be a QuantConfig or KVCacheQuantParam, not {type(config).__name__}"
        )
    if not param.kv_enable:
        return FloatKVCache()
    return QuantKVCache(granularity=param.kv_granularity, bits=param.kv_bits)


def channel_amax(states: Sequence[FloatKV], length: int | None = None) -> list[ChannelScales]:
    """Per layer, the absolute maximum of each (head, dim) channel over batch and positions.

    Args:
        states: float cache states after a prefill of calibration text, one per layer.
        length: only positions `[0, length)` hold written tokens; None means all.

    Returns:
        One `ChannelScales` of maxima per layer; combine batches with `merge_amax`.
    """
    out = []
    for i, state in enumerate(states):
        if not isinstance(state, FloatKV):
            raise TypeError(
                f"layer {i}: calibration reads a float cache (`FloatKV`), got "
                f"{type(state).__name__}; run the calibration text with `FloatKVCache()`."
            )
        k, v = (x[:, :length] for x in state)
        out.append(ChannelScales(*(jnp.max(jnp.abs(x), axis=(0, 1)) for x in (k, v))))
    return out


def merge_amax(a: Sequence[ChannelScales], b: Sequence[ChannelScales]) -> list[ChannelScales]:
    """Element-wise maximum of two per-layer amax lists (from two calibration batches)."""
    if len(a) != len(b):
        raise ValueError(f"cannot merge amax of {len(a)} layers with amax of {len(b)} layers.")
    return [ChannelScales(*jax.tree.map(jnp.maximum, x, y)) for x, y in zip(a, b, strict=True)]


def calibrate_channel_scales(amax: Sequence[ChannelScales], bits: int = 8) -> list[ChannelScales]:
    """PER_CHANNEL scales from calibrated maxima: the maximum maps to the largest code."""
    return [ChannelScales(*(jnp.maximum(m / qmax(bits), _MIN_SCALE) for m in a)) for a in amax]


def cache_nbytes(states: Sequence[KVState]) -> int:
    """Bytes held by cache states: codes plus scales (or float keys and values)."""
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(list(states)))
