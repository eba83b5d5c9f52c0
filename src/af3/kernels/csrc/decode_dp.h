/* Part of attention.c (included by it where the tiles are emulated: AVX512-BF16 without AMX): the decoding attention
 * written for pair dot products directly, in place of the AMX kernel over emulated tiles.
 *
 * Why: over emulated tiles each 16 x 16 tile product copies its tiles through memory, the probabilities are
 * transposed by gathers, and the keys' products run 16 query lanes wide. On a 2-vCPU EPYC Zen 4, 8 rows of 14/2
 * heads over 850 cached keys took 0.30 ms a layer that way, 0.25 in the fused step's generic attention.
 *
 * Per row and kv head, with its rep = H / G queries (rep <= 16) and its n valid keys:
 * - scores, one lane per query: for each pair of dimensions p, a broadcast of key s's pair times the queries' pairs
 *   (packed once: lane j = query j's pair p) adds into key s's accumulator, 16 keys at a time; the keys are read
 *   where they lie in the cache;
 * - softmax down the keys, one lane per query, in fp32; the probabilities of keys 2c and 2c + 1 rounded to bf16 and
 *   packed as one 32-bit pair per query;
 * - p v, one lane per dimension: the values of keys 2c and 2c + 1 interleaved into pairs (32 dimensions at a time),
 *   times the broadcast probability pair of each query (at most 8 queries at a time, 16 accumulators).
 * The arithmetic is the AMX kernel's: products of bf16 values summed in fp32 (in another order), exp in fp32,
 * probabilities rounded to bf16 for the product with v while their sum stays fp32, the output divided by that sum
 * and rounded once. */
#ifndef AF3_DECODE_DP_H
#define AF3_DECODE_DP_H

/* The 32-bit word at p (two bf16 values) in all 16 lanes. */
INLINE __m512bh pair_bcast(const uint16_t *p) {
    int32_t w;
    memcpy(&w, p, sizeof w);
    return (__m512bh)_mm512_set1_epi32(w);
}

/* Scores of keys s0 .. s0 + cnt - 1 (cnt <= 16) against the packed queries qp [Dh / 2][16]: st[s] lane j = q_j . k_s
 * (unscaled). The full blocks unroll over their 16 keys. */
INLINE void dp_scores(const uint16_t *kh, ptrdiff_t ks, ptrdiff_t s0, ptrdiff_t cnt, const uint32_t *qp,
                      ptrdiff_t pairs, float *st) {
    if (cnt == 16) {
        __m512 acc[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (ptrdiff_t p = 0; p < pairs; p++) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + p * 16);
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbf16_ps(acc[i], pair_bcast(kh + (s0 + i) * ks + 2 * p), qv);
        }
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) _mm512_storeu_ps(st + (s0 + i) * 16, acc[i]);
        return;
    }
    for (ptrdiff_t i = 0; i < cnt; i++) {
        __m512 acc = _mm512_setzero_ps();
        for (ptrdiff_t p = 0; p < pairs; p++)
            acc = _mm512_dpbf16_ps(acc, pair_bcast(kh + (s0 + i) * ks + 2 * p),
                                   (__m512bh)_mm512_loadu_si512(qp + p * 16));
        _mm512_storeu_ps(st + (s0 + i) * 16, acc);
    }
}

/* o = P v for queries j0 .. j0 + JN - 1 (JN <= 8) and dimensions d0 .. d0 + 31, over the key pairs pw [pairs][16]
 * (lane j: query j's probabilities of keys 2c and 2c + 1), divided by each query's sum and rounded to bf16 into
 * out (query j's row at out + j * os). Keys at and past n (the odd last pair's second) count as zero values. */
INLINE void dp_values(const uint16_t *vh, ptrdiff_t vs, ptrdiff_t n, const uint32_t *pw, ptrdiff_t j0, const int JN,
                      ptrdiff_t d0, const float *sum, uint16_t *out, ptrdiff_t os, __m512i lo_idx, __m512i hi_idx) {
    __m512 acc[8][2];
#pragma GCC unroll 8
    for (int j = 0; j < JN; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    for (ptrdiff_t c = 0; 2 * c < n; c++) {
        const __m512i r0 = _mm512_loadu_si512(vh + 2 * c * vs + d0);
        const __m512i r1 = 2 * c + 1 < n ? _mm512_loadu_si512(vh + (2 * c + 1) * vs + d0) : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(r0, lo_idx, r1);
        const __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(r0, hi_idx, r1);
#pragma GCC unroll 8
        for (int j = 0; j < JN; j++) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int32_t)pw[c * 16 + j0 + j]);
            acc[j][0] = _mm512_dpbf16_ps(acc[j][0], w, lo);
            acc[j][1] = _mm512_dpbf16_ps(acc[j][1], w, hi);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < JN; j++) {
        const float s = sum[j0 + j];
        const __m512 inv = _mm512_set1_ps(s > 0 ? 1.0f / s : 0.0f);
        uint16_t *dst = out + (j0 + j) * os + d0;
        _mm256_storeu_si256((__m256i *)dst, bf16x16_from(_mm512_mul_ps(acc[j][0], inv), 1));
        _mm256_storeu_si256((__m256i *)(dst + 16), bf16x16_from(_mm512_mul_ps(acc[j][1], inv), 1));
    }
}

