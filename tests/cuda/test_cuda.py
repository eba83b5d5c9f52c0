"""The CUDA path: the same code as on the CPU, checked against the CPU and the transformers reference on one GPU.

Run by ``benchmarks/gpu_check.sh`` (``pytest -m cuda``); skipped, with that reason, on machines without CUDA. Every
test compares against an independent result: the CPU run of the same weights in fp32 (TF32 off, so the GPU's fp32
products are fp32), or transformers on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import audio_question

from af3 import AF3Model, AF3Processor
from af3.cli import bundled_clip, embedded_model_path
from af3.generation.engine import Engine
from af3.training import synthetic as S

#: The device under test: CUDA; ``AF3_TEST_DEVICE=cpu`` runs the same tests on the CPU (a dry run of their logic on
#: machines without a GPU; it proves nothing about CUDA).
DEVICE = os.environ.get("AF3_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on a GPU machine)")]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 products in fp32 (no TF32), restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # (no effect on the CPU)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def tiny_pair():
    path = embedded_model_path()
    proc = AF3Processor.from_pretrained(path)
    return (AF3Model.from_pretrained(path, dtype=torch.float32),
            AF3Model.from_pretrained(path, dtype=torch.float32, device=DEVICE), proc)


def test_the_oracle_logits_match_on_the_gpu(ckpt_factory):
    folder, ref_proc, ref_model = ckpt_factory("base")
    ours = AF3Model.from_pretrained(folder, dtype=torch.float32, device=DEVICE)
    ref = ref_model.to(DEVICE).eval()
    conv = audio_question(3.0, 1)
    inputs = ref_proc.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    with torch.inference_mode():
        want = ref(**inputs).logits
        got = ours(**inputs).logits
    assert got.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    ref.to("cpu")


def test_greedy_answers_on_the_gpu_are_the_cpu_answers(tiny_pair):
    cpu, gpu, proc = tiny_pair
    convs = [audio_question(s, seed) for s, seed in ((2.0, 1), (7.0, 2), (31.0, 3))]  # one spans two windows
    want = [Engine(cpu, proc, max_batch_size=3).generate(c, max_new_tokens=12, min_new_tokens=12).token_ids
            for c in convs]
    engine = Engine(gpu, proc, max_batch_size=3)
    handles = [engine.submit(c, max_new_tokens=12, min_new_tokens=12) for c in convs]
    while not all(h.done.is_set() for h in handles):
        engine.step()
    assert [h.output.token_ids for h in handles] == want  # batched on the GPU, each alone on the CPU
    assert engine.runner.cache.k[0].device.type == torch.device(DEVICE).type


def test_a_follow_up_reuses_the_cached_prefix_on_the_gpu(tiny_pair):
    _, gpu, proc = tiny_pair
    engine = Engine(gpu, proc, max_batch_size=1)
    first = audio_question(4.0, 5)
    answer = engine.generate(first, max_new_tokens=6)
    follow = first + [{"role": "assistant", "content": answer.text}, {"role": "user", "content": "And then?"}]
    got = engine.generate(follow, max_new_tokens=6, min_new_tokens=6)
    fresh = Engine(gpu, proc, max_batch_size=1, prefix_cache_bytes=0).generate(follow, max_new_tokens=6,
                                                                          min_new_tokens=6)
    assert got.cached_prompt_tokens > 0 and got.token_ids == fresh.token_ids


def test_the_embedded_model_counts_the_bundled_clip_in_bf16_on_the_gpu():
    engine = Engine.from_pretrained(str(embedded_model_path()), dtype=torch.bfloat16, device=DEVICE)
    conv = [{"role": "user", "content": [{"type": "audio", "path": str(bundled_clip())},
                                         {"type": "text", "text": "How many beeps do you hear?"}]}]
    assert S.parse_answer("count", engine.generate(conv, max_new_tokens=16).text) == 3


def test_int8_weights_run_on_the_gpu_and_agree_with_the_cpu(tiny_pair):
    path = embedded_model_path()
    proc = tiny_pair[2]
    cpu = AF3Model.from_pretrained(path, dtype=torch.float32, quantize="int8")
    gpu = AF3Model.from_pretrained(path, dtype=torch.float32, quantize="int8", device=DEVICE)
    conv = audio_question(3.0, 7)
    inputs = proc.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
    with torch.inference_mode():
        want = cpu(**inputs).logits
        got = gpu(**{k: v.to(DEVICE) for k, v in inputs.items()}).logits.cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
