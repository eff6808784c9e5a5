"""Per layer and batch: which cold experts to stream into VRAM and which to leave to their hosts' CPUs.

`auto` asks the cost model (gpu_worker.cost_model) for the split that finishes the layer soonest
with the PCIe link and the hosts' CPUs working in parallel, from constants measured at start-up
on this machine and refreshed from the hosts' reported timings; `cpu` and `stream` force one path.
"""

from __future__ import annotations

import time

import torch

from gpu_worker.cost_model import (
    ColdExpert,
    CostConstants,
    LiveConstants,
    expert_flops_per_token,
    expert_format,
    plan_layer,
)
from shared.config import COLD_PATHS
from shared.expert_math import grouped_ffn
from shared.expert_source import ExpertSource
from shared.process import torch_threads


def measure_cpu_expert(source: ExpertSource, dtype: torch.dtype, threads: int) -> tuple[float, float]:
    """(weight bytes/s at one token, flop/s at 64 tokens) of this machine's CPU on served experts, computed the
    way an expert host computes them (grouped_ffn, with its number of threads), from activations of the
    worker's dtype: one token's top-k experts of layer 0 in one call (at one row each the hosts' native kernel
    takes a layer's experts at once, so timing one expert alone would count its call overhead k times), and
    64 tokens through one expert."""
    cfg = source.model.config
    one_token = list(range(min(cfg.n_experts_used, cfg.n_experts)))
    flops = expert_flops_per_token(cfg)

    def seconds(experts: list[int], rows: int) -> float:
        # the views made once, as a host holds its experts: the native kernel checks an expert's tensors once
        weights = {e: source.weights(0, e) for e in experts}
        x = torch.randn(rows * len(experts), cfg.hidden, dtype=dtype)
        counts = [rows] * len(experts)
        grouped_ffn(x, experts, counts, weights.__getitem__)
        start = time.perf_counter()
        for _ in range(4):
            grouped_ffn(x, experts, counts, weights.__getitem__)
        return (time.perf_counter() - start) / 4

    with torch_threads(threads):
        return (len(one_token) * source.expert_nbytes(0) / seconds(one_token, 1),
                64 * flops / seconds([0], 64))


def measure_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Flop/s of an expert-sized GEMM on the worker's device, measured now."""
    a = torch.randn(256, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(8):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 8 * 2 * 256 * 2048 * 2048 / (time.perf_counter() - start)


class ColdPlanner:
    def __init__(self, source: ExpertSource, mode: str, stream_bw: float, gpu_flops: float,
                 activation_dtype: torch.dtype, host_threads: int) -> None:
        if mode not in COLD_PATHS:
            raise ValueError(f"cold_path must be one of {', '.join(COLD_PATHS)}, not {mode!r}")
        self.mode = mode
        # one key for the CPU's rate, layer 0's, measured on layer 0's experts: a Q4_K_M file's int4 layers and
        # int4+int8 ones the native kernel reads at about the same share of the memory's bandwidth
        # (bench/cpu_kernels.md); a model mixing float and quantized layers gets the rate of layer 0's kind for
        # all. The sizes are each layer's own.
        self.dtype = expert_format(source, 0)
        self.expert_bytes = [source.expert_nbytes(layer) for layer in range(source.model.config.n_layers)]
        self.flops_per_token = expert_flops_per_token(source.model.config)
        cpu_bw, cpu_flops = measure_cpu_expert(source, activation_dtype, host_threads)
        self.live = LiveConstants(CostConstants(pcie_bw=stream_bw, cpu_read_bw={self.dtype: cpu_bw},
                                                cpu_flops=cpu_flops, round_trip_s=100e-6, gpu_flops=gpu_flops))
        self.begin_step()

    def begin_step(self) -> None:
        """Take the constants the step's layers plan with: refreshed once a step, not after every layer's
        observations, where the refit (a small least-squares solve) was a fifth of a layer's planning. Without
        it the planner keeps planning with the constants it started with."""
        self.constants = self.live.current

    def to_stream(self, layer: int, cold: list[tuple[int, int, int]]) -> list[int]:
        """Experts to stream among (expert, owning host, tokens) of the layer, by the step's constants."""
        if self.mode == "cpu" or not cold:
            return []
        if self.mode == "stream":
            return [e for e, _, _ in cold]
        plan = plan_layer([ColdExpert(e, host, n, self.expert_bytes[layer], self.dtype, self.flops_per_token)
                           for e, host, n in cold], self.constants)
        return plan.stream

    def observe_host(self, layer: int, experts: int, tokens: int, compute_s: float, round_trip_s: float | None
                     ) -> None:
        """A host computed `experts` of the layer for `tokens` in `compute_s`; `round_trip_s` from sending to its
        answer, or None when that is not known. A compute time of 0 (a host's clock coarser than its work) is
        no rate to learn: it is left out, rather than failing the step after a right answer."""
        if compute_s > 0.0:
            self.live.observe_cpu(self.dtype, experts * self.expert_bytes[layer], tokens * self.flops_per_token,
                                  compute_s)
        if round_trip_s is not None:
            self.live.observe_round_trip(max(round_trip_s - compute_s, 0.0))
