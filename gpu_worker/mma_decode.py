"""int4 and int8 decode on tensor cores: the CUDA kernel of mma_decode.cu, which cupy compiles with NVRTC on first use.

Triton could not express the kernel's inner loop: the int4 layout keeps two rows of one column in a byte, the
tensor cores want two columns of one row in a register, and Triton re-paired the nibbles through extra
permutes and shared memory (2.8 instructions per weight at 174 registers, 15-46% of HBM on the H200). Here a
lane copies its groups of weights into shared memory ahead (cp.async), then reads exactly the words of its own
mma fragments, and one byte permute pairs them (bench/quant_kernels.md). int8's down of a few experts runs in the
same ring and loop (quant_kernels.INT8_MMA_DOWN_EXPERTS), which on the H100 took one token's int8 FFN from 60% of HBM
with Triton's down to 64%.

Launches go through the driver's cuLaunchKernel (ctypes) on torch's current stream, not cupy's kernel call in a
stream context: a decode step of one stream makes four a layer, and a grouped call of two took 94-107 us of host
time so against 181-230 us (quant_swiglu_grouped, 8 experts of one row, H200 host; bench/README.md).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import threading
from pathlib import Path
from typing import Any

import torch

from shared.quant import INT4_ROW_TILE, Int4Matrix, Int8Matrix

_SOURCE = Path(__file__).with_suffix(".cu")
# Groups of 32 columns in each warp's ring in shared memory, stages - 1 copies in flight: 6 was 1-9% slower than
# 4 on the H200, 8 3-15% (bench/quant_kernels.md)
STAGES = 4
# A gate/up launch of at least this many blocks (12 a Qwen3-30B-A3B expert: all 128 of them) takes a deeper ring,
# DEEP_STAGES[8-row tiles of x - 1]: on the H100 the FFN of 128 experts at one row took 150 us (82% of HBM) against
# 170 (73%) with 4 stages, at 16 rows 156 against 160; from 1 to 8 rows 6 stages were fastest, at 16 rows 5, and at
# 96 experts and fewer 4 (bench/quant_kernels.md).
DEEP_RING_BLOCKS = 1536
DEEP_STAGES = (6, 5)
# int4's down of at most SHALLOW_DOWN_EXPERTS experts (one token's 8: 256 blocks whose warps walk 3 groups each)
# takes a shallower ring: on the H100 3 stages were 2-5% faster than 4 from 2 to 16 rows at 8 experts (the FFN of
# one token 0-2%) and 1-5% slower at 12 experts and more; int8's down of 8 experts was 9% slower at 3. At two tiles
# of x (9-16 rows) and from SHALLOWEST_DOWN_FROM experts, int4's and int8's down take 2 stages: int4's FFN at 8 x 16
# was 2.3-3% faster on three H100 starts, at 8 x 9 2.2% and at 6 x 16 4.7% on one, but 4 x 16 2.3-2.6% slower.
# int8's rings of 4 stages at two tiles fit one block an SM, so 8 experts' 256 blocks took two waves: with 2 stages
# (two blocks an SM) int8's FFN at 8 x 9-16 took 19.4-19.8 us against 21.8-22.2 at 4 stages (bench/quant_kernels.md).
SHALLOW_DOWN_EXPERTS = 8
SHALLOW_DOWN_STAGES = 3
SHALLOWEST_DOWN_FROM = 5
SHALLOWEST_DOWN_STAGES = 2
# At two tiles of x (9-16 rows) a warp walks its groups in unrolled rounds of the ring's stages (mma_decode.cu), except
# in launches over these numbers of experts, whose one-group loop, two thirds of the code, was faster on the H100:
# the FFN 2.9% at 8 x 9-16, 1.5% at 12 x 16 and 1.2% at 16 x 16, where it was 1.7% slower at 4 x 16 and 0.5-0.8% at
# 64 x 16 and 128 x 16 (bench/quant_kernels.md)
ONE_GROUP_LOOP_EXPERTS = range(5, 17)
# A gate/up launch that walks each warp's groups one at a time lets down, its dependent, start once each block has a
# warp RELEASE_EIGHTHS[8-row tiles of x - 1] eighths of the way through its groups, not from gate/up's start: down's
# early copies slowed gate/up's loop more than they gained. On the H100 int4's FFN was within 0.3% at a quarter and a
# half at one tile, at a half and three quarters at two; after the loop down started too late. At two tiles over at
# most SHALLOW_DOWN_EXPERTS experts, FEW_EXPERTS_RELEASE_EIGHTHS: at 8 x 9-16 Q4_K_M's FFN (down in int8) was 1.4-1.8%
# faster at five eighths than at a half, and 2-4% slower at three eighths or three quarters than at a half, int4's
# level; at 16 x 16 five eighths was 1.2% (Q4_K_M) and 2.3% (int4) slower (mma_decode.cu; bench/quant_kernels.md)
RELEASE_EIGHTHS = (4, 4)
FEW_EXPERTS_RELEASE_EIGHTHS = 5
_WARPS_PER_SM = 8  # warps a launch aims for: enough loads in flight to keep HBM busy
_BLOCK_WARPS = 16  # warps x tiles of x in a block at most: the kernel's launch bounds (512 / tiles threads)
_SUMS_BYTES = 32 * 16 * 4  # per warp and 8-row tile of x: 16 float32 per lane


def kernel_name(x_tiles: int, swiglu: bool, stages: int, one_row: bool, int8: bool, unrolled: bool) -> str:
    """The name expression of quant_decode's instantiation. one_row: for launches of at most one row of x per expert;
    unrolled: as unrolled_rounds says."""
    def cpp(flag: bool) -> str:
        return "true" if flag else "false"

    return f"quant_decode<{x_tiles}, {cpp(swiglu)}, {stages}, {', '.join(map(cpp, (one_row, int8, unrolled)))}>"


def compile_kernel(source: str, name: str, device: torch.device) -> tuple[Any, Any]:
    """(module, function) of `name` compiled from `source` by NVRTC, allowed the shared memory a block may opt into
    on `device`."""
    try:
        import cupy
    except ImportError as e:
        raise ImportError("int4 experts on a GPU, and int8's down, need cupy (pip install 'tierserve[gpu]')") from e
    with cupy.cuda.Device(device.index):
        module = cupy.RawModule(code=source, options=("--std=c++17",), name_expressions=[name])
        function = module.get_function(name)
        function.max_dynamic_shared_size_bytes = _shared_limit(device)
        return module, function


@functools.cache
def _kernel(x_tiles: int, swiglu: bool, stages: int, one_row: bool, int8: bool, unrolled: bool, device: torch.device):
    """The compiled kernel as cupy's Function, which keeps its module loaded: its ptr is the CUfunction."""
    name = kernel_name(x_tiles, swiglu, stages, one_row, int8, unrolled)
    return compile_kernel(_SOURCE.read_text(), name, device)[1].kernel


