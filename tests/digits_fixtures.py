"""Session fixtures: LeNet-5 and an MLP trained on real digits, and helpers to check programs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import pytest

from jaxptq.models import digits


@pytest.fixture(scope="session")
def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return digits.load_digits_split()


@pytest.fixture(scope="session")
def calib(digits_data: Any) -> list[np.ndarray]:
    """100 training digits in batches of 10: the calibration set."""
    x_train = digits_data[0]
    return [x_train[i : i + 10] for i in range(0, 100, 10)]


@pytest.fixture(scope="session")
def lenet() -> Any:
    return digits.pretrained("lenet5")


@pytest.fixture(scope="session")
def mlp() -> Any:
    return digits.pretrained("mlp")


def iter_eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation, sub-jaxprs included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from iter_eqns(inner)


def site_operand_dtypes(fn: Any, *args: Any) -> list[tuple[str, str, str]]:
    """(primitive, lhs dtype, rhs dtype) of every dot_general / convolution in `fn`, and of
    every `u8s8_dot` (XLA:CPU's integer dot, `jaxptq.u8s8`), sub-jaxprs included."""
    closed = jax.make_jaxpr(fn)(*args)
    out = []
    for eqn in iter_eqns(closed.jaxpr):
        if eqn.primitive.name in ("dot_general", "conv_general_dilated", "u8s8_dot"):
            lhs, rhs = eqn.invars[:2]
            out.append((eqn.primitive.name, str(lhs.aval.dtype), str(rhs.aval.dtype)))
    return out


def integer_op(d: tuple[str, str, str]) -> bool:
    """An entry of `site_operand_dtypes` that multiplies 8-bit integers: `int8 x int8`, or
    XLA:CPU's `uint8 x int8` form."""
    return d[1:] == ("uint8" if d[0] == "u8s8_dot" else "int8", "int8")
