"""The fused decoding step (``cpu_kernels.decode_step``, all decoder layers in one C call): as accurate as the torch
modules against a float64 reference, same cache writes, same greedy tokens in the Engine and ``generate``, and the
modules' path wherever something is not plain (hooks, adapters, autograd)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from af3 import AF3Model, AF3Processor
from af3.cli import embedded_model_path
from af3.config import TextConfig
from af3.generation.cache import KVCache
from af3.generation.engine import Engine, SlotCache
from af3.kernels import binding as cpu_kernels
from af3.model import decoder as D
from af3.model.quantize import Int8Linear
from af3.training import synthetic as S

from af3.model.linear import CONVERT_DTYPES


def fused_here(dtype: torch.dtype) -> bool:
    """Whether decoding steps in ``dtype`` take the fused step on this machine (kernel built, no native GEMM)."""
    return cpu_kernels.available() and dtype in CONVERT_DTYPES


needs_fused = pytest.mark.skipif(not fused_here(torch.bfloat16) or not fused_here(torch.float16),
                                 reason="the fused step runs where af3's CPU kernel is built and bf16/fp16 have no "
                                        "native CPU GEMM (AVX2 without AVX-512)")

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 3, 64, 4, 2, 16, 96


def random_decoder(seed: int = 0) -> D.Qwen2Model:
    torch.manual_seed(seed)
    cfg = TextConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=50,
                     pad_token_id=0)
    model = D.Qwen2Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    return model


class Calls:
    """Counts calls of cpu_kernels.decode_step (to know which path a forward took)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = cpu_kernels.decode_step

        def counted(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, "decode_step", counted)


def decode_once(model: D.Qwen2Model, dtype: torch.dtype, fused: bool, monkeypatch, prompt: int = 9,
                max_len: int = 48) -> tuple[torch.Tensor, KVCache]:
    """Prefill ``prompt`` random embeddings for 3 rows (rows 1 and 2 left-padded by 3 and 5), then one decoding
    step; returns the step's hidden states [3, 1, D] (fp32) and the cache."""
    monkeypatch.setattr(D, "FUSED_DECODE", "auto" if fused else "off")
    g = torch.Generator().manual_seed(1)
    b = 3
    x = torch.randn(b, prompt, HIDDEN, generator=g).to(dtype)
    step = torch.randn(b, 1, HIDDEN, generator=g).to(dtype)
    valid = torch.ones(b, prompt + 1, dtype=torch.bool)
    valid[1, :3] = valid[2, :5] = False
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    cache = KVCache(LAYERS, b, max_len, KV_HEADS, HEAD_DIM, dtype=dtype, device="cpu")
    with torch.inference_mode():
        model(x, pos[:, :prompt], D.attention_mask_4d(valid[:, :prompt], 0, prompt), cache, 0)
        out = model(step, pos[:, prompt:], D.attention_mask_4d(valid, prompt, 1), cache, prompt)
    return out.float(), cache


@needs_fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("prompt", [9, 37])
def test_the_fused_step_is_as_accurate_as_the_modules(dtype, int8, prompt, monkeypatch):
    base = random_decoder()
    model = copy.deepcopy(base).to(dtype)
    if int8:  # as quantize_int8 does in an AF3Model
        for layer in model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    setattr(parent, name, Int8Linear.from_linear(child))
    truth_model = copy.deepcopy(model).double()  # the same (rounded / quantized) weights, float64 arithmetic
    calls = Calls(monkeypatch)
    fused, fused_cache = decode_once(model, dtype, True, monkeypatch, prompt)
    assert calls.n == 1
    modules, modules_cache = decode_once(model, dtype, False, monkeypatch, prompt)
    assert calls.n == 1
    truth, _ = decode_once(truth_model, torch.float64, False, monkeypatch, prompt)
    fused_err, modules_err = (fused - truth).abs(), (modules - truth).abs()
    # Both round to the same dtype at the same points; sums run in other orders, so single roundings may differ.
    assert fused_err.max() <= 2 * modules_err.max() + 1e-3
    assert fused_err.mean() <= 1.5 * modules_err.mean() + 1e-4
    # The new token's keys and values land in the same slots, everything else in the caches is untouched.
    for got, want in zip(fused_cache.k + fused_cache.v, modules_cache.k + modules_cache.v, strict=True):
        a, b = got.float(), want.float()
        assert torch.equal(a[:, :, :prompt], b[:, :, :prompt])
        assert torch.equal(a[:, :, prompt + 1:], b[:, :, prompt + 1:])
        assert (a[:, :, prompt] - b[:, :, prompt]).abs().max() <= 0.05 * b[:, :, prompt].abs().max()
        assert a[:, :, prompt].abs().sum() > 0


