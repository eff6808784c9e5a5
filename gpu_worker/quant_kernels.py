"""Quantized experts on the GPU: Triton and CUDA kernels that read the int8 / int4 serving formats in place.

Matrices come as stacks with a leading expert dimension (a layer's hot experts, or VRAM slots of raw
expert regions, where stride(0) is the region size), and rows of x are grouped by expert as in
gpu_worker.grouped. Two regimes:
- decode (at most DECODE_MAX_ROWS rows per expert): one launch per matrix over all experts, each
  program dequantizing a tile of rows in registers and multiplying it into that expert's rows, so
  every quantized byte is read once; gate and up run in the same launch with the SwiGLU fused. int4 is a CUDA
  kernel (gpu_worker.mma_decode), whose inner loop Triton could not express; int8 a Triton kernel, but for the down
  of a few experts launched as a dependent of gate/up, which takes the CUDA kernel (int8_down_on_mma).
- prefill: the experts in use are dequantized into a bf16 scratch and torch's grouped GEMM takes
  over, whose arithmetic then dominates the extra pass over the weights.

Import this module only on the CUDA path: it needs triton, which CUDA builds of torch bring along, and the CUDA
decode kernel (int4, int8's down) needs cupy.
"""

from __future__ import annotations

import functools
from itertools import accumulate
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from gpu_worker import mma_decode
from gpu_worker.grouped import swiglu_grouped
from shared.quant import INT4_ROW_TILE, Int4Matrix, Int8Matrix

QuantMatrix = Int8Matrix | Int4Matrix
DECODE_MAX_ROWS = 16  # rows per expert the decode kernels take (one tensor-core tile of 16 rows)
FEW_EXPERTS = 8  # the smallest tuning class of Triton's int8 decode (GroupPlan.size_class): one token's experts
# Experts dequantized to bf16 at once by prefill. Each pass costs ~0.6 ms of host work (plans, Triton launches,
# the grouped GEMMs' set-up): 4096 tokens x top-8 over 128 experts took 2,476 us in passes of 32 (the GPU
# waiting on the host), 1,438 in passes of 64 and 1,391 in one pass, against 886 for bf16 (H200).
PREFILL_EXPERTS_PER_PASS = 64
# The int4 layout interleaves rows in tiles of 64: a tile's column k is 32 bytes, rows j (low nibbles) and
# 32 + j (high nibbles); the kernel also uses that every (scale, zero) pair covers 32 columns.
_ROW_TILE = tl.constexpr(INT4_ROW_TILE)
# Operand type of the tensor-core products. The interpreter (as the CPU tests run the kernels) keeps bf16 as raw
# 16-bit integers and multiplies those, so there the operands are float32.
_OPERAND = tl.constexpr(tl.float32 if knobs.runtime.interpret else tl.bfloat16)
# Launches on the CUDA kernel (int4's, int8's down) of up to this many experts whose x is the output of the launch
# just before (decode's down after gate/up) start as its dependents (programmatic dependent launch): their blocks are
# placed and started while that one's last blocks run, copy their first groups of weights, and wait only before
# reading x. For int4 on the H100 one token's FFN took 15.0 us against 16.9 launched after gate/up, 16 experts' 22.4
# against 25.3, 32 experts' at 4 rows 37.8 against 41.2; at 64 x 2 it was 1-2% slower, the waiting blocks holding SMs
# that the launch before could still use (128 x 16: within 0.5%).
DEPENDENT_LAUNCH_EXPERTS = 32
# int8's down of up to this many experts runs on the CUDA kernel as a dependent of gate/up (int8_down_on_mma), which
# copies every warp's first groups of weights before it waits. On the H100 one token's FFN took 19.4 us against 20.6
# with Triton's down (64% of HBM against 60%; gate/up on the autotuner's pick then), Q4_K_M's 14.9 against 16.6 (63%
# against 56%). With Triton's down the FFN was within 1% at 16 experts of one row and 6-9% faster at 32 experts. At
# 9-16 rows, with the kernel's shallowest ring there (mma_decode.ring_stages), 8 experts' FFN took 19.4-19.8 us
# against 20.4-21.1 with Triton's down, Q4_K_M's 15.4-15.8 against 16.5-17.1; 1-4 experts' 4-13% faster
# (bench/quant_kernels.md).
INT8_MMA_DOWN_EXPERTS = 8
# Triton's int8 down is launched as a dependent from this many experts, loading its first tile of weights before it
# waits. On the H100 16 experts' FFN took 32.6 us against 33.5 launched after gate/up, 32 experts' at 4 rows 60.0
# against 61.1 (after int4 gate/up, as Q4_K_M's experts run: 27.9 against 28.5, 47.0 against 48.3); at one token's
# 8 experts it was between 3% faster and 8% slower, by run and by mix (bench/quant_kernels.md).
INT8_DEPENDENT_LAUNCH_FROM = 9


