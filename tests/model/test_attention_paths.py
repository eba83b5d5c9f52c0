"""The decoder's attention takes several routes through SDPA depending on the torch version and the input (kv heads
shared inside the kernel with ``enable_gqa`` or copied with ``repeat_interleave``; a causal flag, a boolean mask, or
the additive mask ``Qwen2Model.forward`` makes of it). Every route must give the same numbers; float64 makes any
difference in the math visible."""

from __future__ import annotations

import pytest
import torch

from af3.config import TextConfig
from af3.model import decoder as D


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
