"""Routed experts for one MoE layer: hot ones computed on the worker, cold ones sent to their hosts.

Cold work for every host is sent first, the hot experts are computed while the hosts
work, then the hosts' results are gathered, so the two overlap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpu_worker.remote import RemoteExperts
from shared.expert_math import ExpertWeights, group_by_expert, grouped_ffn
from shared.gguf_file import GGUFModel
from shared.placement import GPU, Placement


class HotExperts:
    """The experts the placement keeps on the worker, dequantized onto its device."""

    def __init__(self, model: GGUFModel, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.weights: dict[tuple[int, int], ExpertWeights] = {}

    def apply(self, placement: Placement) -> None:
        wanted = {(layer, e) for layer in range(placement.n_layers) for e in placement.hot(layer)}
        for key in set(self.weights) - wanted:
            del self.weights[key]
        for layer, e in sorted(wanted - set(self.weights)):
            self.weights[(layer, e)] = tuple(  # type: ignore[assignment]
                self.model.expert(layer, kind, e).to(self.device, self.dtype)
                for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
            )

    def of_layer(self, layer: int) -> Callable[[int], ExpertWeights]:
        return lambda e: self.weights[(layer, e)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.weights.values() for t in w)


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
            y = grouped_ffn(h[g.tokens], g.experts, g.counts, self.hot.of_layer(layer))
            out.index_add_(0, g.tokens, y * g.weights[:, None])
            self.on_dispatch("hot", len(g.tokens))
        for host, g in sent:
            y = self.remote.receive(host, layer).to(h.device, h.dtype)  # type: ignore[union-attr]
            out.index_add_(0, g.tokens, y * g.weights[:, None])
        return out
