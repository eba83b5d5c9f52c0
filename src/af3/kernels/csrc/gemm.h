/* af3's CPU kernels, shared part: matrix products out[M, N] = (x[M, K] . w[N, K]^T) * scale[N] + bias[N]
 * for weights stored as bf16, fp16 or int8, accumulated in fp32, on x86 CPUs with AVX2 + FMA + F16C. Included by
 * small_gemm.c (one product, called from Python) and decode_step.c (a whole decoding step of the Qwen2 decoder).
 *
 * Why: on CPUs without native bf16 matrix instructions (AVX2), torch's bf16 F.linear reads the weight at a
 * fraction of memory bandwidth when there are few rows (decoding), and its fp32 path would first have to convert
 * the whole weight. Here each weight vector is loaded once, widened to fp32 in registers (bf16: shift left by 16;
 * fp16: vcvtph2ps; int8: sign-extend and convert) and multiplied into up to 4 rows of x at a time; the rows of one
 * tile of weights stay in L1 while the other row tiles of x use them. A single row reads each weight row front to
 * back. From PACK_ROWS rows the weight is widened into fp32 panels a chunk at a time instead (many_rows.h). Output
 * channels are split across OpenMP threads (the same libgomp runtime as torch's when torch is loaded first).
 *
 * Where the compiler targets AVX512-BF16 (and AMX), bf16 rows meet bf16 weights without widening: pair dot products
 * for one row, AMX tile products for 2-16 rows (block_dp, run_amx below); with AVX512-VBMI too, int8 weights become
 * bf16 by byte lookups and meet bf16 rows the same way (int8_rows.h).
 *
 * Built at first use by af3/kernels/binding.py with -O3 -march=native for the machine it runs on. Without AVX2,
 * FMA and F16C the entry points build as stubs, af3_small_gemm_level() is 0, and af3 keeps torch's kernels.
 */
#ifndef AF3_GEMM_H
#define AF3_GEMM_H
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

/* Element types, as af3/kernels/binding.py numbers them. */
enum { BF16 = 0, F16 = 1, I8 = 2, F32 = 3 };

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define AF3_HAVE_KERNELS 1
#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))

