/* A layer's SwiGLU experts over int8 / int4 weights in one OpenMP parallel region.
 *
 * torch computes one small matrix product per call, and at a few rows per expert each call's Python, dispatch
 * and thread start-up cost about as much as reading the weights (bench/cpu_kernels.md). Here every expert of
 * the call is one set of tasks of one parallel region: phase 1 takes (expert, 64 rows of F) tasks,
 * h = silu(gate x) * (up x); phase 2 takes (expert, 64 rows of H) tasks, out = down h. Each task reads its
 * weight tile once for all of its expert's rows (fp32 accumulation). tierserve_pin_threads binds the region's
 * threads to given logical CPUs.
 *
 * The rounding follows torch's kernels as shared.quant.quantized_ffn calls them: activations in bf16, the gate
 * and up products rounded to bf16, h rounded to bf16 (down's input; with bf16 activations, silu(gate) is
 * rounded too, as torch computes it in the activations' dtype), the output in bf16. What is left between the
 * two paths is the order of the fp32 sums, so a placement that takes this path gives the same numbers as one
 * that takes torch's up to that order.
 *
 * Layouts (shared/quant.py):
 *   int8: q (N, K) int8, scale (N,) bf16;                 W[n, k] = q[n, k] * scale[n]
 *   int4: packed (N, K/2) uint8, scale_zero (K/32, N, 2) bf16, torch's CPU int4pack layout: the byte of
 *         (n, k) is (n / 64) * (K * 32) + k * 32 + n % 32, low nibble for n % 64 < 32, high otherwise;
 *         W[n, k] = (q - 8) * s + z with (s, z) = scale_zero[k / 32, n].
 *
 * Written for gcc -O3 -march=native -ffast-math: GCC vector types (16 floats) for the accumulators, lowered to
 * whatever vector registers the CPU has, and the activation rows in small blocks whose accumulators stay in
 * registers while a weight row (int8) or a column pair's bytes (int4) sit in L1. Intrinsics only where a CPU
 * feature pays for its own path: int4 on AVX512-BF16. (__builtin_shuffle is GCC's: another compiler fails the
 * build, and the caller falls back to torch.)
 */

#define _GNU_SOURCE /* sched_setaffinity */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64       /* weight rows per task; torch's int4 layout interleaves rows in tiles of 64 */
#define GROUP 32      /* int4 values sharing one (scale, zero) */
#define ROW_BLOCK 4   /* int8 activation rows per pass over a weight row: 4 x 4 accumulator vectors */
/* Software prefetch this far ahead of the reads: the hardware's alone left both kernels waiting on memory
 * (a third slower from RAM than from cache, one thread, at one row) */
#define INT8_PREFETCH_ROWS 2
#define INT4_PREFETCH 4096  /* bytes: 128 columns of a tile */
/* groups: a tile's (s, z) pairs of one group are 256 bytes, N * 4 bytes after the previous group's, too far apart
 * for the hardware prefetchers, so without software prefetch each group waited on a miss. On a Zen 4 core, 8 int4
 * experts at one row took 877-954 us instead of 1,210 on 1 thread, 732-763 instead of 983 on 2. */
#define INT4_SCALES_AHEAD 4
#define MAX_ROWS 16   /* rows per expert (the caller sends fewer): the per-task products live on the stack */

enum { FMT_INT8 = 0, FMT_INT4 = 1 };
enum { OK = 0, ERR_FORMAT = 1, ERR_SHAPE = 2, ERR_ROWS = 3, ERR_MEMORY = 4, ERR_ID = 5, ERR_HELD = 6 };

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as torch converts */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* Accumulators are GCC vectors of 16 floats, which the compiler lowers to whatever the CPU has (one AVX-512
 * register, two AVX2 ones): unlike arrays indexed in loops they stay in registers. (Written as plain loops over
 * float arrays, every accumulator lived in memory, a store and a load per FMA: int4 ran at a quarter of the
 * speed and int8 slowed with every activation row.) */
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

static inline f32x16 load_f32(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);  /* an unaligned load */
    return v;
}

