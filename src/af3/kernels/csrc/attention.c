/* Attention over many queries (a prefill, the audio encoder) with AMX tiles: out = softmax(scale * q k^T + mask) v
 * for bf16 q, k, v, in blocks of 16 queries and chunks of CH keys with an online softmax (flash attention).
 *
 * Why: torch's CPU flash attention multiplies bf16 blocks through generic GEMM calls (AMX packing is only taken for
 * fp16), and on a 2-vCPU Xeon a 30 s window's encoder attention (8 heads, 1500 positions) or a decoder prefill's
 * (14 heads, 800 positions) ran at 0.3-0.5 TFLOP/s. Here q k^T and p v are AMX tile products (bf16 in, fp32
 * accumulators), the keys and values are packed once per key/value head into the tiles' pair-interleaved layout, and
 * the softmax runs in AVX-512 on fp32 scores. The tile products of the next chunk's scores and of the previous
 * chunk's p v are issued between the rows of a chunk's softmax, so that the tile unit works while the vector units do
 * (done one after the other, the two took as long as their sum; benchmarks/README.md). The math is torch's: scores
 * in fp32, exp in fp32, probabilities rounded to bf16 for the product with v while their sum stays fp32, the output
 * divided by that sum and rounded once.
 *
 * Masks: `causal` (query i, at position q_start + i, sees keys 0 .. q_start + i) and a per-batch count of valid keys
 * (`kv_len`, keys beyond it are padding). Grouped-query heads: head h reads key/value head h / (H / G).
 *
 * Built where the compiler targets AMX-BF16 and AVX-512 (-march=native on such a CPU); where it targets AVX512-BF16
 * without AMX, the many-query kernel runs over tiles emulated with pair dot products (amx_emul.h) and the decoding
 * kernel is written in pair dot products directly (decode_dp.h); elsewhere af3_attention_level() is 0 and af3 keeps
 * torch's SDPA.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"

#if (defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__linux__)) \
    || defined(__AVX512BF16__)
#include <immintrin.h>
#include <math.h>

#if !(defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__))
#include "amx_emul.h" /* AVX512-BF16 without AMX: the same kernels over emulated tiles */
#endif
#include "amx.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Keys per softmax chunk (a multiple of 32). Over emulated tiles 256: the chunk's fixed work (each query's rescale
 * of its output, the output tiles' loads and stores) runs on the same vector units as the products (5-minute prefill
 * shape 0.96x the time of 128 on a Zen 4; 512 was no better). */
#ifdef AF3_AMX_EMULATED
#define CH 256
#else
#define CH 128
#endif
#define QB 16        /* queries per block: one tile's rows */
#define LOG2E 1.44269504f
#define TILE 512     /* bf16 elements in one 16 x 64-byte tile */

/* 1: AMX tiles; 2: tiles emulated with AVX512-BF16 (amx_emul.h). */
#ifdef AF3_AMX_EMULATED
int af3_attention_level(void) { return 2; }
#else
int af3_attention_level(void) { return 1; }
#endif

/* The first min(count, 16) lanes. */
static inline __mmask16 lanes(ptrdiff_t count) {
    return count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1);
}

/* Keys of one head [S, Dh] (rows ks apart) into B tiles of q k^T: tile (dc, kc) holds, for the 16 dimension pairs
 * p of dimension chunk dc (32 dims) and the 16 keys n of key chunk kc, k[n][2p], k[n][2p + 1] side by side. Keys
 * past S are zero. `chunks` = key chunks of 16 (padded S / 16). */
static void pack_keys(const uint16_t *k, ptrdiff_t ks, ptrdiff_t S, ptrdiff_t Dh, ptrdiff_t chunks, uint16_t *dst) {
    for (ptrdiff_t dc = 0; dc < Dh / 32; dc++)
        for (ptrdiff_t kc = 0; kc < chunks; kc++) {
            const ptrdiff_t keys = S - kc * 16 < 16 ? S - kc * 16 : 16; /* 0 or fewer: an all-zero tile */
            transpose_pairs(k + kc * 16 * ks + dc * 32, ks, keys, dst + (dc * chunks + kc) * TILE);
        }
}

/* Values of one head [S, Dh] into B tiles of p v: tile (kc, dc) holds, for the 16 key pairs p of key chunk kc (32
 * keys) and the 16 dimensions d of dimension chunk dc, v[2p][d], v[2p + 1][d] side by side. Keys past S are zero.
 * `chunks` = key chunks of 32. */
