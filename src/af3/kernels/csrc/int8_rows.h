/* Part of gemm.h (included by it after bf16_rows.h): products of bf16 rows with int8 weights that turn each weight
 * into bf16 with two byte lookups and multiply it with AVX512-BF16's pair dot products, where the compiler targets
 * AVX512-BF16 and AVX512-VBMI (Zen 4, Sapphire Rapids and newer). run_jobs takes them for fewer than PACK_ROWS rows
 * when the caller gives its rows as bf16.
 *
 * Why: the widening path (gemm.h's row1_i8 and tiles) turns 16 weights into fp32 with two instructions and then
 * needs the rows in fp32, 4 bytes of x for every byte of weight. On a 2-vCPU EPYC Zen 4 a one-row product over 1 GB
 * of int8 weights read 34-48 GB/s with K = 3584 but 16-31 with K = 18944 (AF3-8B's down projection), whose 75 KB
 * of fp32 x no longer fit in L1 (minutes when torch's fp32 sum read 40-43 GB/s). Here the rows stay bf16 (2 bytes
 * per input), 64 weights take 5 instructions to become two vectors of 32 bf16, and the products are exact in fp32
 * as before: 42-49 GB/s with K = 3584 and 37-44 with K = 18944 in the same minutes (in slow minutes, ~30 GB/s,
 * 30-32 against 31-34 and 29-33 against 19-28; benchmarks/README.md).
 *
 * How: a weight byte b (-128..127) is bf16(b) exactly. Its two bytes come from 128-entry tables indexed by |b|
 * (vpermi2b): the low byte (one exponent bit and 7 mantissa bits) as it is, the high byte (sign and 7 exponent bits)
 * masked to zero for b = 0 (entry 0 serves |b| = 128) with b's sign or'ed in. Interleaving low and high bytes
 * (vpunpcklbw/vpunpckhbw, within each 128-bit lane) gives 64 weights as two vectors of 32 bf16 in the order
 * [0-7, 16-23, 32-39, 48-55] and [8-15, 24-31, 40-47, 56-63]; the rows are copied once per call in that order
 * (i8_permute), so the weights are never reordered. */
#ifndef AF3_INT8_ROWS_H
#define AF3_INT8_ROWS_H

#if defined(HAVE_DP) && defined(__AVX512VBMI__)
#define HAVE_I8DP 1

/* The rows of one call: bf16, permuted per 64 inputs (i8_permute) and zero-padded to K64 = K rounded up to 64. */
typedef struct {
    const uint16_t *x;
    ptrdiff_t K64;
} I8Rows;

/* The lookup tables: the high bytes of bf16(v) for v = 128, 1, .., 127, then the low bytes; filled once, when the
 * library is loaded. */
static uint8_t i8_table_bytes[256];

__attribute__((constructor)) static void i8_tables(void) {
    for (int v = 0; v < 128; v++) {
        union { float f; uint32_t u; } b = {v ? (float)v : 128.0f};
        i8_table_bytes[v] = (uint8_t)(b.u >> 24);
        i8_table_bytes[128 + v] = (uint8_t)(b.u >> 16);
    }
}

/* x [M, K] bf16 -> dst [M, K64]: for every 64 inputs, the 32 that i8_bf16's first vector pairs with, then the
 * other 32 (two-source word permutes); zeros past K. */
static void i8_permute(const uint16_t *x, ptrdiff_t M, ptrdiff_t K, ptrdiff_t K64, uint16_t *dst) {
    uint16_t order[64];
    for (int i = 0; i < 64; i++) order[i] = (uint16_t)(i % 32 / 8 * 16 + i / 32 * 8 + i % 8);
    const __m512i first = _mm512_loadu_si512(order), second = _mm512_loadu_si512(order + 32);
    for (ptrdiff_t m = 0; m < M; m++)
        for (ptrdiff_t k0 = 0; k0 < K64; k0 += 64) {
            const uint16_t *src = x + m * K + k0;
            const ptrdiff_t left = K - k0;
            const __m512i a = left >= 32 ? _mm512_loadu_si512(src)
                                         : _mm512_maskz_loadu_epi16(((__mmask32)1 << left) - 1, src);
            const __m512i b = left >= 64 ? _mm512_loadu_si512(src + 32)
                              : left > 32 ? _mm512_maskz_loadu_epi16(((__mmask32)1 << (left - 32)) - 1, src + 32)
                                          : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + m * K64 + k0, _mm512_permutex2var_epi16(a, first, b));
            _mm512_storeu_si512(dst + m * K64 + k0 + 32, _mm512_permutex2var_epi16(a, second, b));
        }
}

/* The lookup tables in registers. */
typedef struct {
    __m512i hi0, hi1, lo0, lo1;
} I8Table;

INLINE I8Table i8_table(void) {
    const uint8_t *t = i8_table_bytes;
    I8Table r = {_mm512_loadu_si512(t), _mm512_loadu_si512(t + 64), _mm512_loadu_si512(t + 128),
                 _mm512_loadu_si512(t + 192)};
    return r;
}

