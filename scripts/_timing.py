"""The timing loop the benchmarks share: every program timed in the same rounds."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def interleaved_times_ms(
    runs: Sequence[Callable[[], Any]], repeats: int, min_s: float = 0.0
) -> np.ndarray:
    """`(rounds, len(runs))` wall times in ms of `runs`, each a call that returns when its
    result is ready. Every round calls each once, in an order drawn per round, for `repeats`
    rounds and more until the calls took `min_s` in all, so every program sees the same
    load and the same neighbours.

    Timed apart, programs drifted against each other on this shared VM: on the digits MLP
    the float graph's median moved by 40% between two pairings, and onnxruntime's own
    models and jaxptq's exports swapped places between two runs. Always calling the
    reference first had favoured the second by 5-8%."""
    for run in runs:  # compiled, caches and thread pools warm
        run()
        run()
    times: list[list[float]] = []
    order = np.random.default_rng(0)
    spent = 0.0
    while len(times) < repeats or spent < min_s:
        row = [0.0] * len(runs)
        for i in order.permutation(len(runs)):
            start = time.perf_counter()
            runs[i]()
            row[i] = time.perf_counter() - start
        times.append(row)
        spent += sum(row)
    return 1000 * np.array(times)
