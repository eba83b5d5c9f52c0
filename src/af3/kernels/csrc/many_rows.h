/* Products of many rows (PACK_ROWS and more): one task's output channels (TASK_CHANNELS, from gemm.h's block) are
 * computed a chunk of PACK_KC inputs at a time. Each chunk of the task's weight rows is first widened to fp32 and
 * transposed into panels of 16 channels ([k][16], pack_panel); then 6 rows of x times one panel accumulate in 12
 * registers (micro): per input, 2 loads of the panel, 6 broadcasts of x and 12 FMAs, where gemm.h's tiles need 6
 * loads and 2 widenings for 8 FMAs and re-read every weight block once per 4 rows. One panel (16 channels of a
 * chunk, 16 KB) stays in L1 while every row tile passes over it; the sums wait in a per-thread scratch between
 * chunks.
 *
 * Packing costs about as much per weight element as 3-4 rows of FMAs, so it pays from a couple of dozen rows. On a
 * 2-vCPU Zen 3 EPYC (AVX2; weights streamed from memory, 2026-12-07, C harness, GFLOP/s tiles -> packed): AF3-8B's
 * gate 18944 x 3584 at 16 / 20 / 32 / 64 / 128 rows 96 -> 94, 96 -> 105, 99 -> 129, 100 -> 153, 99 -> 168; its down
 * projection 3584 x 18944 at 32 / 128 / 256 rows 96 -> 126, 95 -> 162, 86 -> 157; the mid-size benchmark's
 * 4864 x 896 at 16 / 24 / 64 / 128 rows 101 -> 97, 83 -> 88, 91 -> 139, 92 -> 153; its 151936 x 896 lm_head at 24 /
 * 32 / 48 rows 116 -> 109, 115 -> 112, 92 -> 136 (benchmarks/README.md). Torch's fp32 GEMM reaches ~150 here, after
 * widening the weight.
 *
 * Every sum is accumulated in fp32 over k in order (each output one FMA chain); the tiles' sums go 8 lanes apart
 * and are added at the end, so the two paths can differ in the last bits of a sum, as any two GEMMs do.
 */
#ifndef AF3_MANY_ROWS_H
#define AF3_MANY_ROWS_H

/* Rows from which block() packs the weight (the measured crossover above; -DPACK_ROWS=n to compare the paths). */
#ifndef PACK_ROWS
#define PACK_ROWS 24
#endif
/* Rows per pass over the weights (gemm.h's run_jobs): all of a pass's rows are read once per task of 64 channels,
 * and beyond a few hundred rows their fp32 copy outgrows the caches (AF3-8B's down projection, 1500 rows, K = 18944:
 * 114 MB). Zen 3, bf16 weights, two runs, GFLOP/s in one pass -> in passes of 256 rows: 3000 rows through the
 * mid-size model's 896 x 4864 110 -> 119-162 and AF3-8B's 3584 x 3584 126-134 -> 155-160, 1500 rows through AF3-8B's
 * down projection 141-142 -> 146-164. */
#ifndef PASS_ROWS
#define PASS_ROWS 256
#endif
/* Inputs per chunk: a panel of 16 channels is PACK_KC * 64 bytes. */
#define PACK_KC 256
/* Channels per panel (2 vectors) and rows per register tile: 12 accumulators, 2 panel vectors, 1 broadcast. */
#define PACK_NR 16
#define PACK_MR 6

/* This thread's scratch of at least `floats` floats, 64-byte aligned: kept between calls (OpenMP's threads live
 * as long as the process) and grown as needed, so it holds the largest task this thread has run. NULL if memory
 * ran out. */
static float *pack_scratch(size_t floats) {
    static _Thread_local float *buf;
    static _Thread_local size_t cap;
    if (floats > cap) {
        free(buf);
        buf = (float *)aligned_alloc(64, (floats * sizeof(float) + 63) & ~(size_t)63);
        cap = buf ? floats : 0;
    }
    return buf;
}

/* The 8 x 8 floats in r[0..7] (one row each) transposed in place. */
INLINE void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* panel[s][k][j] = w[n0 + 16 s + j, k0 + k] widened to fp32, for k < kc and every slab s of 16 channels covering
 * [n0, n1); channels from n1 on are 0 (their sums are never stored). */
