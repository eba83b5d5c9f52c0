/* Row-wise steps of the Qwen2 decoder for many rows (a prefill, a decoding step of many rows), each one pass over
 * memory instead of the 4-8 tensors torch writes and reads back for the same expression:
 *
 *   af3_rms_norm:  y = T(w * T(s * rsqrt(mean(s^2) + eps))) with s = x, or s = T(x + r) (the residual add fused
 *                  in front of the norm; s is written out too);
 *   af3_silu_mul:  g = T(T(silu(g)) * u), in place;
 *   af3_rotary:    y = T(T(x * cos) + T(rotate_half(x) * sin)) for every head of every row;
 *   af3_argmax:    the first index of each row's maximum (greedy decoding's choice, on the logits as computed).
 *
 * T() rounds an fp32 value to the activations' type (bf16 or fp16; F32: no rounding), at the same points where
 * torch's bf16/fp16 ops round, so the results are those of decoder.py's torch expressions (sums of squares may be
 * added in another order: the norm can differ from torch's in the last bit of the rounded result, as the fused
 * decoding step's can). Rows are split across `threads` OpenMP threads (torch's count, from the caller).
 *
 * Built with small_gemm.c and decode_step.c by af3/kernels/binding.py (-O3 -march=native).
 */
#include "gemm.h"

#ifdef AF3_HAVE_KERNELS
#ifdef _OPENMP
#include <omp.h>
#endif
#include <math.h>

/* Work (elements) below which a call stays on one thread: waking the others costs more. */
#define PARALLEL_MIN 32768

#ifdef __AVX512F__
/* The value of 16 fp32 lanes rounded to bf16 (bf16_bits16's rounding), as fp32. */
INLINE __m512 round16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(v), 16)); }

/* 16 fp32 lanes rounded to bf16 and stored at p. */
INLINE void put16(uint16_t *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, bf16x16_from(v, 1)); }

/* af3_rms_norm for bf16 activations and weight, dim % 16 == 0: the same roundings, 16 lanes at a time (the sum of
 * squares in 16 partial sums instead of 8). */
static void rms_norm_bf16_wide(const uint16_t *x, const uint16_t *r, uint16_t *s, uint16_t *y, const uint16_t *w,
                               ptrdiff_t rows, ptrdiff_t dim, ptrdiff_t stride, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * dim >= PARALLEL_MIN)
    for (ptrdiff_t m = 0; m < rows; m++) {
        const uint16_t *xr = x + m * stride;
        float buf[dim]; /* the row's s, fp32 */
        __m512 acc = _mm512_setzero_ps();
        for (ptrdiff_t i = 0; i < dim; i += 16) {
            __m512 v = bf16x16(xr + i);
            if (r) {
                v = round16(_mm512_add_ps(v, bf16x16(r + m * stride + i)));
                put16(s + m * stride + i, v);
            }
            _mm512_storeu_ps(buf + i, v);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps));
        for (ptrdiff_t i = 0; i < dim; i += 16)
            put16(y + m * dim + i, _mm512_mul_ps(bf16x16(w + i), round16(_mm512_mul_ps(_mm512_loadu_ps(buf + i), inv))));
    }
}
#endif

/* x, r, s, y: [rows, dim] of `kind` (rows `stride` elements apart in x, r and s; y is contiguous); w: [dim] of
 * w_kind. r == NULL: s = x (s unused). Returns 0, or -1 for a kind it does not take. */
int af3_rms_norm(const void *x, const void *r, void *s, void *y, const void *w, ptrdiff_t rows, ptrdiff_t dim,
                 ptrdiff_t stride, int kind, int w_kind, float eps, int threads) {
    if (kind < BF16 || kind > F32 || kind == I8 || w_kind < BF16 || w_kind > F32 || w_kind == I8) return -1;
#ifdef __AVX512F__
    if (kind == BF16 && w_kind == BF16 && dim % 16 == 0) {
        rms_norm_bf16_wide(x, r, s, y, w, rows, dim, stride, eps, threads);
        return 0;
    }
#endif
    const size_t size = kind == F32 ? 4 : 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * dim >= PARALLEL_MIN)
    for (ptrdiff_t m = 0; m < rows; m++) {
        const char *xr = (const char *)x + m * stride * size;
        float buf[dim];  /* the row's s, fp32 */
        __m256 acc = _mm256_setzero_ps();
        ptrdiff_t i = 0;
        for (; i + 8 <= dim; i += 8) {
            __m256 v = get8(xr, i, kind);
            if (r) {
                v = round8(_mm256_add_ps(v, get8((const char *)r + m * stride * size, i, kind)), kind);
                put8((char *)s + m * stride * size, i, kind, v);
            }
            _mm256_storeu_ps(buf + i, v);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (; i < dim; i++) {
            float v = load1(xr, i, kind);
            if (r) {
                v = round_to(v + load1((const char *)r + m * stride * size, i, kind), kind);
                store1((char *)s + m * stride * size, i, kind, v);
            }
            buf[i] = v;
            ss += v * v;
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(ss / (float)dim + eps));
        char *yr = (char *)y + m * dim * size;
        for (i = 0; i + 8 <= dim; i += 8) {
            __m256 h = round8(_mm256_mul_ps(_mm256_loadu_ps(buf + i), inv), kind);
            put8(yr, i, kind, _mm256_mul_ps(get8(w, i, w_kind), h));
        }
        for (; i < dim; i++)
            store1(yr, i, kind, load1(w, i, w_kind) * round_to(buf[i] * _mm256_cvtss_f32(inv), kind));
    }
    return 0;
}

