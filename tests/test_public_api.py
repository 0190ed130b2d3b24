"""The public API: every name in `__all__` imports, and nothing private leaks."""

from __future__ import annotations

import jaxptq


def test_all_names_import_and_are_public() -> None:
    assert len(set(jaxptq.__all__)) == len(jaxptq.__all__)
    for name in jaxptq.__all__:
        assert not name.startswith("_")
        assert getattr(jaxptq, name) is not None


def test_nothing_private_leaks() -> None:
    public = {n for n in dir(jaxptq) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(jaxptq, n)).__name__ == "module"}
    assert public - modules == set(jaxptq.__all__)


def test_core_entry_points_are_exported() -> None:
    for name in ("ptq", "QuantConfig", "QuantPlan", "QuantizedFunction", "import_onnx"):
        assert name in jaxptq.__all__
