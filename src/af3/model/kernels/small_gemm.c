/* Few-row matrix products out[M, N] = (x[M, K] . w[N, K]^T) * scale[N] + bias[N] for weights stored as bf16, fp16
 * or int8, accumulated in fp32, on x86 CPUs with AVX2 + FMA + F16C.
 *
 * Why: on CPUs without native bf16 matrix instructions (AVX2), torch's bf16 F.linear reads the weight at a
 * fraction of memory bandwidth when there are few rows (decoding), and its fp32 path would first have to convert
 * the whole weight. Here each weight vector is loaded once, widened to fp32 in registers (bf16: shift left by 16;
 * fp16: vcvtph2ps; int8: sign-extend and convert) and multiplied into up to 4 rows of x at a time; the rows of one
 * tile of weights stay in L1 while the other row tiles of x use them. A single row reads each weight row front to
 * back. Output channels are split across OpenMP
 * threads (the same libgomp runtime as torch's when torch is loaded first).
 *
 * Built at first use by af3/model/cpu_kernels.py with -O3 -march=native for the machine it runs on. Without AVX2,
 * FMA and F16C it builds a stub whose af3_small_gemm_level() is 0, and af3 keeps torch's kernels.
 */
#include <stddef.h>
#include <stdint.h>

enum { W_BF16 = 0, W_F16 = 1, W_I8 = 2 };

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

int af3_small_gemm_level(void) { return 1; }

#define INLINE static inline __attribute__((always_inline))

