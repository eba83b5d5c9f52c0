/* One decoding step of a Qwen2 decoder for a few rows (one new token each), all layers in one call from Python
 * (af3/kernels/binding.py: decode_step). Per layer: RMSNorm, q/k/v products (one parallel loop), rotary
 * embeddings, the new key/value written into the caller's cache, grouped-query attention over the cache, o_proj
 * and the residual, RMSNorm, gate/up products (one parallel loop), SiLU * up, down_proj and the residual; then the
 * final norm.
 *
 * Why: decoding one token of a 0.5B decoder calls about 40 small torch operations per layer; on a 2-core CPU
 * their dispatch costs a quarter of a token's time beside weight-bound products that af3's kernel runs at memory
 * bandwidth. Here they cost next to nothing.
 *
 * Numerics follow the torch modules of af3/model/decoder.py in the activations' dtype T (bf16 or fp16): every
 * value torch stores as T is rounded to T here at the same point (norm output, norm * weight, each product,
 * cos/sin, each term of the rotary sum, attention output, residual sums, SiLU, SiLU * up), and computed in fp32
 * in between. Where torch's kernels order sums differently (the norms' mean, products, attention), results can
 * differ by a rounding of T. */
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "gemm.h"

/* One linear layer: weight [n, k] of w_kind, per-channel scale (int8) and bias, or NULL. */
typedef struct {
    const void *w, *scale, *bias;
    int64_t n, k;
    int32_t w_kind, scale_kind, bias_kind, unused;
} Lin;

typedef struct {
    Lin q, k, v, o, gate, up, down;
    const void *norm1, *norm2; /* RMSNorm weights [hidden], of the activations' kind */
} Layer;

typedef struct {
    int64_t rows, hidden, heads, kv_heads, head_dim, inter;
    int64_t width;                            /* key slots each query reads: the mask's width */
    int64_t cache_row, cache_head, cache_slot; /* strides of every cache tensor, in elements */
    const int64_t *positions, *slots;         /* [rows]: rotary position, and the cache slot written */
    const uint8_t *mask;                      /* [rows, width]: 1 = the query attends to this slot */
    const float *inv_freq;                    /* [head_dim / 2] */
    void *const *caches;                      /* per layer: keys, values (rows of this step first) */
    const void *final_norm;                   /* [hidden] */
    const void *x;                            /* [rows, hidden]: embeddings of the new tokens */
    void *out;                                /* [rows, hidden]: hidden states after the final norm */
    float *scratch;                           /* the caller's work memory, af3_decode_scratch(step) floats */
    int64_t scratch_floats;
    float eps;
    int32_t act_kind, threads;
    int32_t amx_attention; /* 1: attention may run in af3's AMX decoding kernel (bf16, rows attending to prefixes) */
} Step;

/* Sizes of the structs as this build lays them out: binding.py checks them against its ctypes copies. */
int64_t af3_decode_struct_size(int which) {
    const size_t sizes[] = {sizeof(Lin), sizeof(Layer), sizeof(Step)};
    return which >= 0 && which < 3 ? (int64_t)sizes[which] : -1;
}

/* Floats of scratch one attention task needs: scores over the key slots, a widened block of 8 keys or values,
 * and the softmax normalisers of the `rep` heads. */
static ptrdiff_t attend_floats(ptrdiff_t rep, ptrdiff_t Dh, ptrdiff_t width) {
    const ptrdiff_t span = (width + 7) & ~(ptrdiff_t)7;
    return rep * span + 8 * Dh + rep;
}

/* Floats of the step's activations (x, normed x, q, k, v, attention output, gate, up, rotary table, o). */
static ptrdiff_t step_floats(const Step *st) {
    const ptrdiff_t M = st->rows, D = st->hidden, H = st->heads, G = st->kv_heads, Dh = st->head_dim;
    return 2 * M * D + M * (H + 2 * G) * Dh + M * H * Dh + 2 * st->inter * M + M * Dh + M * D;
}

/* Floats holding one product's input rows as bf16 (the widest input: hidden, heads * head_dim or inter), for the
 * pair dot products (gemm.h, have_dp). */
static ptrdiff_t bf16_floats(const Step *st) {
    ptrdiff_t widest = st->hidden > st->inter ? st->hidden : st->inter;
    if (st->heads * st->head_dim > widest) widest = st->heads * st->head_dim;
    return (st->rows * widest + 1) / 2;
}