def _configs(options: list[tuple]) -> list[triton.Config]:
    """(kwargs, warps, stages) each."""
    configs = [triton.Config(kwargs, num_warps=warps, num_stages=stages) for kwargs, warps, stages in options]
    return configs[:1] if knobs.runtime.interpret else configs  # one config: the interpreter has nothing to time


# int8's gate/up of a few experts (size class FEW_EXPERTS) takes this configuration, (kwargs, warps, stages), not
# the autotuner's pick. Timing each configuration's launch alone, the autotuner picked three different ones on four
# starts of the H100, and one token's FFN took 18.3 to 20.7 us by the pick; in the FFN this one was the fastest at
# 1 x 1, 8 x 1 and 8 x 4 (18.26 us at 8 x 1, 67.9% of HBM, against 19.50 and 20.74 for the other two picks:
# bench/quant_kernels.md).
_FEW_EXPERTS_GATE_UP = ({"BLOCK_N": 32, "BLOCK_K": 256}, 4, 3)


def _decode_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """The configurations to tune a decode launch over: those whose K tile fits K (wider ones only mask lanes),
    the narrowest if none does; of them, for gate/up of a few experts, _FEW_EXPERTS_GATE_UP alone."""
    launch = {**named_args, **kwargs}  # the autotuner passes positional arguments (K) apart from keywords (SWIGLU)
    fitting = [c for c in configs if c.kwargs["BLOCK_K"] <= launch["K"]]
    if launch["SWIGLU"] and launch["size_class"] == FEW_EXPERTS:
        fitting = [c for c in fitting if (c.kwargs, c.num_warps, c.num_stages) == _FEW_EXPERTS_GATE_UP] or fitting
    return fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_K"])]


def _bench_briefly(fn, quantiles):  # tuning runs once per shape and size class: a short timing suffices
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# DEPENDENT is not in the key: the autotuner times each launch alone, where a dependent one runs as a plain one
_TUNING = dict(key=["N", "K", "SWIGLU", "size_class"], prune_configs_by={"early_config_prune": _decode_configs},
               do_bench=_bench_briefly)


# ---------------------------------------------------------------- tiles of dequantized weights


@triton.jit
def _int8_tile(q_ptr, K, n, n_mask, k0, BLOCK_K: tl.constexpr):
    """(BLOCK_K, len(n)) of q transposed, as dot operands (int8 is exact in bf16); the row scale is applied
    after the dot."""
    k = k0 + tl.arange(0, BLOCK_K)
    q = tl.load(q_ptr + n[None, :] * K + k[:, None], mask=n_mask[None, :] & (k < K)[:, None], other=0)
    return q.to(_OPERAND)