/* 64 int8 weights -> bf16, as two vectors of 32 (the order above). */
INLINE void i8_bf16(__m512i b, const I8Table *t, __m512bh *first, __m512bh *second) {
    const __m512i a = _mm512_abs_epi8(b); /* -128 -> 0x80, which indexes entry 0 */
    __m512i hi = _mm512_maskz_permutex2var_epi8(_mm512_test_epi8_mask(b, b), t->hi0, a, t->hi1);
    hi = _mm512_ternarylogic_epi32(hi, b, _mm512_set1_epi8((char)0x80), 0xF8); /* hi | (b & 0x80) */
    const __m512i lo = _mm512_permutex2var_epi8(t->lo0, a, t->lo1);
    *first = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
    *second = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
}

/* 64 weights from p, the first n of them (n < 64: the rest zero). */
INLINE __m512i i8_load(const int8_t *p, ptrdiff_t n) {
    if (n >= 64) return _mm512_loadu_si512(p);
    return _mm512_maskz_loadu_epi8(((__mmask64)1 << n) - 1, p);
}

/* One step of 64 inputs at k for an MT x NT tile: each weight vector converted once, used by all MT rows. */
#define I8_STEP(LOAD)                                                                                             \
    do {                                                                                                          \
        _Pragma("GCC unroll 4") for (int j = 0; j < NT; j++) {                                                    \
            __m512bh first, second;                                                                               \
            i8_bf16(LOAD, &t, &first, &second);                                                                   \
            _Pragma("GCC unroll 8") for (int i = 0; i < MT; i++) {                                                \
                const uint16_t *xi = r->x + (m0 + i) * r->K64 + k;                                                \
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], first, (__m512bh)_mm512_loadu_si512(xi));                \
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], second, (__m512bh)_mm512_loadu_si512(xi + 32));           \
            }                                                                                                     \
        }                                                                                                         \
    } while (0)

/* out[m0:m0+MT, n0:n0+NT] (MT <= 8, MT * NT <= 16), inputs s.k0 .. s.k1, prefetching as tile_dp does. */
INLINE void tile_i8dp(const I8Rows *r, ptrdiff_t K, const int8_t *w, ptrdiff_t n0, int MT, int NT,
                      const Epilogue *e, ptrdiff_t m0, Span s) {
    const I8Table t = i8_table();
    __m512 acc[8][4];
    SPAN_START(acc, s, MT, NT);
    const Ahead ahead = tile_ahead(w, 1, K, n0, MT, NT, &s);
    ptrdiff_t k = s.k0;
    for (; k + 64 <= s.k1; k += 64) {
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) prefetch_ahead(&ahead, j, k);
        I8_STEP(_mm512_loadu_si512(w + (n0 + j) * K + k));
    }
    if (k < s.k1) I8_STEP(i8_load(w + (n0 + j) * K + k, K - k));
    SPAN_END(acc, s, MT, NT, K, e, m0, n0)
}

/* out[m0, n] for one row: the weight row read front to back, prefetched AHEAD_BYTES ahead (the widening row1_i8's
 * distance: without it, a C harness of this loop read 17-22 GB/s against 29-42 with K = 18944 on the Zen 4 EPYC). */
INLINE void row1_i8dp(const I8Rows *r, ptrdiff_t K, const int8_t *w, ptrdiff_t n, const Epilogue *e,
                      ptrdiff_t m0) {
    const I8Table t = i8_table();
    const int8_t *wr = w + n * K;
    const uint16_t *x = r->x + m0 * r->K64;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (ptrdiff_t k = 0; k < K; k += 64) {
        AHEAD(wr + k, AHEAD_BYTES(I8), 0);
        __m512bh first, second;
        i8_bf16(i8_load(wr + k, K - k), &t, &first, &second);
        a0 = _mm512_dpbf16_ps(a0, first, (__m512bh)_mm512_loadu_si512(x + k));
        a1 = _mm512_dpbf16_ps(a1, second, (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    finish(e, m0, n, _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
}

/* Output channels [n0, n1) for all M rows (bf16_rows.h's ROW_BLOCKS). */
INLINE void block_i8dp(const I8Rows *r, ptrdiff_t M, ptrdiff_t K, const void *wv, ptrdiff_t n0, ptrdiff_t n1,
                       const Epilogue *e) {
    const int8_t *w = (const int8_t *)wv;
#define I8_TILE(n, o, MT, NT) tile_i8dp(r, K, w, n, MT, NT, e, m0 + o, tile_span(&s, n - g, 1))
#define I8_ROW1(n) row1_i8dp(r, K, w, n, e, m0)
    ROW_BLOCKS(I8_TILE, I8_ROW1, K, 1, 0)
#undef I8_TILE
#undef I8_ROW1
}
#undef I8_STEP

DEFINE_RUN(run_i8rows, I8Rows, block_i8dp,)

/* run_jobs for M bf16 rows (xb) with int8 weights: 0, or -2 when memory for the permuted rows could not be had. */
static int run_i8dp(const uint16_t *xb, ptrdiff_t M, ptrdiff_t K, const Job *jobs, int njobs, int threads) {
    I8Rows r;
    r.K64 = (K + 63) / 64 * 64;
    uint16_t *permuted = rows_memory(M * r.K64);
    if (!permuted) return -2;
    i8_permute(xb, M, K, r.K64, permuted);
    r.x = permuted;
    run_i8rows(&r, M, K, jobs, njobs, threads);
    return 0;
}
#endif /* HAVE_DP && __AVX512VBMI__ */
#endif /* AF3_INT8_ROWS_H */