/* Floats for the AMX decoding attention's operands: each row's valid keys (int64), the queries and the outputs as
 * bf16 (a multiple of 16 floats, so that the int64 lengths stay aligned). */
static ptrdiff_t amx_floats(const Step *st) {
    return (2 * st->rows + st->rows * st->heads * st->head_dim + 15) & ~(ptrdiff_t)15;
}

/* Where the AMX attention's operands start in the scratch (floats): after the activations and one attention area
 * per thread, at a multiple of 16 floats. */
static ptrdiff_t amx_start(const Step *st) {
    const ptrdiff_t G = st->kv_heads, rep = G > 0 ? st->heads / G : 0, threads = st->threads < 1 ? 1 : st->threads;
    return (step_floats(st) + threads * attend_floats(rep, st->head_dim, st->width) + 15) & ~(ptrdiff_t)15;
}

/* Scratch floats af3_decode_step needs for this step: the activations, one attention area per thread, the AMX
 * attention's operands, then the bf16 rows. */
int64_t af3_decode_scratch(const Step *st) { return (int64_t)(amx_start(st) + amx_floats(st) + bf16_floats(st)); }

/* af3's AMX decoding attention (attention.c): 0 when it ran, else it did nothing (no AMX here, or shapes it does
 * not take). */
int af3_decode_attention(const uint16_t *q, const int64_t *q_strides, const uint16_t *k, const int64_t *k_strides,
                         const uint16_t *v, const int64_t *v_strides, uint16_t *out, const int64_t *o_strides,
                         int64_t B, int64_t H, int64_t G, int64_t S, int64_t Dh, const int64_t *kv_len, float scale,
                         int threads);

#ifdef AF3_HAVE_KERNELS

/* The 8 horizontal sums of a[0..7], in order, as one vector. */
INLINE __m256 hsum8(const __m256 *a) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* RMSNorm of one row as decoder.RMSNorm computes it: y = T(w * T(x * rsqrt(mean(x^2) + eps))). */
static void rms_norm(const float *x, float *y, ptrdiff_t D, const void *w, int kind, float eps) {
    __m256 acc = _mm256_setzero_ps();
    ptrdiff_t i = 0;
    for (; i + 8 <= D; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; i < D; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= D; i += 8) {
        const __m256 n = round8(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), kind);
        _mm256_storeu_ps(y + i, round8(_mm256_mul_ps(load8(w, i, kind), n), kind));
    }
    for (; i < D; i++) y[i] = round_to(load1(w, i, kind) * round_to(x[i] * r, kind), kind);
}

/* x = T(x + d) for n values. */
static void add_residual(float *x, const float *d, ptrdiff_t n, int kind) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, round8(_mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(d + i)), kind));
    for (; i < n; i++) x[i] = round_to(x[i] + d[i], kind);
}

/* Rotary embedding of `heads` heads of one row in place: x * cos + rotate_half(x) * sin, each term rounded to T. */
static void rotate(float *x, ptrdiff_t heads, ptrdiff_t Dh, const float *cs, const float *sn, int kind) {
    ptrdiff_t half = Dh / 2;
    for (ptrdiff_t h = 0; h < heads; h++) {
        float *v = x + h * Dh;
        ptrdiff_t j = 0;
        for (; j + 8 <= half; j += 8) {
            const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + half);
            const __m256 c = _mm256_loadu_ps(cs + j), s = _mm256_loadu_ps(sn + j);
            _mm256_storeu_ps(v + j, round8(_mm256_sub_ps(round8(_mm256_mul_ps(a, c), kind),
                                                         round8(_mm256_mul_ps(b, s), kind)), kind));
            _mm256_storeu_ps(v + j + half, round8(_mm256_add_ps(round8(_mm256_mul_ps(b, c), kind),
                                                                round8(_mm256_mul_ps(a, s), kind)), kind));
        }
        for (; j < half; j++) {
            float a = v[j], b = v[j + half];
            v[j] = round_to(round_to(a * cs[j], kind) - round_to(b * sn[j], kind), kind);
            v[j + half] = round_to(round_to(b * cs[j], kind) + round_to(a * sn[j], kind), kind);
        }
    }
}

