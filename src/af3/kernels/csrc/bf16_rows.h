/* Part of gemm.h (included by it, after the shared definitions it uses): products of bf16 rows with bf16 weights
 * that use the rows as bf16, without widening the weights to fp32, where the compiler targets AVX512-BF16 (pair dot
 * products) and AMX (tile products). gemm.h's run_jobs takes them when the caller gives its rows as bf16. */
#ifndef AF3_BF16_ROWS_H
#define AF3_BF16_ROWS_H

#ifdef __AVX512BF16__
/* bf16 weights times bf16 activations on CPUs with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and adds each
 * pair's two products into one of 16 fp32 lanes, so a weight vector is used as loaded, with no widening. The
 * products of bf16 values are exact in fp32 and the sums run in fp32, as in the widening path, in another order;
 * unlike it the instruction takes denormal inputs as zero and flushes denormal sums (below 1.2e-38, nothing a bf16
 * result can hold). Why: widening costs more instructions than the product for 2 or more rows, so the widening
 * tiles are bound by arithmetic from ~4 rows on (on a 2-vCPU Xeon, 8 rows of a decoding step read weights at 7-12
 * GB/s); this reads them at memory speed up to 8 rows and more. */
#define HAVE_DP 1

/* 32 bf16 values at p, the first `n` of them (n < 32: the rest are zero, and so add nothing). */
INLINE __m512bh dp_load(const uint16_t *p, ptrdiff_t n) {
    if (n >= 32) return (__m512bh)_mm512_loadu_si512(p);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1u << n) - 1u), p);
}

/* How many tiles ahead tile_dp prefetches (see there). On a 2-vCPU EPYC Zen 4, 8 rows over the benchmark decoder's
 * 24 layers of weights streamed from memory ran at 124-126 GMAC/s two tiles ahead, 118-125 at four or eight, 95-98 at
 * one (the tile after) and 56-60 with no prefetch, in minutes when torch's fp32 sum read 44-52 GB/s (107-114 against
 * 93-95 in slower minutes; one tile ahead into L1 instead of L2: 79-82). */
#ifndef DP_AHEAD_TILES
#define DP_AHEAD_TILES 2
#endif

/* One row reads ROWS_TOGETHER (gemm.h) weight rows at once, each x vector loaded once for all of them, from
 * ROWS_TOGETHER_K inputs on: there x (2 bytes an input) no longer stays in L1 next to the streaming weights, and one
 * row at a time reloads all of it from L2 for every weight row. On a 2-vCPU EPYC Zen 4 (32 KB L1), one-row
 * products over 1 GB of bf16 weights, one row at a time / 4 rows at once with OWN_AHEAD: K = 3584 51-60 / 35-42
 * GB/s, 6144 48-60 / 40-51, 9728 31-40 / 44-51, 12288 29-39 / 47-53, 18944 32-38 / 42-55 (minutes when torch's fp32
 * sum read 42 GB/s). The int8 products (int8_rows.h) take the same rule: their rows are bf16 too. */
#ifndef ROWS_TOGETHER_K
#define ROWS_TOGETHER_K 8192
#endif
/* How far ahead, in bytes, a tile of one row prefetches its own weight rows. */
#define OWN_AHEAD 2048

