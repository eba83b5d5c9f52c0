"""The fused decoding step (``af3.kernels.FusedDecoder``: every decoder layer in one C call, planned from the torch
modules by ``af3.generation.fused_plan``): as accurate as the torch modules against a float64 reference, same cache
writes, same greedy tokens in the Engine and ``generate``, and the modules' path wherever something is not plain
(hooks, adapters, autograd, other dtypes).

These tests force the fused step through the kernel policy, so they run on every x86 CPU where the kernel builds
(AVX2 and AVX-512 alike), not only where the policy would pick it by itself; an edit to the torch attention that the
C twin does not follow fails them on both CPU classes (see the mutation test).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from af3 import AF3Model, AF3Processor, kernels
from af3.cli import embedded_model_path
from af3.config import TextConfig
from af3.generation.engine import Engine
from af3.generation.fused_plan import read_plan
from af3.generation.runner import ModelRunner
from af3.kernels import binding
from af3.kernels import ops as kernel_ops
from af3.model import decoder as D
from af3.model.kv_cache import KVCache
from af3.model.quantize import Int8Linear
from af3.training import synthetic as S

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="af3's CPU kernels do not build on this machine "
                                                                  "(not x86, no C compiler, or no AVX2/FMA/F16C)")

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 3, 64, 4, 2, 16, 96


def random_decoder(seed: int = 0, head_dim: int = HEAD_DIM) -> D.Qwen2Model:
    torch.manual_seed(seed)
    cfg = TextConfig(hidden_size=HEADS * head_dim, intermediate_size=INTER, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=head_dim, vocab_size=50,
                     pad_token_id=0)
    model = D.Qwen2Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    return model


class Calls:
    """Counts fused steps (calls of FusedDecoder.step), to know which path a forward took."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = binding.FusedDecoder.step

        def counted(plan, *args, **kwargs):
            self.n += 1
            return real(plan, *args, **kwargs)

        monkeypatch.setattr(binding.FusedDecoder, "step", counted)


def decode_once(model: D.Qwen2Model, dtype: torch.dtype, fused: bool, prompt: int = 9, max_len: int = 48,
                padded: bool = True, amx: bool = False, rows: int = 3) -> tuple[torch.Tensor, KVCache]:
    """Prefill ``prompt`` random embeddings for ``rows`` rows (``padded``: rows 1 and 2 left-padded by 3 and 5) with
    the modules, then one decoding step through the fused plan (``amx``: allowed to attend through the AMX kernel) or
    the modules; returns the step's hidden states [rows, 1, D] (fp32) and the cache."""
    g = torch.Generator().manual_seed(1)
    b = rows
    hidden = model.norm.weight.numel()
    x = torch.randn(b, prompt, hidden, generator=g).to(dtype)
    step = torch.randn(b, 1, hidden, generator=g).to(dtype)
    valid = torch.ones(b, prompt + 1, dtype=torch.bool)
    if padded:
        valid[1, :3] = valid[2, :5] = False
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    cache = KVCache(LAYERS, b, max_len, KV_HEADS, model.layers[0].self_attn.head_dim, dtype=dtype, device="cpu")
    mask = D.attention_mask_4d(valid, prompt, 1)  # [3, 1, 1, S]
    with torch.inference_mode():
        model(x, pos[:, :prompt], D.attention_mask_4d(valid[:, :prompt], 0, prompt), cache, 0)
        if fused:
            plan = read_plan(model, dtype)
            assert plan is not None
            slots = torch.full((b,), prompt, dtype=torch.long)
            out = plan.decoder.step(step.reshape(b, -1), pos[:, prompt].contiguous(), slots, mask.reshape(b, -1),
                                    cache.k, cache.v, amx)[:, None]
        else:
            out = model(step, pos[:, prompt:], mask, cache, prompt)
    return out.float(), cache


def quantized(model: D.Qwen2Model) -> D.Qwen2Model:
    for layer in model.layers:  # as quantize_int8 does in an AF3Model
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                setattr(parent, name, Int8Linear.from_linear(child))
    return model


