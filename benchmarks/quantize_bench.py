"""Int8 weight-only decoder vs bf16 on a random mid-size AF3: decode speed, prefill, memory, top-1 agreement.

Run: ``python -m benchmarks.quantize_bench [--runs 5] [--new-tokens 32] [--threads N]``.

The model has a Qwen2.5-0.5B-sized decoder (hidden 896, 24 layers, 14/2 heads, ffn 4864, vocab 151936, untied
lm_head) and a Whisper-base-sized encoder (512 wide, 6 layers, 8 heads, ffn 2048), random weights N(0, 0.02),
built in bf16 (~1.3 GB). The int8 model is a quantized deep copy, so both are resident (~2 GB plus activations).
Timings on a shared machine are noisy: each figure is the median of ``--runs`` runs, bf16 and int8 interleaved.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from af3 import AF3Model
from af3.config import AF3Config, EncoderConfig, TextConfig
from af3.kernels import policy as kernel_policy
from af3.model import quantize as Q
from af3.features import conv_output_lengths

AUDIO_ID = 151646
VOCAB = 151936


def mid_config() -> AF3Config:
    return AF3Config(
        audio_config=EncoderConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                   intermediate_size=2048),
        text_config=TextConfig(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                               tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
                               pad_token_id=151643),
        audio_token_id=AUDIO_ID,
    )


@torch.no_grad()
def build_random(cfg: AF3Config, seed: int = 0) -> AF3Model:
    """A bf16 AF3Model with N(0, 0.02) matrices, unit norm weights and zero biases (built without an fp32 copy)."""
    with torch.device("meta"):
        model = AF3Model(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    return model.eval()


def rss_gb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def linear_bytes(model: AF3Model) -> int:
    """Resident bytes of the decoder's linear layers (weights, scales, biases)."""
    mods = [m for m in model.language_model.modules() if isinstance(m, nn.Linear | Q.Int8Linear)]
    return Q.tensor_bytes(t for m in mods for t in [*m.parameters(), *m.buffers()])