/* Products of 3-8 rows whose K inputs (2 bytes each) do not fit in L1 (ROWS_CHUNK_BYTES) beside the streaming weights,
 * below ROWS_TOGETHER_K inputs (from there, ROW_TILES' wide tiles), run over ROWS_CHUNK_BYTES of every row at a time
 * (rows_chunk inputs) for CHUNK_CHANNELS output channels at a time; each tile keeps its sums in the Span's partial sums
 * between chunks. So a chunk of the rows is read from L1 by all the group's tiles, not from L2 by each: tiles 2
 * channels wide brought MT / 2 times as many bytes of rows from L2 as of weight. While a group runs, its tiles prefetch
 * the next group's weights (contiguous with it) front to back, at the pace they read their own: a chunked group reads
 * each of its rows in pieces, which the hardware prefetchers serve worse than one stream. On a 2-vCPU EPYC Zen 4, over
 * 1 GB of bf16 weights, against the tiles before (4 channels wide for 2-4 rows, no chunks), medians of 14 interleaved
 * rounds (minutes when torch's fp32 sum read 28-48 GB/s), K = 3584 / 4864 / 18944: 8 rows 1.65x / 1.68x / 1.32x, 5 rows
 * 1.55x / 1.57x / 1.31x, 4 rows 1.18x / 1.14x / 1.29x, 3 rows 1.08x / 1.05x / 1.21x, 2 rows 1.02x / 1.05x / 1.05x; K =
 * 896 (the rows in L1, tiles now 2 wide) 1.11x, 1.22x, 1.12x, 1.02x and 0.99x at 2, 3, 4, 5 and 8 rows. Chunks of 8, 12
 * or 24 KB, groups of 4, 8 or 16 channels, chunks from 5 rows only, and prefetching where the tile in its place reads
 * in the next chunk instead were measured beside these: none better at every K. From ROWS_TOGETHER_K inputs on, 5-8
 * rows read faster as two tiles of 4 channels (the second reading its weights from L2) than in chunks: AF3-8B's down
 * projection, 3584 x 18944, and 3584 x 9728, through 1 GB of weights, medians of 6-14 interleaved rounds in four runs,
 * two tiles / chunks: 8 rows 1.12-1.20x, 7 rows 1.00-1.14x, 6 rows 1.01-1.10x, 5 rows 0.90-1.10x (K = 3584-6144, the
 * same code in both: 0.97-1.03x). */
#ifndef ROWS_CHUNK_BYTES
#define ROWS_CHUNK_BYTES 16384
#endif
#define CHUNK_CHANNELS 32

/* The inputs [k0, k1) a tile reads now; where its sums wait between chunks, part[8 * j + i] for row i and the
 * tile's j-th channel; and, when its rows run in chunks, the weights it prefetches, from `next` on at input k0. */
typedef struct {
    ptrdiff_t k0, k1;
    __m512 *part;
    const char *next;
} Span;

/* The span of the tile `at` channels into its group of a chunk span s (weights of `size` bytes): its partial sums
 * and its part of the next group's weights, which the group's tiles prefetch in the order they run (the group's
 * chunk of each tile, s.k1 - s.k0 inputs of its channels, comes after the earlier chunks of all the group). */
INLINE Span tile_span(const Span *s, ptrdiff_t at, int size) {
    const Span t = {s->k0, s->k1, s->part + 8 * at, s->next ? s->next + at * (s->k1 - s->k0) * size : NULL};
    return t;
}

/* 1 when `rows` rows (at most 8 are read at once) of K bf16 inputs stay in L1 beside the streaming weights. */
INLINE int rows_fit(ptrdiff_t rows, ptrdiff_t K) { return (rows > 8 ? 8 : rows) * K * 2 <= ROWS_CHUNK_BYTES; }

/* How many inputs of `rows` rows one chunk holds: K when they fit or need no chunks; a multiple of 64. */
INLINE ptrdiff_t rows_chunk(ptrdiff_t rows, ptrdiff_t K) {
    if (rows > 8) rows = 8;
    if (rows <= 2 || rows_fit(rows, K) || K >= ROWS_TOGETHER_K) return K;
    return ROWS_CHUNK_BYTES / (rows * 2) / 64 * 64;
}

/* What a tile of MT x NT (tile_dp, tile_i8dp; weights of `size` bytes) prefetches into L2: column j at input k the
 * line at + j * per_column + k * per_input. With chunks, the next group's weights (tile_span), NT lines per step of
 * 64 bytes per row; else with one row its own weight row OWN_AHEAD bytes on, with more the row DP_AHEAD_TILES tiles
 * on, 64 inputs past k. (Worked out once per tile: a test of the span in the loop cost 8 rows 3%.) */
typedef struct {
    const char *at;
    ptrdiff_t per_column, per_input;
} Ahead;

INLINE Ahead tile_ahead(const void *w, int size, ptrdiff_t K, ptrdiff_t n0, int MT, int NT, const Span *s) {
    if (s->next) {
        const Ahead a = {s->next - s->k0 * NT * size, 64, NT * size};
        return a;
    }
    const ptrdiff_t at = MT == 1 ? n0 * K * size + OWN_AHEAD : ((n0 + DP_AHEAD_TILES * NT) * K + 64) * size;
    const Ahead a = {(const char *)w + at, K * size, size};
    return a;
}