/* Widens n cached vectors of Dh elements (rows `stride` apart) starting at slot s0 to fp32 rows of dst. */
INLINE void widen_block(const void *base, ptrdiff_t s0, ptrdiff_t n, ptrdiff_t stride, ptrdiff_t Dh, int kind,
                        float *dst) {
    for (ptrdiff_t j = 0; j < n; j++)
        for (ptrdiff_t c = 0; c < Dh; c += 8)
            _mm256_storeu_ps(dst + j * Dh + c, load8(base, (s0 + j) * stride + c, kind));
    for (ptrdiff_t j = n; j < 8; j++) memset(dst + j * Dh, 0, (size_t)Dh * sizeof(float));
}

/* out[r, :] = T(inv[r] * sum over slots s < width of p[r * span + s] * values[s]) for NR (1 to 6, a constant
 * where inlined) heads: 16 columns of every head accumulate in registers over all slots, each value vector widened
 * once per pass (the same fp32 sums, in the same slot order, as one head at a time). */
INLINE void weigh_values(const float *p, ptrdiff_t span, const int NR, const void *values, ptrdiff_t stride,
                         ptrdiff_t width, ptrdiff_t Dh, int kind, const float *inv, float *out) {
    for (ptrdiff_t c = 0; c < Dh; c += 16) {
        const int two = c + 16 <= Dh; /* else 8 columns (Dh % 16 == 8) */
        __m256 a[6][2];
#pragma GCC unroll 6
        for (int r = 0; r < NR; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
        for (ptrdiff_t s = 0; s < width; s++) {
            const __m256 v0 = load8(values, s * stride + c, kind);
            const __m256 v1 = two ? load8(values, s * stride + c + 8, kind) : v0;
#pragma GCC unroll 6
            for (int r = 0; r < NR; r++) {
                const __m256 b = _mm256_broadcast_ss(p + r * span + s);
                a[r][0] = _mm256_fmadd_ps(b, v0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(b, v1, a[r][1]);
            }
        }
        float f[6][16];
#pragma GCC unroll 6
        for (int r = 0; r < NR; r++) {
            _mm256_storeu_ps(f[r], a[r][0]);
            _mm256_storeu_ps(f[r] + 8, a[r][1]);
        }
        for (int r = 0; r < NR; r++)
            for (int d = 0; d < (two ? 16 : 8); d++) out[r * Dh + c + d] = round_to(f[r][d] * inv[r], kind);
    }
}

/* How far ahead of the scores' block `attend` prefetches keys (into L1) and values (into L2, for the sums that
 * follow). A decoding step streams ~1 GB of weights between two layers' attention, so each layer's cache comes
 * from memory; without prefetching the attention of a batch-1 step of the benchmark model (~900 slots, AVX2 EPYC)
 * took 1.9-2.5 ms of the step, with it 1.35-1.6 ms at 32 slots ahead, 1.65-1.75 at 64 or 128. */
#define AHEAD_SLOTS 32

/* Attention of the `rep` query heads q[rep, Dh] that share one key/value head (keys, values: slot s at s * stride)
 * over `width` slots where mask[s] is 1 (every slot where mask is NULL), scores scaled by scale_by; out[rep, Dh]
 * rounded to T. `scores` is
 * attend_floats(rep, Dh, width) floats of work memory. */
static void attend(const float *q, ptrdiff_t rep, ptrdiff_t Dh, const void *keys, const void *values,
                   ptrdiff_t stride, ptrdiff_t width, const uint8_t *mask, int kind, float scale_by, float *scores,
                   float *out) {
    const ptrdiff_t span = (width + 7) & ~(ptrdiff_t)7;
    float *block = scores + rep * span, *inv = block + 8 * Dh;
    const __m256 scale = _mm256_set1_ps(scale_by), minus_inf = _mm256_set1_ps(-INFINITY);
    for (ptrdiff_t s0 = 0; s0 < width; s0 += 8) { /* scores = q . k / sqrt(Dh), -inf where masked */
        const ptrdiff_t n = width - s0 < 8 ? width - s0 : 8;
        widen_block(keys, s0, n, stride, Dh, kind, block);
        for (ptrdiff_t j = 0; j < 8; j++) /* keys and values AHEAD_SLOTS on (see there; prefetches do not fault) */
            for (ptrdiff_t c = 0; c < Dh * 2; c += 64) {
                _mm_prefetch((const char *)keys + (s0 + AHEAD_SLOTS + j) * stride * 2 + c, _MM_HINT_T0);
                _mm_prefetch((const char *)values + (s0 + AHEAD_SLOTS + j) * stride * 2 + c, _MM_HINT_T1);
            }
        int32_t on[8];
        for (int j = 0; j < 8; j++) on[j] = j < n && (!mask || mask[s0 + j]) ? -1 : 0;
        const __m256 keep = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)on));
        for (ptrdiff_t r = 0; r < rep; r++) {
            __m256 a[8];
            for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
            for (ptrdiff_t c = 0; c < Dh; c += 8) {
                const __m256 qv = _mm256_loadu_ps(q + r * Dh + c);
                for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(block + j * Dh + c), a[j]);
            }
            _mm256_storeu_ps(scores + r * span + s0, _mm256_blendv_ps(minus_inf, _mm256_mul_ps(hsum8(a), scale), keep));
        }
    }
    for (ptrdiff_t r = 0; r < rep; r++) { /* scores -> exp(score - max); inv[r] = 1 / their sum */
        float *sr = scores + r * span;
        __m256 most = minus_inf; /* (slots past width hold -inf too; a NaN score is passed over, as `>` does) */
        for (ptrdiff_t s = 0; s < span; s += 8) most = _mm256_max_ps(_mm256_loadu_ps(sr + s), most);
        most = _mm256_max_ps(most, _mm256_permute2f128_ps(most, most, 1));
        most = _mm256_max_ps(most, _mm256_shuffle_ps(most, most, 0x4e));
        const float top = _mm256_cvtss_f32(_mm256_max_ps(most, _mm256_shuffle_ps(most, most, 0xb1)));
        __m256 total = _mm256_setzero_ps();
        for (ptrdiff_t s = 0; s < span; s += 8) {
            const __m256 v = _mm256_loadu_ps(sr + s);
            __m256 p = _mm256_setzero_ps();
            if (top != -INFINITY)
                p = _mm256_and_ps(exp8(_mm256_sub_ps(v, _mm256_set1_ps(top))),
                                  _mm256_cmp_ps(v, minus_inf, _CMP_NEQ_OQ));
            _mm256_storeu_ps(sr + s, p);
            total = _mm256_add_ps(total, p);
        }
        const float sum = hsum(total);
        inv[r] = sum > 0 ? 1.0f / sum : 0.0f;
    }
    /* out = (sum over slots of p * v) * inv: up to 6 heads at a time, 16 columns of them in registers */
    for (ptrdiff_t r0 = 0; r0 < rep;) {
        const ptrdiff_t left = rep - r0, nr = left <= 6 ? left : left <= 12 ? (left + 1) / 2 : 6;
#define WEIGH(NR) weigh_values(scores + r0 * span, span, NR, values, stride, width, Dh, kind, inv + r0, out + r0 * Dh)
        switch (nr) { /* (NR a constant in each, so that the accumulators stay in registers) */
        case 1: WEIGH(1); break;
        case 2: WEIGH(2); break;
        case 3: WEIGH(3); break;
        case 4: WEIGH(4); break;
        case 5: WEIGH(5); break;
        default: WEIGH(6); break;
        }
#undef WEIGH
        r0 += nr;
    }
}