def errors(model: D.Qwen2Model, dtype: torch.dtype, prompt: int = 9, rows: int = 3,
           **how) -> tuple[float, float, float, float]:
    """(max, mean) error of the fused step and of the modules against float64 arithmetic on the same weights."""
    truth_model = copy.deepcopy(model).double()
    fused, _ = decode_once(model, dtype, True, prompt, rows=rows, **how)
    modules, _ = decode_once(model, dtype, False, prompt, padded=how.get("padded", True), rows=rows)
    truth, _ = decode_once(truth_model, torch.float64, False, prompt, padded=how.get("padded", True), rows=rows)
    f, m = (fused - truth).abs(), (modules - truth).abs()
    return float(f.max()), float(f.mean()), float(m.max()), float(m.mean())


def as_accurate(err: tuple[float, float, float, float]) -> bool:
    # Both round to the same dtype at the same points; sums run in other orders, so single roundings may differ.
    fused_max, fused_mean, modules_max, modules_mean = err
    return fused_max <= 2 * modules_max + 1e-3 and fused_mean <= 1.5 * modules_mean + 1e-4


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("prompt", [9, 37])
def test_the_fused_step_is_as_accurate_as_the_modules(dtype, int8, prompt):
    model = copy.deepcopy(random_decoder()).to(dtype)
    if int8:
        quantized(model)
    assert as_accurate(errors(model, dtype, prompt))
    fused_out, fused_cache = decode_once(model, dtype, True, prompt)
    _, modules_cache = decode_once(model, dtype, False, prompt)
    # The new token's keys and values land in the same slots, everything else in the caches is untouched.
    for got, want in zip(fused_cache.k + fused_cache.v, modules_cache.k + modules_cache.v, strict=True):
        a, b = got.float(), want.float()
        assert torch.equal(a[:, :, :prompt], b[:, :, :prompt])
        assert torch.equal(a[:, :, prompt + 1:], b[:, :, prompt + 1:])
        assert (a[:, :, prompt] - b[:, :, prompt]).abs().max() <= 0.05 * b[:, :, prompt].abs().max()
        assert a[:, :, prompt].abs().sum() > 0


@needs_kernel
@pytest.mark.parametrize("int8", [False, True])
def test_the_fused_step_is_as_accurate_as_the_modules_for_many_rows(int8):
    """Without native half GEMMs "auto" takes the step up to FUSED_ROWS rows: 70 rows (packed panels: 11 row tiles
    of 6 and a tail of 4) through it, and through the modules (af3's kernel there too), against float64."""
    model = copy.deepcopy(random_decoder()).to(torch.bfloat16)
    if int8:
        quantized(model)
    assert as_accurate(errors(model, torch.bfloat16, 9, rows=70))


@needs_kernel
@pytest.mark.skipif(not kernel_ops.amx_attention_available(), reason="af3's tile attention needs AVX512-BF16")
def test_rows_that_attend_to_prefixes_take_the_amx_attention_where_allowed():
    model = copy.deepcopy(random_decoder(head_dim=32)).to(torch.bfloat16)  # the AMX kernel takes Dh % 32 == 0
    for amx in (False, True):
        assert as_accurate(errors(model, torch.bfloat16, 37, padded=False, amx=amx))
    own, _ = decode_once(model, torch.bfloat16, True, 37, padded=False)
    tiles, cache = decode_once(model, torch.bfloat16, True, 37, padded=False, amx=True)
    _, modules_cache = decode_once(model, torch.bfloat16, False, 37, padded=False)
    assert not torch.equal(own, tiles)  # the AMX kernel ran: probabilities rounded to bf16 for the product with v
    for got, want in zip(cache.k + cache.v, modules_cache.k + modules_cache.v, strict=True):
        assert torch.equal(got[:, :, :37], want[:, :, :37]) and got[:, :, 37].abs().sum() > 0
    padded, _ = decode_once(model, torch.bfloat16, True, 37, amx=True)  # left-padded rows: the step's own attention
    assert torch.equal(padded, decode_once(model, torch.bfloat16, True, 37)[0])


