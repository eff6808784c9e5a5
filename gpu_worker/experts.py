"""Routed experts for one MoE layer: hot ones computed on the worker, cold ones sent to their hosts.

Cold work for every host is sent first, the hot experts are computed while the hosts
work, then the hosts' results are gathered, so the two overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from gpu_worker.cold_path import ColdPlanner
from gpu_worker.grouped import experts_grouped
from gpu_worker.remote import RemoteExperts
from gpu_worker.soft_pool import SoftPool
from gpu_worker.step_profile import section
from shared.expert_math import ExpertWeights, Grouped, group_by_expert, grouped_ffn
from shared.expert_source import ExpertSource
from shared.model_config import EXPERT_TENSOR_KINDS
from shared.placement import GPU, Placement
from shared.quant import matrix_tensors


class HotExperts:
    """The experts the placement keeps on the worker.

    On a GPU each layer's hot experts are stacked so one grouped launch computes all of them: float experts
    as bf16 stacks for torch._grouped_mm, quantized ones as a stack of their cache regions (the served bytes,
    copied as they are) for the int8 / int4 kernels. On a CPU they are kept one by one: float ones in the
    worker's dtype, quantized ones as views of the expert cache file, computed as an expert host does.
    """

    def __init__(self, source: ExpertSource, device: torch.device, dtype: torch.dtype) -> None:
        self.source, self.device, self.dtype = source, device, dtype
        self.ids: dict[int, list[int]] = {}
        self.stack_index: dict[int, dict[int, int]] = {}  # layer -> expert -> its place in the layer's stack
        self.weights: dict[tuple[int, int], ExpertWeights] = {}  # CPU: per expert
        self.stacks: dict[int, ExpertWeights] = {}  # GPU: per layer, (gate_up, down) or quantized (gate, up, down)

    def _grouped(self, layer: int) -> bool:
        """Whether the layer's experts are stacked for grouped kernels: on a GPU, bf16 for torch._grouped_mm
        or quantized for the int8 / int4 kernels."""
        return self.device.type == "cuda" and (self.dtype == torch.bfloat16 or self.source.format(layer) != "float")

    def _float(self, layer: int, e: int) -> ExpertWeights:
        model = self.source.model
        return tuple(model.expert(layer, kind, e).to(self.device, self.dtype)  # type: ignore[return-value]
                     for kind in EXPERT_TENSOR_KINDS)

    def _stack(self, layer: int, ids: list[int]) -> ExpertWeights:
        layout = self.source.layout(layer)
        if layout.format == "float":
            weights = [self._float(layer, e) for e in ids]
            return torch.stack([torch.cat([g, u]) for g, u, _ in weights]), torch.stack([d for _, _, d in weights])
        regions = torch.zeros(len(ids), layout.region_nbytes, dtype=torch.uint8, device=self.device)
        for region, e in zip(regions, ids, strict=True):
            self.source.fill_region(layer, e, region)
        return layout.views(regions)

    def apply(self, placement: Placement) -> None:
        for layer in range(placement.n_layers):
            ids = placement.hot(layer)
            if self.ids.get(layer) == ids:
                continue
            self.ids[layer] = ids
            self.stack_index[layer] = {e: i for i, e in enumerate(ids)}
            for key in [k for k in self.weights if k[0] == layer]:
                del self.weights[key]
            self.stacks.pop(layer, None)
            if not ids:
                continue
            if self._grouped(layer):
                self.stacks[layer] = self._stack(layer, ids)
            elif self.source.format(layer) == "float":
                for e in ids:
                    self.weights[(layer, e)] = self._float(layer, e)
            else:
                for e in ids:
                    self.weights[(layer, e)] = self.source.weights(layer, e)

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights the worker holds (views of the expert cache file are the page cache's)."""
        held = [m for stack in self.stacks.values() for m in stack]
        held += [m for w in self.weights.values() for m in w if isinstance(m, torch.Tensor)]
        return sum(t.numel() * t.element_size() for m in held for t in matrix_tensors(m))

    def compute(self, layer: int, x: torch.Tensor, experts: list[int], counts: list[int]) -> torch.Tensor:
        """Rows of x grouped by expert (ascending ids, as group_by_expert sorts them) through their experts."""
        if layer not in self.stacks:
            return grouped_ffn(x, experts, counts, lambda e: self.weights[(layer, e)])
        index = self.stack_index[layer]
        return experts_grouped(x, self.stacks[layer], [index[e] for e in experts], counts)