/* 8 consecutive weights at element i, widened to fp32. */
INLINE __m256 load8(const void *w, ptrdiff_t i, int kind) {
    if (kind == W_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (kind == W_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
}

/* One weight at element i, widened to fp32 (the K % 8 tail). */
INLINE float load1(const void *w, ptrdiff_t i, int kind) {
    if (kind == W_BF16) {
        union { uint32_t u; float f; } v = {(uint32_t)((const uint16_t *)w)[i] << 16};
        return v.f;
    }
    if (kind == W_F16)
        return _cvtsh_ss(((const uint16_t *)w)[i]);
    return (float)((const int8_t *)w)[i];
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Software prefetch distance (elements) along a weight row. Hardware prefetchers alone left the decode-shaped
 * products at 9-12 GB/s of weights on a 2-core Zen 3 VM; with this, 15-18 GB/s for one row (DRAM-bound) and
 * about 1.4x more for 8 rows (tried 256-2048; 512 was best, within the VM's noise). */
#define PREFETCH 512

/* out[0:MT, n0:n0+NT] for rows x[0:MT] (MT <= 4, NT <= 8, MT * NT <= 12 keeps the accumulators in registers). */
INLINE void tile(const float *x, ptrdiff_t K, const void *w, ptrdiff_t n0, int MT, int NT, int kind,
                 const float *scale, const float *bias, float *out, ptrdiff_t N) {
    __m256 acc[4][8];
#pragma GCC unroll 4
    for (int i = 0; i < MT; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
    ptrdiff_t k = 0;
    const int size = kind == W_I8 ? 1 : 2;
    for (; k + 8 <= K; k += 8) {
        if ((k & 31) == 0) {
#pragma GCC unroll 8
            for (int j = 0; j < NT; j++)
                _mm_prefetch((const char *)w + ((n0 + j) * K + k + PREFETCH) * size, _MM_HINT_T0);
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
            if (scale) s *= scale[n0 + j];
            if (bias) s += bias[n0 + j];
            out[i * N + n0 + j] = s;
        }
}

/* out[0, n] for a single row x: the weight row is read front to back (one stream, which the memory system serves
 * faster than 8 interleaved rows) into 4 independent accumulators. */
INLINE void row1(const float *x, ptrdiff_t K, const void *w, ptrdiff_t n, int kind, const float *scale,
                 const float *bias, float *out) {
    const int size = kind == W_I8 ? 1 : 2;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    ptrdiff_t k = 0, base = n * K;
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char *)w + (base + k + PREFETCH) * size, _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(load8(w, base + k, kind), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(w, base + k + 8, kind), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(w, base + k + 16, kind), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(w, base + k + 24, kind), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w, base + k, kind), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += load1(w, base + k, kind) * x[k];
    if (scale) s *= scale[n];
    if (bias) s += bias[n];
    out[n] = s;
}

/* Output channels [n0, n1) for all M rows: row tiles of 4 inside each tile of output channels. */
INLINE void block(const float *x, ptrdiff_t M, ptrdiff_t K, const void *w, ptrdiff_t N, ptrdiff_t n0, ptrdiff_t n1,
                  int kind, const float *scale, const float *bias, float *out) {
    for (ptrdiff_t m0 = 0; m0 < M; m0 += 4) {
        const float *xm = x + m0 * K;
        float *om = out + m0 * N;
        ptrdiff_t n = n0;
        switch (M - m0 >= 4 ? 4 : M - m0) {
        case 1:
            for (; n < n1; n++) row1(xm, K, w, n, kind, scale, bias, om);
            break;
        case 2:
            for (; n + 4 <= n1; n += 4) tile(xm, K, w, n, 2, 4, kind, scale, bias, om, N);
            for (; n < n1; n++) tile(xm, K, w, n, 2, 1, kind, scale, bias, om, N);
            break;
        case 3:
            for (; n + 4 <= n1; n += 4) tile(xm, K, w, n, 3, 4, kind, scale, bias, om, N);
            for (; n < n1; n++) tile(xm, K, w, n, 3, 1, kind, scale, bias, om, N);
            break;
        default:
            for (; n + 2 <= n1; n += 2) tile(xm, K, w, n, 4, 2, kind, scale, bias, om, N);
            for (; n < n1; n++) tile(xm, K, w, n, 4, 1, kind, scale, bias, om, N);
            break;
        }
    }
}

/* Output channels per parallel task: a multiple of 8 (every tile width) so only the last task has a tail. */
#define TASK_CHANNELS 64

/* One function per weight kind, so that OpenMP's outlined loop body sees the kind as a constant. */
#define DEFINE_RUN(NAME, KIND)                                                                                   \
    static void NAME(const float *x, ptrdiff_t M, ptrdiff_t K, const void *w, ptrdiff_t N, const float *scale,    \
                     const float *bias, float *out, int threads) {                                                \
        ptrdiff_t tasks = (N + TASK_CHANNELS - 1) / TASK_CHANNELS;                                                \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                        \
        for (ptrdiff_t t = 0; t < tasks; t++) {                                                                   \
            ptrdiff_t n0 = t * TASK_CHANNELS, n1 = n0 + TASK_CHANNELS < N ? n0 + TASK_CHANNELS : N;               \
            block(x, M, K, w, N, n0, n1, KIND, scale, bias, out);                                                 \
        }                                                                                                         \
    }

DEFINE_RUN(run_bf16, W_BF16)
DEFINE_RUN(run_f16, W_F16)
DEFINE_RUN(run_i8, W_I8)

/* x fp32 [M, K], w [N, K] of `kind` (row-major, contiguous), scale/bias fp32 [N] or NULL, out fp32 [M, N].
 * The kind is resolved here so that each loop nest is compiled for one weight type. Returns 0, or -1 for an
 * unknown kind. */
int af3_small_gemm(const float *x, ptrdiff_t M, ptrdiff_t K, const void *w, int kind, ptrdiff_t N,
                   const float *scale, const float *bias, float *out, int threads) {
    if (threads < 1) threads = 1;
    switch (kind) {
    case W_BF16: run_bf16(x, M, K, w, N, scale, bias, out, threads); return 0;
    case W_F16: run_f16(x, M, K, w, N, scale, bias, out, threads); return 0;
    case W_I8: run_i8(x, M, K, w, N, scale, bias, out, threads); return 0;
    default: return -1;
    }
}

#else

int af3_small_gemm_level(void) { return 0; }

int af3_small_gemm(const float *x, ptrdiff_t M, ptrdiff_t K, const void *w, int kind, ptrdiff_t N,
                   const float *scale, const float *bias, float *out, int threads) {
    (void)x; (void)M; (void)K; (void)w; (void)kind; (void)N; (void)scale; (void)bias; (void)out; (void)threads;
    return -1;
}

#endif
