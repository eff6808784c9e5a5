"""Quantized-expert kernels (gpu_worker.quant_kernels) on Qwen3-30B-A3B expert shapes, against the HBM
bandwidth measured in the same run and against bf16 grouped GEMMs over the same experts.

    python -m bench.quant_kernels_bench [--out bench/quant_kernels.md] [--formats int8 int4]

Decode kernels are timed as CUDA-graph replays of many launches (launch gaps included, Python's
launch cost not), each launch on a different set of experts out of a 128-expert stack so that the
weights come from HBM rather than L2; bandwidth counts the quantized bytes (codes and scales) of the
experts a launch reads. Prefill is timed per call (triton.testing.do_bench median), host-side plan
included, against gpu_worker.grouped.swiglu_grouped on bf16 stacks.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton

from gpu_worker import mma_decode
from gpu_worker import quant_kernels as qk
from gpu_worker.grouped import swiglu_grouped
from tests.quant_stacks import QuantMatrix, random_regions

FFN, HIDDEN, EXPERTS = 768, 2048, 128  # Qwen3-30B-A3B: gate/up (768, 2048), down (2048, 768), 128 experts
# (experts used, rows each); one token's 8 experts also at 4 and 16 rows each: decode takes 1-16 rows an expert
DECODE_CASES = [(1, 1), (4, 1), (8, 1), (8, 4), (8, 16), (16, 1), (32, 4), (64, 2), (128, 1), (64, 9), (64, 16),
                (128, 16)]
PREFILL_TOKENS, TOP_K = 4096, 8


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def graph_time(calls: list[Callable[[], object]], min_calls: int = 256) -> float:
    """Seconds per call: the calls captured into one CUDA graph (repeated to at least min_calls calls),
    replayed; median over replays."""
    for call in calls:  # compile and tune outside the capture
        call()
    torch.cuda.synchronize()
    repeat = -(-min_calls // len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for call in calls:
                call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times) / (repeat * len(calls))


def expert_bytes(matrices: list[QuantMatrix | torch.Tensor], groups: list[int]) -> int:
    tensors = [t for m in matrices for t in ([m] if isinstance(m, torch.Tensor) else m)]
    return sum(t[g].numel() * t.element_size() for t in tensors for g in groups)


# Reads 16-byte chunks and computes nothing: at one or two experts a launch's fixed cost rivals its bytes, and this
# measures how much, apart from any kernel's arithmetic
_PLAIN_READ = r"""
extern "C" __global__ void plain_read(const uint4* __restrict__ p, long long chunks, unsigned* sink) {
    // block b reads its own slice of the chunks, 8 loads in flight a thread
    const long long per = (chunks + gridDim.x - 1) / gridDim.x, first = blockIdx.x * per;
    const long long end = min(first + per, chunks);
    unsigned folded = 0;
    for (long long i = first + threadIdx.x; i < end; i += 8 * blockDim.x) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const long long j = i + u * blockDim.x;
            v[u] = j < end ? __ldcs(p + j) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) folded ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (folded == 0x9E3779B9u) *sink = folded;  // never in practice: keeps the loads
}"""
_ROTATED_BYTES = 256 << 20  # at least this much rotated over, so that a launch's bytes come from HBM, not the 50 MB L2


@cache
def _plain_read_kernel():
    import cupy
    return cupy.RawKernel(_PLAIN_READ, "plain_read")


def plain_read_time(launch_bytes: list[int]) -> float:
    """Seconds to read launch_bytes[0] bytes, then launch_bytes[1], ..., one launch each of a kernel that
    computes nothing, in plain stream order, each on its fastest of ten grids: in one launch, what a kernel that
    reads those bytes and does nothing else reaches. Timed as the decode rows are (graph_time over rotating slices
    of a buffer)."""
    import cupy
    kernel = _plain_read_kernel()
    sink = cupy.zeros(1, dtype=cupy.uint32)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    grids = [(blocks, threads) for blocks in (sms // 4, sms // 2, sms, 2 * sms, 4 * sms) for threads in (256, 1024)]
    sizes = [-(-n // 4096) * 4096 for n in launch_bytes]  # each slice 4 KB-aligned, as an expert's region
    slots = max(2, -(-_ROTATED_BYTES // sum(sizes)))
    buffers = [torch.empty(slots, n, dtype=torch.uint8, device="cuda") for n in sizes]
    slices = [[cupy.asarray(buffer[s]) for s in range(slots)] for buffer in buffers]  # the kernel takes their pointers
    chunks = [np.int64(n // 16) for n in launch_bytes]

    def read(launch: int, slot: int, grid: tuple[int, int]) -> None:
        # on torch's current stream: under graph_time's capture, the graph's
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            kernel((grid[0],), (grid[1],), (slices[launch][slot], chunks[launch], sink))

    best = [min(grids, key=lambda grid, i=i: graph_time([partial(read, i, s, grid) for s in range(slots)]))
            for i in range(len(sizes))]

    def read_all(slot: int) -> None:
        for launch, grid in enumerate(best):
            read(launch, slot, grid)
    return graph_time([partial(read_all, s) for s in range(slots)])


def rotation(n_used: int) -> list[list[int]]:
    """Disjoint expert sets, as many as fit, so consecutive launches read different weights."""
    return [list(range(start, start + n_used)) for start in range(0, EXPERTS - n_used + 1, n_used)]


class Table:
    def __init__(self, hbm: float) -> None:
        self.hbm, self.rows = hbm, []

    def add(self, kernel: str, shape: str, seconds: float, nbytes: int | None = None, ratio: float | None = None
            ) -> None:
        gbs = f"{nbytes / seconds / 1e9:.0f}" if nbytes else ""
        pct = f"{100 * nbytes / seconds / self.hbm:.0f}%" if nbytes else ""
        self.rows.append((kernel, shape, f"{seconds * 1e6:.1f}", gbs, pct, f"{ratio:.2f}" if ratio else ""))
        print(" | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        head = ("kernel", "shape", "time (us)", "GB/s of weight bytes", "% of HBM", "ratio to bf16")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])


def bf16_decode_calls(gate_up: torch.Tensor, down: torch.Tensor, sets: list[list[int]], rows: int, x: torch.Tensor
                      ) -> list[Callable[[], object]]:
    """swiglu_grouped's two grouped GEMMs with offsets prepared ahead (graph capture takes no host copies)."""
    calls = []
    for groups in sets:
        per_group = torch.zeros(EXPERTS, dtype=torch.int32)
        per_group[groups] = rows
        offs = per_group.cumsum(0, dtype=torch.int32).cuda()

        def call(offs=offs):
            h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs)
            g, u = h.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)
        calls.append(call)
    return calls


