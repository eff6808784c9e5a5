// int4 and int8 expert decode on tensor cores, launched by gpu_worker/mma_decode.py: out[rows of each expert] =
// x[rows] @ W.T, or silu(x @ W1.T) * (x @ W2.T).
//
// The int4 layout (shared/quant.py) keeps a 64-row tile's column k in 32 bytes, the low nibble of byte j for row
// j and the high one for row 32 + j, with a (scale, zero) bf16 pair per row and group of 32 columns. The mma's A
// operand wants two columns of one row in each register, so a lane reads the four 32-bit words of its row quad
// (rows 4g..4g+3 and 32+4g..35+4g) at four neighbouring columns of a 16-column step from its warp's copy of the
// group in shared memory (cp.async, a few groups ahead, x's rows with it), and one byte permute puts two
// columns' bytes side by side: one lop3 then makes a register of two bf16 codes 128 + q. The mma's k order
// within a step is free as long as A and B agree, so lane t's pairs k = 2t, 2t+1 and 2t+8, 2t+9 of step s are
// columns 8t+4s, +1 and 8t+4s+2, +3: x's four B words of a row in both steps are then one 16-byte load. The mma runs
// on the codes, which bf16 holds exactly, and each group's sums are scaled once in float32:
//     sum_k x_k W_k = s * sum_k x_k (q_k - 8) + z * sum_k x_k
// where sum_k x_k comes from one more mma against ones, and the code mmas start from -136 times it. No weight is
// rounded to bf16, as dequantizing would. With two 8-row tiles of x, whose float32 scaling per group costs twice
// as much, the codes are instead scaled into bf16 weights (bf16x2 FMAs) before the mma, as prefill's
// dequantized weights are.
//
// int8 (shared/quant.py's Int8Matrix: rows of K bytes, a bf16 scale per row) takes the same ring and tensor-core
// loop over groups of 32 columns of a 64-row tile (add_group8). A byte b = l - 128 h (l: its low 7 bits, h: its
// top bit) becomes two bf16 codes of one instruction each, 128 + l and -128 (1 + h), whose sum is b: two mmas a
// 16-column step, against none of the scaling int4 needs, and the row's scale once at the end.
//
// One block per (64-row tile, expert); its warps cut K into k_warps ranges per matrix (gate and up in separate
// warps under SWIGLU) and add their sums in shared memory.

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 byte_perm(u32 a, u32 b, u32 selector) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
    return r;
}
// byte_perm selectors: the low 16-bit halves of a and b, side by side (a's in the low half), or the high halves
constexpr u32 LOW_HALVES = 0x5410, HIGH_HALVES = 0x7632;

// (v & MASK) | BITS, one instruction: two bf16 codes from bits of each 16-bit half of v
template <u32 MASK, u32 BITS>
__device__ __forceinline__ u32 masked_or(u32 v) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "n"(MASK), "n"(BITS));
    return r;
}

// Nibbles at bits 0-3 and 16-19 -> two bf16 128 + q
__device__ __forceinline__ u32 codes(u32 v) { return masked_or<0x000F000F, 0x43004300>(v); }

// int8 bytes at bits 0-7 and 16-23 -> two bf16 128 + l, l the byte's low 7 bits
__device__ __forceinline__ u32 low_codes(u32 v) { return masked_or<0x007F007F, 0x43004300>(v); }

// ... -> two bf16 -128 (1 + h), h the byte's top bit, which lands on the exponent's lowest bit (-128 to -256).
// low_codes + top_codes = the signed byte.
__device__ __forceinline__ u32 top_codes(u32 v) { return masked_or<0x00800080, 0xC300C300>(v); }

__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float bf16_low(u32 pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_high(u32 pair) { return __uint_as_float(pair & 0xFFFF0000u); }

__device__ __forceinline__ u16 to_bf16(float v) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}

// What one lane takes of one group of 32 columns.
template <int NT>
struct Group {
    u32 w[2][4];     // weight words: [16-column step s][columns 8t+4s .. 8t+4s+3]
    uint4 sz_low;    // (s, z) of rows 4g..4g+3
    uint4 sz_high;   // (s, z) of rows 32+4g..35+4g
    u32 x[2][NT][2]; // B fragments: [step s][8-row tile of x][columns 8t+4s, +1 | 8t+4s+2, +3]
};