/* g = T(T(silu(g)) * u) for n values; silu(g) = g / (1 + exp(-g)) in fp32. */
static void silu_block(float *g, const float *u, ptrdiff_t n, int kind) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(g + i);
        v = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
        _mm256_storeu_ps(g + i, round8(_mm256_mul_ps(round8(v, kind), _mm256_loadu_ps(u + i)), kind));
    }
    for (; i < n; i++) g[i] = round_to(round_to(g[i] / (1.0f + expf(-g[i])), kind) * u[i], kind);
}

/* silu_block over n values, in blocks of SILU_BLOCK (a multiple of 8: the same values as one call) split over the
 * threads from 8 blocks on (4 rows of the benchmark decoder, 1 of AF3-8B's). A decoding step of 8 rows of the
 * benchmark decoder (8 x 4864 values a layer) spent 1.4-1.8 ms in it on one thread, 0.65-0.72 ms on two (with the
 * bf16 copy of the result, now vectorized: as_bf16) on a Zen 4 EPYC. */
#define SILU_BLOCK 2048
static void silu_mul(float *g, const float *u, ptrdiff_t n, int kind, int threads) {
    const ptrdiff_t blocks = (n + SILU_BLOCK - 1) / SILU_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (blocks >= 8)
    for (ptrdiff_t b = 0; b < blocks; b++) {
        const ptrdiff_t at = b * SILU_BLOCK;
        silu_block(g + at, u + at, n - at < SILU_BLOCK ? n - at : SILU_BLOCK, kind);
    }
}

