"""The decoder's attention takes several routes through SDPA depending on the torch version and the input (kv heads
shared inside the kernel with ``enable_gqa`` or copied with ``repeat_interleave``; a causal flag, a boolean mask, or
the additive mask ``Qwen2Model.forward`` makes of it). Every route must give the same numbers; float64 makes any
difference in the math visible."""

from __future__ import annotations

import pytest
import torch

from af3.config import TextConfig
from af3.model import decoder as D
from af3.model.kv_cache import KVCache


def random_decoder() -> D.Qwen2Model:
    torch.manual_seed(0)
    cfg = TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=50, pad_token_id=0)
    model = D.Qwen2Model(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    return model


def layers_with_bool_mask(model: D.Qwen2Model, x, pos, mask):
    """The layers run with the boolean mask as given (what forward did before it made the additive one)."""
    rope = model.rotary(pos, x.dtype)
    for layer in model.layers:
        x = layer(x, rope, mask, None, 0)
    return model.norm(x)


@pytest.mark.parametrize("gqa", [True, False])
def test_every_attention_route_gives_the_same_hidden_states(monkeypatch, gqa):
    if gqa and not D.SDPA_GQA:
        pytest.skip(f"torch {torch.__version__} has no enable_gqa (the copying route is tested)")
    monkeypatch.setattr(D, "SDPA_GQA", gqa)
    model = random_decoder()
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    pos = torch.arange(9)[None].expand(2, 9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # row 1 is left-padded
    mask = D.attention_mask_4d(valid, 0, 9)
    with torch.inference_mode():
        causal = model(x, pos)
        additive = model(x, pos, mask)
        boolean = layers_with_bool_mask(model, x, pos, mask)
        monkeypatch.setattr(D, "SDPA_GQA", not gqa and D.SDPA_GQA)
        other_route = model(x, pos, mask)
    torch.testing.assert_close(additive, boolean, rtol=0, atol=1e-12)
    torch.testing.assert_close(other_route, additive, rtol=0, atol=1e-12)
    torch.testing.assert_close(additive[0], causal[0], rtol=0, atol=1e-12)  # an unpadded row is plain causal
    assert (additive[1] - causal[1]).abs().max() > 1e-3  # the padding mattered: the mask was not ignored


def _cache(model: D.Qwen2Model, rows: int, dtype) -> KVCache:
    cfg = model.layers[0].self_attn
    return KVCache(len(model.layers), rows, 64, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device="cpu", capacity=64)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_a_prefill_of_the_last_position_only_matches_the_whole_prefill(kv_heads):
    """``last_only``: the last layer computes only the last position's query, attention and MLP. Its hidden state and
    every cached key and value must be those of the whole prefill (float64): from slot 0 without a mask, from a
    cached prefix with one, and for a left-padded batch."""
    torch.manual_seed(0)
    cfg = TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=kv_heads, head_dim=16, vocab_size=50, pad_token_id=0)
    model = D.Qwen2Model(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    pos = torch.arange(12)[None].expand(2, 12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False  # row 1 is left-padded
    with torch.inference_mode():
        whole, whole_cache = model(x, pos, None, c := _cache(model, 2, torch.float64)), c
        last, last_cache = model(x, pos, None, c := _cache(model, 2, torch.float64), last_only=True), c
        assert last.shape == (2, 1, 64)
        torch.testing.assert_close(last, whole[:, -1:], rtol=0, atol=1e-12)
        for a, b in zip(whole_cache.k + whole_cache.v, last_cache.k + last_cache.v, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # the rest of a prompt after 5 cached slots, with its mask
        mask = D.attention_mask_4d(torch.ones(2, 12, dtype=torch.bool), 5, 7)
        whole = model(x[:, 5:], pos[:, 5:], mask, whole_cache, 5)
        last = model(x[:, 5:], pos[:, 5:], mask, last_cache, 5, last_only=True)
        torch.testing.assert_close(last, whole[:, -1:], rtol=0, atol=1e-12)
        # a left-padded batch from slot 0
        mask = D.attention_mask_4d(valid, 0, 12)
        whole, last = model(x, pos, mask), model(x, pos, mask, last_only=True)
        torch.testing.assert_close(last, whole[:, -1:], rtol=0, atol=1e-12)
        assert (model(x, pos, None, last_only=True) - last)[1].abs().max() > 1e-3  # the padding mattered


def test_a_bf16_prefill_of_the_last_position_only_stays_as_close_to_float64():
    """The same in bf16 (af3's row-wise kernels where they run): the last position's hidden state as close to the
    float64 one as the whole prefill's."""
    model = random_decoder()
    x = torch.randn(1, 40, 64, dtype=torch.float64)
    pos = torch.arange(40)[None]
    with torch.inference_mode():
        exact = model(x, pos)[:, -1:]
        half = model.to(torch.bfloat16)
        whole = half(x.bfloat16(), pos, None, _cache(half, 1, torch.bfloat16))[:, -1:].double()
        last = half(x.bfloat16(), pos, None, _cache(half, 1, torch.bfloat16), last_only=True).double()
    err_whole, err_last = (whole - exact).abs().max(), (last - exact).abs().max()
    assert err_last <= 2 * err_whole + 1e-2