// A group's bytes in shared memory: the tile's 32 columns of 32 bytes in four blocks of 8 columns, each block
// 32 bytes after the last, then its 64 (s, z) pairs, then x's 8-row tiles (the group's 32 columns of a row, 64
// bytes). The padding puts lane t's column 8t + v in banks 8 (t + v) .. + 7 (mod 32), so that the four lanes t
// reading one word each at the same v hit different banks, at offsets a load takes as constants.
constexpr int GROUP_BYTES = 32 * 32, BLOCK_STRIDE = 8 * 32 + 32, PAIRS_BYTES = 64 * 4, X_ROW_BYTES = 64;
constexpr int COLUMNS_BYTES = 4 * BLOCK_STRIDE;
// An int8 group: the tile's 64 rows of 32 bytes, four rows a 128-byte line, row r in 32-byte slot (r ^ r / 4) % 4
// of line r / 4. Lane (g, t) reads rows 4g + i and 32 + 4g + i (tile i of add_group8) at columns 8t .. 8t + 7:
// slot i ^ g % 4 of lines g and 8 + g, so that the 16 lanes of a 64-bit load's phase (g = 0-3 or 4-7) hit every
// bank once, where rows 4g + i unswizzled lie in the same banks of four lines.
constexpr int ROWS_BYTES = 64 * 32;
template <bool INT8>
__host__ __device__ constexpr int x_offset() { return INT8 ? ROWS_BYTES : COLUMNS_BYTES + PAIRS_BYTES; }
template <int NT, bool INT8>
__host__ __device__ constexpr int stage_bytes() { return x_offset<INT8>() + NT * 8 * X_ROW_BYTES; }

__device__ __forceinline__ int column_at(int c) { return (c >> 3) * BLOCK_STRIDE + (c & 7) * 32; }

__device__ __forceinline__ void copy_async(u32 shared, const void* global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(shared), "l"(global));
}

// Lets the launch after this one (a dependent: down after gate/up) start its blocks once every block of this one has
// said so, or ended: the first warp of a block to say so says it for the block.
__device__ __forceinline__ void let_dependents_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void copy_zfill(u32 shared, const void* global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(shared), "l"(global), "r"(valid ? 16 : 0));
}

// Where this lane's copies land in the ring's first stage, as shared-space addresses: made once, so that a copy
// adds only its stage's offset. Its other weight chunks lie at constant offsets from `columns` (int4: the second
// column chunk 2 * BLOCK_STRIDE after the first; int8: four rows' chunks 512 bytes apart), and its x chunk (row
// lane >> 2, part lane % 4: lane * 16 bytes into x's rows) at `x`, int4's (s, z) chunk PAIRS_BYTES before it: two
// addresses, which ptxas remakes from the thread index at each copy in 12 instructions, where it remade four in 20.
struct CopyTo {
    u32 columns, x;
};

// One warp copies a group into a stage, in two parts: the weights (copy_weights), then x's rows (copy_x, which
// commits the copies issued so far). Weights: 64 chunks of 16 bytes of columns and 16 of (s, z) pairs; a lane
// copies column chunks lane and lane + 32 (from `columns`, at this lane's chunk) to column_at's places, and pairs
// chunk lane. x: 4 chunks of each row; a lane copies chunks lane + 32 j: row (lane >> 2) + 8 j, its 16-byte part
// lane % 4, from x_at[j]. Rows past the group's last are zero-filled, no bytes read. (Read by plain loads one group
// ahead into registers, x held up the warps as the weights had before they were copied; copied with them, the
// kernel came 7-35% faster: bench/quant_kernels.md.)
__device__ __forceinline__ void copy_weights(u32 stage, const CopyTo& to, const unsigned char* columns,
                                             const unsigned char* pairs, int lane) {
    copy_async(to.columns + stage, columns);
    copy_async(to.columns + stage + 2 * BLOCK_STRIDE, columns + 32 * 16);
    if (lane < 16) copy_async(to.x + stage - PAIRS_BYTES, pairs);
}

// int8: 128 chunks of 16 bytes, each row's two; a lane copies rows (lane >> 1) + 16 j, half lane % 2, from `rows`
// (row lane >> 1's chunk), rows row_step bytes apart
__device__ __forceinline__ void copy_rows(u32 stage, const CopyTo& to, const unsigned char* rows, long long row_step) {
#pragma unroll
    for (int j = 0; j < 4; ++j) copy_async(to.columns + stage + j * 512, rows + j * row_step);
}

