"""The experts one host owns, read from the GGUF over mmap: only owned slices are ever touched."""

from __future__ import annotations

from collections.abc import Callable

import torch

from shared.expert_math import ExpertWeights, grouped_ffn
from shared.gguf_file import GGUFModel
from shared.model_config import EXPERT_TENSOR_KINDS
from shared.placement import Placement


class ExpertStore:
    """Float experts are zero-copy views of the mapped file, so a host's RAM is the pages it touches."""

    def __init__(self, model: GGUFModel, host_index: int) -> None:
        self.model, self.host_index = model, host_index
        self.weights: dict[tuple[int, int], ExpertWeights] = {}
        self.placement_version = 0

    def apply(self, placement: Placement) -> None:
        """Hold exactly the experts the placement gives this host (drop first, so RAM never holds both sets)."""
        wanted = {(layer, e) for layer in range(placement.n_layers) for e in placement.on_host(layer, self.host_index)}
        for key in set(self.weights) - wanted:
            del self.weights[key]
        for layer, e in sorted(wanted - set(self.weights)):
            self.weights[(layer, e)] = tuple(  # type: ignore[assignment]
                self.model.expert_view(layer, kind, e) for kind in EXPERT_TENSOR_KINDS
            )
        self.placement_version = placement.version

    def owns(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.weights

    def of_layer(self, layer: int) -> Callable[[int], ExpertWeights]:
        return lambda e: self.weights[(layer, e)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.weights.values() for t in w)


    def compute(self, layer: int, experts: list[int], counts: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """Validate a work item against what this host holds, then run it; ValueError names what is wrong."""
        if len(experts) != len(counts) or sum(counts) != hidden.shape[0] or any(n <= 0 for n in counts):
            raise ValueError(f"counts {counts} do not describe {hidden.shape[0]} rows for {len(experts)} experts")
        hidden_size = self.model.config.hidden
        if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
            raise ValueError(f"hidden has shape {tuple(hidden.shape)}, expected (rows, {hidden_size})")
        missing = [e for e in experts if not self.owns(layer, e)]
        if missing:
            raise ValueError(f"layer {layer}: experts {missing} are not held by this host")
        compute_dtype = self.weights[(layer, experts[0])][0].dtype if experts else hidden.dtype
        return grouped_ffn(hidden.to(compute_dtype), experts, counts, self.of_layer(layer)).to(hidden.dtype)
