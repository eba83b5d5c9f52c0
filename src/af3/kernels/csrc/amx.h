/* AMX's shared part for af3's kernels (attention.c, and gemm.h's products of a few rows): the process's permission
 * to use the tiles, the one tile layout every AMX kernel here loads, and the pair transpose that packs B tiles.
 * Included where the compiler targets AMX-BF16 and AVX-512 on Linux, and (after amx_emul.h, for the pair transpose
 * only) where it targets AVX512-BF16 without AMX. */
#ifndef AF3_AMX_H
#define AF3_AMX_H
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef AF3_AMX_EMULATED /* (amx_emul.h does the tiles' part with AVX512-BF16 where there is no AMX) */
/* Linux gives a process AMX state only after it asks (torch's oneDNN usually has; asking again is harmless). */
static inline int amx_permitted(void) {
    static int state = 0;
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Tiles 0-7, each 16 rows of 64 bytes. attention.c's prefill: 0-1 score accumulators, 4 queries (A), 5 keys (B);
 * 2-3 output accumulators, 6 probabilities (A), 7 values (B), so that both products can be in flight; its decoding
 * kernel: 0 accumulator, 4 A, 5 B. gemm.h's row products: 0-3 accumulators, 4 and 5 weights (A), 6 the rows (B). */
static inline void tiles_on(void) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    /* GCC 12 does not see that ldtilecfg reads the struct: in an OpenMP region of only tile instructions it dropped
     * the stores of colsb and rows as dead, and the load faulted (-O3; tests/model/test_amx_attention.py). */
    __asm__ __volatile__("" : : "r"(&c) : "memory");
    _tile_loadconfig(&c);
}
#endif

/* `rows` (at most 16) rows of 32 bf16 (`stride` elements apart) into one B tile: row p of the tile holds, for each
 * source row n, its elements 2p and 2p + 1 side by side, zeros for n >= rows (a transpose of a 16 x 16 block of
 * 32-bit pairs, in registers). */
static inline void transpose_pairs(const uint16_t *src, ptrdiff_t stride, ptrdiff_t rows, uint16_t *dst) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i++) a[i] = i < rows ? _mm512_loadu_si512(src + i * stride) : _mm512_setzero_si512();
    for (int i = 0; i < 16; i += 2) {
        b[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
    }
    for (int g = 0; g < 4; g++) { /* a[4g + j], 128-bit lane L: element pair 4L + j of rows 4g .. 4g + 3 */
        a[4 * g] = _mm512_unpacklo_epi64(b[4 * g], b[4 * g + 2]);
        a[4 * g + 1] = _mm512_unpackhi_epi64(b[4 * g], b[4 * g + 2]);
        a[4 * g + 2] = _mm512_unpacklo_epi64(b[4 * g + 1], b[4 * g + 3]);
        a[4 * g + 3] = _mm512_unpackhi_epi64(b[4 * g + 1], b[4 * g + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i d = _mm512_shuffle_i32x4(a[j], a[4 + j], 0x88), e = _mm512_shuffle_i32x4(a[j], a[4 + j], 0xdd);
        const __m512i f = _mm512_shuffle_i32x4(a[8 + j], a[12 + j], 0x88);
        const __m512i h = _mm512_shuffle_i32x4(a[8 + j], a[12 + j], 0xdd);
        _mm512_storeu_si512(dst + (0 + j) * 32, _mm512_shuffle_i32x4(d, f, 0x88));
        _mm512_storeu_si512(dst + (8 + j) * 32, _mm512_shuffle_i32x4(d, f, 0xdd));
        _mm512_storeu_si512(dst + (4 + j) * 32, _mm512_shuffle_i32x4(e, h, 0x88));
        _mm512_storeu_si512(dst + (12 + j) * 32, _mm512_shuffle_i32x4(e, h, 0xdd));
    }
}

#endif /* AF3_AMX_H */