static void pack_values(const uint16_t *v, ptrdiff_t vs, ptrdiff_t S, ptrdiff_t Dh, ptrdiff_t chunks, uint16_t *dst) {
    __m512i pairs; /* lanes 2d and 2d + 1 take element d of the low and of the high half */
    {
        uint16_t idx[32];
        for (int d = 0; d < 16; d++) idx[2 * d] = (uint16_t)d, idx[2 * d + 1] = (uint16_t)(16 + d);
        pairs = _mm512_loadu_si512(idx);
    }
    for (ptrdiff_t kc = 0; kc < chunks; kc++)
        for (ptrdiff_t dc = 0; dc < Dh / 16; dc++) {
            uint16_t *t = dst + (kc * (Dh / 16) + dc) * TILE;
            if (kc * 32 + 32 <= S) { /* 32 whole keys: each tile row interleaves two keys' 16 values */
                for (ptrdiff_t p = 0; p < 16; p++) {
                    const uint16_t *a = v + (kc * 32 + 2 * p) * vs + dc * 16;
                    const __m256i lo = _mm256_loadu_si256((const __m256i *)a);
                    const __m512i two = _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                                                           _mm256_loadu_si256((const __m256i *)(a + vs)), 1);
                    _mm512_storeu_si512(t + p * 32, _mm512_permutexvar_epi16(pairs, two));
                }
                continue;
            }
            for (ptrdiff_t p = 0; p < 16; p++)
                for (int e = 0; e < 2; e++) {
                    const ptrdiff_t key = kc * 32 + 2 * p + e;
                    for (ptrdiff_t d = 0; d < 16; d++) t[p * 32 + d * 2 + e] = key < S ? v[key * vs + dc * 16 + d] : 0;
                }
        }
}

/* 2^x for x <= 0 (-inf lanes come out NaN: callers mask them): 2^n * p(r), n = round(x), r = x - n in [-1/2, 1/2],
 * p the Taylor polynomial of 2^r = e^(r ln 2) to degree EXP2_DEGREE (relative error ~2.4e-6 at 5, ~1.2e-7 at 6;
 * the probabilities are rounded to bf16, 2^-9, before they multiply v). One multiply and two subtractions fewer
 * than exp16_nonpositive: the softmax's scale and shift take log2(e) in. */