def bench_decode(table: Table, fmt: str, stack: str, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix,
                 bf16: tuple[torch.Tensor, torch.Tensor]) -> None:
    read_for: set[int] = set()
    for n_used, rows in DECODE_CASES:
        sets = rotation(n_used)
        plans = [qk.plan_groups(s, [rows] * n_used, torch.device("cuda")) for s in sets]
        x = torch.randn(n_used * rows, HIDDEN, device="cuda").to(torch.bfloat16)
        act = x.new_empty((n_used * rows, FFN))
        out = x.new_empty((n_used * rows, HIDDEN))
        shape = f"{n_used} experts x {rows} rows"
        gate_up_s = graph_time([partial(qk.decode_linear, x, gate, up, p, act) for p in plans])
        table.add(f"{fmt} gate+up+SwiGLU decode, {stack}", f"{shape}, ({FFN}, {HIDDEN}) x2", gate_up_s,
                  expert_bytes([gate, up], sets[0]))
        down_s = graph_time([partial(qk.decode_linear, act, down, None, p, out) for p in plans])
        table.add(f"{fmt} down decode, {stack}", f"{shape}, ({HIDDEN}, {FFN})", down_s, expert_bytes([down], sets[0]))
        if fmt == "int8" and qk.int8_down_on_mma(HIDDEN, FFN, plans[0], x.device):  # the FFN row's down's kernel
            cuda_s = graph_time([partial(mma_decode.decode, act, down, down, False, p.meta, p.n_used, p.used_at_most,
                                         p.rows_at_most, out) for p in plans])
            table.add(f"int8 down decode, CUDA kernel, {stack}", f"{shape}, ({HIDDEN}, {FFN})", cuda_s,
                      expert_bytes([down], sets[0]))
        # as a decode step runs them: down may start while gate/up ends (qk.DEPENDENT_LAUNCH_EXPERTS)
        both = graph_time([partial(qk.decode_swiglu, x, gate, up, down, p) for p in plans])
        bf16_s = graph_time(bf16_decode_calls(*bf16, sets, rows, x))
        table.add(f"{fmt} expert FFN decode (gate+up, down), {stack}", shape, both,
                  expert_bytes([gate, up, down], sets[0]), ratio=both / bf16_s)
        if stack == "hot stack" and n_used not in read_for:  # the bytes depend on the experts only, not the rows
            launches = [expert_bytes([gate, up], sets[0]), expert_bytes([down], sets[0])]
            read_for.add(n_used)
            table.add(f"plain read of {fmt}'s FFN bytes, one launch (no compute)", f"{n_used} experts",
                      plain_read_time([sum(launches)]), sum(launches))
            table.add(f"plain read of {fmt}'s FFN bytes, gate+up's then down's launch (no compute)",
                      f"{n_used} experts", plain_read_time(launches), sum(launches))
        if fmt == "int4":
            bench_uncut(table, stack, shape, sets, plans, (x, gate, up, act), (act, down, None, out))


