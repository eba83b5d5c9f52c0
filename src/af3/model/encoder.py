"""Audio encoder: Whisper-large-v3-style transformer over 30 s log-mel windows, then AvgPool(2) and LayerNorm.

One window is [num_mel_bins, 3000] mel frames → 1500 conv frames → 750 pooled frames (one per 40 ms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import EncoderConfig
from ..errors import CheckpointError
from ..features import conv_output_lengths
from ..kernels import binding as cpu_kernels
from ..kernels import ops as kernel_ops
from ..kernels import policy as kernel_policy
from .linear import Linear, linear_via_fp32


class EncoderAttention(nn.Module):
    """Bidirectional multi-head self-attention; ``k_proj`` has no bias and q is pre-scaled (Whisper)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim, bias=False)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        n, t, d = x.shape  # [N, T, D]
        shape = (n, t, self.num_heads, self.head_dim)
        # Scale q before the kernel (scale=1.0 inside), in the same order as the reference.
        q = (self.q_proj(x) * self.head_dim**-0.5).view(shape).transpose(1, 2)  # [N, H, T, Dh]
        k = self.k_proj(x).view(shape).transpose(1, 2)  # [N, H, T, Dh]
        v = self.v_proj(x).view(shape).transpose(1, 2)  # [N, H, T, Dh]
        if kernel_policy.current().amx_attention(q):  # the key-padding mask is a prefix of valid keys per window
            out = kernel_ops.attention(q, k, v, scale=1.0, kv_len=None if mask is None else mask.sum(-1).view(n))
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # [N, H, T, Dh]
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))  # [N, T, D]


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = EncoderAttention(d, cfg.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = Linear(d, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # keep fp16 activations finite, like the reference
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


def _windows_product(windows: Tensor, conv: nn.Conv1d) -> Tensor:
    """``conv`` (kernel k) as a product: windows [N, L, k * C_in] (tap-major) → [N, L, C_out]; where the CPU has no
    native GEMMs for its dtype, in af3's kernel or else in fp32 over a widened weight, as ``Linear`` (each result
    rounded once, as the convolution's)."""
    weight = conv.weight.permute(0, 2, 1).reshape(conv.out_channels, -1)  # [C_out, k * C_in], tap-major
    policy = kernel_policy.current()
    if policy.own_gemm(windows.numel() // windows.shape[-1], weight.dtype, weight.device):
        return cpu_kernels.small_gemm(windows, weight, bias=conv.bias, out_dtype=windows.dtype)
    if policy.widens_half(weight.dtype, weight.device):
        return linear_via_fp32(windows, weight, conv.bias)
    return F.linear(windows, weight, conv.bias)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed position table [length, channels]: sines then cosines over geometric timescales."""
    half = channels // 2
    increment = math.log(max_timescale) / max(half - 1, 1)
    inv = torch.exp(-increment * torch.arange(half, dtype=torch.float32))  # [C/2]
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]  # [L, C/2]
    table = torch.cat([t.sin(), t.cos()], dim=1)  # [L, 2*(C/2)]
    return torch.nn.functional.pad(table, (0, channels - table.shape[1]))  # odd widths: one zero column


class AudioEncoder(nn.Module):
    """Whisper-style encoder on fixed 30 s windows; returns [N, max_source_positions // 2, hidden_size]."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.activation_function != "gelu":
            raise CheckpointError(f"audio activation_function {cfg.activation_function!r} is not supported")
        self.config = cfg
        d = cfg.hidden_size
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.embed_positions.requires_grad_(False)  # learned once, frozen (as in the reference)
        with torch.no_grad():  # a fresh model starts from Whisper's sinusoids, not frozen random noise
            self.embed_positions.weight.copy_(sinusoids(cfg.max_source_positions, d))
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(d)

    def stem(self, x: Tensor) -> Tensor:
        """gelu(conv2(gelu(conv1(x)))) for mel frames x [N, mel, L] → [N, L', D], time-major. Where the policy says
        so (half-precision CPU inference), each convolution runs as one GEMM over its unfolded windows (the same
        products, each result rounded once), one input at a time: the unfolded copy is 3x the convolution's input
        (AF3-8B: 11.5 MB for a 30 s window's conv2)."""
        if not kernel_policy.current().conv_as_gemm(x):
            return F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)
        if x.shape[0] > 1:
            return torch.cat([self.stem(one) for one in x.split(1)])
        windows = F.pad(x, (1, 1)).unfold(2, 3, 1).permute(0, 2, 3, 1)  # [1, L, 3, mel]
        x = F.gelu(_windows_product(windows.reshape(1, windows.shape[1], -1), self.conv1))  # [1, L, D]
        windows = F.pad(x, (0, 0, 1, 1)).unfold(1, 3, 2).permute(0, 1, 3, 2)  # [1, L', 3, D]
        return F.gelu(_windows_product(windows.reshape(1, windows.shape[1], -1), self.conv2))  # [1, L', D]

    def forward(self, input_features: Tensor, input_features_mask: Tensor | None = None) -> Tensor:
        """input_features [N, mel, 2*P] (P = max_source_positions), mask [N, 2*P] with 1 = real frame
        (a left-aligned prefix; only its sum is used) → [N, P // 2, D]."""
        x = input_features.to(self.conv1.weight.dtype)
        positions = self.config.max_source_positions  # conv frames of a full window
        cut, mask = positions, None
        if input_features_mask is not None:
            lengths = conv_output_lengths(input_features_mask.sum(-1).long())[0]  # [N] frames after conv2
            # Padded frames are never used: valid keys are all a query attends to, and a valid pooled frame
            # averages two valid positions. So everything runs only on the longest window's valid prefix (a 2 s
            # clip costs ~1/15 of a window) and the tail is zero-filled. Conv position j < cut reads mel frames
            # up to 2j + 2, so 2 * cut + 1 frames give the same values as the whole window. The key-padding mask
            # stays for windows shorter than that (none when all are full: SDPA's fastest path); clamp(min=1): an
            # empty window still sees one key and yields finite (unused) values, not NaN.
            longest = int(lengths.max())
            cut = min(positions, max(2, longest + longest % 2))
            x = x[..., : 2 * cut + 1]
            if bool((lengths < cut).any()):
                keep = torch.arange(cut, device=x.device) < lengths.clamp(min=1)[:, None]  # [N, cut]
                mask = keep[:, None, None, :]  # [N, 1, 1, cut]
        x = self.stem(x)[:, :cut] + self.embed_positions.weight[:cut]  # [N, cut, D]

        for layer in self.layers:
            x = layer(x, mask)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(1, 2)  # [N, cut//2, D]
        x = self.layer_norm(x)
        if x.shape[1] < positions // 2:
            x = F.pad(x, (0, 0, 0, positions // 2 - x.shape[1]))  # [N, P//2, D], unused zero tail
        return x