#ifdef __AVX512F__
/* silu_mul for bf16, 16 lanes at a time from element i0 up to a multiple of 16; returns where it stopped. */
static ptrdiff_t silu_mul_bf16_wide(uint16_t *g, const uint16_t *u, ptrdiff_t n, int threads) {
    const ptrdiff_t blocks = n / 16;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_MIN)
    for (ptrdiff_t b = 0; b < blocks; b++) {
        __m512 v = bf16x16(g + b * 16);
        v = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
        put16(g + b * 16, _mm512_mul_ps(round16(v), bf16x16(u + b * 16))); /* T(T(silu(g)) * u) */
    }
    return blocks * 16;
}
#endif

/* g, u: n values of `kind`; g = T(T(silu(g)) * u), silu(g) = g / (1 + exp(-g)) in fp32. */
int af3_silu_mul(void *g, const void *u, ptrdiff_t n, int kind, int threads) {
    if (kind < BF16 || kind > F32 || kind == I8) return -1;
    ptrdiff_t done = 0;
#ifdef __AVX512F__
    if (kind == BF16) done = silu_mul_bf16_wide((uint16_t *)g, (const uint16_t *)u, n, threads);
#endif
    const ptrdiff_t blocks = (n - done) / 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (n - done >= PARALLEL_MIN)
    for (ptrdiff_t b = 0; b < blocks; b++) {
        const ptrdiff_t i = done + b * 8;
        __m256 v = get8(g, i, kind);
        v = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
        put8(g, i, kind, _mm256_mul_ps(round8(v, kind), get8(u, i, kind)));
    }
    for (ptrdiff_t i = done + blocks * 8; i < n; i++) {
        float v = load1(g, i, kind);
        store1(g, i, kind, round_to(v / (1.0f + expf(-v)), kind) * load1(u, i, kind));
    }
    return 0;
}

/* x: [rows, heads, dh] of `kind` (rows `x_stride` elements apart, heads contiguous), y: the same shape,
 * contiguous; cos, sin: [rows, dh] of `kind` (the halves equal, as RotaryEmbedding makes them). dh % 16 == 0. */
int af3_rotary(const void *x, ptrdiff_t x_stride, void *y, const void *cos, const void *sin, ptrdiff_t rows,
               ptrdiff_t heads, ptrdiff_t dh, int kind, int threads) {
    if (kind < BF16 || kind > F32 || kind == I8 || dh % 16) return -1;
    const ptrdiff_t half = dh / 2;
#ifdef __AVX512F__
    if (kind == BF16 && half % 16 == 0) { /* the same roundings, 16 lanes at a time */
        const uint16_t *xb = x, *cb = cos, *sb = sin;
        uint16_t *yb = y;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * heads * dh >= PARALLEL_MIN)
        for (ptrdiff_t m = 0; m < rows; m++)
            for (ptrdiff_t h = 0; h < heads; h++) {
                const uint16_t *xs = xb + m * x_stride + h * dh;
                uint16_t *yd = yb + (m * heads + h) * dh;
                for (ptrdiff_t j = 0; j < half; j += 16) {
                    __m512 a = bf16x16(xs + j), b = bf16x16(xs + half + j);
                    __m512 c1 = bf16x16(cb + m * dh + j), c2 = bf16x16(cb + m * dh + half + j);
                    __m512 s1 = bf16x16(sb + m * dh + j), s2 = bf16x16(sb + m * dh + half + j);
                    put16(yd + j, _mm512_sub_ps(round16(_mm512_mul_ps(a, c1)), round16(_mm512_mul_ps(b, s1))));
                    put16(yd + half + j, _mm512_add_ps(round16(_mm512_mul_ps(b, c2)), round16(_mm512_mul_ps(a, s2))));
                }
            }
        return 0;
    }
