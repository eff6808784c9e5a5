"""Experts in their served form, whatever the model stores: float views of the model file or quantized views
of the expert cache file. Every process gets its experts through here."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from shared.config import Config
from shared.expert_cache import (
    CacheError,
    ExpertCache,
    ExpertLayout,
    ensure_expert_cache,
    expert_layouts,
    rebuild_command,
)
from shared.expert_math import ExpertWeights
from shared.gguf_file import GGUFModel
from shared.model_config import EXPERT_TENSOR_KINDS
from shared.pages import read_only_tensor


class ExpertSource:
    """One model's experts as served. Float layers come from the model file and quantized ones from `cache`
    (which must be the model's, as `ensure_expert_cache` gives it); both zero-copy. Every layer has an
    `ExpertLayout`, float ones too, so a region (a pinned arena slot, a VRAM slot) holds any format the
    same way."""

    def __init__(self, model: GGUFModel, cache: ExpertCache | None) -> None:
        self.model, self.cache = model, cache
        self._layouts = expert_layouts(model)
        self._cached_regions: dict[int, torch.Tensor] = {}  # layer -> its regions in the cache, made on first use
        quantized = [layer for layer, layout in enumerate(self._layouts) if layout.format != "float"]
        if quantized and cache is None:
            raise ValueError(f"{model.path}: layers {quantized} have quantized experts, which are served from an "
                             "expert cache file (see ensure_expert_cache)")
        if cache is not None and [cache.layout(layer) for layer in quantized] != [self._layouts[i] for i in quantized]:
            raise ValueError(f"{cache.path} does not hold the experts of {model.path} in their current layout")

    def format(self, layer: int) -> str:
        """float | int8 | int4, or the matrices' distinct formats joined by '+' (`ExpertLayout.format`)"""
        return self._layouts[layer].format

    def layout(self, layer: int) -> ExpertLayout:
        return self._layouts[layer]

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        """(gate, up, down) as served, zero-copy: float tensors over the model file's pages, or Int8Matrix /
        Int4Matrix over the cache file's."""
        if not self._in_cache(layer):
            return tuple(self.model.expert_view(layer, kind, expert)  # type: ignore[return-value]
                         for kind in EXPERT_TENSOR_KINDS)
        return self.cache.weights(layer, expert)  # type: ignore[union-attr]

    def _in_cache(self, layer: int) -> bool:
        return self.cache is not None and self._layouts[layer].format != "float"

    def fill_region(self, layer: int, expert: int, region: torch.Tensor, non_blocking: bool = False) -> int:
        """Copy the expert's served bytes into a region of its layer's layout (a page-locked arena's, a VRAM
        slot's); the bytes copied. non_blocking: a DMA from registered pages into VRAM that the caller orders."""
        if self._in_cache(layer):
            # one tensor over the layer's regions, made once: a decode step fills several experts a layer, and
            # wrapping each region anew took longer than queueing its copy
            regions = self._cached_regions.get(layer)
            if regions is None:
                regions = self._cached_regions[layer] = read_only_tensor(self.cache.regions(layer))  # type: ignore[union-attr]
            data = regions[expert]
            region[: data.numel()].copy_(data, non_blocking=non_blocking)
            return data.numel()
        copied = 0  # a float expert: one copy per matrix, straight from the model file
        for kind, slots in zip(EXPERT_TENSOR_KINDS, self._layouts[layer].matrices, strict=True):
            data = self.model.expert_bytes(layer, kind, expert).reshape(-1).view(np.uint8)
            region[slots[0].offset : slots[0].offset + data.nbytes].copy_(read_only_tensor(data),
                                                                          non_blocking=non_blocking)
            copied += data.nbytes
        return copied

    def check_digests(self, layer: int, experts: list[int], threads: int = 1) -> None:
        """Raise CacheError, naming them, if any of the layer's `experts` no longer has its digest in the cache
        file: for a process that copies them (pinned memory, VRAM) and serves the copies for as long as it runs.
        Read again from the file's pages, still in the page cache after the copy. A float layer has nothing to
        check: GGUF keeps no digest of the model file's tensors."""
        cache = self.cache
        if cache is None or not self._in_cache(layer):
            return
        damaged = cache.damaged(layer, experts, threads)
        if damaged:
            raise CacheError(f"{cache.path}: layer {layer} experts {damaged} do not match their digests, the file "
                             f"is damaged; rebuild it with `{rebuild_command(self.model.path, cache.path)}`")

    def expert_nbytes(self, layer: int) -> int:
        """Bytes of one expert as served (its tensors; its region is `layout(layer).region_nbytes`)."""
        return self._layouts[layer].expert_nbytes

    def close(self) -> None:
        self._cached_regions.clear()  # views of the cache's map: the map is unmapped once none is left
        if self.cache is not None:
            self.cache.close()


def open_expert_source(model: GGUFModel, config: Config, stopping: Callable[[], bool] = lambda: False
                       ) -> ExpertSource:
    """The model's experts as served, converting its quantized experts into the cache file on first use (given up
    with ConversionStopped once `stopping` says so)."""
    return ExpertSource(model, ensure_expert_cache(model, config.expert_cache_dir or None, stopping=stopping,
                                                   memory_floor=config.host_memory_floor))
