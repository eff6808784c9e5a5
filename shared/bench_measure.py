"""This machine's links and compute, measured now for the benchmark's physical limits (bench_limits).

Each measurement takes the best of a few rounds after a warm-up: a limit is what the hardware can do,
not what it did while something else ran.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import torch

from shared.bench_limits import Machine
from shared.process import torch_threads


def _best_seconds(run: Callable[[], None], rounds: int, sync: bool = False) -> float:
    run()
    best = float("inf")
    for _ in range(rounds):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_read_bandwidth(nbytes: int = 2 << 30, threads: int | None = None, rounds: int = 3) -> float:
    """Bytes/s of summing a float32 buffer far larger than the caches with `threads` torch threads
    (default: every core), as the expert hosts' CPU kernels read weights."""
    with torch_threads(threads or os.cpu_count() or 1):
        buffer = torch.ones(nbytes // 4, dtype=torch.float32)  # written once, so every page is resident
        return buffer.numel() * 4 / _best_seconds(buffer.sum, rounds)


def pinned_h2d_bandwidth(nbytes: int = 256 << 20, rounds: int = 5) -> float | None:
    """Bytes/s of host-to-device copies from page-locked memory; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    src = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / _best_seconds(lambda: dst.copy_(src, non_blocking=True), rounds, sync=True)


def gpu_memory_bandwidth(nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes/s the GPU moves in a device-to-device copy (read plus write)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), rounds, sync=True)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, rounds: int = 5) -> float:
    """Flop/s of an n x n x n matrix product, on every core when the device is the CPU."""
    with torch_threads(os.cpu_count() or 1) if device.type == "cpu" else contextlib.nullcontext():
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        return 2 * n**3 / _best_seconds(lambda: a @ b, rounds, sync=device.type == "cuda")


def measure_machine(quick: bool = False) -> Machine:
    """The links and compute tierserve runs on: a GPU (bf16) with PCIe when CUDA is there, else the CPU (fp32)."""
    # The decode bound rests on this figure: a quick run on a GPU machine reads the full 2 GiB too (two quick runs
    # on the same kind of machine read 256 MB at 34 and 91 GB/s); 256 MB keeps the CPU-only check short.
    cpu_bw = cpu_read_bandwidth((256 << 20) if quick and not torch.cuda.is_available() else (2 << 30))
    if not torch.cuda.is_available():
        cpu_flops = matmul_flops(torch.device("cpu"), torch.float32, 1024 if quick else 2048)
        return Machine(cpu_bw, None, cpu_bw, cpu_flops, 4)
    machine = Machine(cpu_bw, pinned_h2d_bandwidth(), gpu_memory_bandwidth(),
                      matmul_flops(torch.device("cuda"), torch.bfloat16, 8192), 2)
    torch.cuda.empty_cache()  # hand the measurement buffers back before the gpu_worker sizes its pools
    return machine