static inline float hsum(f32x16 v) {
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* int8 codes go into float lanes by the same means as int4's below, not by a widening loop (gcc left that loop
 * scalar for Intel CPUs: 2 GB/s a core on the GPU machine's Xeon, gcc 13, against 19 on a Zen 4 core): 64 bytes of a
 * row read as sixteen 32-bit lanes hold byte m of lane i at column 4i + m, and two shifts sign-extend it. The
 * activations are stored in that order (int8_position), so vector m of a 64-column block meets the columns
 * 4i + m of x without a shuffle; columns past the last whole block stay in place. */
static inline int64_t int8_position(int64_t k, int64_t K) {
    return k < K / 64 * 64 ? (k & ~(int64_t)63) + (k % 4) * 16 + (k % 64) / 4 : k;
}

/* y[r][n - n0] = scale[n] * sum_k q[n, k] x[r, k] for the rows n of one tile and `rb` rows of x (ldx apart,
 * in int8_position order): inlined with rb a constant, so that exactly rb x 4 accumulators exist. Four per row:
 * independent FMA chains that hide the FMA's latency. */
static inline __attribute__((always_inline)) void int8_block(const int8_t *q, const uint16_t *scale, int64_t K,
                                                             int64_t n0, int64_t n1, const float *x, int64_t ldx,
                                                             float (*y)[TILE], const int rb) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *row = q + n * K;
        f32x16 acc[ROW_BLOCK][4] = {{{0}}};
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            __builtin_prefetch(row + INT8_PREFETCH_ROWS * K + k);
            i32x16 lanes;
            memcpy(&lanes, row + k, sizeof lanes);
            const f32x16 w[4] = {__builtin_convertvector((lanes << 24) >> 24, f32x16),
                                 __builtin_convertvector((lanes << 16) >> 24, f32x16),
                                 __builtin_convertvector((lanes << 8) >> 24, f32x16),
                                 __builtin_convertvector(lanes >> 24, f32x16)};
            for (int r = 0; r < rb; r++)
                for (int m = 0; m < 4; m++) acc[r][m] += w[m] * load_f32(x + r * ldx + k + 16 * m);
        }
        const float s = bf16_to_float(scale[n]);
        for (int r = 0; r < rb; r++) {
            float sum = hsum(acc[r][0] + acc[r][1] + acc[r][2] + acc[r][3]);
            for (int64_t kk = k; kk < K; kk++) sum += (float)row[kk] * x[r * ldx + kk];
            y[r][n - n0] = sum * s;
        }
    }
}

/* int4 codes go into float lanes without widening instructions: 64 bytes (two columns k, k + 1) read as sixteen
 * 32-bit lanes put bytes 4i .. 4i + 3 of a column in lane i (i < 8, column k; i >= 8, column k + 1), so the
 * nibble at bit 8m of lane i is the code of row 4i + m and the one at bit 8m + 4 that of row 32 + 4i + m. A
 * shuffle of the 16 values q - 8 by the lanes shifted right turns one nibble of every lane into its value: GCC
 * takes shuffle indices modulo 16, the low 4 bits, which is what AVX-512's vpermps reads, so it is a shift and
 * one permute per 16 weights. Eight such vectors hold the two columns' 128 weights, in rows permuted that way
 * and split over the two halves; the accumulators stay in that order until a tile is done. (Widening bytes to
 * floats by plain loops made gcc 12 code at under half this speed; masking and converting ran about as fast on
 * a Zen 4 core, with a third more instructions.) */
#define LANE_ROWS(m) m, 4 + m, 8 + m, 12 + m, 16 + m, 20 + m, 24 + m, 28 + m
#define PICK_ROWS(a, b, m) __builtin_shuffle(a, b, (u32x16){LANE_ROWS(m), LANE_ROWS(m)})

static inline f32x16 bits_f32(u32x16 v) {
    f32x16 f;
    memcpy(&f, &v, sizeof f);
    return f;
}