class MoEDispatch:
    """The trunk's MoE function for one placement. `on_dispatch(path, pairs)` counts (token, expert)
    pairs by path: hot, soft_hit (already in a VRAM slot), streamed (copied in for this step) or cpu."""

    def __init__(self, placement: Placement, hot: HotExperts, remote: RemoteExperts | None,
                 pool: SoftPool | None = None, planner: ColdPlanner | None = None,
                 on_dispatch: Callable[[str, int], None] = lambda path, n: None) -> None:
        self.hot, self.remote, self.pool, self.planner, self.on_dispatch = hot, remote, pool, planner, on_dispatch
        self.owners = [list(layer) for layer in placement.owner]
        self.all_hot = [all(owner == GPU for owner in layer) for layer in placement.owner]
        self.owner = [torch.tensor(layer, dtype=torch.long, device=hot.device) for layer in placement.owner]

    def _soft_slots(self, layer: int, cold: Grouped) -> dict[int, int]:
        """Slots of this layer's cold experts computed on the GPU this step: resident ones, then the
        ones the planner streams in (an expert the policy finds no slot for stays on its host)."""
        if self.pool is None:
            return {}
        tier = self.pool.tier
        slots = {}
        for e in cold.experts:  # pinned as found, so streaming this layer's misses cannot evict them
            if (layer, e) in tier:
                slots[e] = tier.lookup((layer, e))
                tier.pin((layer, e))
        counts = dict(zip(cold.experts, cold.counts, strict=True))
        self.on_dispatch("soft_hit", sum(counts[e] for e in slots))
        misses = [(e, self.owners[layer][e], counts[e]) for e in cold.experts if e not in slots]
        for e in self.planner.to_stream(misses) if self.planner else []:
            slot = self.pool.stream(layer, e)
            if slot is not None:
                slots[e] = slot
                tier.pin((layer, e))
                self.on_dispatch("streamed", counts[e])
        return slots

    def _add_hot(self, layer: int, h: torch.Tensor, g: Grouped, out: torch.Tensor) -> torch.Tensor:
        self.on_dispatch("hot", len(g.tokens))
        with section("hot"):
            y = self.hot.compute(layer, h[g.tokens], g.experts, g.counts)
            return out.index_add_(0, g.tokens, y * g.weights[:, None])

    def __call__(self, layer: int, h: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        n, k = expert_ids.shape
        tokens = torch.arange(n, device=h.device).repeat_interleave(k)
        experts, pair_weights = expert_ids.flatten(), weights.flatten()
        if self.all_hot[layer]:  # nothing of this layer is cold: no mask, no host, no slot to look at
            return self._add_hot(layer, h, group_by_expert(tokens, experts, pair_weights), torch.zeros_like(h))
        owners = self.owner[layer][experts]
        out = torch.zeros_like(h)
        cold = owners != GPU
        slots: dict[int, int] = {}
        if self.pool is not None and bool(cold.any()):
            with section("soft"):
                slots = self._soft_slots(layer, group_by_expert(tokens[cold], experts[cold], pair_weights[cold]))
        slot_of = torch.full((len(self.owners[layer]),), -1, dtype=torch.long)
        for e, slot in slots.items():
            slot_of[e] = slot
        pair_slot = slot_of.to(h.device)[experts]
        on_cpu = cold & (pair_slot < 0)
        sent = []
        for host in torch.unique(owners[on_cpu]).tolist():
            assert self.remote is not None, "placement has cold experts but the worker has no expert hosts"
            sel = on_cpu & (owners == host)
            g = group_by_expert(tokens[sel], experts[sel], pair_weights[sel])
            self.remote.send(host, layer, g.experts, g.counts, h, g.tokens)
            self.on_dispatch("cpu", len(g.tokens))
            sent.append((host, g, time.perf_counter()))
        on_gpu = owners == GPU
        if bool(on_gpu.any()):
            self._add_hot(layer, h, group_by_expert(tokens[on_gpu], experts[on_gpu], pair_weights[on_gpu]), out)
        if slots:
            with section("soft"):
                soft = pair_slot >= 0
                g = group_by_expert(tokens[soft], pair_slot[soft], pair_weights[soft])  # grouped by slot
                y = self.pool.compute(layer, h[g.tokens], g.experts, g.counts)
                out.index_add_(0, g.tokens, y * g.weights[:, None])
                for e in slots:
                    self.pool.tier.unpin((layer, e))
        for host, g, sent_at in sent:
            y, compute_s = self.remote.receive(host, layer)  # type: ignore[union-attr]
            if self.planner is not None:
                self.planner.observe_host(len(g.experts), len(g.tokens), compute_s, time.perf_counter() - sent_at)
            out.index_add_(0, g.tokens, y.to(h.device, h.dtype) * g.weights[:, None])
        return out