def audio_prompt(seconds: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A chat-like prompt with ``seconds`` of random log-mel features in one 30 s window."""
    feats = torch.randn(1, 128, 3000, generator=gen)
    fmask = torch.zeros(1, 3000, dtype=torch.long)
    fmask[:, : int(seconds * 100)] = 1
    n = int(conv_output_lengths(fmask.sum(-1))[1][0])
    ids = torch.cat([torch.randint(0, 151000, (1, 10), generator=gen), torch.full((1, n), AUDIO_ID),
                     torch.randint(0, 151000, (1, 12), generator=gen)], dim=1)
    return dict(input_ids=ids, input_features=feats, input_features_mask=fmask)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_rate(model: AF3Model, ids: torch.Tensor, new: int) -> float:
    """Decode tokens/s (all rows): B·new / (t(1 + new tokens) − t(1 token)), i.e. without the prefill."""
    t1 = timed(lambda: model.generate(ids, max_new_tokens=1, do_sample=False))
    tn = timed(lambda: model.generate(ids, max_new_tokens=1 + new, min_new_tokens=1 + new, do_sample=False))
    return ids.shape[0] * new / max(tn - t1, 1e-9)


@torch.inference_mode()
def logit_error(ref: AF3Model, other: AF3Model, batches: list[dict[str, torch.Tensor]]) -> float:
    """RMS of (other − ref) logits relative to the RMS spread of ref's logits (insensitive to how flat they are)."""
    num = den = 0.0
    for batch in batches:
        a = ref(**batch).logits.float()  # [B, T, V]
        b = other(**batch).logits.float()  # [B, T, V]
        num += float((b - a).pow(2).sum())
        den += float((a - a.mean(-1, keepdim=True)).pow(2).sum())
    return (num / den) ** 0.5


def best_ms(fn, runs: int) -> float:
    fn()
    return min(timed(fn) for _ in range(max(runs, 5))) * 1e3


@torch.inference_mode()
def kernel_table(runs: int) -> list[tuple[str, float, float, float]]:
    """Per-layer decode (1 row) times in ms: bf16 F.linear, int8 (auto path), int8 fallback."""
    out = []
    for name, (n, k) in {"mlp up (4864x896)": (4864, 896), "mlp down (896x4864)": (896, 4864),
                         "lm_head (151936x896)": (VOCAB, 896)}.items():
        lin = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        q = Q.Int8Linear.from_linear(lin)
        x = torch.randn(1, k, dtype=torch.bfloat16)
        float_ms = best_ms(lambda x=x, w=lin.weight: F.linear(x, w), runs)
        auto_ms = best_ms(lambda x=x, q=q: q(x), runs)
        fallback_ms = best_ms(lambda x=x, q=q: Q.int8_linear(x, q.qweight, q.scales, fused=False), runs)
        out.append((name, float_ms, auto_ms, fallback_ms))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="decode batch size (tok/s is the aggregate)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-prefill", action="store_true", help="skip the 30 s audio prefill timing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fused int8 kernel on CPU: "
          f"{kernel_policy.current().int8pack_rows > 0}")

    t = time.perf_counter()
    bf16 = build_random(mid_config())
    print(f"built bf16 model in {time.perf_counter() - t:.1f} s, RSS {rss_gb():.2f} GB")
    rss_before = rss_gb()
    t = time.perf_counter()
    int8 = Q.quantize_int8(copy.deepcopy(bf16))
    print(f"deep copy + quantize in {time.perf_counter() - t:.1f} s, RSS {rss_gb():.2f} GB "
          f"(+{rss_gb() - rss_before:.2f} GB for the int8 copy)")

    gen = torch.Generator().manual_seed(1)
    text = torch.randint(0, 151000, (1, 16), generator=gen).expand(args.batch, -1)  # [B, 16] short prompt
    rates: dict[str, list[float]] = {"bf16": [], "int8": []}
    models = {"bf16": bf16, "int8": int8}
    for m in models.values():  # warm-up
        m.generate(text, max_new_tokens=3, do_sample=False)
    for _ in range(args.runs):
        for name, m in models.items():
            rates[name].append(decode_rate(m, text, args.new_tokens))

    prefill: dict[str, float] = {}
    if not args.no_prefill:
        long = audio_prompt(30.0, gen)
        for name, m in models.items():
            prefill[name] = statistics.median(
                timed(lambda m=m: m.generate(**long, max_new_tokens=1, do_sample=False)) for _ in range(2))

    batches = [dict(input_ids=torch.randint(0, 151000, (2, 32), generator=gen)) for _ in range(2)]
    batches.append(audio_prompt(4.0, gen))
    positions = sum(b["input_ids"].numel() for b in batches)
    agreement = Q.top1_agreement(bf16, int8, batches)
    fp32 = copy.deepcopy(bf16).float()  # how flat are random logits: bf16 rounding alone vs fp32
    baseline = Q.top1_agreement(fp32, bf16, batches)
    int8_vs_fp32 = Q.top1_agreement(fp32, int8, batches)
    err_bf16, err_int8 = logit_error(fp32, bf16, batches), logit_error(fp32, int8, batches)
    del fp32

    print()
    print(f"| model | decode tok/s, batch {args.batch} (median of {args.runs}) | range | prefill 30 s audio | "
          "decoder linear weights | all weights |")
    print("|---|---|---|---|---|---|")
    for name, m in models.items():
        r = rates[name]
        pre = f"{prefill[name]:.2f} s" if prefill else "-"
        print(f"| {name} | {statistics.median(r):.2f} | {min(r):.2f}-{max(r):.2f} | {pre} | "
              f"{linear_bytes(m) / 1e9:.3f} GB | {Q.module_bytes(m) / 1e9:.3f} GB |")
    ratio = linear_bytes(int8) / linear_bytes(bf16)
    print(f"\nint8 / bf16 decoder linear bytes: {ratio:.3f}")
    print(f"top-1 agreement over {positions} positions (2 text batches + 1 prompt with 4 s audio): int8 vs bf16 "
          f"{agreement:.3f}; for scale, bf16 vs fp32 {baseline:.3f} and int8 vs fp32 {int8_vs_fp32:.3f}")
    print(f"relative logit error vs the fp32 model: bf16 {err_bf16:.4f}, int8 {err_int8:.4f} "
          "(random weights have flat logits, so top-1 flips easily; the logit error does not depend on that)")

    print("\n| layer, 1 row (best of runs) | bf16 F.linear ms | int8 (auto) ms | int8 fallback ms |")
    print("|---|---|---|---|")
    for name, a, b, c in kernel_table(args.runs):
        print(f"| {name} | {a:.3f} | {b:.3f} | {c:.3f} |")


if __name__ == "__main__":
    main()