/* The (s, z) pairs of group g of a tile's rows into the cache, if the matrix has that group. */
static inline void prefetch_scales(const uint16_t *scale_zero, int64_t N, int64_t K, int64_t tile, int64_t g) {
    if (g >= K / GROUP) return;
    const char *p = (const char *)(scale_zero + (g * N + tile * TILE) * 2);
    for (int line = 0; line < TILE * 4; line += 64) __builtin_prefetch(p + line);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define INT4_ROW_BLOCK 4  /* 4 x 4 accumulators, x and the 4 decoded vectors fit in 32 registers */

/* One 64-row tile of an int4 matrix against `rb` rows of x, on CPUs with AVX512-BF16 (the GPU machine's Xeon, Zen 4):
 * codes become bf16 128 + q by bit operations and vdpbf16ps multiplies 32 of them into 16 float sums per
 * instruction, half the instructions of the float path below. It needs the two codes of a 32-bit lane to be one row
 * at columns k and k + 1: a word permute pairs column k's 16-bit words with column k + 1's, so that lane j holds
 * bytes 2j and 2j + 1 of both columns, and the nibbles at bit shifts 0, 8, 4 and 12 (with 16 more) are rows 2j,
 * 2j + 1, 32 + 2j and 33 + 2j. Per group of 32 columns, sum (128 + q) x, then apply s and add (z - 136 s) sum(x):
 * (128 + q) x is exact in float32, and the group's sum, at most 143 |x| a term, loses about 2^-24 of that.
 * Measured: 9-25% faster than the float path on a Zen 4 core; no change on the GPU machine's Xeon, where the
 * float path is not bound by its instructions either (bench/cpu_kernels.md). */
static inline __attribute__((always_inline)) void int4_block(const uint8_t *packed, const uint16_t *scale_zero,
                                                             int64_t N, int64_t K, int64_t tile, const float *x,
                                                             int64_t ldx, float (*y)[TILE], const int rb) {
    const uint8_t *base = packed + tile * K * 32;
    const __m512i word_pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i nibbles = _mm512_set1_epi32(0x000F000F), bias = _mm512_set1_epi32(0x43004300);
    f32x16 out[INT4_ROW_BLOCK][4] = {{{0}}};
    for (int64_t g = 0; g < INT4_SCALES_AHEAD; g++) prefetch_scales(scale_zero, N, K, tile, g);
    for (int64_t g = 0; g < K / GROUP; g++) {
        prefetch_scales(scale_zero, N, K, tile, g + INT4_SCALES_AHEAD);
        /* the group's x as bf16 pairs (columns 2c, 2c + 1) for vdpbf16ps's broadcast operand (x holds bf16 values,
         * so exactly): a group at a time, since a whole row's pairs on the stack overflowed 8 MiB thread stacks at
         * K = 2^20 */
        uint32_t xp[INT4_ROW_BLOCK][GROUP / 2];
        for (int r = 0; r < rb; r++)
            for (int c = 0; c < GROUP / 2; c++) {
                uint32_t lo, hi;
                memcpy(&lo, x + r * ldx + g * GROUP + 2 * c, sizeof lo);
                memcpy(&hi, x + r * ldx + g * GROUP + 2 * c + 1, sizeof hi);
                xp[r][c] = (lo >> 16) | (hi & 0xffff0000u);
            }
        f32x16 acc[INT4_ROW_BLOCK][4] = {{{0}}};
        for (int k = 0; k < GROUP; k += 2) {
            const uint8_t *bytes = base + (g * GROUP + k) * 32;
            __builtin_prefetch(bytes + INT4_PREFETCH);
            const __m512i cols = _mm512_permutexvar_epi16(word_pairs, _mm512_loadu_si512(bytes));
            const __m512i codes[4] = {  /* (a & b) | c is ternary-logic table 0xEA */
                _mm512_ternarylogic_epi32(cols, nibbles, bias, 0xEA),
                _mm512_ternarylogic_epi32(_mm512_srli_epi32(cols, 8), nibbles, bias, 0xEA),
                _mm512_ternarylogic_epi32(_mm512_srli_epi32(cols, 4), nibbles, bias, 0xEA),
                _mm512_ternarylogic_epi32(_mm512_srli_epi32(cols, 12), nibbles, bias, 0xEA)};
            for (int r = 0; r < rb; r++) {
                const __m512bh xk = (__m512bh)_mm512_set1_epi32((int)xp[r][k / 2]);
                for (int v = 0; v < 4; v++)
                    acc[r][v] = (f32x16)_mm512_dpbf16_ps((__m512)acc[r][v], (__m512bh)codes[v], xk);
            }
        }
        /* (s, z) of rows 2j, 2j + 1, 32 + 2j, 33 + 2j as 32-bit lanes, s in the low half */
        const uint16_t *sz = scale_zero + (g * N + tile * TILE) * 2;
        u32x16 pairs[4];
        memcpy(pairs, sz, sizeof pairs);
        const u32x16 even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}, odd = even + 1;
        const u32x16 picked[4] = {
            __builtin_shuffle(pairs[0], pairs[1], even), __builtin_shuffle(pairs[0], pairs[1], odd),
            __builtin_shuffle(pairs[2], pairs[3], even), __builtin_shuffle(pairs[2], pairs[3], odd)};
        for (int r = 0; r < rb; r++) {
            float sx = 0.f;
            for (int k = 0; k < GROUP; k++) sx += x[r * ldx + g * GROUP + k];
            for (int v = 0; v < 4; v++) {
                const f32x16 s = bits_f32(picked[v] << 16), z = bits_f32(picked[v] & 0xffff0000u);
                out[r][v] += s * acc[r][v] + (z - 136.f * s) * sx;
            }
        }
    }
    for (int r = 0; r < rb; r++)
        for (int v = 0; v < 4; v++)
            for (int j = 0; j < 16; j++) y[r][(v / 2) * 32 + 2 * j + v % 2] = out[r][v][j];
}
#else
#define INT4_ROW_BLOCK 3  /* 3 x 8 accumulators, x and the vector being decoded fit in 32 registers */