@triton.jit
def _int4_tile(p_ptr, sz_ptr, N, K, block, k0, BLOCK_K: tl.constexpr):
    """Dequantized W of one 64-row tile for columns k0 .. k0+BLOCK_K, float32, as two (BLOCK_K // 32, 32, 32)
    arrays [k // 32, k % 32, row] for the tile's rows 0..31 (low nibbles) and 32..63 (high nibbles)."""
    KG: tl.constexpr = BLOCK_K // 32
    kg = tl.arange(0, KG)
    j = tl.arange(0, 32)
    k = k0 + kg[:, None, None] * 32 + tl.arange(0, 32)[None, :, None]
    packed = tl.load(p_ptr + block * K * 32 + k * 32 + j[None, None, :], mask=k < K, other=0)
    group = k0 // 32 + kg
    sz = sz_ptr + (group[:, None] * N + block * _ROW_TILE + j[None, :]) * 2  # (s, z) of rows 0..31
    g_mask = (group < K // 32)[:, None]
    s_lo = tl.load(sz, mask=g_mask, other=0).to(tl.float32)
    z_lo = tl.load(sz + 1, mask=g_mask, other=0).to(tl.float32)
    s_hi = tl.load(sz + 64, mask=g_mask, other=0).to(tl.float32)  # rows 32..63: 32 rows of 2 values on
    z_hi = tl.load(sz + 65, mask=g_mask, other=0).to(tl.float32)
    # W = (q - 8) * s + z = q * s + (z - 8 s)
    lo = (packed & 15).to(tl.float32) * s_lo[:, None, :] + (z_lo - 8 * s_lo)[:, None, :]
    hi = (packed >> 4).to(tl.float32) * s_hi[:, None, :] + (z_hi - 8 * s_hi)[:, None, :]
    return lo, hi


@triton.jit
def _rows_of(meta_ptr, n_used, i, K, BLOCK_M: tl.constexpr):
    """Expert index and row span of group i, and how far along K to go: 0 for a group with no rows, whose
    program then reads no weights (a plan from device-side counts lists every expert of the stack); meta holds
    the groups' experts, then n_used + 1 row offsets."""
    expert = tl.load(meta_ptr + i).to(tl.int64)
    start = tl.load(meta_ptr + n_used + i)
    end = tl.load(meta_ptr + n_used + i + 1)
    rows = start + tl.arange(0, BLOCK_M)
    return expert, rows, rows < end, tl.where(end > start, K, 0)


@triton.jit
def _x_tile(x_ptr, x_stride, rows, row_mask, K, k0, BLOCK_K: tl.constexpr):
    k = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + rows[:, None] * x_stride + k[None, :], mask=row_mask[:, None] & (k < K)[None, :], other=0.0)
    return x.to(_OPERAND)


# ---------------------------------------------------------------- decode: fused dequantize + multiply