#ifndef EXP2_DEGREE
#define EXP2_DEGREE 6
#endif
static inline __m512 exp2_nonpositive(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(x, n);
    static const float c[] = {1.0f, 0.693147181f, 0.240226507f, 0.0555041087f, 0.00961812911f, 0.00133335581f,
                              0.000154035304f};
    __m512 p = _mm512_set1_ps(c[EXP2_DEGREE]);
    for (int i = EXP2_DEGREE - 1; i >= 0; i--) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

/* Groups of 32 keys of the chunk starting at s0 that hold keys below `end` (the pack is zero past S). */
static inline ptrdiff_t groups32(ptrdiff_t end, ptrdiff_t s0) {
    const ptrdiff_t n = end - s0 < CH ? end - s0 : CH;
    return n > 0 ? (n + 31) / 32 : 0;
}

/* One piece of a chunk's scores: keys s0 + 32 grp .. + 31 against dimensions 32 dc .. + 31 of the 16 queries
 * (tiles 0-1 accumulate, 4 holds the queries, 5 the keys); the last dimension piece stores them into sb [16, CH]. */
static inline void score_step(const uint16_t *qbuf, ptrdiff_t Dh, const uint16_t *kt, ptrdiff_t k16, ptrdiff_t s0,
                              ptrdiff_t grp, ptrdiff_t dc, ptrdiff_t halves, float *sb) {
    if (dc == 0) {
        _tile_zero(0);
        _tile_zero(1);
    }
    const uint16_t *kd = kt + (dc * k16 + s0 / 16 + 2 * grp) * TILE;
    _tile_loadd(4, qbuf + dc * 32, Dh * 2);
    _tile_loadd(5, kd, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(5, kd + TILE, 64);
    _tile_dpbf16ps(1, 4, 5);
    if (dc == halves - 1) {
        _tile_stored(0, sb + grp * 32, CH * 4);
        _tile_stored(1, sb + grp * 32 + 16, CH * 4);
    }
}

/* One piece of a chunk's p v: dimensions 32 hf .. + 31 of o [16, Dh] (tiles 2-3, loaded at the first key group and
 * stored at the last) += the probabilities of key group kc (tile 6, from pb [16, CH]) times their values (tile 7). */
static inline void value_step(float *o, ptrdiff_t Dh, const uint16_t *pb, const uint16_t *vt, ptrdiff_t s0,
                              ptrdiff_t hf, ptrdiff_t kc, ptrdiff_t groups) {
    if (kc == 0) {
        _tile_loadd(2, o + hf * 32, Dh * 4);
        _tile_loadd(3, o + hf * 32 + 16, Dh * 4);
    }
    const uint16_t *vb = vt + ((s0 / 32 + kc) * (Dh / 16) + 2 * hf) * TILE;
    _tile_loadd(6, pb + kc * 32, CH * 2);
    _tile_loadd(7, vb, 64);
    _tile_dpbf16ps(2, 6, 7);
    _tile_loadd(7, vb + TILE, 64);
    _tile_dpbf16ps(3, 6, 7);
    if (kc == groups - 1) {
        _tile_stored(2, o + hf * 32, Dh * 4);
        _tile_stored(3, o + hf * 32 + 16, Dh * 4);
    }
}

/* q [B, H, T, Dh], k and v [B, G, S, Dh], out [B, H, T, Dh]: bf16, any strides (in elements, `*_strides` = b, head,
 * position) with Dh contiguous. kv_len [B] (NULL: S for every row). Dh a multiple of 64 (at most 256); H a multiple
 * of G. Returns 0; -1 for shapes it does not take; -2 when work memory could not be allocated; -3 when the OS
 * refuses AMX. */
int af3_attention(const uint16_t *q, const int64_t *q_strides, const uint16_t *k, const int64_t *k_strides,
                  const uint16_t *v, const int64_t *v_strides, uint16_t *out, const int64_t *o_strides, int64_t B,
                  int64_t H, int64_t G, int64_t T, int64_t S, int64_t Dh, const int64_t *kv_len, int causal,
                  int64_t q_start, float scale, int threads) {
    if (B < 1 || H < 1 || G < 1 || H % G || T < 1 || S < 1 || Dh % 64 || Dh > 256 || q_start < 0) return -1;
    if (!amx_permitted()) return -3;
    if (threads < 1) threads = 1;
    const ptrdiff_t rep = H / G, padded = (S + CH - 1) / CH * CH, k16 = padded / 16, k32 = padded / 32;
    const ptrdiff_t per_head = padded * Dh; /* packed elements of one head's keys (and of its values) */
    uint16_t *packed = (uint16_t *)malloc((size_t)(2 * B * G * per_head) * sizeof(uint16_t));
    if (!packed) return -2;
    uint16_t *kp = packed, *vp = packed + B * G * per_head;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (ptrdiff_t t = 0; t < 2 * B * G; t++) {
        const ptrdiff_t bg = t / 2, b = bg / G, g = bg % G;
        if (t % 2 == 0)
            pack_keys(k + b * k_strides[0] + g * k_strides[1], k_strides[2], S, Dh, k16, kp + bg * per_head);
        else
            pack_values(v + b * v_strides[0] + g * v_strides[1], v_strides[2], S, Dh, k32, vp + bg * per_head);
    }
    const ptrdiff_t qblocks = (T + QB - 1) / QB, halves = Dh / 32;
#pragma omp parallel num_threads(threads)
    {
        tiles_on();
        uint16_t qbuf[QB * 256] __attribute__((aligned(64))), pbuf[2][QB * CH] __attribute__((aligned(64)));
        float sbuf[2][QB * CH] __attribute__((aligned(64))), o[QB * 256] __attribute__((aligned(64)));
        float top[QB] __attribute__((aligned(64))), sum[QB], alpha[QB] __attribute__((aligned(64)));
        ptrdiff_t limit[QB];
#pragma omp for schedule(dynamic, 1)
        for (ptrdiff_t task = 0; task < B * H * qblocks; task++) {
            const ptrdiff_t b = task / (H * qblocks), h = task / qblocks % H, qb = task % qblocks;
            const ptrdiff_t g = h / rep, q0 = qb * QB, rows = T - q0 < QB ? T - q0 : QB;
            const uint16_t *kt = kp + (b * G + g) * per_head, *vt = vp + (b * G + g) * per_head;
            for (ptrdiff_t r = 0; r < QB; r++) { /* the block's queries, zero rows past T */
                const uint16_t *src = q + b * q_strides[0] + h * q_strides[1] + (q0 + r) * q_strides[2];
                if (r < rows) memcpy(qbuf + r * Dh, src, (size_t)Dh * 2);
                else memset(qbuf + r * Dh, 0, (size_t)Dh * 2);
                top[r] = -INFINITY;
                sum[r] = 0.0f;
            }
            memset(o, 0, sizeof(float) * (size_t)(QB * Dh));
            ptrdiff_t end = kv_len ? (kv_len[b] < S ? kv_len[b] : S) : S;
            if (causal && q_start + q0 + rows < end) end = q_start + q0 + rows;
            const ptrdiff_t chunks = (end + CH - 1) / CH;
            /* Chunk j's scores (tiles), then its softmax (AVX-512), then p v (tiles): the tile products of chunk
             * j + 1's scores and chunk j - 1's p v are issued between the rows of chunk j's softmax, so that the
             * tile unit and the vector units work at the same time. */
            for (ptrdiff_t i = 0, n = groups32(end, 0); i < n * halves; i++)
                score_step(qbuf, Dh, kt, k16, 0, i / halves, i % halves, halves, sbuf[0]);
            for (ptrdiff_t j = 0; j < chunks; j++) {
                const ptrdiff_t s0 = j * CH, n = end - s0 < CH ? end - s0 : CH;
                const float *sj = sbuf[j % 2];
                uint16_t *pj = pbuf[j % 2];
                const ptrdiff_t nq = j + 1 < chunks ? groups32(end, s0 + CH) * halves : 0;
                const ptrdiff_t pk = j > 0 ? groups32(end, s0 - CH) : 0, np = pk * halves, total = nq + np;
                ptrdiff_t iq = 0, ip = 0;
                __m512 vtop = _mm512_load_ps(top), vmax = _mm512_set1_ps(-INFINITY);
                float block[QB] __attribute__((aligned(64)));
                for (ptrdiff_t r = 0; r < QB; r++) { /* each query's seen keys in this chunk, and their top score */
                    ptrdiff_t lim = r < rows ? n : 0; /* keys s0 + c with c < lim are seen */
                    if (causal && q_start + q0 + r + 1 - s0 < lim) lim = q_start + q0 + r + 1 - s0;
                    limit[r] = lim < 0 ? 0 : lim;
                    __m512 m = _mm512_set1_ps(-INFINITY);
                    for (ptrdiff_t c = 0; c < limit[r]; c += 16)
                        m = _mm512_mask_max_ps(m, lanes(limit[r] - c), m, _mm512_loadu_ps(sj + r * CH + c));
                    /* scale > 0: the scaled maximum is the maximum scaled */
                    block[r] = limit[r] > 0 ? _mm512_reduce_max_ps(m) * scale : -INFINITY;
                }
                vmax = _mm512_max_ps(vtop, _mm512_load_ps(block));
                /* rescale of what was summed so far: 0 where nothing was seen yet */
                const __mmask16 seen = _mm512_cmp_ps_mask(vtop, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                _mm512_store_ps(alpha, _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(vtop, vmax))));
                _mm512_store_ps(top, vmax);
                const __m512 vscale = _mm512_set1_ps(scale * LOG2E);
                for (ptrdiff_t r = 0; r < QB; r++) {
                    for (const ptrdiff_t due = (r + 1) * total / QB; iq + ip < due;) { /* tile work for this row */
                        if (iq < nq && (ip >= np || iq <= ip)) {
                            score_step(qbuf, Dh, kt, k16, s0 + CH, iq / halves, iq % halves, halves, sbuf[(j + 1) % 2]);
                            iq++;
                        } else {
                            value_step(o, Dh, pbuf[(j + 1) % 2], vt, s0 - CH, ip / pk, ip % pk, pk);
                            ip++;
                        }
                    }
                    uint16_t *pr = pj + r * CH;
                    const ptrdiff_t width = groups32(end, s0) * 32;
                    if (top[r] == -INFINITY) { /* nothing seen yet: probabilities 0 */
                        memset(pr, 0, (size_t)width * 2);
                        sum[r] *= alpha[r];
                        continue;
                    }
                    __m512 total_p = _mm512_setzero_ps();
                    const __m512 shift = _mm512_set1_ps(-top[r] * LOG2E);
                    for (ptrdiff_t c = 0; c < width; c += 16) { /* p = exp(scale * s - top), 0 where unseen */
                        const __mmask16 on = c < limit[r] ? lanes(limit[r] - c) : 0;
                        const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(sj + r * CH + c), vscale, shift);
                        const __m512 p = _mm512_maskz_mov_ps(on, exp2_nonpositive(x));
                        total_p = _mm512_add_ps(total_p, p);
                        _mm256_storeu_si256((__m256i *)(pr + c), bf16x16_from(p, 0));
                    }
                    sum[r] = sum[r] * alpha[r] + _mm512_reduce_add_ps(total_p);
                }
                for (ptrdiff_t r = 0; r < QB; r++) /* o (chunk j - 1's products now in it) to this chunk's top */
                    if (alpha[r] != 1.0f)
                        for (ptrdiff_t d = 0; d < Dh; d += 16)
                            _mm512_storeu_ps(o + r * Dh + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * Dh + d),
                                                                           _mm512_set1_ps(alpha[r])));
            }
            if (chunks > 0) { /* the last chunk's p v */
                const ptrdiff_t pk = groups32(end, (chunks - 1) * CH);
                for (ptrdiff_t i = 0; i < pk * halves; i++)
                    value_step(o, Dh, pbuf[(chunks - 1) % 2], vt, (chunks - 1) * CH, i / pk, i % pk, pk);
            }
            for (ptrdiff_t r = 0; r < rows; r++) {
                uint16_t *dst = out + b * o_strides[0] + h * o_strides[1] + (q0 + r) * o_strides[2];
                const __m512 inv = _mm512_set1_ps(sum[r] > 0 ? 1.0f / sum[r] : 0.0f);
                for (ptrdiff_t d = 0; d < Dh; d += 16) {
                    const __m512 scaled = _mm512_mul_ps(_mm512_load_ps(o + r * Dh + d), inv);
                    _mm256_storeu_si256((__m256i *)(dst + d), bf16x16_from(scaled, 1));
                }
            }
        }
        _tile_release();
    }
    free(packed);
    return 0;
}

