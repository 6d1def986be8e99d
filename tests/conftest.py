"""Shared fixtures: the synthetic tiny DeepSeek-V3 family, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The runtime's oracle tests hold the f32 torch reference engine to 1e-4 of transformers (and greedy
# text to transformers.generate), which int8-quantized activations cannot meet. Those tests run the
# reference engine; the native engine is tested against it (and against transformers where its
# arithmetic is f32) in test_kernels_native.py and test_runtime_native.py, which choose explicitly.
os.environ.setdefault("KTPACK_ENGINE", "ref")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """make_all("tiny") output: keys "hf", "F32".."Q4_K_M", "legacy-F32/Q8_0/Q4_K", "split-1..3"."""
    from ktpack.convert.synth import make_all

    return make_all(tmp_path_factory.mktemp("tiny_models"), preset="tiny")


@pytest.fixture(scope="session")
def tiny_dir(tiny_models: dict[str, Path]) -> Path:
    """The folder holding the tiny family: hf/, tiny-<Q>.gguf, tiny-legacy-<Q>.gguf, split/."""
    return tiny_models["hf"].parent


@pytest.fixture
def isa_env(monkeypatch):
    """`isa_env(name)` forces the native engine's ISA for one test (KTPACK_ISA), then restores the default."""
    from ktpack import kernels as K

    def force(name: str) -> None:
        monkeypatch.setenv("KTPACK_ISA", name)
        assert K.ensure_engine() == name

    yield force
    monkeypatch.delenv("KTPACK_ISA", raising=False)
    K.ensure_engine()