/* Prefetches column j's line of `a` at input k. */
INLINE void prefetch_ahead(const Ahead *a, int j, ptrdiff_t k) {
    _mm_prefetch(a->at + j * a->per_column + k * a->per_input, _MM_HINT_T1);
}

/* A tile's MT x NT accumulators at the start of its span (zero, or the sums of the chunks before) and at its end
 * (waiting for the next chunk, or finished into the output). Macros, not functions: an accumulator array passed by
 * pointer made GCC keep it in memory. */
#define SPAN_START(acc, s, MT, NT)                                                                                \
    _Pragma("GCC unroll 8") for (int i = 0; i < MT; i++)                                                          \
        _Pragma("GCC unroll 4") for (int j = 0; j < NT; j++) acc[i][j] = _mm512_setzero_ps();                     \
    if ((s).k0)                                                                                                   \
        _Pragma("GCC unroll 8") for (int i = 0; i < MT; i++)                                                      \
            _Pragma("GCC unroll 4") for (int j = 0; j < NT; j++) acc[i][j] = (s).part[8 * j + i]
/* The sums of the 16 vectors v[0..15], lane l holding v[l]'s: pairs interleaved and added within each 128 bits,
 * then quadruples, then across the four 128-bit lanes (45 instructions for 16 sums, against 16 reductions of ~8). */
