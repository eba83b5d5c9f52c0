/* Part of attention.c (included by it where the tiles are emulated: AVX512-BF16 without AMX): the decoding attention
 * written for pair dot products directly, in place of the AMX kernel over emulated tiles.
 *
 * Why: over emulated tiles each 16 x 16 tile product copies its tiles through memory, the probabilities are
 * transposed by gathers, and the keys' products run 16 query lanes wide. On a 2-vCPU EPYC Zen 4, 8 rows of 14/2
 * heads over 850 cached keys took 0.30 ms a layer that way, 0.25 in the fused step's generic attention.
 *
 * Per row and kv head, with its rep = H / G queries (rep <= 16) and its n valid keys:
 * - scores, one lane per key: each block of 16 keys is transposed into pairs of dimensions (row p: the 16 keys'
 *   dimensions 2p, 2p + 1, amx.h's transpose_pairs), then for each query and pair p a broadcast of the query's pair
 *   times row p adds into the query's 16 scores (two sums per query, even and odd pairs, so that enough dependency
 *   chains are in flight). All 16 lanes do work whatever rep is: with one lane per query instead, grouped heads of
 *   7 queries filled 7 of the 16 (8 rows of 14/2 heads, Dh 64, ms a layer, that way / this way: over 850 keys
 *   0.146-0.148 / 0.104-0.109, over 3000 0.48 / 0.33, one row over 850 0.031 / 0.026);
 * - softmax along each query's row of scores in fp32; the probabilities rounded to bf16 in key order, so that keys
 *   2c and 2c + 1 form the 32-bit pair c of the query's row;
 * - p v, one lane per dimension: the values of keys 2c and 2c + 1 interleaved into pairs (32 dimensions at a time),
 *   times the broadcast probability pair of each query (at most 8 queries at a time, 16 accumulators).
 * The arithmetic is the AMX kernel's: products of bf16 values summed in fp32 (in another order), exp in fp32,
 * probabilities rounded to bf16 for the product with v while their sum stays fp32, the output divided by that sum
 * and rounded once. */
#ifndef AF3_DECODE_DP_H
#define AF3_DECODE_DP_H

/* p v runs over a head's values in blocks of VALUE_PAIRS key pairs (8 KB of values at Dh 64) when they are more than
 * VALUE_SPAN bytes (half of a Zen 4 core's L2), so that its passes (32 dimensions and 8 queries at a time) after the
 * first read a block from L1; smaller heads run in one block (a block's sums go through memory between blocks). 8
 * rows of 14/2 heads, Dh 64, ms a layer: over 7500 keys 1.36 in blocks of 32 pairs, 1.43 of 64, 1.57 in one; over
 * 850 keys 0.114, 0.111, 0.107; over 3000 0.348, 0.338, 0.331. */
#define VALUE_PAIRS 32
#define VALUE_SPAN (512 << 10)

/* While the scores of a block of keys are worked out, the keys KV_AHEAD slots on are prefetched into L1 and, where
 * the head's values fit in VALUE_SPAN, their values into L2 for p v. In a decoding step each layer's cache comes
 * from memory: 8 rows of 14/2 heads, Dh 64, 24 layers' caches in turn, 850 keys: 5.39 ms against 6.72 without (32
 * slots ahead; 64: 5.05 against 5.60, 128: 5.27), 3000 keys 16.2 against 22.9; 1 row 1.15 against 1.20 (Zen 4). */
#define KV_AHEAD 32

/* Scores of keys s0 .. s0 + cnt - 1 (cnt <= 16) for queries j0 .. j0 + JN - 1 (JN <= 8): st[j * sst + s0 + i] =
 * q_j . k_(s0 + i) (unscaled; lanes past cnt are not stored). kt [pairs][16]: the block's keys as pairs of
 * dimensions; qw [rep][pairs]: each query's pairs. */