/* _mm512_permutex2var_epi16 indices that interleave two rows of 32 values r0, r1 into pairs (r0[d], r1[d]): *lo for
 * dims 0-15, *hi for 16-31 (the values of two keys as a pair operand). */
static inline void pair_indices(__m512i *lo, __m512i *hi) {
    uint16_t a[32], b[32];
    for (int j = 0; j < 16; j++) {
        a[2 * j] = (uint16_t)j, a[2 * j + 1] = (uint16_t)(32 + j);
        b[2 * j] = (uint16_t)(16 + j), b[2 * j + 1] = (uint16_t)(48 + j);
    }
    *lo = _mm512_loadu_si512(a);
    *hi = _mm512_loadu_si512(b);
}

#ifdef AF3_AMX_EMULATED
#include "decode_dp.h" /* the decoding attention in pair dot products, where the tiles would be emulated */
#endif

/* Decoding attention: one query per row and head. q [B, H, Dh] and out [B, H, Dh] (strides b, head), key/value
 * caches [B, G, S, Dh] (strides b, head, slot; Dh contiguous), kv_len [B]: the valid keys of each row, a prefix.
 * Per row and kv head, the rep = H / G queries that share it: scores as S^T = K Q^T (the A operand is 16 cached keys
 * read straight from the cache, B the queries packed once), softmax over the keys with one lane per query, the
 * probabilities transposed into the A operand of O = P V, and V interleaved by key pairs into B tiles. rep <= 16, Dh
 * a multiple of 32 up to 256. Returns 0, -1 for shapes it does not take, -2 without memory, -3 without AMX. Where the
 * tiles would be emulated, decode_dp.h does the same in pair dot products. */
