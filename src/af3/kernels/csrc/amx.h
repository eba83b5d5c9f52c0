/* AMX's shared part for af3's kernels (attention.c, and gemm.h's products of a few rows): the process's permission
 * to use the tiles, and the one tile layout every AMX kernel here loads. Included only where the compiler targets
 * AMX-BF16 and AVX-512 on Linux. */
#ifndef AF3_AMX_H
#define AF3_AMX_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

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

/* Tiles 0-6, each 16 rows of 64 bytes. attention.c: 0-3 fp32 accumulators, 4 the A operand, 5 and 6 B operands;
 * gemm.h's row products: 0-3 accumulators, 4 and 5 weights (A), 6 the rows (B). */
static inline void tiles_on(void) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 7; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    /* GCC 12 does not see that ldtilecfg reads the struct: in an OpenMP region of only tile instructions it dropped
     * the stores of colsb and rows as dead, and the load faulted (-O3; tests/model/test_amx_attention.py). */
    __asm__ __volatile__("" : : "r"(&c) : "memory");
    _tile_loadconfig(&c);
}

#endif /* AF3_AMX_H */