INLINE __m512 sums16(const __m512 *v) {
    __m512 t[8], u[4];
    for (int k = 0; k < 8; k++) /* per 128 bits [a0+a2, b0+b2, a1+a3, b1+b3] for a, b = v[2k], v[2k+1] */
        t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++) /* per 128 bits: the partial sums of v[4k] .. v[4k+3] */
        u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0xEE));
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* NT (<= 16) values of `kind` (bf16, fp16 or fp32) from element n, widened to fp32, in lanes 0 .. NT-1. */
INLINE __m512 load_few(const void *p, ptrdiff_t n, int NT, int kind) {
    const __mmask16 on = (__mmask16)((1u << NT) - 1u);
    if (kind == F32) return _mm512_maskz_loadu_ps(on, (const float *)p + n);
    const __m256i h = _mm256_maskz_loadu_epi16(on, (const uint16_t *)p + n);
    if (kind == F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* finish() for a tile's MT x NT results at once (MT * NT <= 16), lane i * NT + j holding row m0 + i, channel n0 + j:
 * scale and bias spread over the lanes, the whole vector rounded, one masked store a row (masked lanes are neither
 * written nor read, so the store may start before the row). The same values as finish() lane by lane. Why: finish()
 * one result at a time, after a reduction each, cost more than the products of a tile of 8 rows over 896 inputs:
 * with this, 8 rows x 4864 x 896 (weights in L3) ran 1.36x as fast, 4 rows 1.29x, 2 rows 1.24x, on a Zen 4 EPYC
 * (benchmarks/README.md). */
INLINE void finish_lanes(const Epilogue *e, ptrdiff_t m0, ptrdiff_t n0, int MT, int NT, __m512 s) {
    int c[16];
    for (int l = 0; l < 16; l++) c[l] = l % NT;
    const __m512i channel = _mm512_loadu_si512(c);
    if (e->scale) s = _mm512_mul_ps(s, _mm512_permutexvar_ps(channel, load_few(e->scale, n0, NT, e->scale_kind)));
    if (e->bias) s = _mm512_add_ps(s, _mm512_permutexvar_ps(channel, load_few(e->bias, n0, NT, e->bias_kind)));
    const unsigned row = (1u << NT) - 1u;
    if (e->out_kind == F32) {
        if (e->round_kind == BF16)
            s = _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(s), 16));
        else if (e->round_kind == F16)
            s = _mm512_cvtph_ps(_mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        for (int i = 0; i < MT; i++)
            _mm512_mask_storeu_ps((float *)e->out + (m0 + i) * e->stride + n0 - i * NT, (__mmask16)(row << i * NT), s);
        return;
    }
    const __m256i h = e->out_kind == BF16 ? bf16x16_from(s, 1)
                                          : _mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    for (int i = 0; i < MT; i++)
        _mm256_mask_storeu_epi16((uint16_t *)e->out + (m0 + i) * e->stride + n0 - i * NT, (__mmask16)(row << i * NT),
                                 h);
}

/* A tile's MT x NT accumulators at the end of its span: waiting for the next chunk in the Span's partial sums, or
 * reduced (sums16) and finished (finish_lanes). */
#define SPAN_END(acc, s, MT, NT, K, e, m0, n0)                                                                    \
    if ((s).k1 < (K)) {                                                                                           \
        for (int i = 0; i < MT; i++)                                                                              \
            for (int j = 0; j < NT; j++) (s).part[8 * j + i] = acc[i][j];                                         \
    } else {                                                                                                      \
        __m512 v_[16];                                                                                            \
        _Pragma("GCC unroll 16") for (int l = 0; l < 16; l++) v_[l] = _mm512_setzero_ps();                        \
        _Pragma("GCC unroll 8") for (int i = 0; i < MT; i++)                                                      \
            _Pragma("GCC unroll 4") for (int j = 0; j < NT; j++) v_[i * NT + j] = acc[i][j];                      \
        finish_lanes(e, m0, n0, MT, NT, sums16(v_));                                                              \
    }

/* out[m0:m0+MT, n0:n0+NT] for bf16 rows xb[0:MT] (MT <= 8, MT * NT <= 16 accumulators), inputs s.k0 .. s.k1. While
 * it works, the tile prefetches (tile_ahead) column for column, as `tile` does for the tile after it. */
INLINE void tile_dp(const uint16_t *xb, ptrdiff_t K, const uint16_t *w, ptrdiff_t n0, int MT, int NT,
                    const Epilogue *e, ptrdiff_t m0, Span s) {
    __m512 acc[8][4];
    SPAN_START(acc, s, MT, NT);
    /* Whole steps of 32 inputs, then the masked tail: one loop with both kept GCC from holding the accumulators in
     * registers (it stored all of them every step: 8 rows ran at ~27% of vdpbf16ps's rate on a Zen 4 EPYC). */
    const Ahead ahead = tile_ahead(w, 2, K, n0, MT, NT, &s);
    ptrdiff_t k = s.k0;
    for (; k + 32 <= s.k1; k += 32) {
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) prefetch_ahead(&ahead, j, k);
        __m512bh xv[8];
#pragma GCC unroll 8
        for (int i = 0; i < MT; i++) { /* (the empty asm keeps each row in a register: GCC reloaded the rows for
                                          every weight column, 18 loads per 16 products against 10) */
            xv[i] = (__m512bh)_mm512_loadu_si512(xb + i * K + k);
            __asm__("" : "+v"(xv[i]));
        }
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n0 + j) * K + k);
#pragma GCC unroll 8
            for (int i = 0; i < MT; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xv[i]);
        }
    }
    if (k < s.k1) {
        __m512bh xv[8];
#pragma GCC unroll 8
        for (int i = 0; i < MT; i++) xv[i] = dp_load(xb + i * K + k, K - k);
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            const __m512bh wv = dp_load(w + (n0 + j) * K + k, K - k);
#pragma GCC unroll 8
            for (int i = 0; i < MT; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xv[i]);
        }
    }
    SPAN_END(acc, s, MT, NT, K, e, m0, n0)
}

/* row1_dp's software prefetch distance. On Intel (a Sapphire Rapids Xeon) row1's 8 KB into L2, every line (a batch-1
 * decoding step 40.5 -> 36.0 ms against every other line, interleaved). On AMD (AF3_AMD comes from the build, by
 * /proc/cpuinfo's vendor; a 2-vCPU EPYC Zen 4) none: there the hardware prefetchers keep up with a product that does
 * not widen its weights, and any software prefetch slowed it down when the memory was fast (that VM's bandwidth
 * moves by the minute). One-row products over 272 MB-1 GB read 49-60 GB/s without, 42-44 with 8 KB into L2 and 37-41
 * with 4 KB into L1, while torch's fp32 sum read 51-53; a batch-1 decoding step of the benchmark model 40-44 against
 * 33-39 tok/s (alike in slow minutes, 27-31 both). */
#ifndef DP_AHEAD_BYTES
#ifdef AF3_AMD
#define DP_AHEAD_BYTES 0
#else
#define DP_AHEAD_BYTES AHEAD_BYTES(BF16)
#endif
#endif

