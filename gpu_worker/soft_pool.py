"""The soft tier: VRAM slots that cold experts' weights are streamed into and computed from.

The worker reads a cold expert straight from its own read-only map of the model file, or of the expert
cache file for quantized experts (the page cache the expert hosts map too, so no second copy of the
experts exists in RAM) and copies it into a slot; on a GPU the map is registered with CUDA (read-only
host registration) so the copy is a DMA from the page cache. Float slots keep llama.cpp's row layout,
gate rows then up rows, so one copy per matrix moves an expert; a quantized expert is one region, one copy.
Which expert keeps a slot is the SoftTier policy's business.
"""

from __future__ import annotations

import ctypes
import logging
import time

import numpy as np
import torch

from gpu_worker.expert_cache import SoftTier, make_policy
from gpu_worker.grouped import all_experts_grouped, experts_grouped, takes_device_counts
from shared.expert_cache import ExpertLayout
from shared.expert_math import ExpertWeights, grouped_ffn
from shared.expert_source import ExpertSource
from shared.mailbox import cuda_driver
from shared.model_config import EXPERT_TENSOR_KINDS, ModelError, expert_tensor_name

log = logging.getLogger(__name__)
_CU_MEMHOSTREGISTER_READ_ONLY = 0x08
_CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712


def register_for_dma(views: list[np.ndarray]) -> bool:
    """Page-lock the span of the file map these views lie in for the GPU (read-only registration). Already
    registered (another pool of this process on the same map) counts as registered."""
    start = min(v.ctypes.data for v in views)
    end = max(v.ctypes.data + v.nbytes for v in views)
    page = 4096
    start -= start % page
    # the driver's call (cuda_driver says why): torch.cuda.cudart()'s refusal failed the next copy on the H200
    err = cuda_driver().cuMemHostRegister_v2(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                             ctypes.c_uint(_CU_MEMHOSTREGISTER_READ_ONLY))
    if err not in (0, _CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED):
        log.warning("cannot register the expert file map for DMA (CUDA driver error %d); streaming from pageable "
                    "memory", err)
        return False
    return True


def slot_nbytes(source: ExpertSource, dtype: torch.dtype) -> int:
    """Bytes of one slot: the largest quantized expert's region, or one float expert in `dtype`."""
    cfg = source.model.config
    layouts = [source.layout(layer) for layer in range(cfg.n_layers)]
    if layouts[0].format != "float":
        return max(layout.region_nbytes for layout in layouts)
    return 3 * cfg.expert_ffn * cfg.hidden * dtype.itemsize