@triton.autotune(configs=_configs([  # none of these spills registers on sm_90 (ptxas report)
    ({"BLOCK_N": 32, "BLOCK_K": 128}, 4, 4),
    _FEW_EXPERTS_GATE_UP,
    ({"BLOCK_N": 32, "BLOCK_K": 64}, 4, 4),
    ({"BLOCK_N": 64, "BLOCK_K": 128}, 4, 4),
    ({"BLOCK_N": 64, "BLOCK_K": 256}, 8, 3),
    ({"BLOCK_N": 128, "BLOCK_K": 128}, 8, 3),
]), **_TUNING)
@triton.jit(do_not_specialize=["n_used", "size_class"])  # one compiled kernel for any number of experts
def _int8_decode_kernel(x_ptr, x_stride, out_ptr, out_stride, meta_ptr, n_used,
                        q1_ptr, s1_ptr, q2_ptr, s2_ptr, q1_gs, s1_gs, q2_gs, s2_gs, N, K, size_class,
                        SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GRID_DEPENDENCY: tl.constexpr, DEPENDENT: tl.constexpr):
    """out[rows] = x[rows] @ W1.T, or silu(x[rows] @ W1.T) * (x[rows] @ W2.T) with SWIGLU, for one
    expert's rows (program axis 1) and BLOCK_N output columns (axis 0). GRID_DEPENDENCY: the GPU has grid dependency
    control (Hopper on), so a gate/up lets a dependent down start. DEPENDENT (down only): launched as a dependent of
    the launch before, whose output x is: the first tile of weights is loaded before waiting for it to finish."""
    tl.static_assert(not (DEPENDENT and SWIGLU), "only down, one matrix, is launched as a dependent")
    expert, rows, row_mask, k_end = _rows_of(meta_ptr, n_used, tl.program_id(1), K, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    q1_ptr += expert * q1_gs
    q2_ptr += expert * q2_gs
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU and GRID_DEPENDENCY:
        gdc_launch_dependents()  # down, if launched as a dependent, may place its blocks in the SMs left free
    start = 0
    if DEPENDENT:
        first = _int8_tile(q1_ptr, K, n, n_mask & (k_end > 0), 0, BLOCK_K)
        gdc_wait()
        acc1 = tl.dot(_x_tile(x_ptr, x_stride, rows, row_mask, K, 0, BLOCK_K), first, acc1)
        start = BLOCK_K
    for k0 in range(start, k_end, BLOCK_K):
        x = _x_tile(x_ptr, x_stride, rows, row_mask, K, k0, BLOCK_K)
        acc1 = tl.dot(x, _int8_tile(q1_ptr, K, n, n_mask, k0, BLOCK_K), acc1)
        if SWIGLU:
            acc2 = tl.dot(x, _int8_tile(q2_ptr, K, n, n_mask, k0, BLOCK_K), acc2)
    y = acc1 * tl.load(s1_ptr + expert * s1_gs + n, mask=n_mask, other=0).to(tl.float32)[None, :]
    if SWIGLU:
        up = acc2 * tl.load(s2_ptr + expert * s2_gs + n, mask=n_mask, other=0).to(tl.float32)[None, :]
        y = y * tl.sigmoid(y) * up
    tl.store(out_ptr + rows[:, None] * out_stride + n[None, :], y.to(tl.bfloat16),
             mask=row_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------- prefill: dequantize into a bf16 scratch


@triton.jit
def _int8_dequant_kernel(q_ptr, s_ptr, q_gs, s_gs, meta_ptr, out_ptr, out_gs, out_rs, N, K,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[i] = W[meta[i]] in bf16 for used group i (axis 2), one (BLOCK_N, BLOCK_K) tile per program."""
    i = tl.program_id(2)
    expert = tl.load(meta_ptr + i).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = n < N
    q = _int8_tile(q_ptr + expert * q_gs, K, n, n_mask, k0, BLOCK_K)  # (BLOCK_K, BLOCK_N)
    w = q.to(tl.float32) * tl.load(s_ptr + expert * s_gs + n, mask=n_mask, other=0).to(tl.float32)[None, :]
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + i.to(tl.int64) * out_gs + n[None, :] * out_rs + k[:, None], w.to(tl.bfloat16),
             mask=n_mask[None, :] & (k < K)[:, None])


@triton.jit
def _int4_dequant_kernel(p_ptr, sz_ptr, p_gs, sz_gs, meta_ptr, out_ptr, out_gs, out_rs, N, K,
                         BLOCK_K: tl.constexpr):
    """As _int8_dequant_kernel, one 64-row block (axis 0) by BLOCK_K columns (axis 1) per program."""
    i = tl.program_id(2)
    expert = tl.load(meta_ptr + i).to(tl.int64)
    block = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    lo, hi = _int4_tile(p_ptr + expert * p_gs, sz_ptr + expert * sz_gs, N, K, block, k0, BLOCK_K)
    k = k0 + tl.arange(0, BLOCK_K // 32)[:, None, None] * 32 + tl.arange(0, 32)[None, :, None]
    row = block * _ROW_TILE + tl.arange(0, 32)[None, None, :]
    out = out_ptr + i.to(tl.int64) * out_gs + row * out_rs + k
    tl.store(out, lo.to(tl.bfloat16), mask=k < K)
    tl.store(out + 32 * out_rs, hi.to(tl.bfloat16), mask=k < K)


_DEQUANT_INT8_BLOCK = (32, 256)  # (rows, columns): 8 KB read, 16 KB written per program
_DEQUANT_INT4_BLOCK_K = 256  # 64 rows x 256 columns: 8 KB read, 32 KB written per program


# ---------------------------------------------------------------- host side


class GroupPlan(NamedTuple):
    """Where each group's rows lie, on the device: the used experts (plan_groups), or every expert of a stack
    with counts the host never reads (plan_all_experts), empty ones included."""

    meta: torch.Tensor  # int32: the n_used expert indices, then n_used + 1 row offsets
    n_used: int
    used_at_most: int  # how many of the groups have rows, or at most have
    rows_at_most: int  # rows in any one group, or at most

    @property
    def size_class(self) -> int:
        """Tuning bucket for the number of experts in a launch: few experts want narrower tiles, for more
        programs."""
        return FEW_EXPERTS if self.used_at_most <= FEW_EXPERTS else 32 if self.used_at_most <= 32 else 128

    @property
    def ends(self) -> torch.Tensor:
        """Cumulative row ends, the `offs` of torch._grouped_mm."""
        return self.meta[self.n_used + 1:]


def plan_groups(groups: list[int], counts: list[int], device: torch.device) -> GroupPlan:
    """One small host-to-device copy per call, as swiglu_grouped makes for its offsets."""
    used = [(g, c) for g, c in zip(groups, counts, strict=True) if c > 0]
    used_counts = [c for _, c in used]
    host = torch.tensor([g for g, _ in used] + list(accumulate(used_counts, initial=0)), dtype=torch.int32)
    return GroupPlan(host.to(device, non_blocking=True), len(used), len(used), max(used_counts, default=0))


def plan_all_experts(counts: torch.Tensor, used_at_most: int, rows_at_most: int) -> GroupPlan:
    """A plan over every expert of a stack from rows per expert on the device (x sorted by expert), made
    without waiting on the device; `used_at_most` experts have rows (what the launches are tuned for), none
    more than `rows_at_most`."""
    experts = counts.shape[0]
    meta = torch.zeros(2 * experts + 1, dtype=torch.int32, device=counts.device)
    meta[:experts] = torch.arange(experts, dtype=torch.int32, device=counts.device)
    torch.cumsum(counts, 0, dtype=torch.int32, out=meta[experts + 1:])
    return GroupPlan(meta, experts, min(used_at_most, experts), rows_at_most)


def _shape(w: QuantMatrix) -> tuple[int, int]:
    """(N, K) of a stacked matrix, after checking the layout the kernels address (only dim 0 may be strided)."""
    if isinstance(w, Int8Matrix):
        _, n, k = w.q.shape
        assert w.q.dtype == torch.int8 and w.q.stride()[1:] == (k, 1), "int8 q must be (G, N, K), rows contiguous"
        assert w.scale.shape[1:] == (n,) and w.scale.stride(1) == 1, "int8 scale must be (G, N)"
        return n, k
    _, n, half_k = w.packed.shape
    k = 2 * half_k
    assert w.packed.dtype == torch.uint8 and w.packed.stride()[1:] == (half_k, 1), "int4 packed must be (G, N, K/2)"
    assert n % INT4_ROW_TILE == 0 and k % 32 == 0, "int4 needs N % 64 == 0 and K % 32 == 0"
    assert w.scale_zero.shape[1:] == (k // 32, n, 2) and w.scale_zero.stride()[1:] == (2 * n, 2, 1), \
        "int4 scale_zero must be (G, K/32, N, 2)"
    return n, k


def decode_linear(x: torch.Tensor, w1: QuantMatrix, w2: QuantMatrix | None, plan: GroupPlan,
                  out: torch.Tensor, k_warps: int | None = None) -> torch.Tensor:
    """out = x @ W1.T per expert, or silu(x @ W1.T) * (x @ W2.T) when w2 is given; one launch, every plan count
    <= DECODE_MAX_ROWS. x (P, K) and out (P, N) bf16 with unit column stride. `k_warps` (int4) overrides how
    many warps cut K for each tile of rows (gpu_worker.mma_decode.k_warps_for)."""
    n, k = _shape(w1)
    assert w2 is None or (type(w2) is type(w1) and _shape(w2) == (n, k)), "gate and up must match"
    return _launch_decode(x, w1, w2, n, k, plan, out, k_warps)


def _launch_decode(x: torch.Tensor, w1: QuantMatrix, w2: QuantMatrix | None, n: int, k: int, plan: GroupPlan,
                   out: torch.Tensor, k_warps: int | None = None, dependent: bool = False) -> torch.Tensor:
    """decode_linear after its shape checks, (n, k) W1's: a grouped call checks its stacks once, where five
    checks a call were 3% of a one-stream decode step's host time (bench/README.md). `dependent`: x is the output
    of the launch just before on this stream, which a launch of up to DEPENDENT_LAUNCH_EXPERTS experts may then
    overlap (int8: on the CUDA kernel where int8_down_on_mma, else Triton's from INT8_DEPENDENT_LAUNCH_FROM)."""
    assert x.stride(1) == 1 and out.stride(1) == 1
    swiglu = w2 is not None
    w2 = w2 if swiglu else w1
    grid_dependency = _grid_dependency(x.device)
    dependent = dependent and grid_dependency and plan.used_at_most <= DEPENDENT_LAUNCH_EXPERTS
    if isinstance(w1, Int8Matrix) and not (dependent and int8_down_on_mma(n, k, plan, x.device)):
        common = dict(SWIGLU=swiglu, BLOCK_M=DECODE_MAX_ROWS, size_class=plan.size_class)
        args = (x, x.stride(0), out, out.stride(0), plan.meta, plan.n_used)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), plan.n_used)  # noqa: E731
        dependent = dependent and plan.used_at_most >= INT8_DEPENDENT_LAUNCH_FROM
        _int8_decode_kernel[grid](*args, w1.q, w1.scale, w2.q, w2.scale, w1.q.stride(0), w1.scale.stride(0),
                                  w2.q.stride(0), w2.scale.stride(0), n, k, **common, GRID_DEPENDENCY=grid_dependency,
                                  DEPENDENT=dependent, launch_pdl=dependent)
    else:
        mma_decode.decode(x, w1, w2, swiglu, plan.meta, plan.n_used, plan.used_at_most, plan.rows_at_most, out,
                          k_warps, dependent)
    return out


def int8_down_on_mma(n: int, k: int, plan: GroupPlan, device: torch.device) -> bool:
    """Whether decode's int8 down (n, k) on `device` runs on mma_decode's kernel, launched as a dependent of gate/up
    (INT8_MMA_DOWN_EXPERTS), not on Triton's."""
    return (_grid_dependency(device) and plan.used_at_most <= min(INT8_MMA_DOWN_EXPERTS, DEPENDENT_LAUNCH_EXPERTS)
            and mma_decode.takes(n, k) and mma_decode.available())


@functools.cache
def _grid_dependency(device: torch.device) -> bool:
    """Whether launches on `device` may start as dependents (griddepcontrol is PTX for sm_90 on); never under the
    interpreter (as the CPU tests run the kernels), which launches everything in turn."""
    return not knobs.runtime.interpret and torch.cuda.get_device_capability(device)[0] >= 9


def dequantize_used(w: QuantMatrix, plan: GroupPlan, out: torch.Tensor) -> torch.Tensor:
    """out[i] = bf16 W of the plan's i-th used expert; out (n_used, N, K) with unit column stride."""
    n, k = _shape(w)
    assert out.shape == (plan.n_used, n, k) and out.stride(2) == 1
    args = (plan.meta, out, out.stride(0), out.stride(1), n, k)
    if isinstance(w, Int8Matrix):
        block_n, block_k = _DEQUANT_INT8_BLOCK
        grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k), plan.n_used)
        _int8_dequant_kernel[grid](w.q, w.scale, w.q.stride(0), w.scale.stride(0), *args,
                                   BLOCK_N=block_n, BLOCK_K=block_k)
    else:
        block_k = min(_DEQUANT_INT4_BLOCK_K, triton.next_power_of_2(k))
        grid = (n // INT4_ROW_TILE, triton.cdiv(k, block_k), plan.n_used)
        _int4_dequant_kernel[grid](w.packed, w.scale_zero, w.packed.stride(0), w.scale_zero.stride(0), *args,
                                   BLOCK_K=block_k)
    return out


def grouped_linear(x: torch.Tensor, w: QuantMatrix, groups: list[int], counts: list[int]) -> torch.Tensor:
    """x (P, K) bf16 rows grouped by `groups` (ascending indices into w's stack), counts[i] rows for
    groups[i] -> (P, N) bf16, each row times W[its group].T."""
    n, k = _shape(w)
    plan = plan_groups(groups, counts, x.device)
    x = x.contiguous()
    out = x.new_empty((x.shape[0], n))
    if plan.n_used == 0:
        return out
    if max(counts) <= DECODE_MAX_ROWS:
        return decode_linear(x, w, None, plan, out)
    dense = dequantize_used(w, plan, x.new_empty((plan.n_used, n, k)))
    return torch._grouped_mm(x, dense.transpose(-2, -1), offs=plan.ends)


def quant_swiglu_grouped(x: torch.Tensor, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix,
                         groups: list[int], counts: list[int]) -> torch.Tensor:
    """gpu_worker.grouped.swiglu_grouped over quantized stacks: gate, up (G, F, H) and down (G, H, F).

    Prefill dequantizes PREFILL_EXPERTS_PER_PASS experts at a time into a bf16 scratch, so the scratch stays
    the size of that many experts (~0.6 GB at Qwen3-30B-A3B's shapes), not of every expert a long prompt uses."""
    f, h = _ffn_shape(gate, up, down)
    x = x.contiguous()
    if not any(counts):
        return x.new_empty((x.shape[0], h))
    if max(counts) <= DECODE_MAX_ROWS:
        return _decode_swiglu(x, gate, up, down, f, h, plan_groups(groups, counts, x.device))
    used = [(g, c) for g, c in zip(groups, counts, strict=True) if c > 0]
    out = x.new_empty((x.shape[0], h))
    start = 0
    for i in range(0, len(used), PREFILL_EXPERTS_PER_PASS):
        part_groups, part_counts = zip(*used[i : i + PREFILL_EXPERTS_PER_PASS], strict=True)
        end = start + sum(part_counts)
        out[start:end] = _prefill_swiglu(x[start:end], gate, up, down, f, h, list(part_groups), list(part_counts))
        start = end
    return out


def quant_swiglu_all_experts(x: torch.Tensor, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix,
                             counts: torch.Tensor, used_at_most: int, rows_at_most: int) -> torch.Tensor:
    """quant_swiglu_grouped over every expert of the stacks, with x's first rows sorted by expert and `counts`
    (rows per expert, each at most rows_at_most <= DECODE_MAX_ROWS) on the device (rows after those are left
    unwritten): nothing waits on the device, so a decode step queues its hot experts' work without a round trip
    to the host."""
    assert rows_at_most <= DECODE_MAX_ROWS
    f, h = _ffn_shape(gate, up, down)
    return _decode_swiglu(x.contiguous(), gate, up, down, f, h, plan_all_experts(counts, used_at_most, rows_at_most))


def _ffn_shape(gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix) -> tuple[int, int]:
    """(F, H) of an expert FFN's stacks, checked: gate and up (F, H) of one format, down (H, F) of any."""
    f, h = _shape(gate)
    assert type(up) is type(gate) and _shape(up) == (f, h) and _shape(down) == (h, f), "gate, up and down must match"
    return f, h


def decode_swiglu(x: torch.Tensor, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix, plan: GroupPlan
                  ) -> torch.Tensor:
    """The decode regime of quant_swiglu_grouped on a plan made ahead: two launches, nothing the host waits on."""
    f, h = _ffn_shape(gate, up, down)
    return _decode_swiglu(x.contiguous(), gate, up, down, f, h, plan)


def _decode_swiglu(x: torch.Tensor, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix, f: int, h: int,
                   plan: GroupPlan) -> torch.Tensor:
    act = _launch_decode(x, gate, up, f, h, plan, x.new_empty((x.shape[0], f)))
    return _launch_decode(act, down, None, h, f, plan, x.new_empty((x.shape[0], h)), dependent=True)


def _prefill_swiglu(x: torch.Tensor, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix, f: int, h: int,
                    groups: list[int], counts: list[int]) -> torch.Tensor:
    plan = plan_groups(groups, counts, x.device)
    gate_up = x.new_empty((plan.n_used, 2 * f, h))
    dequantize_used(gate, plan, gate_up[:, :f])
    dequantize_used(up, plan, gate_up[:, f:])
    dense_down = dequantize_used(down, plan, x.new_empty((plan.n_used, h, f)))
    return swiglu_grouped(x, gate_up, dense_down, list(range(plan.n_used)), counts)