INLINE void dp_scores(const uint32_t *kt, const uint32_t *qw, ptrdiff_t pairs, ptrdiff_t j0, const int JN,
                      ptrdiff_t s0, ptrdiff_t cnt, float *st, ptrdiff_t sst) {
    __m512 acc[8][2];
#pragma GCC unroll 8
    for (int j = 0; j < JN; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    for (ptrdiff_t p = 0; p < pairs; p += 2) {
        const __m512bh k0 = (__m512bh)_mm512_load_si512(kt + p * 16);
        const __m512bh k1 = (__m512bh)_mm512_load_si512(kt + p * 16 + 16);
#pragma GCC unroll 8
        for (int j = 0; j < JN; j++) {
            DP_PAIR_AT(acc[j][0], qw + (j0 + j) * pairs + p, k0);
            DP_PAIR_AT(acc[j][1], qw + (j0 + j) * pairs + p + 1, k1);
        }
    }
    const __mmask16 on = lanes(cnt);
#pragma GCC unroll 8
    for (int j = 0; j < JN; j++)
        _mm512_mask_storeu_ps(st + (j0 + j) * sst + s0, on, _mm512_add_ps(acc[j][0], acc[j][1]));
}

/* Key pairs c0 .. c1 - 1 of o = P v for queries j0 .. j0 + JN - 1 (JN <= 8) and dimensions d0 .. d0 + 31, over the
 * probability pairs pw [rep][pws] (word c of query j's row: its probabilities of keys 2c and 2c + 1). The sums start
 * at zero (c0 == 0) or from acc [rep][Dh] and go back there, or, after the last pair (c1 * 2 >= n), are divided by
 * each query's sum and rounded to bf16 into out (query j's row at out + j * os). Keys at and past n (the odd last
 * pair's second) count as zero values. */
INLINE void dp_values(const uint16_t *vh, ptrdiff_t vs, ptrdiff_t n, const uint32_t *pw, ptrdiff_t pws, ptrdiff_t c0,
                      ptrdiff_t c1, ptrdiff_t j0, const int JN, ptrdiff_t d0, ptrdiff_t Dh, float *acc_mem,
                      const float *sum, uint16_t *out, ptrdiff_t os, __m512i lo_idx, __m512i hi_idx) {
    __m512 acc[8][2];
#pragma GCC unroll 8
    for (int j = 0; j < JN; j++) {
        float *a = acc_mem + (j0 + j) * Dh + d0;
        acc[j][0] = c0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(a);
        acc[j][1] = c0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(a + 16);
    }
    for (ptrdiff_t c = c0; c < c1; c++) {
        const __m512i r0 = _mm512_loadu_si512(vh + 2 * c * vs + d0);
        const __m512i r1 = 2 * c + 1 < n ? _mm512_loadu_si512(vh + (2 * c + 1) * vs + d0) : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_permutex2var_epi16(r0, lo_idx, r1);
        const __m512bh hi = (__m512bh)_mm512_permutex2var_epi16(r0, hi_idx, r1);
#pragma GCC unroll 8
        for (int j = 0; j < JN; j++) {
            DP_PAIR_AT(acc[j][0], pw + (j0 + j) * pws + c, lo);
            DP_PAIR_AT(acc[j][1], pw + (j0 + j) * pws + c, hi);
        }
    }
    if (2 * c1 < n) {
#pragma GCC unroll 8
        for (int j = 0; j < JN; j++) {
            float *a = acc_mem + (j0 + j) * Dh + d0;
            _mm512_store_ps(a, acc[j][0]);
            _mm512_store_ps(a + 16, acc[j][1]);
        }
        return;
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

/* Each query's softmax over its n scores (row j at st + j * sst, unscaled): the probabilities exp(scale * s - max),
 * rounded to bf16 into row j of pb (pbs elements apart; a zero after an odd n's last, so that its pair is whole),
 * their fp32 sum into sum[j]. */
INLINE void dp_softmax(const float *st, ptrdiff_t sst, ptrdiff_t rep, ptrdiff_t n, float scale, uint16_t *pb,
                       ptrdiff_t pbs, float *sum) {
    for (ptrdiff_t j = 0; j < rep; j++) {
        const float *row = st + j * sst;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (ptrdiff_t s = 0; s < n; s += 16)
            vmax = _mm512_mask_max_ps(vmax, lanes(n - s), vmax, _mm512_loadu_ps(row + s));
        const __m512 shift = _mm512_set1_ps(-_mm512_reduce_max_ps(vmax) * scale), vscale = _mm512_set1_ps(scale);
        __m512 total = _mm512_setzero_ps();
        uint16_t *pr = pb + j * pbs;
        for (ptrdiff_t s = 0; s < n; s += 16) {
            const __mmask16 on = lanes(n - s);
            const __m512 x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(on, row + s), vscale, shift);
            const __m512 p = _mm512_maskz_mov_ps(on, exp16_nonpositive(x));
            total = _mm512_add_ps(total, p);
            _mm256_mask_storeu_epi16(pr + s, on, bf16x16_from(p, 0));
        }
        if (n % 2) pr[n] = 0;
        sum[j] = _mm512_reduce_add_ps(total);
    }
}

/* af3_decode_attention's contract (attention.c), which has checked the shapes: rep = H / G <= 16, Dh % 32 == 0. */
static int decode_attention_dp(const uint16_t *q, const int64_t *q_strides, const uint16_t *k,
                               const int64_t *k_strides, const uint16_t *v, const int64_t *v_strides, uint16_t *out,
                               const int64_t *o_strides, int64_t B, int64_t H, int64_t G, int64_t S, int64_t Dh,
                               const int64_t *kv_len, float scale, int threads) {
    const ptrdiff_t rep = H / G, pairs = Dh / 2, sst = (S + 15) & ~(ptrdiff_t)15, pbs = sst + 32;
    /* per thread, in 4-byte words: p v's sums [rep][Dh], the block's keys as pairs [pairs][16], the queries' pairs
     * [rep][pairs], scores [rep][sst], probabilities [rep][pbs] bf16; each thread's part and the parts up to the
     * scores start on 64 bytes */
    const ptrdiff_t qwords = (rep * pairs + 15) & ~(ptrdiff_t)15;
    const ptrdiff_t per = (rep * Dh + pairs * 16 + qwords + rep * sst + rep * pbs / 2 + 15) & ~(ptrdiff_t)15;
    float *work = (float *)aligned_alloc(64, (size_t)(threads * per) * 4);
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
        float *acc = mine;
        uint32_t *kt = (uint32_t *)(acc + rep * Dh), *qw = kt + pairs * 16;
        float *st = (float *)(qw + qwords);
        uint16_t *pb = (uint16_t *)(st + rep * sst);
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
        for (ptrdiff_t j = 0; j < rep; j++) /* query j's pairs of dimensions, one 32-bit word each */
            memcpy(qw + j * pairs, q + b * q_strides[0] + (g * rep + j) * q_strides[1], (size_t)Dh * 2);
        const int values_ahead = n * Dh * 2 <= VALUE_SPAN; /* (they stay in L2 until p v reads them) */
        for (ptrdiff_t s0 = 0; s0 < n; s0 += 16) {
            const ptrdiff_t cnt = n - s0 < 16 ? n - s0 : 16;
            for (ptrdiff_t r = s0 + KV_AHEAD; r < s0 + KV_AHEAD + 16 && r < n; r++)
                for (ptrdiff_t line = 0; line < Dh * 2; line += 64) {
                    _mm_prefetch((const char *)(kh + r * k_strides[2]) + line, _MM_HINT_T0);
                    if (values_ahead) _mm_prefetch((const char *)(vh + r * v_strides[2]) + line, _MM_HINT_T1);
                }
            for (ptrdiff_t dc = 0; dc < Dh / 32; dc++) /* 16 pairs of dimensions at a time, zero rows past cnt */
                transpose_pairs(kh + s0 * k_strides[2] + dc * 32, k_strides[2], cnt, (uint16_t *)(kt + dc * 256));
            for (ptrdiff_t j0 = 0; j0 < rep; j0 += 8)
                switch (rep - j0 >= 8 ? 8 : rep - j0) {
#define DP_SCORES(JN) case JN: dp_scores(kt, qw, pairs, j0, JN, s0, cnt, st, sst); break;
                    DP_SCORES(1) DP_SCORES(2) DP_SCORES(3) DP_SCORES(4) DP_SCORES(5) DP_SCORES(6) DP_SCORES(7)
                    DP_SCORES(8)
#undef DP_SCORES
                }
        }
        float sum[16];
        dp_softmax(st, sst, rep, n, scale, pb, pbs, sum);
        const ptrdiff_t key_pairs = (n + 1) / 2, block = n * Dh * 2 > VALUE_SPAN ? VALUE_PAIRS : key_pairs;
        for (ptrdiff_t c0 = 0; c0 < key_pairs; c0 += block) {
            const ptrdiff_t c1 = c0 + block < key_pairs ? c0 + block : key_pairs;
            for (ptrdiff_t j0 = 0; j0 < rep; j0 += 8)
                for (ptrdiff_t d0 = 0; d0 < Dh; d0 += 32)
                    switch (rep - j0 >= 8 ? 8 : rep - j0) {
#define DP_VALUES(JN) \
    case JN: dp_values(vh, v_strides[2], n, (const uint32_t *)pb, pbs / 2, c0, c1, j0, JN, d0, Dh, acc, sum, ob, \
                       o_strides[1], lo_idx, hi_idx); \
        break;
                        DP_VALUES(1) DP_VALUES(2) DP_VALUES(3) DP_VALUES(4) DP_VALUES(5) DP_VALUES(6) DP_VALUES(7)
                        DP_VALUES(8)
#undef DP_VALUES
                    }
        }
    }
    free(work);
    return 0;
}
#endif /* AF3_DECODE_DP_H */