def bench_uncut(table: Table, stack: str, shape: str, sets: list[list[int]], plans: list[qk.GroupPlan],
                *launches: tuple) -> None:
    """The int4 launches whose blocks cut K among several warps, timed again with one warp walking all of K,
    for the gain in the same run."""
    for x, w1, w2, out in launches:
        n, k = out.shape[1], x.shape[1]
        plan = plans[0]
        if mma_decode.k_warps_for(n, k, plan.used_at_most, w2 is not None, plan.rows_at_most, x.device) == 1:
            continue
        seconds = graph_time([partial(qk.decode_linear, x, w1, w2, p, out, k_warps=1) for p in plans])
        label = "gate+up+SwiGLU" if w2 is not None else "down"
        table.add(f"int4 {label} decode, one warp per tile, {stack}", f"{shape}, ({n}, {k})", seconds,
                  expert_bytes([w1] if w2 is None else [w1, w2], sets[0]))


def bench_prefill(table: Table, fmt: str, stack: str, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix,
                  bf16_gate: torch.Tensor, x: torch.Tensor, counts: list[int], bf16_s: float) -> None:
    groups = list(range(EXPERTS))
    shape = f"{PREFILL_TOKENS} tokens x top-{TOP_K} over {EXPERTS} experts"
    ms = triton.testing.do_bench(lambda: qk.quant_swiglu_grouped(x, gate, up, down, groups, counts),
                                 return_mode="median")
    table.add(f"{fmt} expert FFN prefill (dequantize + grouped GEMM), {stack}", shape, ms * 1e-3,
              expert_bytes([gate, up, down], groups), ratio=ms * 1e-3 / bf16_s)
    plan = qk.plan_groups(groups, counts, torch.device("cuda"))
    gate_up = x.new_empty((EXPERTS, 2 * FFN, HIDDEN))
    dense_down = x.new_empty((EXPERTS, HIDDEN, FFN))

    def dequantize():
        qk.dequantize_used(gate, plan, gate_up[:, :FFN])
        qk.dequantize_used(up, plan, gate_up[:, FFN:])
        qk.dequantize_used(down, plan, dense_down)
    ms = triton.testing.do_bench(dequantize, return_mode="median")
    table.add(f"{fmt} dequantize 128 experts to bf16 (3 launches), {stack}", "gate, up, down", ms * 1e-3,
              expert_bytes([gate, up, down], groups))
    ms = triton.testing.do_bench(lambda: qk.grouped_linear(x, gate, groups, counts), return_mode="median")
    ms_bf16 = triton.testing.do_bench(
        lambda: torch._grouped_mm(x, bf16_gate.transpose(-2, -1), offs=plan.ends), return_mode="median")
    table.add(f"{fmt} grouped_linear prefill (gate only), {stack}", shape, ms * 1e-3,
              expert_bytes([gate], groups), ratio=ms / ms_bf16)


