"""Host-to-GPU streaming of expert-sized copies, per host memory kind, next to a plain pinned copy
measured in the same run; then tierserve's own path (SoftPool.stream from the read-only registered
map of a GGUF with Qwen3-30B-A3B-shaped bf16 experts).

    python -m bench.stream_bench [--expert-mb 9.4] [--total-gb 8] [--out bench/stream_bench.md]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from gpu_worker.soft_pool import SoftPool
from shared.expert_source import ExpertSource
from shared.gguf_file import GGUFModel
from shared.gguf_write import GGUFModelWriter
from shared.model_config import ModelConfig, tensor_shapes

CUDA_HOST_REGISTER_DEFAULT = 0
CUDA_HOST_REGISTER_READ_ONLY = 8
CUDA_HOST_ALLOC_WRITE_COMBINED = 4


def copy_rate(src: torch.Tensor, slots: torch.Tensor, expert_bytes: int, total_bytes: int) -> float:
    """GB/s of copying consecutive expert-sized pieces of `src` (uint8, host) into rotating GPU slots."""
    n_pieces = src.numel() // expert_bytes
    rounds = max(1, total_bytes // expert_bytes)
    for i in range(min(4, rounds)):
        slots[i % len(slots)].copy_(src[(i % n_pieces) * expert_bytes : (i % n_pieces + 1) * expert_bytes],
                                    non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(rounds):
        piece = i % n_pieces
        slots[i % len(slots)].copy_(src[piece * expert_bytes : (piece + 1) * expert_bytes], non_blocking=True)
    torch.cuda.synchronize()
    return rounds * expert_bytes / (time.perf_counter() - start) / 1e9


def register(ptr: int, size: int, flags: int) -> None:
    err = torch.cuda.cudart().cudaHostRegister(ptr, size, flags)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")


def shm_tensor(size: int) -> tuple[torch.Tensor, mmap.mmap, str]:
    """Shared memory (/dev/shm, MAP_SHARED) pre-faulted and registered: how expert hosts would pin."""
    path = f"/dev/shm/tierserve-bench-{os.getpid()}"
    with open(path, "w+b") as f:
        f.truncate(size)
        mapping = mmap.mmap(f.fileno(), size)
    array = np.frombuffer(mapping, dtype=np.uint8)
    array[::4096] = 1  # fault every page in before registering
    register(array.ctypes.data, size, CUDA_HOST_REGISTER_DEFAULT)
    return torch.from_numpy(array), mapping, path


def write_combined_tensor(size: int) -> torch.Tensor | None:
    try:
        import cupy
    except ImportError:
        return None
    ptr = cupy.cuda.runtime.hostAlloc(size, CUDA_HOST_ALLOC_WRITE_COMBINED)
    buffer = (ctypes.c_uint8 * size).from_address(ptr)
    return torch.frombuffer(buffer, dtype=torch.uint8)


def soft_pool_rate(workdir: Path, n_experts: int, total_bytes: int) -> tuple[float, int, bool]:
    """GB/s of SoftPool.stream over a GGUF whose experts have Qwen3-30B-A3B's shape in bf16."""
    cfg = ModelConfig(arch="qwen3moe", n_layers=2, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=128,
                      rope_base=1e6, norm_eps=1e-6, n_experts=n_experts, n_experts_used=8, expert_ffn=768,
                      vocab_size=256, context_length=4096)
    path = workdir / "experts.gguf"
    w = GGUFModelWriter(path, cfg)
    shapes = tensor_shapes(cfg)
    types = {name: (Q.BF16 if "_exps" in name else Q.F32) for name in shapes}
    for name, shape in shapes.items():
        w.add_tensor(name, shape, types[name])
    w.begin()
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if types[name] == Q.BF16:
            w.write((rng.integers(0, 1 << 14, n, dtype=np.uint16) | 0x3C00).astype(np.uint16))
        else:
            w.write(np.ones(n, dtype=np.float32))
    w.close()
    model = GGUFModel(path)
    for layer in range(cfg.n_layers):  # page the file in, as a served model's page cache is
        for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            np.asarray(model.raw(f"blk.{layer}.{kind}.weight")).sum()
    pool = SoftPool(ExpertSource(model, None), torch.device("cuda"), torch.bfloat16, n_slots=16, policy="lru")
    keys = [(layer, e) for layer in range(cfg.n_layers) for e in range(n_experts)]
    expert_bytes = 3 * cfg.hidden * cfg.expert_ffn * 2
    rounds = max(len(keys), total_bytes // expert_bytes)
    for key in keys[:4]:
        pool.stream(*key)
    torch.cuda.synchronize()
    start_bytes, start = pool.bytes_streamed, time.perf_counter()
    for i in range(rounds):
        layer, e = keys[i % len(keys)]
        if (layer, e) not in pool.tier:
            pool.stream(layer, e)
    torch.cuda.synchronize()
    return (pool.bytes_streamed - start_bytes) / (time.perf_counter() - start) / 1e9, expert_bytes, pool.registered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expert-mb", type=float, default=9.4, help="bytes of one copy (a bf16 Qwen3-30B expert)")
    parser.add_argument("--total-gb", type=float, default=8.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    expert_bytes = int(args.expert_mb * 1e6)
    total = int(args.total_gb * 1e9)
    size = expert_bytes * 64
    slots = torch.empty(8, expert_bytes, dtype=torch.uint8, device="cuda")
    rows = []
    pinned = torch.empty(size, dtype=torch.uint8).pin_memory()
    baseline = copy_rate(pinned, slots, expert_bytes, total)
    rows.append(("pinned (cudaHostAlloc via torch pin_memory): baseline", baseline))
    rows.append(("pageable (plain malloc'd tensor)", copy_rate(torch.ones(size, dtype=torch.uint8), slots,
                                                                expert_bytes, total)))
    shm, mapping, shm_path = shm_tensor(size)
    try:
        rows.append(("pinned shared memory (/dev/shm + cudaHostRegister)", copy_rate(shm, slots, expert_bytes, total)))
    finally:
        torch.cuda.cudart().cudaHostUnregister(shm.data_ptr())
        del shm
        mapping.close()
        os.unlink(shm_path)
    wc = write_combined_tensor(size)
    if wc is not None:
        rows.append(("write-combined (cudaHostAlloc WRITECOMBINED)", copy_rate(wc, slots, expert_bytes, total)))
        start = time.perf_counter()
        cpu_sum = wc[: 64 << 20].sum().item()
        seconds = time.perf_counter() - start
        rows.append((f"  CPU read of write-combined memory (sum={cpu_sum})", (64 << 20) / seconds / 1e9))
    with tempfile.TemporaryDirectory() as tmp:
        rate, pool_expert_bytes, registered = soft_pool_rate(Path(tmp), 64, total)
    rows.append((f"tierserve SoftPool.stream, mapped GGUF ({'registered read-only' if registered else 'pageable'}, "
                 f"{pool_expert_bytes / 1e6:.1f} MB experts as 3 copies)", rate))
    lines = [f"H2D streaming, {args.expert_mb} MB copies, {total / 1e9:.0f} GB per row, "
             f"{torch.cuda.get_device_name()}", "", "| memory kind | GB/s | % of pinned |", "|---|---|---|"]
    lines += [f"| {name} | {gbs:.1f} | {100 * gbs / baseline:.0f}% |" for name, gbs in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