/* One 64-row tile of an int4 matrix against `rb` rows of x (CPUs without AVX512-BF16): per group of 32 columns,
 * sum (q - 8) x[k] into the row accumulators, then apply s and add z * sum(x). */
static inline __attribute__((always_inline)) void int4_block(const uint8_t *packed, const uint16_t *scale_zero,
                                                             int64_t N, int64_t K, int64_t tile, const float *x,
                                                             int64_t ldx, float (*y)[TILE], const int rb) {
    const uint8_t *base = packed + tile * K * 32;
    const f32x16 values = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};  /* q - 8 for q = 0 .. 15 */
    const f32x16 lower_half = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0};
    /* vector v holds the nibbles at bit shift[v]: rows 4i + v for v < 4, 32 + 4i + (v - 4) after */
    const int shift[8] = {0, 8, 16, 24, 4, 12, 20, 28};
    f32x16 out[INT4_ROW_BLOCK][8] = {{{0}}};
    for (int64_t g = 0; g < INT4_SCALES_AHEAD; g++) prefetch_scales(scale_zero, N, K, tile, g);
    for (int64_t g = 0; g < K / GROUP; g++) {
        prefetch_scales(scale_zero, N, K, tile, g + INT4_SCALES_AHEAD);
        f32x16 acc[INT4_ROW_BLOCK][8] = {{{0}}};
        for (int k = 0; k < GROUP; k += 2) {
            u32x16 lanes;
            __builtin_prefetch(base + (g * GROUP + k) * 32 + INT4_PREFETCH);
            memcpy(&lanes, base + (g * GROUP + k) * 32, sizeof lanes);
            f32x16 xk[INT4_ROW_BLOCK];
            for (int r = 0; r < rb; r++) {
                const float a = x[r * ldx + g * GROUP + k], b = x[r * ldx + g * GROUP + k + 1];
                xk[r] = (f32x16){a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b};
            }
            for (int v = 0; v < 8; v++) {
                const f32x16 w = __builtin_shuffle(values, (i32x16)(lanes >> shift[v]));
                for (int r = 0; r < rb; r++) acc[r][v] += w * xk[r];
            }
        }
        /* the tile's 64 (s, z) bf16 pairs as 32-bit lanes, s in the low half (bf16 -> fp32 is a shift), picked
         * into the accumulators' row order; z only in the lower halves, which are added to the upper ones at
         * the end */
        const uint16_t *sz = scale_zero + (g * N + tile * TILE) * 2;
        u32x16 pairs[4];
        memcpy(pairs, sz, sizeof pairs);
        const u32x16 picked[8] = {PICK_ROWS(pairs[0], pairs[1], 0), PICK_ROWS(pairs[0], pairs[1], 1),
                                  PICK_ROWS(pairs[0], pairs[1], 2), PICK_ROWS(pairs[0], pairs[1], 3),
                                  PICK_ROWS(pairs[2], pairs[3], 0), PICK_ROWS(pairs[2], pairs[3], 1),
                                  PICK_ROWS(pairs[2], pairs[3], 2), PICK_ROWS(pairs[2], pairs[3], 3)};
        for (int r = 0; r < rb; r++) {
            float sx = 0.f;
            for (int k = 0; k < GROUP; k++) sx += x[r * ldx + g * GROUP + k];
            for (int v = 0; v < 8; v++)
                out[r][v] += bits_f32(picked[v] << 16) * acc[r][v] +
                             bits_f32(picked[v] & 0xffff0000u) * lower_half * sx;
        }
    }
    for (int r = 0; r < rb; r++)
        for (int m = 0; m < 4; m++)
            for (int i = 0; i < 8; i++) {
                y[r][4 * i + m] = out[r][m][i] + out[r][m][8 + i];
                y[r][32 + 4 * i + m] = out[r][4 + m][i] + out[r][4 + m][8 + i];
            }
}