int af3_decode_attention(const uint16_t *q, const int64_t *q_strides, const uint16_t *k, const int64_t *k_strides,
                         const uint16_t *v, const int64_t *v_strides, uint16_t *out, const int64_t *o_strides,
                         int64_t B, int64_t H, int64_t G, int64_t S, int64_t Dh, const int64_t *kv_len, float scale,
                         int threads) {
    if (B < 1 || G < 1 || H % G || H / G > 16 || S < 1 || Dh % 32 || Dh > 256) return -1;
#ifdef AF3_AMX_EMULATED
    return decode_attention_dp(q, q_strides, k, k_strides, v, v_strides, out, o_strides, B, H, G, S, Dh, kv_len, scale,
                               threads < 1 ? 1 : threads);
#endif
    if (!amx_permitted()) return -3;
    if (threads < 1) threads = 1;
    const ptrdiff_t rep = H / G, padded = (S + 31) & ~(ptrdiff_t)31;
    /* per thread: packed queries, scores [padded, 16], probabilities [16, padded], packed values, o [16, Dh], a
     * zero-padded block of 16 keys */
    const ptrdiff_t per = (Dh / 32) * TILE + padded * 16 * 2 + 16 * padded + padded * Dh + 16 * Dh * 2 + 16 * Dh;
    uint16_t *work = (uint16_t *)aligned_alloc(64, ((size_t)(threads * per) * 2 + 63) / 64 * 64);
    if (!work) return -2;
    __m512i lo_idx, hi_idx;
    pair_indices(&lo_idx, &hi_idx);
#pragma omp parallel num_threads(threads)
    {
        tiles_on();
#ifdef _OPENMP
        uint16_t *mine = work + (ptrdiff_t)omp_get_thread_num() * per;
#else
        uint16_t *mine = work;
#endif
        uint16_t *qb = mine;
        float *st = (float *)(qb + (Dh / 32) * TILE);
        uint16_t *pb = (uint16_t *)(st + padded * 16), *vb = pb + 16 * padded;
        float *o = (float *)(vb + padded * Dh);
        uint16_t *kpad = (uint16_t *)(o + 16 * Dh);
#pragma omp for schedule(dynamic, 1)
        for (ptrdiff_t task = 0; task < B * G; task++) {
            const ptrdiff_t b = task / G, g = task % G;
            ptrdiff_t n = kv_len ? kv_len[b] : S;
            if (n > S) n = S;
            const uint16_t *kh = k + b * k_strides[0] + g * k_strides[1];
            const uint16_t *vh = v + b * v_strides[0] + g * v_strides[1];
            for (ptrdiff_t dc = 0; dc < Dh / 32; dc++) /* B tiles of the queries: pairs of dimensions x 16 queries */
                for (ptrdiff_t p = 0; p < 16; p++)
                    for (ptrdiff_t j = 0; j < 16; j++)
                        for (int e = 0; e < 2; e++)
                            qb[dc * TILE + p * 32 + j * 2 + e] =
                                j < rep ? q[b * q_strides[0] + (g * rep + j) * q_strides[1] + dc * 32 + 2 * p + e] : 0;
            float sum[16];
            if (n < 1) { /* no key: zeros (the caller never asks for this) */
                memset(o, 0, sizeof(float) * (size_t)(16 * Dh));
                for (int j = 0; j < 16; j++) sum[j] = 1.0f;
            } else {
                for (ptrdiff_t s0 = 0; s0 < n; s0 += 16) { /* S^T for 16 keys */
                    const uint16_t *a = kh + s0 * k_strides[2];
                    ptrdiff_t lda = k_strides[2] * 2;
                    if (s0 + 16 > S) { /* the last block would read past the cache view: a padded copy */
                        for (ptrdiff_t r = 0; r < 16; r++)
                            if (s0 + r < S) memcpy(kpad + r * Dh, a + r * k_strides[2], (size_t)Dh * 2);
                            else memset(kpad + r * Dh, 0, (size_t)Dh * 2);
                        a = kpad;
                        lda = Dh * 2;
                    }
                    _tile_zero(0);
                    for (ptrdiff_t dc = 0; dc < Dh / 32; dc++) {
                        _tile_loadd(4, a + dc * 32, lda);
                        _tile_loadd(5, qb + dc * TILE, 64);
                        _tile_dpbf16ps(0, 4, 5);
                    }
                    _tile_stored(0, st + s0 * 16, 64);
                }
                __m512 vmax = _mm512_set1_ps(-INFINITY); /* lane j: query j */
                for (ptrdiff_t s = 0; s < n; s++) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(st + s * 16));
                const __m512 shift = _mm512_mul_ps(vmax, _mm512_set1_ps(-scale)), vscale = _mm512_set1_ps(scale);
                __m512 total = _mm512_setzero_ps();
                for (ptrdiff_t s = 0; s < n; s++) {
                    const __m512 pv = exp16_nonpositive(_mm512_fmadd_ps(_mm512_loadu_ps(st + s * 16), vscale, shift));
                    total = _mm512_add_ps(total, pv);
                    _mm512_storeu_ps(st + s * 16, pv);
                }
                _mm512_storeu_ps(sum, total);
                const ptrdiff_t n32 = (n + 31) & ~(ptrdiff_t)31;
                const __m512i key_rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
                                                                             3, 2, 1, 0), _mm512_set1_epi32(16));
                for (ptrdiff_t s0 = 0; s0 < n32; s0 += 16) { /* P [16 queries, n32 keys] in bf16, zero past n */
                    const __mmask16 valid = s0 < n ? lanes(n - s0) : 0;
                    for (ptrdiff_t j = 0; j < 16; j++) { /* query j's probabilities of these 16 keys */
                        const __m512 p = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, key_rows,
                                                                  st + s0 * 16 + j, 4);
                        _mm256_storeu_si256((__m256i *)(pb + j * padded + s0), bf16x16_from(p, 0));
                    }
                }
                for (ptrdiff_t c = 0; c < n32 / 32; c++) /* V by key pairs: B tiles (chunk c, 16 dims) */
                    for (ptrdiff_t p = 0; p < 16; p++) {
                        const ptrdiff_t k0 = c * 32 + 2 * p;
                        for (ptrdiff_t h = 0; h < Dh / 32; h++) {
                            const __m512i r0 = k0 < n ? _mm512_loadu_si512(vh + k0 * v_strides[2] + h * 32)
                                                      : _mm512_setzero_si512();
                            const __m512i r1 = k0 + 1 < n ? _mm512_loadu_si512(vh + (k0 + 1) * v_strides[2] + h * 32)
                                                          : _mm512_setzero_si512();
                            uint16_t *t = vb + (c * (Dh / 16) + 2 * h) * TILE + p * 32;
                            _mm512_storeu_si512(t, _mm512_permutex2var_epi16(r0, lo_idx, r1));
                            _mm512_storeu_si512(t + TILE, _mm512_permutex2var_epi16(r0, hi_idx, r1));
                        }
                    }
                for (ptrdiff_t dc = 0; dc < Dh / 16; dc++) { /* o[:, 16 dims] = P V */
                    _tile_zero(0);
                    for (ptrdiff_t c = 0; c < n32 / 32; c++) {
                        _tile_loadd(4, pb + c * 32, padded * 2);
                        _tile_loadd(5, vb + (c * (Dh / 16) + dc) * TILE, 64);
                        _tile_dpbf16ps(0, 4, 5);
                    }
                    _tile_stored(0, o + dc * 16, Dh * 4);
                }
            }
            for (ptrdiff_t j = 0; j < rep; j++) {
                uint16_t *dst = out + b * o_strides[0] + (g * rep + j) * o_strides[1];
                const float inv = sum[j] > 0 ? 1.0f / sum[j] : 0.0f;
                for (ptrdiff_t d = 0; d < Dh; d++) dst[d] = to_bf16(o[j * Dh + d] * inv);
            }
        }
        _tile_release();
    }
    free(work);
    return 0;
}