/* out[m0, n] for one bf16 row: the weight row read front to back, prefetched DP_AHEAD_BYTES ahead, every line. */
INLINE void row1_dp(const uint16_t *xb, ptrdiff_t K, const uint16_t *w, ptrdiff_t n, const Epilogue *e,
                    ptrdiff_t m0) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    const uint16_t *wr = w + n * K;
    ptrdiff_t k = 0;
    for (; k + 64 <= K; k += 64) {
        AHEAD(wr + k, DP_AHEAD_BYTES, 1); /* both lines of this step's ahead */
        a0 = _mm512_dpbf16_ps(a0, dp_load(wr + k, 32), dp_load(xb + k, 32));
        a1 = _mm512_dpbf16_ps(a1, dp_load(wr + k + 32, 32), dp_load(xb + k + 32, 32));
    }
    for (; k < K; k += 32) a0 = _mm512_dpbf16_ps(a0, dp_load(wr + k, K - k), dp_load(xb + k, K - k));
    finish(e, m0, n, _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
}

/* The plan of block_dp and block_i8dp for the rows from m0 (up to 8 of them) and output channels [n, END): tiles of
 * 2 channels (the last one odd), TILE(n, r, MT, NT) for the MT rows from m0 + r; one row reads one weight row at a
 * time, ROW1(n), or ROWS_TOGETHER at once from ROWS_TOGETHER_K inputs on. Where WIDE is true, tiles are ROWS_TOGETHER
 * channels wide, and 5-8 rows run as two tiles over the same weight rows (4 rows, then the rest; the second reads
 * the weights from L2): block_dp's rows where they neither fit in L1 nor run in chunks (rows_chunk), so that each
 * row vector comes from L2 once for 4 weight rows, not 2. (Where the rows fit, 2 wide ran faster, K = 896: 1.11x,
 * 1.22x and 1.12x as fast as 4 wide at 2, 3 and 4 rows; 5-8 rows from ROWS_TOGETHER_K inputs, against chunks: see
 * ROWS_CHUNK_BYTES.) block_i8dp's tiles are bound by their instructions, not by reading the rows: 4 wide at 2-4
 * rows (WIDE; 2 wide ran 0.93-0.95x as fast), 2 wide at 5-8 (HALVES off). */
#define ROW_TILES(TILE, ROW1, END, WIDE, HALVES)                                                                  \
    switch (M - m0 >= 8 ? 8 : M - m0) {                                                                           \
    case 1:                                                                                                       \
        if (K >= ROWS_TOGETHER_K)                                                                                 \
            for (; n + ROWS_TOGETHER <= (END); n += ROWS_TOGETHER) TILE(n, 0, 1, ROWS_TOGETHER);                  \
        for (; n < (END); n++) ROW1(n);                                                                           \
        break;                                                                                                    \
        TILE_CASE(TILE, 2, END, WIDE, 0) TILE_CASE(TILE, 3, END, WIDE, 0) TILE_CASE(TILE, 4, END, WIDE, 0)        \
        TILE_CASE(TILE, 5, END, HALVES, 4) TILE_CASE(TILE, 6, END, HALVES, 4) TILE_CASE(TILE, 7, END, HALVES, 4)  \
        TILE_CASE(TILE, 8, END, HALVES, 4)                                                                        \
    }
/* MT rows: with WIDE, tiles ROWS_TOGETHER wide, the first SPLIT rows (0: all) in one and the rest in a second. */
#define TILE_CASE(TILE, MT, END, WIDE, SPLIT)                                                                     \
    case MT:                                                                                                      \
        if (WIDE)                                                                                                 \
            for (; n + ROWS_TOGETHER <= (END); n += ROWS_TOGETHER) {                                              \
                TILE(n, 0, SPLIT ? SPLIT : MT, ROWS_TOGETHER);                                                    \
                if (SPLIT) TILE(n, SPLIT, MT - SPLIT, ROWS_TOGETHER);                                             \
            }                                                                                                     \
        for (; n + 2 <= (END); n += 2) TILE(n, 0, MT, 2);                                                         \
        for (; n < (END); n++) TILE(n, 0, MT, 1);                                                                 \
        break;

