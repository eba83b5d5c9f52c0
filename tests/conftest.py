"""Shared fixtures: tiny reference checkpoints, built once per session in a temporary folder."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import oracle  # noqa: E402


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """``ckpt_factory(name)`` → (folder, reference processor, reference model), cached per name."""
    cache: dict[str, tuple] = {}

    def make(name: str = "base"):
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"ckpt_{name}")
            proc, model = oracle.make_checkpoint(folder, name)
            cache[name] = (str(folder), proc, model)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def trio(ckpt_factory):
    """``trio(name)`` → (reference processor, reference model, our model loaded from the same folder), cached."""
    cache: dict[str, tuple] = {}

    def get(name: str = "base"):
        if name not in cache:
            folder, proc, hf = ckpt_factory(name)
            cache[name] = (proc, hf, load_ours(folder))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_factory):
    return ckpt_factory("base")


def synth_audio(seconds: float, seed: int = 0, sr: int = 16000) -> np.ndarray:
    """Deterministic test audio: a few tones plus noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (1200 + 300 * seed) * t)
    x = x + 0.05 * rng.standard_normal(n)
    return x.astype(np.float32)


def audio_question(seconds: float, seed: int, text: str = "What is it?") -> list[dict]:
    """A one-turn conversation: ``seconds`` of :func:`synth_audio` and a question."""
    return [{"role": "user", "content": [{"type": "audio", "audio": synth_audio(seconds, seed)},
                                         {"type": "text", "text": text}]}]


def load_ours(folder: str):
    """Our model from a reference checkpoint folder."""
    from af3 import AF3Model

    return AF3Model.from_pretrained(folder)


@pytest.fixture(scope="session")
def odd_pair(ckpt_factory):
    """(our model, our processor) of the "odd" reference checkpoint, shared by the Engine tests."""
    from af3 import AF3Processor

    folder, _, _ = ckpt_factory("odd")
    return load_ours(folder), AF3Processor.from_pretrained(folder)


@pytest.fixture
def audio():
    return synth_audio


@pytest.fixture
def kernel_policy():
    """``kernel_policy(**fields)`` sets af3's kernel policy for the rest of the test (restored after it), e.g.
    ``kernel_policy(native_half=frozenset())`` makes any CPU dispatch as an AVX2 CPU does."""
    import dataclasses

    from af3.kernels import policy

    before = policy.current()

    def set_fields(**changes):
        policy.set_policy(dataclasses.replace(before, **changes))
        return policy.current()

    yield set_fields
    policy.set_policy(before)


@pytest.fixture(scope="session")
def avx2_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels-avx2")  # one AVX2-only build for the session


@pytest.fixture(params=["native", "avx2"])
def build(request, monkeypatch, avx2_cache):
    """The kernels as built for this CPU, and as built without AVX-512 (on an AVX-512 machine the AVX2 code paths
    then run too, so that CI on either CPU class checks both). Tests that take it need the kernels to build."""
    from af3.kernels import binding

    if request.param == "avx2":
        _build_with(monkeypatch, ("-mno-avx512f",), avx2_cache)
    yield request.param
    binding._library.cache_clear()


def _build_with(monkeypatch, flags: tuple[str, ...], cache) -> None:
    """Build and load the kernels with extra compiler flags, in their own cache, for the rest of the test (the
    fixture clears the loaded library afterwards)."""
    from af3.kernels import binding

    monkeypatch.setattr(binding, "FLAGS", (*binding.FLAGS, *flags))
    monkeypatch.setenv("AF3_CACHE", str(cache))
    binding._library.cache_clear()
    assert binding.available()


@pytest.fixture(scope="session")
def emulated_tiles_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels-no-amx")  # one build without AMX for the session


@pytest.fixture(params=["native", "emulated tiles"])
def tile_build(request, monkeypatch, emulated_tiles_cache):
    """The kernels as built for this CPU, and, on a CPU with AMX, as built without it, where the tile attention runs
    over tiles emulated with AVX512-BF16 (``amx_emul.h``; what a Zen 4 EPYC runs natively), so that CI on either
    CPU class with AVX512-BF16 checks both."""
    from af3.kernels import binding, ops

    if request.param != "native":
        if not ops.amx_tiles_native():
            pytest.skip("no AMX here: the native build already runs the emulated tiles, or no tiles at all")
        _build_with(monkeypatch, ("-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"), emulated_tiles_cache)
        assert binding._library().af3_attention_level() == 2
    yield request.param
    binding._library.cache_clear()
