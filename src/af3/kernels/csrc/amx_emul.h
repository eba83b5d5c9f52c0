/* AMX's tile instructions, as attention.c uses them, done with AVX512-BF16 pair dot products: for CPUs with
 * AVX512-BF16 and no AMX (a Zen 4 EPYC), so that the same flash attention serves them.
 *
 * Why: there torch's CPU flash attention was more than half of a 5-minute prefill (18.7 of 33.5 s, at ~65 GMAC/s),
 * while vdpbf16ps issues once per cycle per core (32 bf16 products each). The attention's tile products keep their
 * meaning: C [16 x 16 fp32] += A [16 x 32 bf16] . B [16 pair rows x 16 columns x 2], where one tile product is 256
 * pair dot products, each row of C summing over the pairs of A's row (a broadcast of one pair of A times a row of
 * B). Sums run in fp32 in the pairs' order; denormal inputs and sums are taken as zero, as AMX and vdpbf16ps both
 * do. Tiles 0-3 (the accumulators, in every kernel here) are 1 KB each of thread-local memory: a load copies 16 rows
 * of 64 bytes into one, a store copies them out, and a zeroed one is only marked so (its products start from zeros
 * in registers). Tiles 4-7 are only ever operands, loaded just before the products that read them: a load records
 * where the rows are and the products read them there (copying each operand into a tile first made the attention
 * 1.10-1.17x slower on a Zen 4). Tile numbers are those of amx.h (0-7, every tile 16 rows of 64 bytes); amx.h's
 * configuration and release have nothing to do here. Include it before amx.h, whose pair transpose the attention
 * uses as well. */
#ifndef AF3_AMX_EMUL_H
#define AF3_AMX_EMUL_H
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define AF3_AMX_EMULATED 1

static __thread float emul_tiles[4][256] __attribute__((aligned(64))); /* accumulators 0-3 */
static __thread int emul_zero[4];                                     /* zeroed, not yet written */
static __thread const char *emul_rows[8];                             /* operands 4-7: their first row */
static __thread ptrdiff_t emul_stride[8];                             /* and the bytes between rows */

static inline int amx_permitted(void) { return 1; }
static inline void tiles_on(void) {}

static inline void emul_tile_load(int t, const void *p, ptrdiff_t stride) {
    if (t >= 4) {
        emul_rows[t] = (const char *)p;
        emul_stride[t] = stride;
        return;
    }
    emul_zero[t] = 0;
    for (int r = 0; r < 16; r++)
        _mm512_store_si512(emul_tiles[t] + 16 * r, _mm512_loadu_si512((const char *)p + r * stride));
}

static inline void emul_tile_store(int t, void *p, ptrdiff_t stride) {
    for (int r = 0; r < 16; r++)
        _mm512_storeu_si512((char *)p + r * stride,
                            emul_zero[t] ? _mm512_setzero_si512() : _mm512_load_si512(emul_tiles[t] + 16 * r));
}

/* acc += (the pair of bf16 at `pair`, in every lane) . b, the pair read by vdpbf16ps itself ({1to16}): from
 * _mm512_set1_epi32 GCC 12 broadcasts it into a register first, one more instruction per product (the attention
 * 1.07-1.17x slower on a Zen 4). decode_dp.h uses it too. */
#define DP_PAIR_AT(acc, pair, b) \
    __asm__("vdpbf16ps %1%{1to16%}, %2, %0" : "+v"(acc) : "m"(*(const uint32_t *)(const void *)(pair)), "v"(b))

/* C += A . B for accumulator tile c and operand tiles a, b: eight rows of C at a time, so that eight dependency
 * chains are in flight. */
static inline void emul_tile_dp(int c, int a, int b) {
    __m512bh bv[16];
    const char *brows = emul_rows[b], *arows = emul_rows[a];
    const ptrdiff_t bs = emul_stride[b], as = emul_stride[a];
    for (int p = 0; p < 16; p++) bv[p] = (__m512bh)_mm512_loadu_si512(brows + p * bs);
    float *ct = emul_tiles[c];
    const int zero = emul_zero[c]; /* a zeroed tile's sums start in registers */
    emul_zero[c] = 0;
    for (int i0 = 0; i0 < 16; i0 += 8) {
        __m512 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) acc[i] = zero ? _mm512_setzero_ps() : _mm512_load_ps(ct + 16 * (i0 + i));
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++)
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) DP_PAIR_AT(acc[i], arows + (i0 + i) * as + 4 * p, bv[p]);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) _mm512_store_ps(ct + 16 * (i0 + i), acc[i]);
    }
}

#define _tile_zero(t) (emul_zero[t] = 1)
#define _tile_loadd(t, p, stride) emul_tile_load((t), (p), (stride))
#define _tile_stored(t, p, stride) emul_tile_store((t), (p), (stride))
#define _tile_dpbf16ps(c, a, b) emul_tile_dp((c), (a), (b))
#define _tile_release() ((void)0)
#endif /* AF3_AMX_EMUL_H */