/* block_dp and block_i8dp: output channels [n0, n1) for all M rows, 8 at a time, by ROW_TILES, in groups of
 * CHUNK_CHANNELS channels and chunks of rows_chunk inputs where the rows do not fit in L1 (else one group, one
 * chunk). TILE(n, r, MT, NT), ROW1(n), WIDE and HALVES see m0, the chunk's length `chunk`, the group's first channel
 * g and the span s. */
#define ROW_BLOCKS(TILE, ROW1, CHUNK, WIDE, HALVES)                                                               \
    __m512 part[CHUNK_CHANNELS * 8];                                                                              \
    for (ptrdiff_t m0 = 0; m0 < M; m0 += 8) {                                                                     \
        const ptrdiff_t chunk = (CHUNK), group = chunk < K ? CHUNK_CHANNELS : n1 - n0;                            \
        for (ptrdiff_t g = n0; g < n1; g += group) {                                                              \
            const ptrdiff_t g1 = n1 - g > group ? g + group : n1;                                                 \
            for (Span s = {0, 0, part, NULL}; s.k0 < K; s.k0 = s.k1) {                                            \
                s.k1 = K - s.k0 > chunk ? s.k0 + chunk : K;                                                       \
                s.next = chunk < K ? (const char *)(w + g1 * K) + s.k0 * (g1 - g) * sizeof(*w) : NULL;            \
                ptrdiff_t n = g;                                                                                  \
                ROW_TILES(TILE, ROW1, g1, WIDE, HALVES)                                                           \
            }                                                                                                     \
        }                                                                                                         \
    }

/* Output channels [n0, n1) for all M bf16 rows (ROW_BLOCKS). */
INLINE void block_dp(const uint16_t *xb, ptrdiff_t M, ptrdiff_t K, const uint16_t *w, ptrdiff_t n0, ptrdiff_t n1,
                     const Epilogue *e) {
#define DP_TILE(n, r, MT, NT) tile_dp(xb + (m0 + r) * K, K, w, n, MT, NT, e, m0 + r, tile_span(&s, n - g, 2))
#define DP_ROW1(n) row1_dp(xb + m0 * K, K, w, n, e, m0)
#define DP_WIDE (chunk == K && !rows_fit(M - m0, K))
    ROW_BLOCKS(DP_TILE, DP_ROW1, rows_chunk(M - m0, K), DP_WIDE, DP_WIDE)
#undef DP_TILE
#undef DP_ROW1
#undef DP_WIDE
}
#endif /* __AVX512BF16__ */

#ifdef HAVE_DP
DEFINE_RUN(run_dp, uint16_t, block_dp,)
#endif

#if defined(HAVE_DP) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
/* 2-16 bf16 rows on CPUs with AMX-BF16: the products run as tile products out^T = W x^T, with the weight as the A
 * operand read straight from its rows (16 output channels x 32 inputs per tile, no packed copy) and the rows packed
 * once per product as the B operand. Why: vdpbf16ps issues about once per 2 cycles here, so the pair dot products
 * above are bound by arithmetic from ~4 rows on (8 rows: ~11 GB/s per core with the weight in L2), while one tile
 * product does the work of 32 of them. Sums run in fp32 (the tile product's order); inputs and sums that are
 * denormal are taken as zero, as in the pair dot products. */
#include "amx.h"
#define HAVE_AMX_ROWS 1
#define AMX_ROWS_MIN 2 /* fewer rows: the one-row pair dot products read the weight faster */

/* The rows xb [M, K] (M <= 16, K % 32 == 0) as B operands, one 1 KB tile per 32 inputs: tile c holds, for the 16
 * input pairs p and the 16 row slots j, xb[j][32c + 2p], xb[j][32c + 2p + 1] side by side (zeros for j >= M). */
static void pack_rows_amx(const uint16_t *xb, ptrdiff_t M, ptrdiff_t K, uint16_t *dst) {
    for (ptrdiff_t c = 0; c < K / 32; c++) transpose_pairs(xb + c * 32, K, M, dst + c * 512);
}