/* The step's rounding, exported for tests: x[i] = round_to(x[i], kind) for n values, 8 at a time (round8) and the
 * rest one by one. Returns 0; -1 for a kind other than bf16 or fp16. */
int af3_round_values(float *x, int64_t n, int kind) {
    if (kind != BF16 && kind != F16) return -1;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, round8(_mm256_loadu_ps(x + i), kind));
    for (; i < n; i++) x[i] = round_to(x[i], kind);
    return 0;
}

/* x [n] (values that bf16 holds exactly: the step rounded them to T = bf16) as bf16 in buf; NULL when buf is. Such
 * a value's bf16 is the top half of its fp32 bits, 8 at a time. */
static const uint16_t *as_bf16(const float *x, ptrdiff_t n, uint16_t *buf) {
    if (!buf) return NULL;
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i top = _mm256_srli_epi32(_mm256_castps_si256(_mm256_loadu_ps(x + i)), 16);
        _mm_storeu_si128((__m128i *)(buf + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1)));
    }
    for (; i < n; i++) buf[i] = to_bf16(x[i]);
    return buf;
}

/* A decoding step's attention for the torch modules, on any CPU the kernels build for: one query per row and
 * head, q [B, H] x Dh, over each row's first kv_len[b] cached keys and values [B, G, S] x Dh (element strides as
 * given, Dh contiguous; bf16 or fp16, `kind`), into out [B, H] x Dh. bf16 takes af3's AMX kernel where it runs
 * and `amx` allows it, else each (row, kv head) runs the fused step's `attend` (keys and values widened to fp32 in
 * blocks of 8).
 * Returns 0; -1 for shapes or kinds it does not take; -2 when out of memory. */
int af3_decode_attention_any(const void *q, const int64_t *q_strides, const void *k, const int64_t *k_strides,
                             const void *v, const int64_t *v_strides, void *out, const int64_t *o_strides, int64_t B,
                             int64_t H, int64_t G, int64_t S, int64_t Dh, const int64_t *kv_len, int kind,
                             int amx, float scale, int threads) {
    if ((kind != BF16 && kind != F16) || B < 1 || G < 1 || H % G || S < 1 || Dh < 8 || Dh % 8
        || k_strides[2] != v_strides[2]) /* (attend walks keys and values with one slot stride) */
        return -1;
    if (threads < 1) threads = 1;
    if (amx && kind == BF16
        && af3_decode_attention(q, q_strides, k, k_strides, v, v_strides, out, o_strides, B, H, G, S, Dh, kv_len,
                                scale, threads) == 0)
        return 0;
    const ptrdiff_t rep = H / G, per = attend_floats(rep, Dh, S) + 2 * rep * Dh;
    float *work = (float *)malloc((size_t)(threads * per) * sizeof(float));
    if (!work) return -2;
    const size_t size = 2;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (ptrdiff_t task = 0; task < B * G; task++) {
        const ptrdiff_t b = task / G, g = task % G;
        ptrdiff_t n = kv_len ? kv_len[b] : S;
        n = n > S ? S : n < 1 ? 1 : n;
#ifdef _OPENMP
        float *mine = work + omp_get_thread_num() * per;
#else
        float *mine = work;
#endif
        float *qf = mine + attend_floats(rep, Dh, S), *of = qf + rep * Dh;
        for (ptrdiff_t r = 0; r < rep; r++)
            for (ptrdiff_t d = 0; d < Dh; d++)
                qf[r * Dh + d] = load1(q, b * q_strides[0] + (g * rep + r) * q_strides[1] + d, kind);
        const char *kh = (const char *)k + (b * k_strides[0] + g * k_strides[1]) * size;
        const char *vh = (const char *)v + (b * v_strides[0] + g * v_strides[1]) * size;
        attend(qf, rep, Dh, kh, vh, k_strides[2], n, NULL, kind, scale, mine, of); /* the first n slots */
        for (ptrdiff_t r = 0; r < rep; r++)
            for (ptrdiff_t d = 0; d < Dh; d++)
                store1(out, b * o_strides[0] + (g * rep + r) * o_strides[1] + d, kind, of[r * Dh + d]);
    }
    free(work);
    return 0;
}