@needs_fused
def test_weights_are_described_again_when_they_change(monkeypatch):
    model = random_decoder().to(torch.bfloat16)
    calls = Calls(monkeypatch)
    decode_once(model, torch.bfloat16, True, monkeypatch)
    first = model.fused_decode_weights(torch.bfloat16)
    assert first is model.fused_decode_weights(torch.bfloat16)  # cached while nothing changes
    model.to(torch.float16)
    fused, _ = decode_once(model, torch.float16, True, monkeypatch)
    modules, _ = decode_once(model, torch.float16, False, monkeypatch)
    assert calls.n == 2 and model.fused_decode_weights(torch.float16) is not first
    assert (fused - modules).abs().max() <= 0.02 * modules.abs().max()
    # A weight replaced by another tensor (not modified in place): described anew, and the step uses the new one.
    lin = model.layers[2].mlp.down_proj
    lin.weight = torch.nn.Parameter(lin.weight.detach() * 2, requires_grad=False)
    doubled, _ = decode_once(model, torch.float16, True, monkeypatch)
    doubled_modules, _ = decode_once(model, torch.float16, False, monkeypatch)
    assert calls.n == 3 and (doubled - doubled_modules).abs().max() <= 0.02 * doubled_modules.abs().max()
    assert (doubled - fused).abs().max() > 0.1
    # A hook added after the description was made: the step goes through the modules, and back once it is gone.
    seen = []
    handle = model.layers[0].self_attn.register_forward_hook(lambda m, a, o: seen.append(1))
    decode_once(model, torch.float16, True, monkeypatch)
    assert calls.n == 3 and len(seen) == 2
    handle.remove()
    fused, _ = decode_once(model, torch.float16, True, monkeypatch)
    assert calls.n == 4 and torch.equal(fused, doubled)
    # One layer quantized, the others not: mixed weight kinds are not fused.
    model.layers[1].mlp.up_proj = Int8Linear.from_linear(model.layers[1].mlp.up_proj)
    decode_once(model, torch.float16, True, monkeypatch)
    assert calls.n == 4 and model.fused_decode_weights(torch.float16) is None
    twin = copy.deepcopy(model)  # the C descriptions are not part of the module: copies work and describe their own
    twin.layers[1].mlp.up_proj = model.layers[2].mlp.up_proj  # plain again (a shared module is fine)
    again, _ = decode_once(twin, torch.float16, True, monkeypatch)
    assert calls.n == 5 and twin.fused_decode_weights(torch.float16) is not None