/* 16 consecutive values of kind (bf16, fp16 or fp32) at element i, widened to fp32. */
INLINE __m512 load16(const void *p, ptrdiff_t i, int kind) {
    if (kind == BF16) return bf16x16((const uint16_t *)p + i);
    if (kind == F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    return _mm512_loadu_ps((const float *)p + i);
}

/* finish() for the 16 channels n .. n + 15 of one row at once. */
INLINE void finish16(const Epilogue *e, ptrdiff_t row, ptrdiff_t n, __m512 s) {
    if (e->scale) s = _mm512_mul_ps(s, load16(e->scale, n, e->scale_kind));
    if (e->bias) s = _mm512_add_ps(s, load16(e->bias, n, e->bias_kind));
    const ptrdiff_t at = row * e->stride + n;
    if (e->out_kind == F32) {
        if (e->round_kind == BF16)
            s = _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(s), 16));
        else if (e->round_kind == F16)
            s = _mm512_cvtph_ps(_mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm512_storeu_ps((float *)e->out + at, s);
    } else if (e->out_kind == BF16) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)e->out + at), bf16x16_from(s, 1));
    } else {
        _mm256_storeu_si256((__m256i *)((uint16_t *)e->out + at),
                            _mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

/* Results of one accumulator tile c [16 channels from n][16 row slots] through the epilogue, M rows of them: each
 * row's 16 channels gathered into one vector. */
INLINE void finish_tile(const float *c, ptrdiff_t M, ptrdiff_t n, const Epilogue *e) {
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    for (ptrdiff_t m = 0; m < M; m++) finish16(e, m, n, _mm512_i32gather_ps(column, c + m, 4));
}

/* Output channels [n0, n1) for M (2-16) rows: 64 channels at a time in 4 accumulator tiles; the channels past the
 * last whole 64 (only a product's last task can have them: TASK_CHANNELS is 64, and AF3's widths are multiples of
 * it) take the pair dot products. Tiles must be configured (tiles_on) in the calling thread. (Software prefetching
 * of the weight rows 1-8 steps ahead, or one block of 16 channels at a time, read no faster: 19-22 GB/s all, 8 rows.) */
INLINE void block_amx(const uint16_t *packed, const uint16_t *xb, ptrdiff_t M, ptrdiff_t K, const uint16_t *w,
                      ptrdiff_t n0, ptrdiff_t n1, const Epilogue *e) {
    float c[4][256];
    const ptrdiff_t steps = K / 32, stride = K * 2;
    ptrdiff_t n = n0;
    for (; n + 64 <= n1; n += 64) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t *wn = w + n * K;
        for (ptrdiff_t s = 0; s < steps; s++) {
            _tile_loadd(6, packed + s * 512, 64);
            _tile_loadd(4, wn + s * 32, stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, wn + 16 * K + s * 32, stride);
            _tile_dpbf16ps(1, 5, 6);
            _tile_loadd(4, wn + 32 * K + s * 32, stride);
            _tile_dpbf16ps(2, 4, 6);
            _tile_loadd(5, wn + 48 * K + s * 32, stride);
            _tile_dpbf16ps(3, 5, 6);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        for (int t = 0; t < 4; t++) finish_tile(c[t], M, n + 16 * t, e);
    }
    if (n < n1) block_dp(xb, M, K, w, n, n1, e);
}

/* run_jobs for M (2-16) bf16 rows with bf16 weights on AMX: 0, or -1 when it cannot (K % 32, no AMX, no memory) and
 * the caller must use another path. */
static int run_amx(const uint16_t *xb, ptrdiff_t M, ptrdiff_t K, const Job *jobs, int njobs, int threads) {
    if (M < AMX_ROWS_MIN || M > 16 || K % 32 || !amx_permitted()) return -1;
    uint16_t *packed = rows_memory(K / 32 * 512);
    if (!packed) return -1;
    pack_rows_amx(xb, M, K, packed);
    ptrdiff_t first[MAX_JOBS + 1];
    const ptrdiff_t tasks = job_tasks(jobs, njobs, first);
#pragma omp parallel num_threads(threads)
    {
        tiles_on();
#pragma omp for schedule(static)
        for (ptrdiff_t t = 0; t < tasks; t++) {
            ptrdiff_t n0, n1;
            const Job *job = task_channels(jobs, first, t, &n0, &n1);
            block_amx(packed, xb, M, K, (const uint16_t *)job->w, n0, n1, &job->e);
        }
        _tile_release();
    }
    return 0;
}
#endif /* AMX */
#endif /* AF3_BF16_ROWS_H */