@needs_kernel
def test_an_edit_to_the_torch_attention_that_the_c_step_does_not_follow_fails_the_comparison(monkeypatch):
    """The mutation check: the comparison above has teeth. Scaling the attention scores differently in the torch
    path only (as an edit of ``Attention.forward`` would) makes the fused step disagree with the modules."""
    model = random_decoder().to(torch.bfloat16)
    assert as_accurate(errors(model, torch.bfloat16))
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: real(*a, scale=0.5, **kw))
    assert not as_accurate(errors(model, torch.bfloat16))


@needs_kernel
def test_the_plan_refuses_what_the_c_step_does_not_compute():
    model = random_decoder().to(torch.bfloat16)
    assert read_plan(model, torch.bfloat16) is not None

    class EditedAttention(D.Attention):  # a subclass may change the math: not the canonical class, not planned
        pass

    edited = copy.deepcopy(model)
    old = edited.layers[1].self_attn
    edited.layers[1].self_attn = EditedAttention.__new__(EditedAttention)
    edited.layers[1].self_attn.__dict__.update(old.__dict__)
    assert read_plan(edited, torch.bfloat16) is None
    mixed = copy.deepcopy(model)  # one layer quantized, the others not: mixed weight kinds
    mixed.layers[1].mlp.up_proj = Int8Linear.from_linear(mixed.layers[1].mlp.up_proj)
    assert read_plan(mixed, torch.bfloat16) is None
    assert read_plan(copy.deepcopy(model).float(), torch.float32) is None  # fp32: torch's kernels are fine
    hooked = copy.deepcopy(model)
    hooked.norm.register_forward_pre_hook(lambda m, a: None)  # a module the step stands in for, outside the layers
    assert read_plan(hooked, torch.bfloat16) is None


@needs_kernel
def test_a_plan_knows_when_the_decoder_changed():
    model = random_decoder().to(torch.bfloat16)
    plan = read_plan(model, torch.bfloat16)
    assert plan.still_valid(model)
    lin = model.layers[2].mlp.down_proj
    lin.weight = torch.nn.Parameter(lin.weight.detach() * 2, requires_grad=False)  # replaced, not edited in place
    assert not plan.still_valid(model)
    plan = read_plan(model, torch.bfloat16)
    handle = model.layers[0].self_attn.register_forward_hook(lambda m, a, o: None)
    assert not plan.still_valid(model)
    handle.remove()
    assert plan.still_valid(model)
    model.to(torch.float16)
    assert not plan.still_valid(model)
    twin = copy.deepcopy(model)  # plans live outside the modules: copies plan for themselves
    assert read_plan(twin, torch.float16) is not None


@needs_kernel
def test_bad_cache_arguments_are_refused():
    model = random_decoder().to(torch.bfloat16)
    weights = read_plan(model, torch.bfloat16).decoder.weights
    cache = KVCache(LAYERS, 2, 8, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cpu")
    x = torch.randn(2, HIDDEN, dtype=torch.bfloat16)
    pos = torch.zeros(2, dtype=torch.long)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="within the cache"):
        kernels.decode_step(weights, x, pos, torch.tensor([0, 8]), mask, cache.k, cache.v)
    with pytest.raises(ValueError, match="within the cache"):
        kernels.decode_step(weights, x, pos, pos, torch.ones(2, 9, dtype=torch.bool), cache.k, cache.v)
    with pytest.raises(ValueError, match="x must be"):
        kernels.decode_step(weights, x.half(), pos, pos, mask, cache.k, cache.v)
    with pytest.raises(ValueError, match="dtype, shape and strides"):
        kernels.decode_step(weights, x, pos, pos, mask, [cache.k[0].half(), *cache.k[1:]], cache.v)
    with pytest.raises(ValueError, match="head_dim % 8"):
        kernels.DecodeWeights([], model.norm.weight, model.rotary.inv_freq, 1e-6, 4, 2, 12, torch.bfloat16)


