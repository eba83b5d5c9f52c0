"""Large weights, int8 weights and KV caches ask Linux for transparent huge pages before they are first written
(``af3.system.advise_huge_pages``); ``AF3_HUGE_PAGES=0`` turns that off. The kernel's own account of each mapping
(``/proc/self/smaps``: ``VmFlags`` has ``hg`` where ``MADV_HUGEPAGE`` was given) is the independent witness."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from af3 import AF3Model
from af3.model import tensor_files, weights
from af3.model.kv_cache import KVCache
from af3.model.quantize import quantize_weight
from af3.system import HUGE_PAGE_BYTES, advise_huge_pages
from af3.tiny import tiny_config

pytestmark = pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                                reason="this kernel has no transparent huge pages")


def vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping that holds ``address`` in this process."""
    inside = False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                start, end = (int(v, 16) for v in line.split()[0].split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def advised(t: torch.Tensor) -> bool:
    """Every page of ``t`` lies in mappings flagged for huge pages (its first, middle and last byte's)."""
    start, size = t.data_ptr(), t.numel() * t.element_size()
    return all("hg" in vm_flags(a) for a in (start, start + size // 2, start + size - 1))


@pytest.fixture(scope="module")
def big_vocab_ckpt(tmp_path_factory):
    """A tiny AF3 whose embedding table and lm_head (8192 x 128 fp32, 4 MB each) are large enough for huge pages;
    every other tensor is far below 2 MB."""
    folder = tmp_path_factory.mktemp("big_vocab")
    torch.manual_seed(0)
    AF3Model(tiny_config(vocab_size=8192, width=128)).save_pretrained(folder)
    return folder


def test_large_weights_are_advised_before_they_are_read_in(big_vocab_ckpt, monkeypatch):
    events = []
    advise, copy_into = weights.advise_huge_pages, tensor_files.TensorSource.copy_into

    def logged_advise(tensors):
        tensors = list(tensors)
        events.extend(("advise", t.data_ptr()) for t in tensors)
        return advise(tensors)

    def logged_copy(self, name, target):
        events.append(("fill", target.data_ptr()))
        return copy_into(self, name, target)

    monkeypatch.setattr(weights, "advise_huge_pages", logged_advise)
    monkeypatch.setattr(tensor_files.TensorSource, "copy_into", logged_copy)
    model = AF3Model.from_pretrained(big_vocab_ckpt)
    big = [model.language_model.lm_head.weight, model.language_model.model.embed_tokens.weight]
    for t in big:
        assert t.numel() * t.element_size() >= HUGE_PAGE_BYTES and advised(t)
        assert events.index(("advise", t.data_ptr())) < events.index(("fill", t.data_ptr()))
    # the loaded values are the checkpoint's (the advice is only a hint)
    again = AF3Model.from_pretrained(big_vocab_ckpt)
    assert torch.equal(again.language_model.lm_head.weight, model.language_model.lm_head.weight)


def test_int8_weights_and_the_kv_cache_are_advised():
    w = torch.randn(2048, 1536)  # its int8 copy: 3 MB
    q, scales = quantize_weight(w)
    assert advised(q)
    assert ((q.float() * scales.float()[:, None] - w).abs() <= scales.float()[:, None] / 2 + 1e-6).all()
    cache = KVCache(2, rows=2, max_len=4096, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, device="cpu")
    assert cache.k[0].numel() * 2 >= HUGE_PAGE_BYTES and advised(cache.k[0]) and advised(cache.v[1])
    assert not cache.k[0].any()  # still zeros where nothing was written


def test_small_tensors_are_left_alone():
    t = torch.empty(HUGE_PAGE_BYTES // 4 - 1)
    assert advise_huge_pages([t]) == 0
    assert advise_huge_pages([torch.empty(HUGE_PAGE_BYTES // 4)]) == HUGE_PAGE_BYTES


def test_af3_huge_pages_0_turns_the_advice_off(big_vocab_ckpt):
    """In a fresh process (a mapping advised earlier in this one could be reused by a later allocation)."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            "from test_huge_pages import vm_flags; from af3 import AF3Model; "
            "m = AF3Model.from_pretrained(sys.argv[1]); w = m.language_model.lm_head.weight; "
            "print(json.dumps(sorted(vm_flags(w.data_ptr() + w.numel() * 2))))")
    for value, want in (("0", False), ("1", True)):
        out = subprocess.run([sys.executable, "-c", code, str(big_vocab_ckpt)], capture_output=True, text=True,
                             env={**os.environ, "AF3_HUGE_PAGES": value}, timeout=300, check=True)
        assert ("hg" in json.loads(out.stdout.strip().splitlines()[-1])) == want, (value, out.stdout)