#endif
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * heads * dh >= PARALLEL_MIN)
    for (ptrdiff_t m = 0; m < rows; m++) {
        for (ptrdiff_t h = 0; h < heads; h++) {
            const ptrdiff_t src = m * x_stride + h * dh, dst = (m * heads + h) * dh;
            for (ptrdiff_t j = 0; j < half; j += 8) {
                __m256 a = get8(x, src + j, kind), b = get8(x, src + half + j, kind);
                __m256 c1 = get8(cos, m * dh + j, kind), c2 = get8(cos, m * dh + half + j, kind);
                __m256 s1 = get8(sin, m * dh + j, kind), s2 = get8(sin, m * dh + half + j, kind);
                /* first half: x1 * cos - x2 * sin; second half: x2 * cos + x1 * sin (each product rounded) */
                __m256 lo = _mm256_sub_ps(round8(_mm256_mul_ps(a, c1), kind), round8(_mm256_mul_ps(b, s1), kind));
                __m256 hi = _mm256_add_ps(round8(_mm256_mul_ps(b, c2), kind), round8(_mm256_mul_ps(a, s2), kind));
                put8(y, dst + j, kind, lo);
                put8(y, dst + half + j, kind, hi);
            }
        }
    }
    return 0;
}

/* out[m] = the first index of the largest value of row m of x [rows, n] (rows `stride` elements apart), as torch's
 * argmax: a NaN counts as the largest (the first NaN wins). Lane-wise running maxima in one pass, then the lanes
 * compared (the smallest index among equal maxima). */
int af3_argmax(const void *x, ptrdiff_t rows, ptrdiff_t n, ptrdiff_t stride, int kind, int64_t *out, int threads) {
    if (kind < BF16 || kind > F32 || kind == I8 || n < 1) return -1;
    const size_t size = kind == F32 ? 4 : 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PARALLEL_MIN)
    for (ptrdiff_t m = 0; m < rows; m++) {
        const char *xr = (const char *)x + m * stride * size;
        __m256 best = _mm256_set1_ps(-INFINITY);
        __m256i where = _mm256_set1_epi32(-1), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256 nan = _mm256_setzero_ps();
        ptrdiff_t i = 0;
        for (; i + 8 <= n && i + 8 < (ptrdiff_t)1 << 31; i += 8) {
            const __m256 v = get8(xr, i, kind);
            const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
            best = _mm256_blendv_ps(best, v, gt);
            where = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(where), _mm256_castsi256_ps(idx), gt));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
        }
        float top = -INFINITY;
        int64_t at = -1;
        float lanes_best[8];
        int32_t lanes_where[8];
        _mm256_storeu_ps(lanes_best, best);
        _mm256_storeu_si256((__m256i *)lanes_where, where);
        for (int j = 0; j < 8; j++)
            if (lanes_where[j] >= 0 && (lanes_best[j] > top || (lanes_best[j] == top && lanes_where[j] < at))) {
                top = lanes_best[j];
                at = lanes_where[j];
            }
        int has_nan = _mm256_movemask_ps(nan) != 0;
        if (at < 0 && i > 0) at = 0; /* the first i values all -inf (or NaN): index 0 so far */
        for (; i < n; i++) { /* the tail (and rows past 2^31 elements) */
            const float v = load1(xr, i, kind);
            if (v != v) has_nan = 1;
            else if (v > top || at < 0) {
                top = v;
                at = i;
            }
        }
        if (at < 0) at = 0; /* every value -inf (or NaN: found below) */
        if (has_nan)
            for (i = 0; i < n; i++) {
                const float v = load1(xr, i, kind);
                if (v != v) {
                    at = i;
                    break;
                }
            }
        out[m] = at;
    }
    return 0;
}

#else

int af3_rms_norm(const void *x, const void *r, void *s, void *y, const void *w, ptrdiff_t rows, ptrdiff_t dim,
                 ptrdiff_t stride, int kind, int w_kind, float eps, int threads) {
    (void)threads; (void)x; (void)r; (void)s; (void)y; (void)w; (void)rows; (void)dim; (void)stride; (void)kind;
    (void)w_kind; (void)eps;
    return -1;
}
int af3_argmax(const void *x, ptrdiff_t rows, ptrdiff_t n, ptrdiff_t stride, int kind, int64_t *out, int threads) {
    (void)x; (void)rows; (void)n; (void)stride; (void)kind; (void)out; (void)threads;
    return -1;
}
int af3_silu_mul(void *g, const void *u, ptrdiff_t n, int kind, int threads) {
    (void)threads; (void)g; (void)u; (void)n; (void)kind;
    return -1;
}
int af3_rotary(const void *x, ptrdiff_t x_stride, void *y, const void *cos, const void *sin, ptrdiff_t rows,
               ptrdiff_t heads, ptrdiff_t dh, int kind, int threads) {
    (void)threads; (void)x; (void)x_stride; (void)y; (void)cos; (void)sin; (void)rows; (void)heads; (void)dh;
    (void)kind;
    return -1;
}

#endif