/* 8 consecutive weights at element i, widened to fp32. */
INLINE __m256 load8(const void *w, ptrdiff_t i, int kind) {
    if (kind == BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (kind == F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
}

/* One weight at element i, widened to fp32 (the K % 8 tail). */
INLINE float load1(const void *w, ptrdiff_t i, int kind) {
    if (kind == BF16) {
        union { uint32_t u; float f; } v = {(uint32_t)((const uint16_t *)w)[i] << 16};
        return v.f;
    }
    if (kind == F16)
        return _cvtsh_ss(((const uint16_t *)w)[i]);
    if (kind == F32)
        return ((const float *)w)[i];
    return (float)((const int8_t *)w)[i];
}

/* fp32 -> bf16, rounding to nearest even (as torch does); NaN stays a (quiet) NaN. */
INLINE uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((v.u >> 16) | 0x40u);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* fp32 -> fp16 -> fp32 or fp32 -> bf16 -> fp32: the value an fp32 result takes when stored as `kind`. */
INLINE float round_to(float f, int kind) {
    if (kind == BF16) {
        union { uint32_t u; float f; } v = {(uint32_t)to_bf16(f) << 16};
        return v.f;
    }
    if (kind == F16) return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
    return f;
}

/* Where results go and what is applied to them on the way: out[row, n] = s * scale[n] + bias[n], stored as
 * out_kind; an fp32 out holds values rounded as if stored as round_kind (F32: not rounded). Rows of out are
 * `stride` elements apart. */
typedef struct {
    const void *scale, *bias;
    void *out;
    int scale_kind, bias_kind, out_kind, round_kind;
    ptrdiff_t stride;
} Epilogue;

/* Stores f at element i of p as `kind` (bf16, fp16 or fp32), rounding to nearest even. */
INLINE void store1(void *p, ptrdiff_t i, int kind, float f) {
    if (kind == F32)
        ((float *)p)[i] = f;
    else if (kind == BF16)
        ((uint16_t *)p)[i] = to_bf16(f);
    else
        ((uint16_t *)p)[i] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}

INLINE void finish(const Epilogue *e, ptrdiff_t row, ptrdiff_t n, float s) {
    if (e->scale) s *= load1(e->scale, n, e->scale_kind);
    if (e->bias) s += load1(e->bias, n, e->bias_kind);
    store1(e->out, row * e->stride + n, e->out_kind, e->out_kind == F32 ? round_to(s, e->round_kind) : s);
}

/* 8 values at p + i (bf16, fp16 or fp32), widened to fp32. */
INLINE __m256 get8(const void *p, ptrdiff_t i, int kind) {
    if (kind == F32) return _mm256_loadu_ps((const float *)p + i);
    return load8(p, i, kind);
}

/* 8 fp32 lanes rounded to `kind` and stored at p + i. */
INLINE void put8(void *p, ptrdiff_t i, int kind, __m256 v) {
    if (kind == F32) {
        _mm256_storeu_ps((float *)p + i, v);
    } else if (kind == F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else { /* bf16, nearest even; NaN stays a quiet NaN (as to_bf16) */
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
        __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
        r = _mm256_blendv_epi8(r, q, nan);
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_castsi256_si128(packed));
    }
}

/* The value 8 fp32 lanes take when stored as `kind` and read back (round_to for 8 lanes, bit for bit). */
INLINE __m256 round8(__m256 v, int kind) {
    if (kind == F32) return v;
    if (kind == F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    __m256i u = _mm256_castps_si256(v); /* bf16 rounding as put8's, kept in the high half of each lane */
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
}

/* finish() for the 8 channels n..n+7 of one row, s their sums. */
INLINE void finish8(const Epilogue *e, ptrdiff_t row, ptrdiff_t n, __m256 s) {
    if (e->scale) s = _mm256_mul_ps(s, get8(e->scale, n, e->scale_kind));
    if (e->bias) s = _mm256_add_ps(s, get8(e->bias, n, e->bias_kind));
    put8(e->out, row * e->stride + n, e->out_kind, e->out_kind == F32 ? round8(s, e->round_kind) : s);
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(x) for 8 lanes: 2^n * p(r) with n = round(x / ln 2), |r| <= ln 2 / 2 and p the Taylor polynomial of degree
 * 7 (relative error about 2e-7). Inputs are clamped to [-87, 88], so -inf gives about 1.6e-38, not 0. */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x); /* ln 2 in two parts: exact n * hi */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#ifdef __AVX512F__
/* AVX-512 forms of the helpers above, for the row-wise kernels and the attention. */
/* exp(x) = 2^n * p(r), n = round(x / ln 2), |r| <= ln 2 / 2 (ln 2 in two parts: n * hi is exact), p the Taylor
 * polynomial with `degree` 6 or 7 (relative error ~2e-7 on the reduced range); scalef takes exponents below the fp32
 * range to 0. */
INLINE __m512 exp16_poly(__m512 x, int degree) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = degree >= 7 ? _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 5040), r, _mm512_set1_ps(1.0f / 720))
                           : _mm512_set1_ps(1.0f / 720);
    const float next[] = {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(next[i]));
    return _mm512_scalef_ps(p, n);
}

/* exp8 for 16 lanes: inputs clamped to [-87, 88], so -inf gives about 1.6e-38, not 0. */
INLINE __m512 exp16(__m512 x) {
    return exp16_poly(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f)), 7);
}

/* 16 bf16 values widened to fp32. */
INLINE __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* fp32 lanes -> their bf16 bits in the low 16 bits of each lane, nearest even; NaN stays a quiet NaN. */
INLINE __m512i bf16_bits16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

/* 16 fp32 lanes -> 16 bf16 values (nearest even, NaN quiet). With AVX512-BF16 one instruction, which also takes
 * denormal inputs as 0: for values where that cannot matter (softmax probabilities, below 1e-38 adding nothing). */
INLINE __m256i bf16x16_from(__m512 v, int denormals_matter) {
#ifdef __AVX512BF16__
    if (!denormals_matter) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
    (void)denormals_matter;
    return _mm512_cvtepi32_epi16(bf16_bits16(v));
}

/* exp(x) for x <= 0 only (scores minus their maximum), cheaper than exp16: no clamping and degree 6. -inf lanes
 * come out NaN: callers mask them. */