def test_kv_cache_rows_are_views_of_its_storage():
    cache = KVCache(2, 4, 8, 2, 16, dtype=torch.bfloat16, device="cpu")
    assert cache.rows(0, 4) is cache
    part = cache.rows(2, 4)
    keys, values = part.layer_tensors()
    assert keys[0].shape[0] == 2 and keys[0].data_ptr() == cache.k[0][2].data_ptr()
    part.update(1, torch.ones(2, 2, 1, 16, dtype=torch.bfloat16), torch.ones(2, 2, 1, 16), 5)
    assert cache.k[1][2:, :, 5].eq(1).all() and cache.k[1][:2].eq(0).all()


# ---------------------------------------------------------------------------------------------- through the runner
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


@needs_kernel
def test_greedy_tokens_are_the_same_fused_or_not(tiny_bf16, monkeypatch):
    model, proc = tiny_bf16
    convs = _conversations(3)
    calls = Calls(monkeypatch)
    got = {}
    inputs = proc.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    for mode in ("always", "off"):
        with kernels.policy.override(fused_decode=mode):
            engine = Engine(model, proc, max_batch_size=3)
            got[mode, "engine"] = [o.token_ids for o in engine.generate(convs, max_new_tokens=12, min_new_tokens=12)]
            ids = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            got[mode, "generate"] = ids[:, inputs["input_ids"].shape[1]:].tolist()
        if mode == "always":
            assert calls.n >= 2 * 11  # both ran their (at least 11) decoding steps through it
            calls.n = 0
    assert calls.n == 0
    assert got["always", "engine"] == got["off", "engine"] == got["always", "generate"] == got["off", "generate"]


@needs_kernel
def test_the_runner_takes_the_modules_for_think_rows_autograd_and_fp32(tiny_bf16, monkeypatch):
    from af3.model.adapters import LoRAWeights, SwitchableLoRA

    model, _ = tiny_bf16
    g = torch.Generator().manual_seed(3)
    name = "language_model.model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    lora = SwitchableLoRA(model, {name: LoRAWeights(torch.randn(4, lin.in_features, generator=g),
                                                    torch.randn(lin.out_features, 4, generator=g), 2.0)})
    calls = Calls(monkeypatch)
    runner = ModelRunner(model, 2, 16, lora=lora)
    try:
        with kernels.policy.override(fused_decode="always"), torch.inference_mode():
            runner.decode([5, 6], [0, 0], [False, False])  # the adapter off: the plain model, fused
            assert calls.n == 1
            hooks = []
            lin.register_forward_pre_hook(lambda m, a: hooks.append(1))  # changes between requests
            runner.check_backend()
            runner.decode([5, 6], [1, 1], [False, True])  # a think row: the adapter's hooks, the modules
            assert calls.n == 1 and len(hooks) == 1 and not lin._forward_hooks
            lin._forward_pre_hooks.clear()
            runner.check_backend()
            runner.decode([5, 6], [2, 2], [False, False])
            assert calls.n == 2
        with kernels.policy.override(fused_decode="always"), torch.enable_grad():
            runner.decode([5], [3], [False])  # autograd on: the modules
        assert calls.n == 2
        with kernels.policy.override(fused_decode="off"), torch.inference_mode():
            runner.decode([5], [3], [False])
        assert calls.n == 2
    finally:
        lora.remove()