#endif

/* y[r][j] = (W x_r)[tile * 64 + j] for the tile's rows that exist and all `rows` rows of x. */
static void tile_product(int fmt, const void *values, const uint16_t *scales, int64_t N, int64_t K, int64_t tile,
                         const float *x, int64_t rows, float (*y)[TILE]) {
    const int64_t block = fmt == FMT_INT8 ? ROW_BLOCK : INT4_ROW_BLOCK;
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
        const int64_t rb = rows - r0 < block ? rows - r0 : block;
        const float *xr = x + r0 * K;
        float (*yr)[TILE] = y + r0;
        if (fmt == FMT_INT8) {
            const int64_t n0 = tile * TILE, n1 = n0 + TILE < N ? n0 + TILE : N;
            switch (rb) {  /* constant rb per call: the accumulators of exactly rb rows */
            case 1: int8_block(values, scales, K, n0, n1, xr, K, yr, 1); break;
            case 2: int8_block(values, scales, K, n0, n1, xr, K, yr, 2); break;
            case 3: int8_block(values, scales, K, n0, n1, xr, K, yr, 3); break;
            default: int8_block(values, scales, K, n0, n1, xr, K, yr, 4); break;
            }
        } else {
            switch (rb) {
            case 1: int4_block(values, scales, N, K, tile, xr, K, yr, 1); break;
            case 2: int4_block(values, scales, N, K, tile, xr, K, yr, 2); break;
            case 3: int4_block(values, scales, N, K, tile, xr, K, yr, 3); break;
            default: int4_block(values, scales, N, K, tile, xr, K, yr, INT4_ROW_BLOCK); break;
            }
        }
    }
}

/* expf's argument held below its overflow: under -ffast-math, v / inf is computed as v * (1 / inf) with a reciprocal
 * approximation that gives NaN for gates below about -88, where silu is -0 */
static inline float silu(float v) { return v / (1.f + expf(fminf(-v, 88.f))); }

/* Shapes an (N, K) matrix's layout allows, checked here too so that a caller's mistake is an error code, not a
 * stray read. */
static int check_shape(int fmt, int64_t n, int64_t k) {
    if (n <= 0 || k <= 0) return ERR_SHAPE;
    if (fmt == FMT_INT8) return OK;
    if (fmt != FMT_INT4) return ERR_FORMAT;
    return n % TILE || k % GROUP ? ERR_SHAPE : OK; /* 64-row tiles, 32-column groups */
}

/* One grouped SwiGLU's operands: group g takes counts[g] rows of x from row starts[g], through the expert whose
 * 6 addresses are ptrs[6 g ..] (gate values, gate scales, up values, up scales, down values, down scales; int8: q,
 * scale; int4: packed, scale_zero). x is fp32 in int8_position order for int8 gate and up; h (rows, ffn) is
 * scratch; out (rows, hidden) bf16. */
struct swiglu {
    int fmt_in, fmt_out, bf16_activations;
    int64_t n_groups, hidden, ffn;
    const int64_t *counts, *starts;
    const uint64_t *ptrs;
    const float *x;
    float *h;
    uint16_t *out;
    int64_t *h_tiles_done;  /* per group, zeroed: its tiles of h written so far */
};

static inline void spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* Both phases as orphaned worksharing loops, run by every thread of the caller's parallel region: one fork and
 * join per call. The task loops are guided: a matrix's tiles lie one after another in memory, so a thread's first
 * chunks are long runs its prefetchers keep ahead of, and the last tasks go out one by one to even out the
 * threads' ends (on the GPU machine's Xeon, 8 experts at one row, int4 on 8 threads: median 370 us against 405
 * handing out single tiles; bench/cpu_kernels.md). No barrier between the phases: a thread out of phase-1 tasks
 * starts on down tiles, each waiting only for its own expert's h (h_tiles_done). Through a barrier every thread
 * waited for the last phase-1 task: up to a task's time, at 13 threads and 8 experts (96 tasks, 7.4 a thread)
 * a seventh of phase 1. The waits cannot deadlock: a thread leaves phase 1's loop only once all of its tasks are
 * handed out, and a phase-1 task never waits. */
