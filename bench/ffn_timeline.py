"""Where one int4 expert FFN's time goes, block by block: gate/up, then down launched as a dependent, as served.

A copy of gpu_worker/mma_decode.cu stamps `%globaltimer` per block (thread 0) at its entry, past
`griddepcontrol.wait`, when warp 0's first group has landed, when warp 0 and then every warp has left the loop,
and at warp 0's end. The FFN is replayed as bench.quant_kernels_bench replays it (a CUDA graph over the
benchmark's rotated expert sets, so weights come from HBM); the stamps read back are the graph's last FFN's.
Medians over --replays replays, us from gate/up's first block entry:

    python -m bench.ffn_timeline [--shapes 8x1,8x16] [--replays 4]

The copy is made by inserting the stamps at fixed points of the kernel's source: a change there fails here by
naming the line it could not find (STAMP_POINTS).
"""

from __future__ import annotations

import argparse
import functools
import statistics

import numpy as np
import torch

from gpu_worker import mma_decode

FFN, HIDDEN = 768, 2048  # Qwen3-30B-A3B's expert, as bench.quant_kernels_bench times it

SLOTS = 6  # per block: entry, past the wait, every warp looped, warp 0's end, its first group landed, it looped
MAX_BLOCKS = 4096  # of one launch: 128 experts' down is 32 tiles each
_HEAD = r"""
__device__ unsigned long long ts_stamps[2][MAX_BLOCKS][SLOTS];
__device__ __forceinline__ unsigned long long ts_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define STAMP(j) do { if (threadIdx.x == 0) \
    ts_stamps[SWIGLU ? 0 : 1][blockIdx.y * gridDim.x + blockIdx.x][j] = ts_now(); } while (0)
""".replace("MAX_BLOCKS", str(MAX_BLOCKS)).replace("SLOTS", str(SLOTS))
# (the kernel's text, what it becomes; "{}" stands for the text): stamps 0 at entry, 1 past the wait, 4 when warp 0's
# first group has landed, 5 when warp 0 has looped, 2 when every warp has (past the barrier), 3 at warp 0's end (on
# both paths of the sums)
STAMP_POINTS = [
    ("    constexpr int E = 16 * NT;  // accumulators per lane\n", "{}    STAMP(0);\n"),
    ('        asm volatile("griddepcontrol.wait;" ::: "memory");\n#endif\n', "{}        STAMP(1);\n"),
    ("        __syncwarp();  // the other lanes' copies of this stage have landed too\n",
     "{}        if (group == begin) STAMP(4);\n"),
    ("    float* mine = partial + warp * SUMS * 32 + lane;\n", "{}    STAMP(5);\n"),
    ("    __syncthreads();\n    const auto finish", "    __syncthreads();\n    STAMP(2);\n    const auto finish"),
    ("            finish(y, up, quad / NT, quad % NT, a % KEPT * E_STEP);\n        }\n", "{}        STAMP(3);\n"),
]


def stamped_source(source: str) -> str:
    """The kernel's source with the timeline's stamps."""
    out = source.replace("typedef unsigned int u32;", _HEAD + "typedef unsigned int u32;", 1)
    for text, stamped in STAMP_POINTS:
        if out.count(text) != 1:
            raise ValueError(f"mma_decode.cu has {out.count(text)} places, not one, like {text.strip()!r}")
        out = out.replace(text, stamped.format(text) if stamped.startswith("{}") else stamped)
    body, closing = out.rstrip().rsplit("\n}", 1)
    if closing:
        raise ValueError("mma_decode.cu does not end with the kernel's closing brace")
    return body + "\n    STAMP(3);\n}\n"


