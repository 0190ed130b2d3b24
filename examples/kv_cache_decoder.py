"""Int8 KV cache for a tiny Flax decoder: memory saved, and how often greedy tokens change.

Trains (or loads from `.cache/`) a character-level decoder on standard-library docstrings,
then decodes a held-out passage (the Zen of Python and `difflib`'s docstrings) token by token
with a float32 cache and with int8 caches of both granularities.

    python examples/kv_cache_decoder.py [--steps 400] [--no-disk-cache]
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxptq.config import QuantConfig
from jaxptq.kvcache import cache_nbytes, kv_cache_from_config
from jaxptq.models import tiny_decoder as td

CACHE_DIR = pathlib.Path(__file__).resolve().parents[1] / ".cache"


def held_out_text() -> str:
    """A passage the decoder never trained on."""
    return td.zen_of_python() + "\n\n" + td.stdlib_docstrings(["difflib"])[:1500]


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Runs the comparison and prints it; returns the numbers per cache granularity."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--no-disk-cache", action="store_true", help="always train afresh")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    text = td.stdlib_docstrings()
    model = td.train_tiny_decoder(
        text, steps=args.steps, cache_dir=None if args.no_disk_cache else CACHE_DIR
    )
    length = model.cfg.max_len
    print(f"decoder ready in {time.perf_counter() - start:.1f}s ({args.steps} steps)")

    held = td.windows(td.encode(held_out_text()), length)
    calib = td.windows(td.encode(text), length)[:64]
    float_cache = kv_cache_from_config(QuantConfig())
    ref = td.teacher_forced_logits(model, float_cache, held)
    prompts, gen_steps = held[:, : length // 2], length // 2
    ref_gen = np.asarray(td.greedy_generate(model, float_cache, prompts, gen_steps))
    float_bytes = cache_nbytes(model.init_cache(float_cache, 1))

    results: dict[str, dict[str, float]] = {}
    for granularity in ("PER_TOKEN_HEAD", "PER_CHANNEL"):
        cache = kv_cache_from_config(QuantConfig.create(kv_enable=True, kv_granularity=granularity))
        scales = td.calibrate_kv_scales(model, calib) if granularity == "PER_CHANNEL" else None
        logits = td.teacher_forced_logits(model, cache, held, scales)
        gen = np.asarray(td.greedy_generate(model, cache, prompts, gen_steps, scales))
        results[granularity] = {
            "memory_ratio": cache_nbytes(model.init_cache(cache, 1, scales)) / float_bytes,
            "agreement": float(jnp.mean(logits.argmax(-1) == ref.argmax(-1))),
            "positions": float(held.size),
            "generation_match": float(np.mean(gen == ref_gen)),
        }
    print(f"{'cache':<16}{'memory vs f32':>14}{'greedy agree':>14}{'gen match':>11}")
    for name, r in results.items():
        print(
            f"{name:<16}{r['memory_ratio']:>14.1%}{r['agreement']:>14.2%}"
            f"{r['generation_match']:>11.1%}"
        )
    print(f"over {held.size} teacher-forced positions; total {time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
