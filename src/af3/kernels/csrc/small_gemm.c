/* One product out[M, N] = (x[M, K] . w[N, K]^T) * scale[N] + bias[N], called from Python
 * (af3/kernels/binding.py: small_gemm). x, scale, bias and out may be bf16, fp16 or fp32: x is widened once per
 * call and each result is rounded once, to nearest even, so that the caller needs no conversions of its own. */
#include "gemm.h"

#ifdef AF3_HAVE_KERNELS

int af3_small_gemm_level(void) { return 1; }

/* 1 when int8 weights meet bf16 rows (fewer than PACK_ROWS) with pair dot products, 0 when widened to fp32. */
int af3_int8_rows_level(void) { return have_i8dp(); }

/* How bf16 weights meet bf16 rows here: 0 widened to fp32 (AVX2), 1 AVX512-BF16 pair dot products, 2 those for one
 * row and AMX tile products for 2-16 rows (the OS permitting AMX). */
int af3_bf16_rows_level(void) {
#ifdef HAVE_AMX_ROWS
    if (amx_permitted()) return 2;
#endif
    return have_dp();
}

/* x [M, K] of x_kind (bf16, fp16 or fp32), w [N, K] of w_kind (bf16, fp16 or int8), scale and bias [N] of their
 * kinds (bf16, fp16 or fp32) or NULL, out [M, N] of out_kind (bf16, fp16 or fp32); all row-major and contiguous.
 * Returns 0, -1 for a kind that is not allowed where it was given, -2 when memory for the widened x (or the int8
 * products' permuted rows) could not be allocated. */
int af3_small_gemm(const void *x, int x_kind, ptrdiff_t M, ptrdiff_t K, const void *w, int w_kind, ptrdiff_t N,
                   const void *scale, int scale_kind, const void *bias, int bias_kind, void *out, int out_kind,
                   int threads) {
    if (x_kind == I8 || w_kind == F32 || scale_kind == I8 || bias_kind == I8 || out_kind == I8)
        return -1;
    if (x_kind < 0 || x_kind > F32 || w_kind < 0 || scale_kind < 0 || scale_kind > F32 || bias_kind < 0
        || bias_kind > F32 || out_kind < 0 || out_kind > F32)
        return -1;
    if (threads < 1) threads = 1;
    Job job = {w, N, {scale, bias, out, scale_kind, bias_kind, out_kind, F32, N}};
    if (x_kind == BF16 && rows_as_bf16(w_kind, M)) /* pair dot products: x as given */
        return run_jobs(NULL, (const uint16_t *)x, M, K, w_kind, &job, 1, threads);
    const float *xf = (const float *)x;
    float *wide = NULL;
    if (x_kind != F32) {
        wide = (float *)malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(float));
        if (!wide) return -2;
        const ptrdiff_t n = M * K, vectors = n / 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= (1 << 18))
        for (ptrdiff_t v = 0; v < vectors; v++) _mm256_storeu_ps(wide + v * 8, load8(x, v * 8, x_kind));
        for (ptrdiff_t i = vectors * 8; i < n; i++) wide[i] = load1(x, i, x_kind);
        xf = wide;
    }
    run_jobs(xf, NULL, M, K, w_kind, &job, 1, threads);
    free(wide);
    return 0;
}

#else

int af3_small_gemm_level(void) { return 0; }

int af3_bf16_rows_level(void) { return 0; }

int af3_int8_rows_level(void) { return 0; }

int af3_small_gemm(const void *x, int x_kind, ptrdiff_t M, ptrdiff_t K, const void *w, int w_kind, ptrdiff_t N,
                   const void *scale, int scale_kind, const void *bias, int bias_kind, void *out, int out_kind,
                   int threads) {
    (void)x; (void)x_kind; (void)M; (void)K; (void)w; (void)w_kind; (void)N; (void)scale; (void)scale_kind;
    (void)bias; (void)bias_kind; (void)out; (void)out_kind; (void)threads;
    return -1;
}

#endif