INLINE void pack_panel(const void *w, ptrdiff_t K, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t k0, ptrdiff_t kc, int kind,
                       float *panel) {
    const ptrdiff_t groups = (n1 - n0 + PACK_NR - 1) / PACK_NR * 2; /* of 8 channels, both halves of every slab */
    for (ptrdiff_t g = 0; g < groups; g++) {
        float *dst = panel + (g / 2) * kc * PACK_NR + (g % 2) * 8;
        const ptrdiff_t c0 = n0 + g * 8;
        const int have = n1 - c0 >= 8 ? 8 : n1 - c0 > 0 ? (int)(n1 - c0) : 0;
        ptrdiff_t k = 0;
        if (have == 8)
            for (; k + 8 <= kc; k += 8) {
                __m256 r[8];
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++) r[j] = load8(w, (c0 + j) * K + k0 + k, kind);
                transpose8(r);
#pragma GCC unroll 8
                for (int t = 0; t < 8; t++) _mm256_store_ps(dst + (k + t) * PACK_NR, r[t]);
            }
        for (; k < kc; k++)
            for (int j = 0; j < 8; j++) dst[k * PACK_NR + j] = j < have ? load1(w, (c0 + j) * K + k0 + k, kind) : 0.0f;
    }
}

/* c[0:MT, 0:16] = (first ? 0 : c) + x[0:MT, 0:kc] . panel[0:kc, 0:16]; rows of x are K apart, rows of c cs. */
INLINE void micro(const float *x, ptrdiff_t K, const float *panel, ptrdiff_t kc, float *c, ptrdiff_t cs, int MT,
                  int first) {
    __m256 a0[PACK_MR], a1[PACK_MR];
#pragma GCC unroll 6
    for (int i = 0; i < MT; i++) {
        a0[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * cs);
        a1[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * cs + 8);
    }
    for (ptrdiff_t k = 0; k < kc; k++) {
        const __m256 b0 = _mm256_load_ps(panel + k * PACK_NR), b1 = _mm256_load_ps(panel + k * PACK_NR + 8);
#pragma GCC unroll 6
        for (int i = 0; i < MT; i++) {
            const __m256 a = _mm256_broadcast_ss(x + i * K + k);
            a0[i] = _mm256_fmadd_ps(a, b0, a0[i]);
            a1[i] = _mm256_fmadd_ps(a, b1, a1[i]);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MT; i++) {
        _mm256_storeu_ps(c + i * cs, a0[i]);
        _mm256_storeu_ps(c + i * cs + 8, a1[i]);
    }
}

/* gemm.h's block() for many rows: out[0:M, n0:n1] (n1 - n0 <= TASK_CHANNELS) through packed panels. Returns 0, or
 * -1 when this thread's scratch could not be allocated (the caller then tiles over the weight as stored). */
INLINE int block_packed(const float *x, ptrdiff_t M, ptrdiff_t K, const void *w, ptrdiff_t n0, ptrdiff_t n1, int kind,
                        const Epilogue *e) {
    const ptrdiff_t width = (n1 - n0 + PACK_NR - 1) / PACK_NR * PACK_NR, kc_max = K < PACK_KC ? K : PACK_KC;
    float *panel = pack_scratch((size_t)(width * kc_max + M * width));
    if (!panel) return -1;
    float *c = panel + width * kc_max; /* the sums so far, [M][width] */
    for (ptrdiff_t k0 = 0; k0 < K; k0 += PACK_KC) {
        const ptrdiff_t kc = K - k0 < PACK_KC ? K - k0 : PACK_KC;
        const int first = k0 == 0;
        pack_panel(w, K, n0, n1, k0, kc, kind, panel);
        for (ptrdiff_t s = 0; s < width / PACK_NR; s++) {
            const float *p = panel + s * kc * PACK_NR;
            ptrdiff_t m = 0;
            for (; m + PACK_MR <= M; m += PACK_MR)
                micro(x + m * K + k0, K, p, kc, c + m * width + s * PACK_NR, width, PACK_MR, first);
            const float *xm = x + m * K + k0;
            float *cm = c + m * width + s * PACK_NR;
            switch (M - m) { /* the last rows: a constant tile height each, so the accumulators stay in registers */
            case 1: micro(xm, K, p, kc, cm, width, 1, first); break;
            case 2: micro(xm, K, p, kc, cm, width, 2, first); break;
            case 3: micro(xm, K, p, kc, cm, width, 3, first); break;
            case 4: micro(xm, K, p, kc, cm, width, 4, first); break;
            case 5: micro(xm, K, p, kc, cm, width, 5, first); break;
            default: break;
            }
        }
    }
    for (ptrdiff_t m = 0; m < M; m++) {
        ptrdiff_t n = n0;
        for (; n + 8 <= n1; n += 8) finish8(e, m, n, _mm256_loadu_ps(c + m * width + n - n0));
        for (; n < n1; n++) finish(e, m, n, c[m * width + n - n0]);
    }
    return 0;
}

#endif /* AF3_MANY_ROWS_H */