static void swiglu_phases(const struct swiglu *s) {
    const int64_t hidden = s->hidden, ffn = s->ffn;
    const int int8_out = s->fmt_out == FMT_INT8;
    const int64_t ffn_tiles = (ffn + TILE - 1) / TILE, hidden_tiles = (hidden + TILE - 1) / TILE;
#pragma omp for schedule(guided) nowait
    for (int64_t task = 0; task < s->n_groups * ffn_tiles; task++) {
        const int64_t e = task / ffn_tiles, tile = task % ffn_tiles, rows = s->counts[e];
        if (rows == 0) continue;
        const uint64_t *p = s->ptrs + 6 * e;
        float gate[MAX_ROWS][TILE], up[MAX_ROWS][TILE];
        const float *xe = s->x + s->starts[e] * hidden;
        tile_product(s->fmt_in, (const void *)p[0], (const uint16_t *)p[1], ffn, hidden, tile, xe, rows, gate);
        tile_product(s->fmt_in, (const void *)p[2], (const uint16_t *)p[3], ffn, hidden, tile, xe, rows, up);
        const int64_t n0 = tile * TILE, width = ffn - n0 < TILE ? ffn - n0 : TILE;
        for (int64_t r = 0; r < rows; r++) {
            float *hr = s->h + (s->starts[e] + r) * ffn + n0;
            for (int64_t j = 0; j < width; j++) {
                const float g = silu(round_bf16(gate[r][j]));
                hr[int8_out ? int8_position(n0 + j, ffn) - n0 : j] =
                    round_bf16((s->bf16_activations ? round_bf16(g) : g) * round_bf16(up[r][j]));
            }
        }
        __atomic_fetch_add(&s->h_tiles_done[e], 1, __ATOMIC_RELEASE);  /* this tile of h is written */
    }
#pragma omp for schedule(guided)
    for (int64_t task = 0; task < s->n_groups * hidden_tiles; task++) {
        const int64_t e = task / hidden_tiles, tile = task % hidden_tiles, rows = s->counts[e];
        if (rows == 0) continue;
        const uint64_t *p = s->ptrs + 6 * e;
        while (__atomic_load_n(&s->h_tiles_done[e], __ATOMIC_ACQUIRE) < ffn_tiles) spin_pause();
        float y[MAX_ROWS][TILE];
        tile_product(s->fmt_out, (const void *)p[4], (const uint16_t *)p[5], hidden, ffn, tile,
                     s->h + s->starts[e] * ffn, rows, y);
        const int64_t n0 = tile * TILE, width = hidden - n0 < TILE ? hidden - n0 : TILE;
        for (int64_t r = 0; r < rows; r++) {
            uint16_t *orow = s->out + (s->starts[e] + r) * hidden + n0;
            for (int64_t j = 0; j < width; j++) orow[j] = float_to_bf16(y[r][j]);
        }
    }
}

/* The grouped SwiGLU: experts e = 0 .. n_experts - 1 take counts[e] consecutive rows of x (rows, hidden),
 * rows = sum(counts). Gate and up are in format fmt_in, down in fmt_out (a Q4_K_M layer: int4 gate and up,
 * int8 down). ptrs holds 6 addresses per expert (struct swiglu). x and out are (rows, hidden) bf16;
 * bf16_activations rounds silu(gate) to bf16 as torch does for bf16 activations. Returns 0, or an error code,
 * having computed nothing. The fp32 copy of x and h (rows, ffn) are the call's scratch, made here rather than by
 * the caller: with the caches swept by the weights, each torch call costs microseconds, and the caller's steps
 * around the parallel region took a fifth of a call on 8 threads (bench/cpu_kernels.md). */