class _Args(ctypes.Structure):
    """quant_decode's parameters, in order."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("x_stride", ctypes.c_int64), ("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64),
        ("meta", ctypes.c_void_p), ("n_used", ctypes.c_int32), ("p1", ctypes.c_void_p), ("sz1", ctypes.c_void_p),
        ("p2", ctypes.c_void_p), ("sz2", ctypes.c_void_p), ("p1_gs", ctypes.c_int64), ("sz1_gs", ctypes.c_int64),
        ("p2_gs", ctypes.c_int64), ("sz2_gs", ctypes.c_int64), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
        ("k_warps", ctypes.c_int32), ("dependent", ctypes.c_int32), ("release_eighths", ctypes.c_int32)]


class _ArgBlock(threading.local):
    """This thread's parameter block and the array of its fields' addresses that cuLaunchKernel reads: the driver
    copies the values at launch, so one block serves every launch of a thread."""

    def __init__(self) -> None:
        self.args = _Args()
        base = ctypes.addressof(self.args)
        self.params = (ctypes.c_void_p * len(_Args._fields_))(
            *[base + getattr(_Args, name).offset for name, _ in _Args._fields_])


_arg_block = _ArgBlock()


@functools.cache
def _launch_kernel():
    launch = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                       ctypes.c_void_p]
    launch.restype = ctypes.c_int
    return launch


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an id, padded to 8 bytes, and a 64-byte value of which only the first int is used here."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.cache
def _launch_kernel_ex():
    launch = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    launch.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                       ctypes.c_void_p]
    launch.restype = ctypes.c_int
    return launch


class _DependentLaunch(threading.local):
    """This thread's launch configuration for a launch that may start before the one ahead of it finishes."""

    def __init__(self) -> None:
        self.attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        self.config = _LaunchConfig(attrs=ctypes.pointer(self.attribute), num_attrs=1)


_dependent_launch = _DependentLaunch()


def _stage_bytes(x_tiles: int, int8: bool) -> int:
    """A group of 32 columns of a 64-row tile: int4's columns (32 bytes of padding after each 8) and (scale, zero)
    pairs, or int8's rows; then x's 8-row tiles of 64-byte rows: mma_decode.cu's stage_bytes."""
    weights = 64 * 32 if int8 else 4 * (8 * 32 + 32) + 64 * 4
    return weights + x_tiles * 8 * 64


def _shared_bytes(warps: int, x_tiles: int, stages: int, int8: bool = False) -> int:
    return warps * (x_tiles * _SUMS_BYTES + stages * _stage_bytes(x_tiles, int8))