INLINE __m512 exp16_nonpositive(__m512 x) { return exp16_poly(x, 6); }
#endif

/* Software prefetch along a weight row, for one-row products (row1, row1_i8; tiles prefetch the next tile instead,
 * see NEXT_TILE; bf16_rows.h's row1_dp has its own distance, DP_AHEAD_BYTES): the hardware prefetchers alone leave a
 * DRAM-bound one-row product that widens its weights well below the bandwidth it can reach. How far ahead, and into
 * which cache, was measured on each CPU class (benchmarks/README.md):
 * - AVX2 (a 2-vCPU AMD EPYC Zen 3): 1 KB ahead for bf16/fp16 and 2 KB for int8 weights, into L1;
 * - AVX-512 (a 2-vCPU Sapphire Rapids Xeon): 8 KB ahead into L2. 1 KB left a single row at ~21 GB/s against
 *   28-30 at 4-16 KB (a C loop over 550 MB), and a batch-1 decoding step of the benchmark model took 38.5-40 ms
 *   at 4-16 KB against 47-48.7 at 1 KB (interleaved in one process; int8: 24.0 against 25.7). On a Zen 4 EPYC
 *   without it, int8 decoding steps of the benchmark model ran at 37-40 tok/s against 54-68 with it. */
#ifdef __AVX512F__
#define AHEAD_BYTES(kind) 8192
#define AHEAD_HINT _MM_HINT_T1
#else
#define AHEAD_BYTES(kind) ((kind) == I8 ? 2048 : 1024)
#define AHEAD_HINT _MM_HINT_T0
#endif
/* Prefetches the line `bytes` past p (and the one after it, with `two`), unless `bytes` is 0. */
#define AHEAD(p, bytes, two)                                                                                      \
    do {                                                                                                          \
        if ((bytes) > 0) {                                                                                        \
            _mm_prefetch((const char *)(p) + (bytes), AHEAD_HINT);                                                \
            if (two) _mm_prefetch((const char *)(p) + (bytes) + 64, AHEAD_HINT);                                  \
        }                                                                                                         \
    } while (0)

/* out[0:MT, n0:n0+NT] for rows x[0:MT] (MT <= 4, NT <= 8, MT * NT <= 12 keeps the accumulators in registers).
 * NEXT_TILE: a tile reads NT weight rows side by side, and the memory system serves those interleaved streams
 * slower than one sequential stream, worst at the start of each row. So while it works, a tile prefetches the rows
 * of the tile after it (contiguous with its own), column for column, into L2 (2-8 row products read faster; the
 * A/B is in benchmarks/README.md; one row reads each weight row front to back and is unchanged). */
INLINE void tile(const float *x, ptrdiff_t K, const void *w, ptrdiff_t n0, int MT, int NT, int kind,
                 const Epilogue *e, ptrdiff_t m0) {
    __m256 acc[4][8];
#pragma GCC unroll 4
    for (int i = 0; i < MT; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
    ptrdiff_t k = 0;
    const int size = kind == I8 ? 1 : 2;
    for (; k + 8 <= K; k += 8) {
        if ((k & 31) == 0) { /* the next tile's rows one line (64 elements) ahead of this column (see NEXT_TILE);
                                addresses past the weight do not fault */
#pragma GCC unroll 8
            for (int j = 0; j < NT; j++)
                _mm_prefetch((const char *)((uintptr_t)w + (uintptr_t)(((n0 + NT + j) * K + k + 64) * size)),
                             _MM_HINT_T1);
        }
        __m256 xv[4];
#pragma GCC unroll 4
        for (int i = 0; i < MT; i++) xv[i] = _mm256_loadu_ps(x + i * K + k);
#pragma GCC unroll 8
        for (int j = 0; j < NT; j++) {
            __m256 wv = load8(w, (n0 + j) * K + k, kind);
#pragma GCC unroll 4
            for (int i = 0; i < MT; i++) acc[i][j] = _mm256_fmadd_ps(wv, xv[i], acc[i][j]);
        }
    }
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NT; j++) {
            float s = hsum(acc[i][j]);
            for (ptrdiff_t t = k; t < K; t++) s += load1(w, (n0 + j) * K + t, kind) * x[i * K + t];
            finish(e, m0 + i, n0 + j, s);
        }
}