def test_the_policy_is_read_from_the_environment_when_detected(caplog):
    from af3.kernels.policy import KernelPolicy

    assert KernelPolicy.detect({"AF3_FUSED_DECODE": "off"}).fused_decode == "off"
    assert not KernelPolicy.detect({"AF3_CPU_KERNELS": "0"}).kernels_usable()
    with caplog.at_level("WARNING"):
        assert KernelPolicy.detect({"AF3_FUSED_DECODE": "sometimes"}).fused_decode == "auto"
    assert "not one of auto, always, off" in caplog.text
    native = KernelPolicy(native_half=frozenset({torch.bfloat16, torch.float16}))
    cpu = torch.device("cpu")
    # "auto" where the dtype's GEMMs are native: the fused step up to the measured crossover, torch's kernels above.
    # The crossover is AMX_FUSED_ROWS for bf16 where the kernels multiply bf16 rows with AMX tiles, DP_FUSED_ROWS
    # where they use AVX512-BF16 pair dot products without AMX, else NATIVE_FUSED_ROWS; int8 weights up to
    # int8_rows (af3's int8 kernel's own crossover: SMALL_ROWS, or INT8_DP_ROWS with its byte lookups), SMALL_ROWS
    # for fp16 activations.
    from af3.kernels.policy import (AMX_FUSED_ROWS, CONVERT_ROWS, DP_FUSED_ROWS, FUSED_ROWS, INT8_DP_ROWS,
                                    NATIVE_FUSED_ROWS, SMALL_ROWS)

    level = binding.bf16_rows_level()
    bf16_limit = AMX_FUSED_ROWS if level == 2 else DP_FUSED_ROWS if level == 1 else NATIVE_FUSED_ROWS
    for dtype, limit in ((torch.bfloat16, bf16_limit), (torch.float16, NATIVE_FUSED_ROWS)):
        for rows in (1, limit):
            assert native.fused_decode_takes(rows, dtype, cpu) == kernels.available()
        assert not native.fused_decode_takes(limit + 1, dtype, cpu)
    assert native.fused_decode_takes(SMALL_ROWS, torch.bfloat16, cpu, int8=True) == kernels.available()
    assert not native.fused_decode_takes(SMALL_ROWS + 1, torch.bfloat16, cpu, int8=True)
    lookups = KernelPolicy(native_half=frozenset({torch.bfloat16, torch.float16}), int8_rows=INT8_DP_ROWS)
    assert lookups.fused_decode_takes(INT8_DP_ROWS, torch.bfloat16, cpu, int8=True) == kernels.available()
    assert not lookups.fused_decode_takes(INT8_DP_ROWS + 1, torch.bfloat16, cpu, int8=True)
    assert not lookups.fused_decode_takes(SMALL_ROWS + 1, torch.float16, cpu, int8=True)
    assert not KernelPolicy(native_half=frozenset({torch.bfloat16}), native_fused_rows=0, amx_fused_rows=0,
                            dp_fused_rows=0).fused_decode_takes(1, torch.bfloat16, cpu)
    forced = KernelPolicy(native_half=frozenset({torch.bfloat16}), fused_decode="always")
    assert forced.fused_decode_takes(1, torch.bfloat16, cpu) == kernels.available()
    assert forced.fused_decode_takes(FUSED_ROWS, torch.bfloat16, cpu) == kernels.available()
    assert not forced.fused_decode_takes(1, torch.float32, cpu)
    assert not forced.fused_decode_takes(FUSED_ROWS + 1, torch.bfloat16, cpu)
    # Without native half GEMMs (AVX2), "auto" runs the step wherever af3's kernel would multiply the rows (every
    # count) up to FUSED_ROWS, the most it was measured faster than the modules at.
    avx2 = KernelPolicy()
    for dtype, int8 in ((torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)):
        assert avx2.fused_decode_takes(FUSED_ROWS, dtype, cpu, int8=int8) == kernels.available()
        assert not avx2.fused_decode_takes(FUSED_ROWS + 1, dtype, cpu, int8=int8)
        assert not KernelPolicy(kernel_rows=FUSED_ROWS).fused_decode_takes(FUSED_ROWS, dtype, cpu, int8=int8)
    # Products: af3's kernel at every row count where it is usable; the fp32 path only where it is not.
    for rows in (1, 31, 32, 5000):
        assert avx2.own_gemm(rows, torch.bfloat16, cpu) == kernels.available()
    off = KernelPolicy(cpu_kernels=False)
    assert off.converts_to_fp32(CONVERT_ROWS, torch.bfloat16, cpu) and not off.own_gemm(5000, torch.bfloat16, cpu)
    assert not off.converts_to_fp32(CONVERT_ROWS - 1, torch.bfloat16, cpu)