template <int NT>
__device__ __forceinline__ void copy_x(u32 stage, const CopyTo& to, const u16* const (&x_at)[NT],
                                       const bool (&x_valid)[NT]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) copy_zfill(to.x + stage + 8 * j * X_ROW_BYTES, x_at[j], x_valid[j]);
    asm volatile("cp.async.commit_group;");
}

// The words of a stage for this lane (from `words`: column 8t, rows 4g..): columns 8t + 4s .. 8t + 4s + 3 of each
// step s, and the (s, z) pairs of its rows
template <int NT>
__device__ __forceinline__ void read_group(Group<NT>& f, const unsigned char* words, const unsigned char* pairs) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
#pragma unroll
        for (int v = 0; v < 4; ++v) f.w[s][v] = *(const u32*)(words + (4 * s + v) * 32);
    }
    f.sz_low = *(const uint4*)pairs;
    f.sz_high = *(const uint4*)(pairs + 128);
}

// x's B fragments of a stage, rows nt * 8 + g: columns 8t .. 8t + 7, one load a row (8 lanes, two rows, a
// 128-byte line: no bank conflict)
template <int NT, bool INT8>
__device__ __forceinline__ void read_x(u32 (&f)[2][NT][2], const unsigned char* stage, int g, int t) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const uint4 v = *(const uint4*)(stage + x_offset<INT8>() + (nt * 8 + g) * X_ROW_BYTES + 16 * t);
        f[0][nt][0] = v.x;
        f[0][nt][1] = v.y;
        f[1][nt][0] = v.z;
        f[1][nt][1] = v.w;
    }
}

// The A fragment of rows 4g+i and 32+4g+i in a 16-column step: the codes 128 + q of rows 4g+i (a[0], a[2]: the
// low nibbles) and 32+4g+i (a[1], a[3]: the high ones), two columns each, each register as `scale(codes, high)`
// gives it (high: of row 32+4g+i). near / far: the step's first and last two columns' words byte-permuted by
// pair_bytes.
template <class Scale>
__device__ __forceinline__ void row_codes(u32 (&a)[4], const u32 (&near)[2], const u32 (&far)[2], int i,
                                          Scale scale) {
    const int shift = (i & 1) * 8;
    const u32 x = near[i >> 1] >> shift, y = far[i >> 1] >> shift;
    a[0] = scale(codes(x), false);
    a[1] = scale(codes(x >> 4), true);
    a[2] = scale(codes(y), false);
    a[3] = scale(codes(y >> 4), true);
}

// Bytes 0-1 (rows 4g, 4g+1) or 2-3 (4g+2, 4g+3) of two columns' words (w: four neighbouring columns), side by
// side per 16-bit half, the first column of each pair in the low half
__device__ __forceinline__ void pair_bytes(u32 (&near)[2], u32 (&far)[2], const u32 (&w)[4]) {
    near[0] = byte_perm(w[0], w[1], LOW_HALVES);
    near[1] = byte_perm(w[0], w[1], HIGH_HALVES);
    far[0] = byte_perm(w[2], w[3], LOW_HALVES);
    far[1] = byte_perm(w[2], w[3], HIGH_HALVES);
}

// bf16x2 a * b + c, each half rounded once
__device__ __forceinline__ u32 fma_bf16x2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// (low, low) and (high, high) of a pair of 16-bit halves: (s, s) and (z, z) from a (s, z) pair. Written as unpack
// and pack, not as a byte permute, ptxas folds them into the FMA that reads them (its operand's .H0_H0 / .H1_H1):
// 16 fewer instructions a group at two tiles of x, 1-4% faster there (bench/quant_kernels.md).
__device__ __forceinline__ u32 low_twice(u32 v) {
    u32 r;
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %1;\n\tmov.b32 %0, {l, l};\n\t}" : "=r"(r) : "r"(v));
    return r;
}

__device__ __forceinline__ u32 high_twice(u32 v) {
    u32 r;
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %1;\n\tmov.b32 %0, {h, h};\n\t}" : "=r"(r) : "r"(v));
    return r;
}