class StampedKernels:
    """mma_decode's kernels compiled from the stamped source, with their stamp arrays (one per compiled module)."""

    def __init__(self) -> None:
        import cupy
        self.cupy, self.source = cupy, stamped_source(mma_decode._SOURCE.read_text())
        self.modules: dict[str, object] = {}  # by the kernel's name expression
        self.functions: dict[str, object] = {}

    def kernel(self, x_tiles: int, swiglu: bool, stages: int, one_row: bool, int8: bool, unrolled: bool,
               device: torch.device):
        """As mma_decode._kernel, from the stamped source."""
        name = mma_decode.kernel_name(x_tiles, swiglu, stages, one_row, int8, unrolled)
        if name not in self.functions:
            self.modules[name], self.functions[name] = mma_decode.compile_kernel(self.source, name, device)
        return self.functions[name].kernel

    def arrays(self) -> list:
        """Each compiled module's stamps: a launch writes its own module's."""
        return [self.cupy.ndarray((2, MAX_BLOCKS, SLOTS), dtype=self.cupy.uint64, memptr=m.get_global("ts_stamps"))
                for m in self.modules.values()]


def timeline(stamps: np.ndarray, n_used: int) -> dict[str, float]:
    """One FFN's figures, us, from its stamps ([gate/up, down][block][slot])."""
    gate_up = stamps[0, : FFN // 64 * n_used].astype(np.int64)
    down = stamps[1, : HIDDEN // 64 * n_used].astype(np.int64)
    t0 = gate_up[:, 0].min()

    def us(column: np.ndarray) -> np.ndarray:
        return (column - t0) / 1000.0

    gate_up_end = us(gate_up[:, 3]).max()
    down_after_wait = us(down[:, 3]) - us(down[:, 1])
    return {
        "gate/up first group": float(np.median(us(gate_up[:, 4]))),
        "gate/up all looped": float(np.median(us(gate_up[:, 2]))),
        "gate/up epilogue": float(np.median(us(gate_up[:, 3]) - us(gate_up[:, 2]))),
        "gate/up last end": float(gate_up_end),
        "wait passes after it": float(us(down[:, 1]).min() - gate_up_end),
        "down after wait, median": float(np.median(down_after_wait)),
        "down after wait, last": float(down_after_wait.max()),
        "down epilogue": float(np.median(us(down[:, 3]) - us(down[:, 2]))),
        "span": float(us(down[:, 3]).max()),
    }


def main() -> None:
    # Triton's, imported by the benchmark's helpers, is a GPU machine's package
    from bench.quant_kernels_bench import EXPERTS, copy_bandwidth, expert_bytes, graph_time, rotation
    from gpu_worker import quant_kernels as qk
    from tests.quant_stacks import random_regions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8x1,8x16", help="experts x rows each, comma-separated (up to 32 "
                                                             "experts: down is a dependent launch there)")
    parser.add_argument("--replays", type=int, default=4)
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    torch.manual_seed(0)
    hbm = copy_bandwidth()
    device = torch.device("cuda")
    gate, up, down = random_regions("int4", EXPERTS, [(FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)], device, seed=1,
                                    strided=False)
    print(f"{torch.cuda.get_device_name()}: HBM copy {hbm / 1e9:,.0f} GB/s; int4 FFN, us from gate/up's first block")
    stamped = StampedKernels()
    for n_used, rows in shapes:
        plans = [qk.plan_groups(s, [rows] * n_used, device) for s in rotation(n_used)]
        x = torch.randn(n_used * rows, HIDDEN, device=device).to(torch.bfloat16)
        calls = [functools.partial(qk.decode_swiglu, x, gate, up, down, p) for p in plans]
        seconds = graph_time(calls)  # the kernel as it is, for the share of HBM
        served = mma_decode._kernel
        mma_decode._kernel = stamped.kernel
        try:
            for call in calls:  # compiled outside the capture
                call()
            figures = []
            for _ in range(args.replays):
                for array in stamped.arrays():
                    array.fill(0)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for call in calls:
                        call()
                graph.replay()
                torch.cuda.synchronize()
                figures.append(timeline(sum(a.get() for a in stamped.arrays()), n_used))
        finally:
            mma_decode._kernel = served
        share = 100 * expert_bytes([gate, up, down], rotation(n_used)[0]) / seconds / hbm
        print(f"\n{n_used} x {rows}: {seconds * 1e6:.2f} us graph-timed, {share:.1f}% of HBM (unstamped)")
        for key in figures[0]:
            print(f"  {key:<26} {statistics.median(f[key] for f in figures):6.2f}")


if __name__ == "__main__":
    main()