INLINE Job job(const Lin *l, float *out, int round_kind) {
    Job j = {l->w, (ptrdiff_t)l->n,
             {l->scale, l->bias, out, l->scale_kind, l->bias_kind, F32, round_kind, (ptrdiff_t)l->n}};
    return j;
}

/* Runs `nlayers` layers and the final norm for st->rows new tokens, in the caller's scratch memory (no allocation).
 * Returns 0; -1 for shapes or kinds it does not take (the caller checks them first); -2 when st->scratch is
 * smaller than af3_decode_scratch(st). */
int af3_decode_step(const Step *st, const Layer *layers, int nlayers) {
    const ptrdiff_t M = st->rows, D = st->hidden, H = st->heads, G = st->kv_heads, Dh = st->head_dim;
    const ptrdiff_t I = st->inter, W = st->width, rep = G > 0 ? H / G : 0;
    const int T = st->act_kind, threads = st->threads < 1 ? 1 : st->threads;
    if ((T != BF16 && T != F16) || M < 1 || G < 1 || H % G || Dh % 8 || Dh < 8 || W < 1 || nlayers < 0)
        return -1;
    if (!st->scratch || st->scratch_floats < af3_decode_scratch(st)) return -2;
    float *x = st->scratch, *h = x + M * D, *q = h + M * D, *k = q + M * H * Dh, *v = k + M * G * Dh;
    float *att = v + M * G * Dh, *gate = att + M * H * Dh, *up = gate + M * I, *rope = up + M * I, *o = rope + M * Dh;
    float *areas = st->scratch + step_floats(st); /* one attention area per thread */
    const ptrdiff_t area = attend_floats(rep, Dh, W);
    int64_t *lengths = (int64_t *)(st->scratch + amx_start(st));
    uint16_t *q16 = (uint16_t *)(lengths + M), *o16 = q16 + M * H * Dh; /* the AMX attention's queries, outputs */
    uint16_t *rows16 = (uint16_t *)((float *)lengths + amx_floats(st)); /* bf16 input rows, for the dot products */
    /* bf16 with AMX tiles (real or emulated), where the caller allows it: attention through the AMX decoding kernel
     * when every row attends to a prefix of its cache slots (as the Engine's rows do), as the torch modules do. */
    int amx = st->amx_attention && T == BF16 && Dh % 32 == 0;
    for (ptrdiff_t m = 0; amx && m < M; m++) {
        const uint8_t *row = st->mask + m * W;
        ptrdiff_t n = 0;
        while (n < W && row[n]) n++;
        for (ptrdiff_t s = n; amx && s < W; s++) amx = !row[s];
        lengths[m] = n;
        amx = amx && n > 0;
    }
    for (ptrdiff_t i = 0; i < M * D; i++) x[i] = load1(st->x, i, T);
    for (ptrdiff_t m = 0; m < M; m++) /* cos (first half) and sin of each row's position, rounded to T */
        for (ptrdiff_t j = 0; j < Dh / 2; j++) {
            const float f = (float)st->positions[m] * st->inv_freq[j];
            rope[m * Dh + j] = round_to(cosf(f), T);
            rope[m * Dh + Dh / 2 + j] = round_to(sinf(f), T);
        }
    for (int l = 0; l < nlayers; l++) {
        const Layer *L = layers + l;
        const int wk = L->q.w_kind;
        uint16_t *b16 = T == BF16 && rows_as_bf16(wk, M) ? rows16 : NULL;
        for (ptrdiff_t m = 0; m < M; m++) rms_norm(x + m * D, h + m * D, D, L->norm1, T, st->eps);
        Job qkv[3] = {job(&L->q, q, T), job(&L->k, k, T), job(&L->v, v, T)};
        run_jobs(h, as_bf16(h, M * D, b16), M, D, wk, qkv, 3, threads);
        for (ptrdiff_t m = 0; m < M; m++) {
            rotate(q + m * H * Dh, H, Dh, rope + m * Dh, rope + m * Dh + Dh / 2, T);
            rotate(k + m * G * Dh, G, Dh, rope + m * Dh, rope + m * Dh + Dh / 2, T);
        }
        char *kc = (char *)st->caches[2 * l], *vc = (char *)st->caches[2 * l + 1];
        const size_t size = T == F32 ? 4 : 2;
        for (ptrdiff_t t = 0; t < M * G; t++) { /* the new keys and values into the cache */
            const ptrdiff_t m = t / G, g = t % G, at = (m * st->cache_row + g * st->cache_head
                                                        + st->slots[m] * st->cache_slot) * (ptrdiff_t)size;
            for (ptrdiff_t d = 0; d < Dh; d++) {
                store1(kc + at, d, T, k[t * Dh + d]);
                store1(vc + at, d, T, v[t * Dh + d]);
            }
        }
        int done = 0;
        if (amx) {
            const int64_t qs[2] = {H * Dh, Dh}, cs[3] = {st->cache_row, st->cache_head, st->cache_slot};
            done = af3_decode_attention(as_bf16(q, M * H * Dh, q16), qs, (const uint16_t *)kc, cs,
                                        (const uint16_t *)vc, cs, o16, qs, M, H, G, W, Dh, lengths,
                                        (float)(1.0 / sqrt((double)Dh)), threads) == 0;
            if (done)
                for (ptrdiff_t i = 0; i < M * H * Dh; i++) att[i] = load1(o16, i, BF16);
            else
                amx = 0; /* not on this machine: the same for every layer */
        }
        if (!done) {
#pragma omp parallel for num_threads(threads) schedule(static)
            for (ptrdiff_t t = 0; t < M * G; t++) {
                const ptrdiff_t m = t / G, g = t % G;
#ifdef _OPENMP
                float *mine = areas + omp_get_thread_num() * area;
#else
                float *mine = areas;
#endif
                const char *kh = kc + (m * st->cache_row + g * st->cache_head) * size;
                const char *vh = vc + (m * st->cache_row + g * st->cache_head) * size;
                attend(q + (m * H + g * rep) * Dh, rep, Dh, kh, vh, st->cache_slot, W, st->mask + m * W, T,
                       1.0f / sqrtf((float)Dh), mine, att + (m * H + g * rep) * Dh);
            }
        }
        Job oj = job(&L->o, o, T);
        run_jobs(att, as_bf16(att, M * H * Dh, b16), M, H * Dh, wk, &oj, 1, threads);
        add_residual(x, o, M * D, T);
        for (ptrdiff_t m = 0; m < M; m++) rms_norm(x + m * D, h + m * D, D, L->norm2, T, st->eps);
        Job gu[2] = {job(&L->gate, gate, T), job(&L->up, up, T)};
        run_jobs(h, as_bf16(h, M * D, b16), M, D, wk, gu, 2, threads);
        silu_mul(gate, up, M * I, T, threads);
        Job dj = job(&L->down, o, T);
        run_jobs(gate, as_bf16(gate, M * I, b16), M, I, wk, &dj, 1, threads);
        add_residual(x, o, M * D, T);
    }
    for (ptrdiff_t m = 0; m < M; m++) rms_norm(x + m * D, h + m * D, D, st->final_norm, T, st->eps);
    for (ptrdiff_t i = 0; i < M * D; i++) store1(st->out, i, T, h[i]);
    return 0;
}

#else

int af3_round_values(float *x, int64_t n, int kind) {
    (void)x; (void)n; (void)kind;
    return -1;
}

int af3_decode_step(const Step *st, const Layer *layers, int nlayers) {
    (void)st; (void)layers; (void)nlayers;
    return -1;
}

int af3_decode_attention_any(const void *q, const int64_t *q_strides, const void *k, const int64_t *k_strides,
                             const void *v, const int64_t *v_strides, void *out, const int64_t *o_strides, int64_t B,
                             int64_t H, int64_t G, int64_t S, int64_t Dh, const int64_t *kv_len, int kind,
                             int amx, float scale, int threads) {
    (void)q; (void)q_strides; (void)k; (void)k_strides; (void)v; (void)v_strides; (void)out; (void)o_strides;
    (void)B; (void)H; (void)G; (void)S; (void)Dh; (void)kv_len; (void)kind; (void)amx; (void)scale;
    (void)threads;
    return -1;
}

#endif