#else

int af3_attention_level(void) { return 0; }

int af3_attention(const uint16_t *q, const int64_t *q_strides, const uint16_t *k, const int64_t *k_strides,
                  const uint16_t *v, const int64_t *v_strides, uint16_t *out, const int64_t *o_strides, int64_t B,
                  int64_t H, int64_t G, int64_t T, int64_t S, int64_t Dh, const int64_t *kv_len, int causal,
                  int64_t q_start, float scale, int threads) {
    (void)q; (void)q_strides; (void)k; (void)k_strides; (void)v; (void)v_strides; (void)out; (void)o_strides;
    (void)B; (void)H; (void)G; (void)T; (void)S; (void)Dh; (void)kv_len; (void)causal; (void)q_start; (void)scale;
    (void)threads;
    return -1;
}

int af3_decode_attention(const uint16_t *q, const int64_t *q_strides, const uint16_t *k, const int64_t *k_strides,
                         const uint16_t *v, const int64_t *v_strides, uint16_t *out, const int64_t *o_strides,
                         int64_t B, int64_t H, int64_t G, int64_t S, int64_t Dh, const int64_t *kv_len, float scale,
                         int threads) {
    (void)q; (void)q_strides; (void)k; (void)k_strides; (void)v; (void)v_strides; (void)out; (void)o_strides;
    (void)B; (void)H; (void)G; (void)S; (void)Dh; (void)kv_len; (void)scale; (void)threads;
    return -1;
}

#endif