def ring_stages(n: int, used: int, swiglu: bool, x_tiles: int, int8: bool = False) -> int:
    """Stages of each warp's ring in a launch over `used` experts' (N, K) matrices."""
    if swiglu and n // INT4_ROW_TILE * used >= DEEP_RING_BLOCKS:
        return DEEP_STAGES[x_tiles - 1]
    if not swiglu and used <= SHALLOW_DOWN_EXPERTS:
        if x_tiles == 2 and used >= SHALLOWEST_DOWN_FROM:
            return SHALLOWEST_DOWN_STAGES
        if not int8:
            return SHALLOW_DOWN_STAGES
    return STAGES


def unrolled_rounds(used: int, x_tiles: int) -> bool:
    """Whether a launch over `used` experts walks each warp's groups in unrolled rounds of the ring's stages."""
    return x_tiles >= 2 and used not in ONE_GROUP_LOOP_EXPERTS


def release_eighths_of(used: int, swiglu: bool, x_tiles: int) -> int:
    """Eighths of a warp's groups after which a launch over `used` experts lets its dependent start: 0, at its
    start, for down and for gate/up's unrolled rounds (RELEASE_EIGHTHS)."""
    if not swiglu or unrolled_rounds(used, x_tiles):
        return 0
    if x_tiles == 2 and used <= SHALLOW_DOWN_EXPERTS:
        return FEW_EXPERTS_RELEASE_EIGHTHS
    return RELEASE_EIGHTHS[x_tiles - 1]


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _shared_limit(device: torch.device) -> int:
    """Shared memory one block may have on this GPU: 227 KB on Hopper, 99 KB on Ada's and Blackwell's desktop
    parts, where a 16-warp block's rings do not fit."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _x_tiles(rows_at_most: int) -> int:
    """8-row tiles of x the kernel takes for up to rows_at_most rows per group."""
    return 1 if rows_at_most <= 8 else 2


def k_warps_for(n: int, k: int, used: int, swiglu: bool, rows_at_most: int, device: torch.device,
                int8: bool = False) -> int:
    """Warps that cut K per matrix in each block on `device` (plan_k_warps)."""
    return plan_k_warps(n, k, used, swiglu, rows_at_most, _multiprocessors(device), _shared_limit(device), int8)


def plan_k_warps(n: int, k: int, used: int, swiglu: bool, rows_at_most: int, multiprocessors: int,
                 shared_limit: int, int8: bool = False) -> int:
    """Warps that cut K per matrix in each block: the fewest, in a power of two, that give every SM
    _WARPS_PER_SM warps (one token's 8 experts' gate/up are 96 blocks on 132 SMs: 8 warps each), each warp with
    at least two groups of 32 columns, within the kernel's launch bounds and the block's shared memory
    (shared_limit bytes). Blocks of a power of two warps pack the SMs. On the H200, for this kernel before it
    copied into shared memory, the rule picked the fastest of 1, 2, 4 and 8 warps in every case of
    bench/quant_kernels.md but one (within 5%), where aiming at 16 warps per SM was slower with few experts (16
    experts: 54 us against 35); since, it was timed against one warp only (the same from 64 experts up, 2.2x
    faster for 8)."""
    matrices, x_tiles = 2 if swiglu else 1, _x_tiles(rows_at_most)
    stages = ring_stages(n, used, swiglu, x_tiles, int8)
    blocks = n // INT4_ROW_TILE * max(1, used)
    k_warps = 1
    while (blocks * matrices * k_warps < _WARPS_PER_SM * multiprocessors
           and 2 * k_warps * matrices * x_tiles <= _BLOCK_WARPS and 2 * k_warps <= k // 32 // 2
           and _shared_bytes(2 * k_warps * matrices, x_tiles, stages, int8) <= shared_limit):
        k_warps *= 2
    return k_warps


@functools.cache
def available() -> bool:
    """Whether cupy, which compiles the kernel, is installed: int8 runs on Triton's kernels without it."""
    return importlib.util.find_spec("cupy") is not None


def takes(n: int, k: int) -> bool:
    """Whether the kernel takes an (N, K) matrix: tiles of 64 rows, groups of 32 columns (int4's always are)."""
    return n % INT4_ROW_TILE == 0 and k % 32 == 0