int tierserve_grouped_swiglu(int fmt_in, int fmt_out, int64_t n_experts, const int64_t *counts,
                             const uint64_t *ptrs, int64_t hidden, int64_t ffn, const uint16_t *x_bf16,
                             uint16_t *out, int num_threads, int bf16_activations) {
    int status = check_shape(fmt_in, ffn, hidden);
    if (status == OK) status = check_shape(fmt_out, hidden, ffn);
    if (status != OK) return status;
    if (n_experts < 0) return ERR_SHAPE;
    for (int64_t e = 0; e < n_experts; e++)
        if (counts[e] < 0 || counts[e] > MAX_ROWS) return ERR_ROWS;
    int64_t *starts = calloc((size_t)(2 * n_experts + 1), sizeof *starts);  /* then the zeroed h_tiles_done */
    if (!starts) return ERR_MEMORY;
    starts[0] = 0;
    for (int64_t e = 0; e < n_experts; e++) starts[e + 1] = starts[e] + counts[e];
    const int64_t total_rows = starts[n_experts];
    float *x = malloc((size_t)(total_rows * (hidden + ffn)) * sizeof *x + 1);
    if (!x) {
        free(starts);
        return ERR_MEMORY;
    }
    /* int8 reads its activations in int8_position order: x is copied so for int8 gate and up, and phase 1 writes
     * h so for int8 down */
    const int int8_in = fmt_in == FMT_INT8;
    const struct swiglu s = {fmt_in, fmt_out, bf16_activations, n_experts, hidden, ffn, counts, starts, ptrs,
                             x, x + total_rows * hidden, out, starts + n_experts + 1};
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < total_rows; r++)
            for (int64_t k = 0; k < hidden; k++)
                x[r * hidden + (int8_in ? int8_position(k, hidden) : k)] = bf16_to_float(x_bf16[r * hidden + k]);
        swiglu_phases(&s);
    }
    free(x);
    free(starts);
    return OK;
}

/* A mailbox lane's request answered whole (expert_host's answer_lane): `rows` rows of x (fp32, or bf16 where
 * x_bf16) each routed to k experts (ids and weights, (rows, k)), of which this host computes those `owned` marks
 * (one byte per expert of the layer; table: each expert's 6 addresses, zeros where it is not held). out (padded,
 * hidden, x's dtype) gets each row's sum over its owned pairs of weight * expert output, in fp32 from the outputs
 * rounded to bf16 as the grouped call's are, and zeros in the padding's rows. In C rather than numpy and torch:
 * a decode step's grouping, gathering and weighted sum were a hundred-odd microseconds of calls a layer, a third
 * of the experts' own time at one row on 16 threads. Returns the pairs computed, or minus an error code, having
 * written nothing: ERR_ID (an id outside 0 .. n_experts - 1), ERR_HELD (an owned expert not held), ERR_ROWS (an
 * expert with more than max_rows pairs: a batch for the caller's GEMM path). */