def test_a_half_precision_cpu_engine_loads_the_kernels_when_it_is_built(tiny_bf16, monkeypatch):
    model, proc = tiny_bf16
    loads = []
    real = binding._library
    monkeypatch.setattr(binding, "_library", lambda: loads.append(1) or real())
    Engine(model, proc, max_batch_size=1)  # not at the first request: a compile there would delay its answer
    assert loads


@needs_kernel
def test_the_c_structs_match_the_binding_and_a_mismatch_is_refused():
    lib = binding._library()
    assert binding.abi_mismatch(lib) == ""

    class Shifted:  # a build whose Step grew by one field the binding does not know
        @staticmethod
        def af3_decode_struct_size(which):
            return lib.af3_decode_struct_size(which) + (8 if which == 2 else 0)

    assert binding.abi_mismatch(Shifted()).startswith("Step: ")


@needs_kernel
def test_the_plan_keeps_one_scratch_buffer_and_grows_it_when_a_step_needs_more():
    model = random_decoder().to(torch.bfloat16)
    plan = read_plan(model, torch.bfloat16)
    cache = KVCache(LAYERS, 4, 2048, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cpu")
    g = torch.Generator().manual_seed(3)

    def step(rows: int, width: int) -> torch.Tensor:
        x = torch.randn(rows, HIDDEN, generator=g).to(torch.bfloat16)
        slots = torch.full((rows,), width - 1, dtype=torch.long)
        mask = torch.ones(rows, width, dtype=torch.bool)
        with torch.inference_mode():
            return plan.decoder.step(x, slots, slots, mask, cache.k, cache.v)

    step(1, 16)
    memory = plan.decoder.scratch.memory
    assert memory.numel() > 0
    for width in range(2, 17):  # other steps that need no more: the same memory
        step(1, width)
    assert plan.decoder.scratch.memory is memory
    out = step(4, 2000)  # more rows, a much longer cache: it grows, and the step still computes
    assert plan.decoder.scratch.memory.numel() > memory.numel() and torch.isfinite(out.float()).all()
    with pytest.raises(RuntimeError, match="status -2"):  # the C side refuses memory smaller than it needs
        small = binding.Scratch()
        small.at_least = lambda floats: torch.empty(max(0, floats - 1))
        binding.decode_step(plan.decoder.weights, torch.zeros(1, HIDDEN, dtype=torch.bfloat16),
                            torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                            torch.ones(1, 1, dtype=torch.bool), cache.k, cache.v, small)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_steps_rounding_is_torchs_bit_for_bit(dtype):
    # The step rounds every activation to bf16/fp16 (8 lanes at a time, the rest one by one): each value must come
    # out as torch's conversion makes it, over every kind of float (ties, overflow, denormals, infinities), and a
    # NaN must stay a NaN. 1001 values: the vector path and a scalar tail.
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=1001, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x00000000, 0x80000000, 0x3f808000, 0x3f818000, 0x3f80c000, 0x7f7fffff, 0xff7fffff,
                        0x7f800000, 0xff800000, 0x00000001, 0x807fffff, 0x477ff000, 0x477fefff, 0x33000000,
                        0x7fc00000, 0xffa00001, 0x7f800001], dtype=np.uint32)
    bits[: len(special)] = special
    bits[-3:] = special[:3]  # (the scalar tail too)
    x = torch.from_numpy(bits.view(np.float32).copy())
    got, want = binding.round_values(x, dtype), x.to(dtype).float()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and nan.sum() > 0
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # the sign of zero included
    assert np.array_equal(x.numpy().view(np.uint32), bits)  # a copy: the input is untouched
    with pytest.raises(ValueError):
        binding.round_values(x, torch.float32)