def decode(x: torch.Tensor, w1: Int4Matrix | Int8Matrix, w2: Int4Matrix | Int8Matrix, swiglu: bool,
           meta: torch.Tensor, n_used: int, used_at_most: int, rows_at_most: int, out: torch.Tensor,
           k_warps: int | None = None, dependent: bool = False) -> None:
    """out[rows] = x[rows] @ W1.T per group, or silu(x @ W1.T) * (x @ W2.T) with swiglu. meta as GroupPlan's:
    n_used expert indices, then n_used + 1 row offsets; used_at_most groups have rows, none more than
    rows_at_most (<= 16), which must bound them: the launch takes one or two tiles of x, and at 1 the kernel that
    computes only x's first row, from it. The caller checks shapes (quant_kernels._shape). dependent: launched as a
    dependent of the launch just before on this stream, whose output x is (down's, of gate/up): its blocks may
    start while that one's last blocks run. w1 and w2 are of one format, which `takes` their shape."""
    int8 = isinstance(w1, Int8Matrix)
    assert not (int8 and swiglu), "int8 takes the kernel for down only (quant_kernels.int8_down_on_mma)"
    if int8:
        (p1, sz1), (p2, sz2) = w1, w2
    else:
        p1, sz1, p2, sz2 = w1.packed, w1.scale_zero, w2.packed, w2.scale_zero
    _, n, k = w1.shape
    if n_used == 0:
        return
    device = x.device
    x_tiles, stages, unrolled, threads, shared_bytes, k_warps, release_eighths = _launch_shape(
        n, k, min(used_at_most, n_used), swiglu, rows_at_most, k_warps, int8, device)
    # weights (and int4's (scale, zero) pairs) are copied 16 bytes at a time; int8's rows, k bytes apart, are so
    # by `takes`
    assert not (p1.data_ptr() | p2.data_ptr() | p1.stride(0) | p2.stride(0)) % 16, "weights: 16-byte aligned"
    assert int8 or not (sz1.data_ptr() | sz2.data_ptr() | 2 * sz1.stride(0) | 2 * sz2.stride(0)) % 16, \
        "int4 (scale, zero) pairs: 16-byte aligned"
    if x.data_ptr() % 16 or x.stride(0) % 8:  # x's rows are copied 16 bytes at a time
        x = x.clone(memory_format=torch.contiguous_format)
    block = _arg_block
    a = block.args
    a.x, a.x_stride, a.out, a.out_stride, a.meta, a.n_used = \
        x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), meta.data_ptr(), n_used
    a.p1, a.sz1, a.p2, a.sz2 = p1.data_ptr(), sz1.data_ptr(), p2.data_ptr(), sz2.data_ptr()
    a.p1_gs, a.sz1_gs, a.p2_gs, a.sz2_gs = p1.stride(0), sz1.stride(0), p2.stride(0), sz2.stride(0)
    a.n, a.k, a.k_warps, a.dependent, a.release_eighths = n, k, k_warps, dependent, release_eighths
    kernel = _kernel(x_tiles, swiglu, stages, rows_at_most == 1, int8, unrolled, device).ptr
    stream = torch._C._cuda_getCurrentRawStream(device.index)
    if dependent:
        config = _dependent_launch.config
        config.grid[:] = (n // INT4_ROW_TILE, n_used, 1)
        config.block[:] = (threads, 1, 1)
        config.shared_bytes, config.stream = shared_bytes, stream
        result = _launch_kernel_ex()(ctypes.byref(config), kernel, block.params, None)
    else:
        result = _launch_kernel()(kernel, n // INT4_ROW_TILE, n_used, 1, threads, 1, 1, shared_bytes, stream,
                                  block.params, None)
    if result != 0:
        raise RuntimeError(f"cuLaunchKernel failed for the quantized decode kernel: CUresult {result}")


@functools.cache  # every launch asks: a decode step makes a few a layer
def _launch_shape(n: int, k: int, used: int, swiglu: bool, rows_at_most: int, k_warps: int | None, int8: bool,
                  device: torch.device) -> tuple[int, int, bool, int, int, int, int]:
    """(8-row tiles of x, ring stages, unrolled rounds, threads a block, its shared bytes, warps cutting K, eighths of
    a warp's groups before its dependents may start) of a launch."""
    assert takes(n, k), f"the kernel takes rows in tiles of {INT4_ROW_TILE} and columns in groups of 32, not {n, k}"
    x_tiles = _x_tiles(rows_at_most)
    stages = ring_stages(n, used, swiglu, x_tiles, int8)
    k_warps = k_warps or k_warps_for(n, k, used, swiglu, rows_at_most, device, int8)
    warps = k_warps * (2 if swiglu else 1)
    assert warps * x_tiles <= _BLOCK_WARPS, "too many warps for a block"
    shared_bytes = _shared_bytes(warps, x_tiles, stages, int8)
    assert shared_bytes <= _shared_limit(device), \
        f"{warps} warps' rings need more shared memory than a block gets on this GPU"
    unrolled = unrolled_rounds(used, x_tiles)
    return x_tiles, stages, unrolled, 32 * warps, shared_bytes, k_warps, release_eighths_of(used, swiglu, x_tiles)