// Two codes 128 + q (bf16) -> two weights (q - 8) * s + z rounded to bf16; s2, z2: (s, s) and (z, z)
__device__ __forceinline__ u32 weights(u32 code_pair, u32 s2, u32 z2) {
    const u32 ones = 0x3F803F80u, minus_136 = 0xC308C308u;  // q - 8 is exact in bf16
    return fma_bf16x2(fma_bf16x2(code_pair, ones, minus_136), s2, z2);
}

// acc[i][nt] += this group's contribution for rows 4g+i (c0, c1) and 32+4g+i (c2, c3), x rows nt*8 + 2t (+1).
// SCALED: the codes are scaled into bf16 weights before the mma, which accumulates them into acc, as a dequantized
// matrix would give, with no float32 scaling after each group (fewer instructions a weight); else the mmas run on
// the exact codes and each group's sums are scaled in float32. ONE_ROW: x has one row, 0, so the sums of x's rows
// 2t + 1 (c1, c3) are never read and not scaled: 16 of 32 FFMAs a group, in the launches of one token.
template <int NT, bool SCALED, bool ONE_ROW>
__device__ __forceinline__ void add_group(float (&acc)[4][NT][4], const Group<NT>& f) {
    const u32 low[4] = {f.sz_low.x, f.sz_low.y, f.sz_low.z, f.sz_low.w};
    const u32 high[4] = {f.sz_high.x, f.sz_high.y, f.sz_high.z, f.sz_high.w};
    float sums[NT][4], dots[4][NT][4];
    if constexpr (!SCALED) {
        const u32 ones = 0x3F803F80u;  // bf16 (1, 1)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) sums[nt][e] = 0.f;
#pragma unroll
            for (int s = 0; s < 2; ++s) mma(sums[nt], ones, ones, ones, ones, f.x[s][nt][0], f.x[s][nt][1]);
            // the dots start at -136 sum_k x_k, so that they end at sum_k x_k (q_k - 8)
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) dots[i][nt][e] = -136.f * sums[nt][e];
        }
    }
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        u32 near[2], far[2];
        pair_bytes(near, far, f.w[s]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            // (s, s) and (z, z) of rows 4g+i and 32+4g+i, for SCALED
            const u32 s_low = low_twice(low[i]), z_low = high_twice(low[i]);
            const u32 s_high = low_twice(high[i]), z_high = high_twice(high[i]);
            u32 a[4];
            row_codes(a, near, far, i, [&](u32 code_pair, bool high_row) {
                if constexpr (SCALED)
                    return high_row ? weights(code_pair, s_high, z_high) : weights(code_pair, s_low, z_low);
                else
                    return code_pair;
            });
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                mma(SCALED ? acc[i][nt] : dots[i][nt], a[0], a[1], a[2], a[3], f.x[s][nt][0], f.x[s][nt][1]);
        }
    }
    if constexpr (!SCALED) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float s_low = bf16_low(low[i]), z_low = bf16_high(low[i]);
            float s_high = bf16_low(high[i]), z_high = bf16_high(high[i]);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                acc[i][nt][0] = fmaf(s_low, dots[i][nt][0], fmaf(z_low, sums[nt][0], acc[i][nt][0]));
                acc[i][nt][2] = fmaf(s_high, dots[i][nt][2], fmaf(z_high, sums[nt][2], acc[i][nt][2]));
                if (ONE_ROW) continue;
                acc[i][nt][1] = fmaf(s_low, dots[i][nt][1], fmaf(z_low, sums[nt][1], acc[i][nt][1]));
                acc[i][nt][3] = fmaf(s_high, dots[i][nt][3], fmaf(z_high, sums[nt][3], acc[i][nt][3]));
            }
        }
    }
}

// What one lane takes of one int8 group: rows 4g + i (w[i][0]) and 32 + 4g + i (w[i][1]),
// columns 8t .. 8t + 7 (.x: step 0's 8t + 4s .. + 3, .y: step 1's), and x as Group's
template <int NT>
struct Group8 {
    uint2 w[4][2];
    u32 x[2][NT][2];
};

// The words of an int8 stage for this lane (from `words`: its rows of tile 0): tile i's rows at the slots XORed
// with i, their high rows 1 KB further
template <int NT>
__device__ __forceinline__ void read_rows(Group8<NT>& f, const unsigned char* stage, int words) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f.w[i][0] = *(const uint2*)(stage + (words ^ 32 * i));
        f.w[i][1] = *(const uint2*)(stage + (words ^ 32 * i) + 1024);
    }
}