/* out[0, n] for a single row x: the weight row is read front to back (one stream, which the memory system serves
 * faster than 8 interleaved rows) into 4 independent accumulators. */
INLINE void row1(const float *x, ptrdiff_t K, const void *w, ptrdiff_t n, int kind, const Epilogue *e,
                 ptrdiff_t m0) {
    const int size = kind == I8 ? 1 : 2;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    ptrdiff_t k = 0, base = n * K;
    for (; k + 32 <= K; k += 32) {
        AHEAD((const char *)w + (base + k) * size, AHEAD_BYTES(kind), 0);
        a0 = _mm256_fmadd_ps(load8(w, base + k, kind), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(w, base + k + 8, kind), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(w, base + k + 16, kind), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(w, base + k + 24, kind), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w, base + k, kind), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += load1(w, base + k, kind) * x[k];
    finish(e, m0, n, s);
}

#ifdef __AVX512F__
/* row1 for int8 weights on AVX-512: 16 weights widened per instruction (a batch-1 int8 decoding step 21.2-21.4 ->
 * 19.1-19.3 ms against the 8-lane row1, interleaved). */
INLINE void row1_i8(const float *x, ptrdiff_t K, const int8_t *w, ptrdiff_t n, const Epilogue *e, ptrdiff_t m0) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int8_t *wr = w + n * K;
    ptrdiff_t k = 0;
    for (; k + 64 <= K; k += 64) {
        AHEAD(wr + k, AHEAD_BYTES(I8), 0);
#define I8X16(o) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wr + k + (o)))))
        a0 = _mm512_fmadd_ps(I8X16(0), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(I8X16(16), _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(I8X16(32), _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(I8X16(48), _mm512_loadu_ps(x + k + 48), a3);
#undef I8X16
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < K; k++) s += (float)wr[k] * x[k];
    finish(e, m0, n, s);
}
#endif

/* How many weight rows one row reads at once where its x no longer stays in L1 (here from WIDE_ROW_K inputs,
 * bf16_rows.h from ROWS_TOGETHER_K): each x vector is loaded once for all of them. */
#define ROWS_TOGETHER 4

/* From this many inputs one fp32 row (4 bytes an input) reads four weight rows at once (a tile of 1 x 4), weights of
 * `kind`: x no longer stays in L1 beside the streaming weights, and row1 (row1_i8) would read all of it again from
 * L2 for every weight row. The builds for AVX2 and for AVX-512 without VBMI, run on a 2-vCPU Zen 4 EPYC (one row,
 * 1 GB of weights, GB/s, four at once / one at a time, 8 interleaved rounds): bf16 K = 2560 31-48 / 30-46, 3584
 * 32-52 / 29-37, 6144 31-53 / 25-26, 18944 29-35 / 19-23; int8 (widened 8 at a time in the tile, so the tile costs
 * more instructions per byte) K = 3584 22-28 / 23-35, 4864 22-26 / 21-27, 9728 26-30 / 19-21, 18944 27-31 / 19-21;
 * int8 with AVX-512's 16-wide row1_i8, K = 9728 and 18944 28-36 / 18-21. Not measured on a Zen 3 or a Xeon. (The
 * pair-dot-product rows, 2 bytes an input, have their own threshold: bf16_rows.h's ROWS_TOGETHER_K.) */
#ifndef WIDE_ROW_K
#define WIDE_ROW_K(kind) ((kind) == I8 ? 8192 : 3072)
#endif

/* Output channels per parallel task: a multiple of 16 (every tile width) so only the last task has a tail. */
#define TASK_CHANNELS 64

/* block_packed: from PACK_ROWS rows, the weight widened into fp32 panels first. */
#include "many_rows.h"

/* Output channels [n0, n1) (at most TASK_CHANNELS) for all M rows: from PACK_ROWS rows through packed panels
 * (many_rows.h); below, row tiles of 4 inside each tile of output channels, over the weight as stored. */
INLINE void block(const float *x, ptrdiff_t M, ptrdiff_t K, const void *w, ptrdiff_t n0, ptrdiff_t n1, int kind,
                  const Epilogue *e) {
    if (M >= PACK_ROWS && block_packed(x, M, K, w, n0, n1, kind, e) == 0) return;
    for (ptrdiff_t m0 = 0; m0 < M; m0 += 4) {
        const float *xm = x + m0 * K;
        ptrdiff_t n = n0;
        switch (M - m0 >= 4 ? 4 : M - m0) {
        case 1:
            if (K >= WIDE_ROW_K(kind))
                for (; n + ROWS_TOGETHER <= n1; n += ROWS_TOGETHER) tile(xm, K, w, n, 1, ROWS_TOGETHER, kind, e, m0);
#ifdef __AVX512F__
            if (kind == I8) {
                for (; n < n1; n++) row1_i8(xm, K, (const int8_t *)w, n, e, m0);
                break;
            }
#endif
            for (; n < n1; n++) row1(xm, K, w, n, kind, e, m0);
            break;
        case 2:
            for (; n + 4 <= n1; n += 4) tile(xm, K, w, n, 2, 4, kind, e, m0);
            for (; n < n1; n++) tile(xm, K, w, n, 2, 1, kind, e, m0);
            break;
        case 3:
            for (; n + 4 <= n1; n += 4) tile(xm, K, w, n, 3, 4, kind, e, m0);
            for (; n < n1; n++) tile(xm, K, w, n, 3, 1, kind, e, m0);
            break;
        default:
            for (; n + 2 <= n1; n += 2) tile(xm, K, w, n, 4, 2, kind, e, m0);
            for (; n < n1; n++) tile(xm, K, w, n, 4, 1, kind, e, m0);
            break;
        }
    }
}

/* One product of a multi-product run: weight [N, K] and where its results go. */
typedef struct {
    const void *w;
    ptrdiff_t N;
    Epilogue e;
} Job;

#define MAX_JOBS 4

/* The parallel tasks of `njobs` products, TASK_CHANNELS output channels each: first[j] is job j's first task;
 * returns how many there are. */
static inline ptrdiff_t job_tasks(const Job *jobs, int njobs, ptrdiff_t first[MAX_JOBS + 1]) {
    first[0] = 0;
    for (int j = 0; j < njobs; j++) first[j + 1] = first[j] + (jobs[j].N + TASK_CHANNELS - 1) / TASK_CHANNELS;
    return first[njobs];
}

/* Task t's job (of job_tasks' split) and its output channels [*n0, *n1). */
INLINE const Job *task_channels(const Job *jobs, const ptrdiff_t *first, ptrdiff_t t, ptrdiff_t *n0, ptrdiff_t *n1) {
    int j = 0;
    while (t >= first[j + 1]) j++;
    *n0 = (t - first[j]) * TASK_CHANNELS;
    *n1 = *n0 + TASK_CHANNELS < jobs[j].N ? *n0 + TASK_CHANNELS : jobs[j].N;
    return jobs + j;
}

/* One function per weight kind, so that OpenMP's outlined loop body sees the kind as a constant. The jobs share x
 * and K (q, k and v of one layer; gate and up) and one parallel loop over all their tasks, so that small products
 * cost one fork/join between them. BLOCK is the function that computes a task's channels, X its rows' type. */
#define DEFINE_RUN(NAME, X, BLOCK, ...)                                                                          \
    static void NAME(const X *x, ptrdiff_t M, ptrdiff_t K, const Job *jobs, int njobs, int threads) {            \
        ptrdiff_t first[MAX_JOBS + 1];                                                                            \
        const ptrdiff_t tasks = job_tasks(jobs, njobs, first);                                                    \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                        \
        for (ptrdiff_t t = 0; t < tasks; t++) {                                                                   \
            ptrdiff_t n0, n1;                                                                                     \
            const Job *job = task_channels(jobs, first, t, &n0, &n1);                                             \
            BLOCK(x, M, K, job->w, n0, n1, __VA_ARGS__ &job->e);                                                  \
        }                                                                                                         \
    }

DEFINE_RUN(run_bf16, float, block, BF16,)
DEFINE_RUN(run_f16, float, block, F16,)
DEFINE_RUN(run_i8, float, block, I8,)

/* The calling thread's memory for rows repacked for one product (the AMX tiles' packed rows, the int8 products'
 * permuted rows): grown, never shrunk; one product at a time per thread uses it. */
static inline uint16_t *rows_memory(ptrdiff_t elements) {
    static __thread uint16_t *memory = NULL;
    static __thread ptrdiff_t size = 0;
    if (elements > size) {
        free(memory);
        memory = (uint16_t *)aligned_alloc(64, (size_t)((elements + 31) / 32 * 64));
        size = memory ? (elements + 31) / 32 * 32 : 0;
    }
    return memory;
}

/* bf16 rows times bf16 weights on AVX512-BF16 and AMX (block_dp, run_dp, run_amx; HAVE_DP, HAVE_AMX_ROWS). */
#include "bf16_rows.h"

/* int8 weights times bf16 rows on AVX512-BF16 + AVX512-VBMI (block_i8dp, run_i8dp; HAVE_I8DP). */
#include "int8_rows.h"

/* 1 when run_jobs multiplies bf16 weights by bf16 rows (given as xb) with AVX512-BF16's pair dot products. */
static inline int have_dp(void) {
#ifdef HAVE_DP
    return 1;
#else
    return 0;
#endif
}

/* 1 when run_jobs multiplies int8 weights by bf16 rows (given as xb) with pair dot products, for fewer than PACK_ROWS
 * rows. */
static inline int have_i8dp(void) {
#ifdef HAVE_I8DP
    return 1;
#else
    return 0;
#endif
}

/* 1 when run_jobs takes weights of w_kind with M rows given as bf16 only (x NULL). */
static inline int rows_as_bf16(int w_kind, ptrdiff_t M) {
    return (w_kind == BF16 && have_dp()) || (w_kind == I8 && have_i8dp() && M < PACK_ROWS);
}

/* Runs `njobs` (<= MAX_JOBS) products of x [M, K] (fp32) with weights of w_kind. xb: the same rows as bf16 (each
 * value of x exactly a bf16 value), or NULL; where given, bf16 weights take the pair dot products (have_dp) and int8
 * weights theirs (have_i8dp, fewer than PACK_ROWS rows). x may be NULL where rows_as_bf16(w_kind, M). Returns 0, or
 * -2 when x is NULL and memory for the int8 products' rows could not be had. */
static int run_jobs(const float *x, const uint16_t *xb, ptrdiff_t M, ptrdiff_t K, int w_kind, const Job *jobs,
                    int njobs, int threads) {
#ifdef HAVE_DP
    if (xb && w_kind == BF16) {
#ifdef HAVE_AMX_ROWS
        if (run_amx(xb, M, K, jobs, njobs, threads) == 0) return 0;
#endif
        run_dp(xb, M, K, jobs, njobs, threads);
        return 0;
    }
#endif
#ifdef HAVE_I8DP
    if (xb && w_kind == I8 && M < PACK_ROWS) {
        if (run_i8dp(xb, M, K, jobs, njobs, threads) == 0) return 0;
        if (!x) return -2;
    }
#endif
    (void)xb;
    /* Rows in passes of at most PASS_ROWS (many_rows.h), evenly split: each task reads all the rows of its pass, and
       every rows' fp32 copy must stay in the caches while the tasks go over it. */
    const ptrdiff_t passes = (M + PASS_ROWS - 1) / PASS_ROWS, per = passes > 1 ? (M + passes - 1) / passes : M;
    for (ptrdiff_t m0 = 0; m0 < M; m0 += per) {
        const ptrdiff_t rows = M - m0 < per ? M - m0 : per;
        Job part[MAX_JOBS];
        for (int j = 0; j < njobs; j++) {
            part[j] = jobs[j];
            part[j].e.out = (char *)jobs[j].e.out + m0 * jobs[j].e.stride * (jobs[j].e.out_kind == F32 ? 4 : 2);
        }
        switch (w_kind) {
        case BF16: run_bf16(x + m0 * K, rows, K, part, njobs, threads); break;
        case F16: run_f16(x + m0 * K, rows, K, part, njobs, threads); break;
        default: run_i8(x + m0 * K, rows, K, part, njobs, threads); break;
        }
    }
    return 0;
}

#endif /* AVX2 && FMA && F16C */
#endif /* AF3_GEMM_H */
