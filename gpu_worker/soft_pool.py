"""The soft tier: VRAM slots that cold experts' weights are streamed into and computed from.

The worker reads a cold expert straight from its own read-only map of the model file (the
page cache the expert hosts map too, so no second copy of the experts exists in RAM) and copies
it into a slot; on a GPU the map is registered with CUDA (read-only host registration) so the copy
is a DMA from the page cache. Slots keep llama.cpp's row layout, gate rows then up rows, so one
copy per matrix moves an expert. Which expert keeps a slot is the SoftTier policy's business.
"""

from __future__ import annotations

import logging
import time

import torch

from gpu_worker.expert_cache import SoftTier, make_policy
from gpu_worker.grouped import swiglu_grouped
from shared.expert_math import grouped_ffn
from shared.gguf_file import GGUFModel
from shared.model_config import EXPERT_TENSOR_KINDS, expert_tensor_name

log = logging.getLogger(__name__)
_CUDA_HOST_REGISTER_READ_ONLY = 8


def register_for_dma(model: GGUFModel) -> bool:
    """Page-lock the file's expert tensors for the GPU (read-only registration of the mapping)."""
    cfg = model.config
    names = [expert_tensor_name(layer, kind) for layer in range(cfg.n_layers) for kind in EXPERT_TENSOR_KINDS]
    views = [model.raw(name) for name in names]
    start = min(v.ctypes.data for v in views)
    end = max(v.ctypes.data + v.nbytes for v in views)
    page = 4096
    start -= start % page
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(start, end - start, _CUDA_HOST_REGISTER_READ_ONLY)
    if int(err) != 0:
        log.warning("cannot register the model map for DMA (%s); streaming from pageable memory", err)
        return False
    return True


class SoftPool:
    def __init__(self, model: GGUFModel, device: torch.device, dtype: torch.dtype, n_slots: int,
                 policy: str) -> None:
        cfg = model.config
        self.model, self.device, self.dtype = model, device, dtype
        self.tier = SoftTier(n_slots, make_policy(policy, cfg.n_layers * cfg.n_experts))
        f, h = cfg.expert_ffn, cfg.hidden
        self.gate_up = torch.empty(n_slots, 2 * f, h, device=device, dtype=dtype)
        self.down = torch.empty(n_slots, h, f, device=device, dtype=dtype)
        self.grouped = device.type == "cuda" and dtype == torch.bfloat16
        self.registered = device.type == "cuda" and register_for_dma(model)
        self.bytes_streamed = 0

    @property
    def nbytes(self) -> int:
        return self.gate_up.numel() * self.gate_up.element_size() + self.down.numel() * self.down.element_size()

    def stream(self, layer: int, expert: int) -> int | None:
        """Copy an expert into a slot (asynchronously on a GPU); None if the policy keeps every resident."""
        admission = self.tier.admit((layer, expert))
        if admission is None:
            return None
        f = self.model.config.expert_ffn
        slot = admission.slot
        gate, up, down = (self.model.expert_view(layer, kind, expert) for kind in EXPERT_TENSOR_KINDS)
        self.gate_up[slot, :f].copy_(gate, non_blocking=True)
        self.gate_up[slot, f:].copy_(up, non_blocking=True)
        self.down[slot].copy_(down, non_blocking=True)
        self.bytes_streamed += sum(t.numel() * t.element_size() for t in (gate, up, down))
        return slot

    def measure_bandwidth(self) -> float:
        """Bytes/s of streaming one expert into a slot, measured now (start-up) on this machine."""
        gate = self.model.expert_view(0, "ffn_gate_exps", 0)
        f = self.model.config.expert_ffn
        for _ in range(2):  # first copies fault pages in and warm the copy engine
            self.gate_up[0, :f].copy_(gate, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        rounds = 8
        start = time.perf_counter()
        for _ in range(rounds):
            self.gate_up[0, :f].copy_(gate, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return rounds * gate.numel() * gate.element_size() / max(time.perf_counter() - start, 1e-9)

    def compute(self, x: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """Rows of x grouped by slot (ascending slot ids) through the experts in those slots."""
        if self.grouped:
            return swiglu_grouped(x, self.gate_up, self.down, slots, counts)
        f = self.model.config.expert_ffn
        return grouped_ffn(x, slots, counts, lambda s: (self.gate_up[s, :f], self.gate_up[s, f:], self.down[s]))