// acc[i][nt] += this int8 group's x rows nt*8 + 2t (+1) times rows w[i]. A word's bytes 0 and 2 (columns c and
// c + 2) make the A register of k 2t, 2t + 1, bytes 1 and 3 that of 2t + 8, 2t + 9 (shifted down a byte), so x's
// B registers pair its columns so too: one byte permute each.
template <int NT>
__device__ __forceinline__ void add_group8(float (&acc)[4][NT][4], const Group8<NT>& f) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        u32 b[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            b[nt][0] = byte_perm(f.x[s][nt][0], f.x[s][nt][1], LOW_HALVES);
            b[nt][1] = byte_perm(f.x[s][nt][0], f.x[s][nt][1], HIGH_HALVES);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 low = s ? f.w[i][0].y : f.w[i][0].x, high = s ? f.w[i][1].y : f.w[i][1].x;
            const u32 low_odd = low >> 8, high_odd = high >> 8;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                mma(acc[i][nt], low_codes(low), low_codes(high), low_codes(low_odd), low_codes(high_odd), b[nt][0],
                    b[nt][1]);
                mma(acc[i][nt], top_codes(low), top_codes(high), top_codes(low_odd), top_codes(high_odd), b[nt][0],
                    b[nt][1]);
            }
        }
    }
}

template <int NT, bool INT8>
struct GroupOf {
    using type = Group<NT>;
};
template <int NT>
struct GroupOf<NT, true> {
    using type = Group8<NT>;
};