int64_t tierserve_lane_swiglu(int fmt_in, int fmt_out, int64_t rows, int64_t padded, int64_t k,
                              const int32_t *ids, const float *weights, const uint8_t *owned,
                              const uint64_t *table, int64_t n_experts, int64_t hidden, int64_t ffn,
                              const void *x_in, void *out, int x_bf16, int64_t max_rows, int num_threads) {
    int status = check_shape(fmt_in, ffn, hidden);
    if (status == OK) status = check_shape(fmt_out, hidden, ffn);
    if (status != OK) return -status;
    if (rows < 0 || padded < rows || k <= 0 || n_experts <= 0) return -ERR_SHAPE;
    if (max_rows > MAX_ROWS) max_rows = MAX_ROWS;
    const int64_t n_pairs = rows * k;
    /* index arrays in one zeroed block: per expert its pairs, then the next free slot of its group; per group its
     * rows, start, addresses and tiles of h done; per pair its slot (-1: not owned); per slot its pair */
    int64_t *count = calloc((size_t)(11 * n_experts + 2 * n_pairs), sizeof *count);
    if (!count) return -ERR_MEMORY;
    int64_t *next = count + n_experts, *group_counts = next + n_experts, *group_starts = group_counts + n_experts;
    uint64_t *ptrs = (uint64_t *)(group_starts + n_experts);
    int64_t *h_tiles_done = (int64_t *)(ptrs + 6 * n_experts);
    int64_t *slot_of = h_tiles_done + n_experts, *pair_of = slot_of + n_pairs;
    /* ids and owned are the mailbox's, which the worker may write while a request it gave up on is computed:
     * each is read once, here, and slot_of keeps the pair's expert (-1: not owned) for the passes below, so a
     * concurrent write makes wrong numbers at worst, never an index out of these blocks */
    status = OK;
    for (int64_t p = 0; p < n_pairs && status == OK; p++) {
        const int64_t e = ids[p];
        if (e < 0 || e >= n_experts) {
            status = ERR_ID;
            break;
        }
        slot_of[p] = owned[e] ? e : -1;
        if (slot_of[p] >= 0 && !table[6 * e]) status = ERR_HELD;
        else if (slot_of[p] >= 0 && ++count[e] > max_rows) status = ERR_ROWS;
    }
    int64_t n_slots = 0, n_groups = 0;
    for (int64_t e = 0; e < n_experts && status == OK; e++) {
        next[e] = n_slots;
        if (!count[e]) continue;
        group_counts[n_groups] = count[e];
        group_starts[n_groups] = n_slots;
        memcpy(ptrs + 6 * n_groups, table + 6 * e, 6 * sizeof *ptrs);
        n_groups++;
        n_slots += count[e];
    }
    /* scratch: the slots' fp32 rows, h, and their bf16 outputs */
    float *x = status == OK ? malloc((size_t)(n_slots * (hidden + ffn)) * sizeof *x +
                                     (size_t)(n_slots * hidden) * sizeof(uint16_t) + 1)
                            : NULL;
    if (!x) {
        free(count);
        return -(status == OK ? ERR_MEMORY : status);
    }
    for (int64_t p = 0; p < n_pairs; p++) {  /* in pair order within each expert, as the Python path groups */
        if (slot_of[p] < 0) continue;
        slot_of[p] = next[slot_of[p]]++;
        pair_of[slot_of[p]] = p;
    }
    float *h = x + n_slots * hidden;
    uint16_t *y = (uint16_t *)(h + n_slots * ffn);
    const int int8_in = fmt_in == FMT_INT8;
    const struct swiglu s = {fmt_in, fmt_out, x_bf16, n_groups, hidden, ffn, group_counts, group_starts, ptrs,
                             x, h, y, h_tiles_done};
    const int64_t hidden_tiles = (hidden + TILE - 1) / TILE;
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1)
    {
        /* each slot's row, through bf16 as the grouped call takes its activations */
#pragma omp for schedule(static)
        for (int64_t slot = 0; slot < n_slots; slot++) {
            const int64_t r = pair_of[slot] / k;
            for (int64_t c = 0; c < hidden; c++) {
                const float v = x_bf16 ? bf16_to_float(((const uint16_t *)x_in)[r * hidden + c])
                                       : round_bf16(((const float *)x_in)[r * hidden + c]);
                x[slot * hidden + (int8_in ? int8_position(c, hidden) : c)] = v;
            }
        }
        swiglu_phases(&s);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < padded * hidden_tiles; task++) {
            const int64_t r = task / hidden_tiles, c0 = task % hidden_tiles * TILE;
            const int64_t c1 = c0 + TILE < hidden ? c0 + TILE : hidden;
            float sum[TILE] = {0};
            for (int64_t j = 0; r < rows && j < k; j++) {
                const int64_t slot = slot_of[r * k + j];
                if (slot < 0) continue;
                const float w = weights[r * k + j];
                for (int64_t c = c0; c < c1; c++) sum[c - c0] += w * bf16_to_float(y[slot * hidden + c]);
            }
            for (int64_t c = c0; c < c1; c++) {
                if (x_bf16) ((uint16_t *)out)[r * hidden + c] = float_to_bf16(sum[c - c0]);
                else ((float *)out)[r * hidden + c] = sum[c - c0];
            }
        }
    }
    free(x);
    free(count);
    return n_slots;
}

/* Binds the OpenMP threads of a team of n: team thread i > 0 to cores[i] alone, and the calling thread (0) to all n,
 * so that whatever threads it starts later (the runtime's included: a smaller team in between ends the pool's
 * extra threads, and the next full team starts new ones) stay on the n cores instead of piling onto one. Later
 * teams of n threads, torch's too where it shares this runtime, are the pool's threads in order. Returns how many
 * threads were not bound. */
int tierserve_pin_threads(const int *cores, int n) {
    if (n < 1) return 0;
    int bound = 0;
#pragma omp parallel num_threads(n) reduction(+ : bound)
    {
        const int i = omp_get_thread_num();
        cpu_set_t set;
        CPU_ZERO(&set);
        if (i == 0)
            for (int j = 0; j < n; j++) CPU_SET(cores[j], &set);
        else
            CPU_SET(cores[i], &set);
        bound += sched_setaffinity(0, sizeof set, &set) == 0;
    }
    return n - bound;
}