/* af3_decode_attention's contract (attention.c), which has checked the shapes: rep = H / G <= 16, Dh % 32 == 0. */
static int decode_attention_dp(const uint16_t *q, const int64_t *q_strides, const uint16_t *k,
                               const int64_t *k_strides, const uint16_t *v, const int64_t *v_strides, uint16_t *out,
                               const int64_t *o_strides, int64_t B, int64_t H, int64_t G, int64_t S, int64_t Dh,
                               const int64_t *kv_len, float scale, int threads) {
    const ptrdiff_t rep = H / G, pairs = Dh / 2, key_pairs = (S + 1) / 2;
    /* per thread, in floats: packed queries [pairs][16], scores [S][16], probability pairs [key_pairs][16] */
    const ptrdiff_t per = (pairs + S + key_pairs) * 16;
    float *work = (float *)aligned_alloc(64, ((size_t)(threads * per) * 4 + 63) / 64 * 64);
    if (!work) return -2;
    __m512i lo_idx, hi_idx; /* attention.c's pair_indices */
    pair_indices(&lo_idx, &hi_idx);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (ptrdiff_t task = 0; task < B * G; task++) {
#ifdef _OPENMP
        float *mine = work + (ptrdiff_t)omp_get_thread_num() * per;
#else
        float *mine = work;
#endif
        uint32_t *qp = (uint32_t *)mine, *pw = (uint32_t *)(mine + (pairs + S) * 16);
        float *st = mine + pairs * 16;
        const ptrdiff_t b = task / G, g = task % G;
        ptrdiff_t n = kv_len ? kv_len[b] : S;
        if (n > S) n = S;
        const uint16_t *kh = k + b * k_strides[0] + g * k_strides[1];
        const uint16_t *vh = v + b * v_strides[0] + g * v_strides[1];
        uint16_t *ob = out + b * o_strides[0] + g * rep * o_strides[1];
        if (n < 1) { /* no key: zeros (the caller never asks for this) */
            for (ptrdiff_t j = 0; j < rep; j++) memset(ob + j * o_strides[1], 0, (size_t)Dh * 2);
            continue;
        }
        for (ptrdiff_t p = 0; p < pairs; p++) /* lane j: query j's dimensions 2p, 2p + 1 (zero past rep) */
            for (ptrdiff_t j = 0; j < 16; j++) {
                uint32_t w = 0;
                if (j < rep) memcpy(&w, q + b * q_strides[0] + (g * rep + j) * q_strides[1] + 2 * p, sizeof w);
                qp[p * 16 + j] = w;
            }
        for (ptrdiff_t s0 = 0; s0 < n; s0 += 16)
            dp_scores(kh, k_strides[2], s0, n - s0 < 16 ? n - s0 : 16, qp, pairs, st);
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (ptrdiff_t s = 0; s < n; s++) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(st + s * 16));
        const __m512 shift = _mm512_mul_ps(vmax, _mm512_set1_ps(-scale)), vscale = _mm512_set1_ps(scale);
        __m512 total = _mm512_setzero_ps();
        for (ptrdiff_t c = 0; 2 * c < n; c++) { /* probabilities, summed in fp32, packed as bf16 pairs of keys */
            const __m512 p0 = exp16_nonpositive(_mm512_fmadd_ps(_mm512_loadu_ps(st + 2 * c * 16), vscale, shift));
            __m512 p1 = _mm512_setzero_ps();
            if (2 * c + 1 < n)
                p1 = exp16_nonpositive(_mm512_fmadd_ps(_mm512_loadu_ps(st + (2 * c + 1) * 16), vscale, shift));
            total = _mm512_add_ps(total, _mm512_add_ps(p0, p1));
            const __m512i w0 = _mm512_cvtepu16_epi32(bf16x16_from(p0, 0));
            const __m512i w1 = _mm512_cvtepu16_epi32(bf16x16_from(p1, 0));
            _mm512_storeu_si512(pw + c * 16, _mm512_or_si512(w0, _mm512_slli_epi32(w1, 16)));
        }
        float sum[16];
        _mm512_storeu_ps(sum, total);
        for (ptrdiff_t j0 = 0; j0 < rep; j0 += 8)
            for (ptrdiff_t d0 = 0; d0 < Dh; d0 += 32)
                switch (rep - j0 >= 8 ? 8 : rep - j0) {
#define DP_VALUES(JN) \
    case JN: dp_values(vh, v_strides[2], n, pw, j0, JN, d0, sum, ob, o_strides[1], lo_idx, hi_idx); break;
                    DP_VALUES(1) DP_VALUES(2) DP_VALUES(3) DP_VALUES(4) DP_VALUES(5) DP_VALUES(6) DP_VALUES(7)
                    DP_VALUES(8)
#undef DP_VALUES
                }
    }
    free(work);
    return 0;
}
#endif /* AF3_DECODE_DP_H */