// Grid (N / 64 tiles, groups of the plan); block 32 * k_warps * (SWIGLU ? 2 : 1) threads, at most 16 / NT warps;
// shared memory warps * (2048 * NT + STAGES * stage_bytes<NT, INT8>()) bytes. INT8: p* are the int8 rows, sz* the
// rows' bf16 scales; else int4's columns and (s, z) pairs. meta holds the plan's n_used expert indices,
// then n_used + 1 row offsets into x and out. Strides in elements; *_gs: per expert; dependent: launched as a
// dependent of the launch before, whose output is x; release_eighths: where this launch lets its dependents start
// (below). Each warp copies its groups of weights into a ring of STAGES
// stages in shared memory, STAGES - 1 ahead of the one it computes: loads in flight that take no registers. x's rows
// must be 16-byte aligned (x and x_stride). ONE_ROW: at most one row of x per expert (add_group). UNROLLED: at two
// tiles of x, the loop in unrolled rounds (below), else one group at a time. One block an SM
// at least, said to ptxas: left to itself, it held the one-row kernels to 64 registers, remaking more values in the
// loop, and one token's FFN took 13.22 us against 12.91 on the H100; the other kernels take more registers so too
// (87-123), and were as fast or faster at every launch measured (bench/quant_kernels.md).
template <int NT, bool SWIGLU, int STAGES, bool ONE_ROW, bool INT8, bool UNROLLED>
__global__ void __launch_bounds__(512 / NT, 1) quant_decode(
    const u16* __restrict__ x, long long x_stride, u16* __restrict__ out, long long out_stride,
    const int* __restrict__ meta, int n_used,
    const unsigned char* __restrict__ p1, const u16* __restrict__ sz1,
    const unsigned char* __restrict__ p2, const u16* __restrict__ sz2,
    long long p1_gs, long long sz1_gs, long long p2_gs, long long sz2_gs, int n, int k, int k_warps,
    int dependent, int release_eighths) {
    // int8's gate/up stays with Triton's kernel, faster there at every launch measured (bench/quant_kernels.md)
    static_assert(!(INT8 && SWIGLU), "int8 runs one matrix, down");
    static_assert(STAGES >= 2, "a ring refills the stage read one group before the one it reads");
    constexpr int E = 16 * NT;  // accumulators per lane
    extern __shared__ __align__(16) unsigned char shared[];
    float* partial = (float*)shared;  // [warp][sums a lane keeps, SUMS below][32 lanes], the warps' sums

    const int tile = blockIdx.x, item = blockIdx.y;
    const long long expert = meta[item];
    const int first = meta[n_used + item], rows = meta[n_used + item + 1] - first;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bool second = SWIGLU && warp >= k_warps;
    const int kw = warp % k_warps;
    const int groups = k / 32;
    const int begin = kw * groups / k_warps, end = (kw + 1) * groups / k_warps;
    const int warps = blockDim.x >> 5;
    // A plan over every expert of a stack lists empty ones: nothing to read. The check reads the expert too (never
    // negative), so that its load leaves with the row offsets' rather than one round trip after them, where the
    // compiler put it when only the offsets were checked.
    if (rows == 0 || expert < 0) return;
    constexpr int STAGE_BYTES = stage_bytes<NT, INT8>(), GROUP_STEP = INT8 ? 32 : GROUP_BYTES;
    unsigned char* ring = shared + warps * E * 32 * 4 + warp * STAGES * STAGE_BYTES;

    const unsigned char* packed = second ? p2 + expert * p2_gs : p1 + expert * p1_gs;
    const u16* scales = second ? sz2 + expert * sz2_gs : sz1 + expert * sz1_gs;
    // this lane's chunk of the next group to copy: int4, of its 1 KB of columns, and of its (s, z) pairs (lanes
    // 0-15), n * 4 bytes after the previous group's; int8, of row lane >> 1 (copy_rows), 32 bytes after the last
    const unsigned char* columns =
        INT8 ? packed + (long long)(tile * 64 + (lane >> 1)) * k + begin * 32 + (lane & 1) * 16
             : packed + ((long long)tile * k + begin * 32) * 32 + lane * 16;
    const unsigned char* pairs = (const unsigned char*)(scales + tile * 64 * 2) + (long long)begin * n * 4 + lane * 16;
    const long long row_step = 16LL * k;
    // the next 8 columns of x this lane copies, of rows (lane >> 2) + 8 j: pointers that step on by a group (made
    // from the row at each copy, they took 10 more instructions a group)
    const u16* x_at[NT];
    bool x_valid[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int row = (lane >> 2) + 8 * j;
        x_valid[j] = row < rows;
        x_at[j] = x + (first + (x_valid[j] ? row : 0)) * x_stride + begin * 32 + (lane & 3) * 8;
    }

    float acc[4][NT][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][nt][e] = 0.f;

    // where this lane's copies land in a stage, and where it reads its words and (s, z) pairs
    const u32 ring_at = (u32)__cvta_generic_to_shared(ring);
    const u32 row_chunk = (lane >> 3) * 128 + (((lane >> 1) ^ (lane >> 3)) & 3) * 32 + (lane & 1) * 16;
    const CopyTo to = {ring_at + (INT8 ? row_chunk : column_at(lane >> 1) + (lane & 1) * 16),
                       ring_at + x_offset<INT8>() + lane * 16};
    // int8: its rows of tile 0, whose slots (g % 4) tile i's XOR with i (read_rows)
    const int words = INT8 ? g * 128 + 32 * (g & 3) + 8 * t : column_at(8 * t) + 4 * g;
    const int pairs_at = COLUMNS_BYTES + 16 * g;

    const auto copy_group = [&](u32 stage, int ahead) {  // the weights `ahead` groups after the next
        if constexpr (INT8)
            copy_rows(stage, to, columns + ahead * GROUP_STEP, row_step);
        else
            copy_weights(stage, to, columns + ahead * GROUP_STEP, pairs + ahead * n * 4, lane);
    };
    const auto advance = [&]() {  // to the next group
        columns += GROUP_STEP;
        if (!INT8) pairs += n * 4;
#pragma unroll
        for (int j = 0; j < NT; ++j) x_at[j] += 32;
    };
    // copies `group` into ring stage `stage` where there is one (`in_range`: the caller knows there is): one
    // commit either way, so that waiting for all but the STAGES - 1 latest is the group about to be read
    const auto copy_next = [&](int group, u32 stage, bool in_range) {  // stage: its byte offset in the ring
        if (in_range || group < end) {
            copy_group(stage, 0);
            copy_x<NT>(stage, to, x_at, x_valid);
            advance();
        } else {
            asm volatile("cp.async.commit_group;");
        }
    };
    // The first STAGES - 1 groups. Launched as a dependent of the launch before (down after gate/up, `dependent`),
    // this block may have started while that one ran: x, its output, is read only once it has finished, and the
    // weights, which it does not write, are on their way meanwhile: every one of those groups' weights, then x's
    // rows (the first commit holds all their weights, so a wait for it waits for more than it must, never less).
    // Launched plainly, each group's weights and x are one commit, so the first group is read as soon as it has
    // landed rather than once every group of the first STAGES - 1 has: on the H100 one token's 8 experts' FFN
    // took 14.46 us against 15.05 (bench/quant_kernels.md).
    // The launch after this one may start its blocks in SMs this one leaves free, to copy and wait there in turn:
    // from this one's start (release_eighths 0), or once each of its blocks has a warp release_eighths eighths of
    // the way through its groups (a one-group loop's, and after the loop in any case). Down's blocks let in at
    // gate/up's start copy their weights while gate/up's loop still runs, and slowed it more than they gained; let
    // in at its middle, the FFN of one token's 8 experts was 0.9-1.8% faster at 9-16 rows and 1.2-2.0% at 1 on the
    // H100 over two starts, 16 x 16 2.8-3.1%; Q4_K_M's mix (down in int8) 1.3% slower at 8 x 1, 1.6% faster at 16 x 16
    // (bench/quant_kernels.md). Before this one's own wait: only down is launched as a dependent, and only of
    // gate/up, which is launched plainly; a chain of dependents would move this after the wait, lest a launch's
    // early copies overtake the launch two before it.
    if (release_eighths == 0) let_dependents_start();
    const int release_at = release_eighths ? begin + (end - begin) * release_eighths / 8 : -1;
    if (dependent) {
#pragma unroll
        for (int d = 0; d < STAGES - 1; ++d)
            if (begin + d < end) copy_group(d * STAGE_BYTES, d);
#if __CUDA_ARCH__ >= 900
        asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#pragma unroll
        for (int d = 0; d < STAGES - 1; ++d) {
            if (begin + d < end) {
                copy_x<NT>(d * STAGE_BYTES, to, x_at, x_valid);
                advance();
            } else {
                asm volatile("cp.async.commit_group;");
            }
        }
    } else {
#pragma unroll
        for (int d = 0; d < STAGES - 1; ++d) copy_next(begin + d, d * STAGE_BYTES, false);
    }
    typename GroupOf<NT, INT8>::type f;
    // the copy STAGES - 1 groups ahead into stage `fill`, the one read one group ago, then stage `read`'s group
    const auto step = [&](int group, u32 read_stage, u32 fill, bool copy_in_range) {  // stages' byte offsets
        copy_next(group + STAGES - 1, fill, copy_in_range);
        const unsigned char* read = ring + read_stage;
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1));
        __syncwarp();  // the other lanes' copies of this stage have landed too
        if constexpr (INT8) {
            read_rows(f, read, words);
            read_x<NT, INT8>(f.x, read, g, t);
            add_group8<NT>(acc, f);
        } else {
            read_group(f, read + words, read + pairs_at);
            read_x<NT, INT8>(f.x, read, g, t);
            // two tiles of x (9-16 rows): the weights scaled before the mma, 3-8% faster there on the H200; one
            // tile keeps them exact, 4% faster than scaled at 128 experts (bench/quant_kernels.md)
            add_group<NT, NT >= 2, ONE_ROW>(acc, f);
        }
        __syncwarp();  // every lane has read this stage before the next iteration refills it
    };
    if constexpr (NT >= 2 && UNROLLED) {
        // rounds of STAGES groups, unrolled so that each stage's offset is a constant, and without a check while
        // every copy of the round is of the warp's groups; then the last ones one at a time. 4-7% faster at two tiles
        // of x on the H200; at one tile, unrolled, the loop took more registers and was 1-4% slower. Where a few
        // experts' two launches share the SMs, the shorter loop below was faster (mma_decode.unrolled_rounds;
        // bench/quant_kernels.md).
        int group = begin;
        for (; group + 2 * STAGES - 2 < end; group += STAGES)
#pragma unroll
            for (int s = 0; s < STAGES; ++s)
                step(group + s, s * STAGE_BYTES, (s + STAGES - 1) % STAGES * STAGE_BYTES, true);
        for (; group < end; ++group)
            step(group, (group - begin) % STAGES * STAGE_BYTES, (group - begin + STAGES - 1) % STAGES * STAGE_BYTES,
                 false);
    } else {
        u32 read = 0, fill = (STAGES - 1) * STAGE_BYTES;
        for (int group = begin; group < end; ++group) {
            if (group == release_at) let_dependents_start();
            step(group, read, fill, false);
            fill = read;
            read = read == (STAGES - 1) * STAGE_BYTES ? 0 : read + STAGE_BYTES;
        }
    }

    if (release_eighths) let_dependents_start();  // a warp with no groups (the others said it in the loop)
    // the sums a lane keeps of each (i, nt), KEPT of them: all four, or under ONE_ROW those of x's row 0 (c0, c2:
    // accumulators E_STEP apart)
    constexpr int KEPT = ONE_ROW ? 2 : 4, SUMS = 4 * NT * KEPT, E_STEP = 4 / KEPT;
    float* mine = partial + warp * SUMS * 32 + lane;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int j = 0; j < KEPT; ++j) mine[((i * NT + nt) * KEPT + j) * 32] = acc[i][nt][j * E_STEP];
    __syncthreads();
    const auto finish = [&](float y, float up, int i, int nt, int e) {  // accumulator (i, nt, e) of this lane
        const int row = nt * 8 + 2 * t + (e & 1);
        // rows past the last are not written, nor computed (their zero sums once sent SwiGLU's IEEE division to its
        // slow path in nearly every warp, 0.24 us of one token's 14.3 us FFN on the H100: bench/quant_kernels.md)
        if (row >= rows) return;
        const int col = tile * 64 + (e < 2 ? 4 * g + i : 32 + 4 * g + i);
        if constexpr (INT8) y *= bf16_low(sz1[expert * sz1_gs + col]);  // the row's scale
        // a fast reciprocal rather than IEEE division, whose four a lane at two tiles of x held up the block's last
        // steps: within 2 ulps of float32, it moved a few outputs by one or two bf16 steps (bench/quant_kernels.md)
        const float v = SWIGLU ? __fdividef(y, 1.f + __expf(-y)) * up : y;
        out[(first + row) * out_stride + col] = to_bf16(v);
    };
    if (warps >= SUMS) {
        // a block of at least as many warps as a lane keeps sums (gate/up of a few experts, 16 warps; down of one
        // row's, 8): one sum a warp, its partial sums eight loads at a time. By quads, 4 of the 16 warps did it in
        // 16 rounds each, a round's loads waiting for the last's: on the H100 one token's FFN took 13.9 us against
        // 14.4. Spread so at fewer warps too (several sums a warp, each a load at a time), launches of 16 experts
        // and more were 3-7% slower (bench/quant_kernels.md).
        for (int a = warp; a < SUMS; a += warps) {  // a = (i * NT + nt) * KEPT + j, as the sums were written
            const float* sums = partial + a * 32 + lane;
            float y = 0.f, up = 0.f;
#pragma unroll 8
            for (int w = 0; w < k_warps; ++w) y += sums[w * SUMS * 32];
            if (SWIGLU)
#pragma unroll 8
                for (int w = k_warps; w < 2 * k_warps; ++w) up += sums[w * SUMS * 32];
            const int quad = a / KEPT;
            finish(y, up, quad / NT, quad % NT, a % KEPT * E_STEP);
        }
        return;
    }
    // else the warps share the block's sums out by (i, nt), KEPT loads in flight at a time. With warp 0 adding every
    // sum alone, 8 experts' gate/up (which then took this path) spent longer on that than on their last groups; an
    // unrolled loop over every accumulator instead (warps skipping the others') was as slow there, its code too long
    // for the warps to share their instruction cache.
    for (int quad = warp; quad < 4 * NT; quad += warps) {
        const int i = quad / NT, nt = quad % NT;
        const float* sums = partial + quad * KEPT * 32 + lane;
        float y[KEPT] = {}, up[KEPT] = {};
#pragma unroll 1
        for (int w = 0; w < k_warps; ++w)
#pragma unroll
            for (int j = 0; j < KEPT; ++j) y[j] += sums[w * SUMS * 32 + j * 32];
        if (SWIGLU)
#pragma unroll 1
            for (int w = k_warps; w < 2 * k_warps; ++w)
#pragma unroll
                for (int j = 0; j < KEPT; ++j) up[j] += sums[w * SUMS * 32 + j * 32];
#pragma unroll
        for (int j = 0; j < KEPT; ++j) finish(y[j], up[j], i, nt, j * E_STEP);
    }
}