class SoftPool:
    """Slots hold float experts as (gate_up, down) in the worker's dtype, or quantized experts as their
    expert-cache regions, byte for byte, so one copy fills a slot and the int8 / int4 kernels read it."""

    def __init__(self, source: ExpertSource, device: torch.device, dtype: torch.dtype, n_slots: int,
                 policy: str, staging: int = 0) -> None:
        """n_slots for the tier, then `staging` slots that `stage` fills for one step's computation."""
        cfg = source.model.config
        self.source, self.device, self.dtype = source, device, dtype
        self.tier = SoftTier(n_slots, make_policy(policy, cfg.n_layers * cfg.n_experts))
        self.staging_slots = list(range(n_slots, n_slots + staging))
        n_slots += staging
        self.n_slots = n_slots  # the tier's and the staging slots
        layouts = [source.layout(layer) for layer in range(cfg.n_layers)]
        self.quantized = layouts[0].format != "float"
        if any((layout.format != "float") != self.quantized for layout in layouts):
            raise ModelError(f"{source.model.path}: some layers' experts are float and others quantized; "
                             "the soft tier streams one kind (run with soft_slots = 0)")
        if self.quantized:
            self.regions = torch.empty(n_slots, max(layout.region_nbytes for layout in layouts), dtype=torch.uint8,
                                       device=device)
            dma_sources = [source.cache.regions(layer) for layer in range(cfg.n_layers)]  # type: ignore[union-attr]
        else:
            f, h = cfg.expert_ffn, cfg.hidden
            self.gate_up = torch.empty(n_slots, 2 * f, h, device=device, dtype=dtype)
            self.down = torch.empty(n_slots, h, f, device=device, dtype=dtype)
            dma_sources = [source.model.raw(expert_tensor_name(layer, kind))
                           for layer in range(cfg.n_layers) for kind in EXPERT_TENSOR_KINDS]
        # grouped kernels: the int8 / int4 ones on a GPU, torch._grouped_mm for bf16 (on a CPU too)
        self.grouped = device.type == "cuda" if self.quantized else dtype == torch.bfloat16
        self.registered = device.type == "cuda" and register_for_dma(dma_sources)
        self.bytes_streamed = 0
        self._views: dict[ExpertLayout, ExpertWeights] = {}

    def _fill(self, slot: int, layer: int, expert: int) -> int:
        """Start copying an expert into a slot (asynchronously on a GPU); the bytes it moves."""
        if self.quantized:
            return self.source.fill_region(layer, expert, self.regions[slot], non_blocking=True)
        f = self.source.model.config.expert_ffn
        gate, up, down = self.source.weights(layer, expert)
        self.gate_up[slot, :f].copy_(gate, non_blocking=True)
        self.gate_up[slot, f:].copy_(up, non_blocking=True)
        self.down[slot].copy_(down, non_blocking=True)
        return sum(t.numel() * t.element_size() for t in (gate, up, down))

    def stream(self, layer: int, expert: int) -> int | None:
        """Copy an expert into a slot (asynchronously on a GPU); None if the policy keeps every resident."""
        admission = self.tier.admit((layer, expert))
        if admission is None:
            return None
        try:
            self.bytes_streamed += self._fill(admission.slot, layer, expert)
        except BaseException:
            self.tier.discard((layer, expert))  # kept, a later hit would compute from whatever the slot held
            raise
        return admission.slot

    def stage(self, layer: int, experts: list[int]) -> list[int]:
        """Copy experts into the staging slots for this step only, in order; their slots. Copies and the
        computation that reads them are queued on the same stream, so the next pass's copies wait for it."""
        assert len(experts) <= len(self.staging_slots), "more experts than staging slots"
        slots = self.staging_slots[: len(experts)]
        for slot, e in zip(slots, experts, strict=True):
            self.bytes_streamed += self._fill(slot, layer, e)
        return slots

    def measure_bandwidth(self) -> float:
        """Bytes/s of streaming one expert into a slot, measured now (start-up) on this machine."""
        for _ in range(2):  # first copies fault pages in and warm the copy engine
            self._fill(0, 0, 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        rounds, moved = 8, 0
        start = time.perf_counter()
        for _ in range(rounds):
            moved += self._fill(0, 0, 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return moved / max(time.perf_counter() - start, 1e-9)

    def _slot_views(self, layer: int) -> tuple[ExpertWeights, ExpertLayout]:
        """Every slot's matrices as `layer`'s layout reads them; made once per layout (a decode step asks per
        layer and pass, and making the views costs more than the kernels they feed)."""
        layout = self.source.layout(layer)
        views = self._views.get(layout)
        if views is None:
            views = self._views[layout] = layout.views(self.regions[:, : layout.region_nbytes])
        return views, layout

    def _stack(self, layer: int) -> ExpertWeights | tuple[torch.Tensor, torch.Tensor]:
        """Every slot, as a grouped kernel reads the stack of `layer`'s experts."""
        return self._slot_views(layer)[0] if self.quantized else (self.gate_up, self.down)

    def on_device(self, layer: int, rows_at_most: int) -> bool:
        """Whether compute_all takes `layer`'s slots for up to `rows_at_most` rows per slot."""
        return self.grouped and takes_device_counts(self._stack(layer), rows_at_most)

    def compute_all(self, layer: int, x: torch.Tensor, counts: torch.Tensor, used_at_most: int,
                    rows_at_most: int) -> torch.Tensor:
        """x's first rows, sorted by slot, through `layer`'s experts in every slot, with `counts` (rows per slot,
        at most rows_at_most, used_at_most slots with rows) on the device: nothing waits on the device, so a decode
        graph may capture it. Rows of x after the counted ones come out undefined."""
        return all_experts_grouped(x, self._stack(layer), counts, used_at_most, rows_at_most)

    def compute(self, layer: int, x: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """Rows of x grouped by slot (ascending slot ids) through the experts of `layer` in those slots."""
        if self.quantized:
            views, layout = self._slot_views(layer)
            if self.grouped:
                return experts_grouped(x, views, slots, counts)
            return grouped_ffn(x, slots, counts, lambda s: layout.views(self.regions[s, : layout.region_nbytes]))
        if self.grouped:
            return experts_grouped(x, self._stack(layer), slots, counts)
        f = self.source.model.config.expert_ffn
        return grouped_ffn(x, slots, counts, lambda s: (self.gate_up[s, :f], self.gate_up[s, f:], self.down[s]))
