"""Routed experts for one MoE layer: hot ones computed on the worker, cold ones sent to their hosts.

Cold work for every host is sent first, the hot experts are computed while the hosts
work, then the hosts' results are gathered, so the two overlap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpu_worker.remote import RemoteExperts
from shared.expert_math import ExpertWeights, group_by_expert, grouped_ffn
from shared.gguf_file import GGUFModel
from shared.model_config import EXPERT_TENSOR_KINDS
from shared.placement import GPU, Placement


class HotExperts:
    """The experts the placement keeps on the worker, dequantized onto its device.

    On a GPU in bf16 each layer's hot experts are stacked so one grouped GEMM (torch._grouped_mm)
    computes all of them at once; otherwise they are kept one by one and computed as the oracle does.
    """

    def __init__(self, model: GGUFModel, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.grouped = device.type == "cuda" and dtype == torch.bfloat16  # what grouped GEMM kernels take
        self.ids: dict[int, list[int]] = {}
        self.weights: dict[tuple[int, int], ExpertWeights] = {}  # CPU: per expert
        self.stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # GPU: (gate_up (G, H, 2F), down (G, F, H))

    def _load(self, layer: int, e: int) -> ExpertWeights:
        return tuple(self.model.expert(layer, kind, e).to(self.device, self.dtype)  # type: ignore[return-value]
                     for kind in EXPERT_TENSOR_KINDS)

    def apply(self, placement: Placement) -> None:
        for layer in range(placement.n_layers):
            ids = placement.hot(layer)
            if self.ids.get(layer) == ids:
                continue
            self.ids[layer] = ids
            for key in [k for k in self.weights if k[0] == layer]:
                del self.weights[key]
            self.stacks.pop(layer, None)
            if not ids:
                continue
            if self.grouped:
                weights = [self._load(layer, e) for e in ids]
                gate_up = torch.stack([torch.cat([g, u]).T for g, u, _ in weights])
                down = torch.stack([d.T for _, _, d in weights])
                self.stacks[layer] = (gate_up.contiguous(), down.contiguous())
            else:
                for e in ids:
                    self.weights[(layer, e)] = self._load(layer, e)

    def compute(self, layer: int, x: torch.Tensor, experts: list[int], counts: list[int]) -> torch.Tensor:
        """Rows of x grouped by expert (ascending ids, as group_by_expert sorts them) through their experts."""
        if not self.grouped:
            return grouped_ffn(x, experts, counts, lambda e: self.weights[(layer, e)])
        gate_up, down = self.stacks[layer]
        rows = torch.tensor([self.ids[layer].index(e) for e in experts], device=x.device)
        per_row = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
        per_row[rows] = torch.tensor(counts, dtype=torch.int32, device=x.device)
        offs = per_row.cumsum(0, dtype=torch.int32)
        h = torch._grouped_mm(x, gate_up, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, down, offs=offs)

    @property
    def nbytes(self) -> int:
        tensors = [t for w in self.weights.values() for t in w] + [t for s in self.stacks.values() for t in s]
        return sum(t.numel() * t.element_size() for t in tensors)


class MoEDispatch:
    """The trunk's MoE function for one placement. `on_dispatch(path, pairs)` counts work by path."""

    def __init__(self, placement: Placement, hot: HotExperts, remote: RemoteExperts | None,
                 on_dispatch: Callable[[str, int], None] = lambda path, n: None) -> None:
        self.hot, self.remote, self.on_dispatch = hot, remote, on_dispatch
        self.owner = [torch.tensor(layer, dtype=torch.long, device=hot.device) for layer in placement.owner]

    def __call__(self, layer: int, h: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        n, k = expert_ids.shape
        tokens = torch.arange(n, device=h.device).repeat_interleave(k)
        experts, pair_weights = expert_ids.flatten(), weights.flatten()
        owners = self.owner[layer][experts]
        out = torch.zeros_like(h)
        sent = []
        for host in torch.unique(owners).tolist():
            if host == GPU:
                continue
            assert self.remote is not None, "placement has cold experts but the worker has no expert hosts"
            sel = owners == host
            g = group_by_expert(tokens[sel], experts[sel], pair_weights[sel])
            self.remote.send(host, layer, g.experts, g.counts, h[g.tokens])
            self.on_dispatch("cpu", len(g.tokens))
            sent.append((host, g))
        sel = owners == GPU
        if bool(sel.any()):
            g = group_by_expert(tokens[sel], experts[sel], pair_weights[sel])
            y = self.hot.compute(layer, h[g.tokens], g.experts, g.counts)
            out.index_add_(0, g.tokens, y * g.weights[:, None])
            self.on_dispatch("hot", len(g.tokens))
        for host, g in sent:
            y = self.remote.receive(host, layer).to(h.device, h.dtype)  # type: ignore[union-attr]
            out.index_add_(0, g.tokens, y * g.weights[:, None])
        return out