@needs_fused
def test_hooks_autograd_and_other_dtypes_take_the_modules_path(monkeypatch):
    model = random_decoder().to(torch.bfloat16)
    calls = Calls(monkeypatch)
    seen = []
    handle = model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    decode_once(model, torch.bfloat16, True, monkeypatch)
    assert calls.n == 0 and len(seen) == 2  # prefill and the decoding step both ran the hooked module
    handle.remove()
    decode_once(model, torch.bfloat16, True, monkeypatch)
    assert calls.n == 1
    for module in (model.norm, model.rotary):  # modules the fused step stands in for, outside the layers
        seen.clear()
        handle = module.register_forward_pre_hook(lambda m, a: seen.append(1))
        decode_once(model, torch.bfloat16, True, monkeypatch)
        assert calls.n == 1 and len(seen) == 2
        handle.remove()
    model.float()  # fp32 weights: torch's kernels are fine, nothing fused
    decode_once(model, torch.float32, True, monkeypatch)
    assert calls.n == 1
    model.bfloat16()
    cache = KVCache(LAYERS, 1, 8, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cpu")
    x = torch.randn(1, 1, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    out = model(x, torch.zeros(1, 1, dtype=torch.long), mask, cache, 0)  # autograd on: the modules' path
    out.float().sum().backward()
    assert calls.n == 1 and x.grad is not None


@needs_fused
def test_bad_cache_arguments_are_refused(monkeypatch):
    model = random_decoder().to(torch.bfloat16)
    weights = model.fused_decode_weights(torch.bfloat16)
    cache = KVCache(LAYERS, 2, 8, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cpu")
    x = torch.randn(2, HIDDEN, dtype=torch.bfloat16)
    pos = torch.zeros(2, dtype=torch.long)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="within the cache"):
        cpu_kernels.decode_step(weights, x, pos, torch.tensor([0, 8]), mask, cache.k, cache.v)
    with pytest.raises(ValueError, match="within the cache"):
        cpu_kernels.decode_step(weights, x, pos, pos, torch.ones(2, 9, dtype=torch.bool), cache.k, cache.v)
    with pytest.raises(ValueError, match="x must be"):
        cpu_kernels.decode_step(weights, x.half(), pos, pos, mask, cache.k, cache.v)
    with pytest.raises(ValueError, match="dtype, shape and strides"):
        cpu_kernels.decode_step(weights, x, pos, pos, mask, [cache.k[0].half(), *cache.k[1:]], cache.v)
    with pytest.raises(ValueError, match="head_dim % 8"):
        cpu_kernels.DecodeWeights([], model.norm.weight, model.rotary.inv_freq, 1e-6, 4, 2, 12, torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_bf16():
    folder = embedded_model_path()
    return AF3Model.from_pretrained(folder, dtype=torch.bfloat16), AF3Processor.from_pretrained(folder)


def _conversations(n: int) -> list[list[dict]]:
    rng = np.random.default_rng(11)
    out = []
    for i in range(n):
        sample = S.make_sample(("count", "pitch", "noise")[i % 3], rng)
        question = sample.messages[0]["content"][1]["text"]
        out.append([{"role": "user", "content": [{"type": "audio", "audio": sample.audio},
                                                 {"type": "text", "text": question}]}])
    return out


@needs_fused
def test_greedy_tokens_are_the_same_fused_or_not(tiny_bf16, monkeypatch):
    model, proc = tiny_bf16
    convs = _conversations(3)
    calls = Calls(monkeypatch)
    got = {}
    inputs = proc.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    for fused in (True, False):
        monkeypatch.setattr(D, "FUSED_DECODE", "auto" if fused else "off")
        engine = Engine(model, proc, max_batch_size=3)
        got[fused, "engine"] = [o.token_ids for o in engine.generate(convs, max_new_tokens=12, min_new_tokens=12)]
        ids = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        got[fused, "generate"] = ids[:, inputs["input_ids"].shape[1]:].tolist()
        if fused:
            assert calls.n >= 2 * 11  # both ran their (at least 11) decoding steps through it
            calls.n = 0
    assert calls.n == 0
    assert got[True, "engine"] == got[False, "engine"] == got[True, "generate"] == got[False, "generate"]


def test_slot_cache_hands_out_its_rows():
    cache = SlotCache(2, 4, 8, 2, 16, torch.bfloat16, torch.device("cpu"))
    keys, values = cache.layer_tensors()
    assert keys[0] is cache.k[0] and values[1] is cache.v[1]
    cache.rows = slice(2, 4)
    keys, _ = cache.layer_tensors()
    assert keys[0].shape[0] == 2 and keys[0].data_ptr() == cache.k[0][2].data_ptr()


@needs_fused
def test_an_adapter_that_is_off_leaves_the_fused_step_on(tiny_bf16, monkeypatch):
    from af3.model.adapters import LoRAWeights, SwitchableLoRA

    model, _ = tiny_bf16
    decoder = model.language_model.model
    g = torch.Generator().manual_seed(3)
    name = "language_model.model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    lora = SwitchableLoRA(model, {name: LoRAWeights(torch.randn(4, lin.in_features, generator=g),
                                                    torch.randn(lin.out_features, 4, generator=g), 2.0)})
    try:
        assert decoder.fused_decode_weights(torch.bfloat16) is not None  # off: the plain model
        lora.rows = torch.tensor([True])
        assert lin._forward_hooks and decoder.fused_decode_weights(torch.bfloat16) is None  # on: the modules
        lora.rows = torch.tensor([False])
        assert not lin._forward_hooks and decoder.fused_decode_weights(torch.bfloat16) is not None
    finally:
        lora.remove()
    assert not lin._forward_hooks


@pytest.mark.skipif(not cpu_kernels.available(), reason="af3's CPU kernel is not built on this machine")
def test_always_runs_the_fused_step_where_torch_has_native_half_gemms(monkeypatch, caplog):
    from af3.model import linear

    monkeypatch.setattr(linear, "CONVERT_DTYPES", frozenset())  # as on an AVX-512/AMX CPU
    model = random_decoder().to(torch.bfloat16)
    calls = Calls(monkeypatch)
    decode_once(model, torch.bfloat16, True, monkeypatch)  # "auto": torch's kernels there
    assert calls.n == 0
    monkeypatch.setattr(D, "FUSED_DECODE", "always")
    g = torch.Generator().manual_seed(1)
    # decode_once sets "auto"; run the same step by hand under "always"
    with torch.inference_mode():
        cache = KVCache(LAYERS, 1, 8, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cpu")
        x = torch.randn(1, 1, HIDDEN, generator=g).bfloat16()
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
        fused = model(x, torch.zeros(1, 1, dtype=torch.long), mask, cache, 0)
        monkeypatch.setattr(D, "FUSED_DECODE", "off")
        plain = model(x, torch.zeros(1, 1, dtype=torch.long), mask, cache, 0)
        assert calls.n == 1 and (fused.float() - plain.float()).abs().max() <= 0.02 * plain.float().abs().max()
        monkeypatch.setattr(D, "FUSED_DECODE", "sometimes")
        with caplog.at_level("WARNING"):
            model(x, torch.zeros(1, 1, dtype=torch.long), mask, cache, 0)
        assert calls.n == 1 and "not one of auto, always, off" in caplog.text


def test_a_half_precision_cpu_engine_loads_the_kernels_when_it_is_built(tiny_bf16, monkeypatch):
    model, proc = tiny_bf16
    loads = []
    real = cpu_kernels._library
    monkeypatch.setattr(cpu_kernels, "_library", lambda: loads.append(1) or real())
    Engine(model, proc, max_batch_size=1)  # not at the first request: a compile there would delay its answer
    assert loads
