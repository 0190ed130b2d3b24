"""Shared fixtures: paths to the team's real data (skipped with a reason when absent), and
the CPU device for tests of XLA:CPU's forms."""

from __future__ import annotations

import os
import pathlib

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("JAXPTQ_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set JAXPTQ_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def on_the_cpu():
    """XLA:CPU's forms against plain XLA references that XLA:GPU rejects (it runs integer
    convolutions only as cuDNN calls with a float result): both on the CPU device, also on
    a machine with a GPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


from tests.digits_fixtures import calib, digits_data, lenet, mlp  # noqa: E402,F401  (fixtures)