def bench_crossover(table: Table, fmt: str, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix) -> None:
    """64 experts x 16 rows, the most the decode kernels take: both regimes on the same call."""
    n_used, rows = 64, qk.DECODE_MAX_ROWS
    groups = list(range(n_used))
    x = torch.randn(n_used * rows, HIDDEN, device="cuda").to(torch.bfloat16)
    counts = [rows] * n_used
    plan = qk.plan_groups(groups, counts, torch.device("cuda"))

    def prefill():
        gate_up = x.new_empty((n_used, 2 * FFN, HIDDEN))
        qk.dequantize_used(gate, plan, gate_up[:, :FFN])
        qk.dequantize_used(up, plan, gate_up[:, FFN:])
        dense_down = qk.dequantize_used(down, plan, x.new_empty((n_used, HIDDEN, FFN)))
        return swiglu_grouped(x, gate_up, dense_down, groups, counts)
    decode_ms = triton.testing.do_bench(lambda: qk.quant_swiglu_grouped(x, gate, up, down, groups, counts),
                                        return_mode="median")
    prefill_ms = triton.testing.do_bench(prefill, return_mode="median")
    shape = f"{n_used} experts x {rows} rows"
    nbytes = expert_bytes([gate, up, down], groups)
    table.add(f"{fmt} expert FFN, decode regime (per call)", shape, decode_ms * 1e-3, nbytes)
    table.add(f"{fmt} expert FFN, prefill regime forced (per call)", shape, prefill_ms * 1e-3, nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file (quant_kernels.md is kept by hand)")
    parser.add_argument("--formats", nargs="+", choices=["int8", "int4"], default=["int8", "int4"])
    parser.add_argument("--int4-stages", type=int, default=mma_decode.STAGES,
                        help=f"groups in each warp's ring of the CUDA decode kernel (int4, and int8's down) where it "
                             f"takes the default depth ({mma_decode.STAGES}; gate/up over every expert takes a deeper "
                             "one, int4's down of a few experts a shallower one): another depth, to compare with a "
                             "run at the default")
    parser.add_argument("--independent-launches", action="store_true",
                        help="decode's down launch waits for gate/up to end before any of its blocks start, "
                             "for the gain of dependent launches against a run without them (int8's down then "
                             "runs on Triton's kernel: the CUDA kernel takes it only as a dependent)")
    args = parser.parse_args()
    mma_decode.STAGES = args.int4_stages  # read when the kernel is first compiled and sized, below
    if args.independent_launches:
        qk.DEPENDENT_LAUNCH_EXPERTS = 0
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    hbm = copy_bandwidth()
    bf16 = (torch.randn(EXPERTS, 2 * FFN, HIDDEN, device="cuda").to(torch.bfloat16).mul_(0.02),
            torch.randn(EXPERTS, HIDDEN, FFN, device="cuda").to(torch.bfloat16).mul_(0.02))
    table = Table(hbm)
    print(f"{device}: device-to-device copy {hbm / 1e9:.0f} GB/s (read + written)", flush=True)

    tokens = torch.rand(PREFILL_TOKENS, EXPERTS, device="cuda").topk(TOP_K, dim=1).indices.flatten()
    counts = torch.bincount(tokens, minlength=EXPERTS).tolist()
    x = torch.randn(PREFILL_TOKENS * TOP_K, HIDDEN, device="cuda").to(torch.bfloat16)
    ms = triton.testing.do_bench(lambda: swiglu_grouped(x, *bf16, list(range(EXPERTS)), counts),
                                 return_mode="median")
    table.add("bf16 swiglu_grouped prefill (baseline)", f"{PREFILL_TOKENS} tokens x top-{TOP_K}", ms * 1e-3,
              expert_bytes(list(bf16), list(range(EXPERTS))))
    bf16_prefill_s = ms * 1e-3
    bf16_gate = bf16[0][:, :FFN].contiguous()

    for fmt in args.formats:
        shapes = [(FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]
        for stack, strided in (("hot stack", False), ("VRAM slots", True)):
            gate, up, down = random_regions(fmt, EXPERTS, shapes, torch.device("cuda"), seed=1, strided=strided)
            bench_decode(table, fmt, stack, gate, up, down, bf16)
            bench_prefill(table, fmt, stack, gate, up, down, bf16_gate, x, counts, bf16_prefill_s)
            if strided:
                bench_crossover(table, fmt, gate, up, down)
            del gate, up, down

    kernel = qk._int8_decode_kernel  # int4 decode is not tuned: its one CUDA kernel sizes blocks itself
    tuned = []
    for key, config in kernel.cache.items():
        named = ", ".join(f"{name} {value}" for name, value in zip(kernel.keys, key, strict=False))
        tuned.append(f"- {kernel.base_fn.__name__} ({named}): {config}")
    text = "\n".join([
        f"Command: `python -m bench.quant_kernels_bench` on {device}.",
        "",
        f"HBM reference: device-to-device copy of 4 GiB, {hbm / 1e9:.0f} GB/s counting bytes read plus written.",
        "GB/s counts the quantized bytes (codes + scales) of the experts each launch reads. Decode rows are",
        "CUDA-graph replays (one launch per set of experts, rotating over disjoint sets of the 128-expert stack so",
        "the weights come from HBM); an FFN row is both launches replayed in turn, as a decode step runs them",
        f"(down launched as a dependent of gate/up up to {qk.DEPENDENT_LAUNCH_EXPERTS} experts; int8's down on the",
        f"CUDA kernel up to {qk.INT8_MMA_DOWN_EXPERTS} experts, else Triton's, as a dependent from",
        f"{qk.INT8_DEPENDENT_LAUNCH_FROM}). The int8 down rows time Triton's kernel, launched alone; the CUDA kernel's",
        "row, where it takes the FFN row's down, too.",
        "Their ratio column is to bf16 swiglu_grouped's GEMMs and SwiGLU on the same",
        "rows (graph-replayed the same way). Prefill rows are per call (do_bench median, host planning included),",
        "ratio to bf16 swiglu_grouped / torch._grouped_mm on the same tokens. The dequantize rows also write",
        "2 bytes per weight, so their HBM traffic is 3x (int8) or 4.2x (int4) the bytes counted. The plain read",
        "rows time a kernel that only reads the same experts' bytes, on its fastest of ten grids, in plain stream",
        "order: in one launch, and in gate+up's launch then down's (the FFN's down is a dependent launch that may",
        "start during gate/up's, so that row is no strict ceiling for the FFN).",
        "",
        table.markdown(),
        "",
        "int8 decode configurations (tuned, except gate/up of a few experts: quant_kernels._FEW_EXPERTS_GATE_UP):",
        *tuned,
        "",
    ])
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
