"""Expert FFNs over rows grouped by expert: one matrix product per expert per batch, never per token.

The gpu_worker (hot experts) and the expert hosts (cold experts) both compute through
here, so every placement of an expert gives the same numbers. Weights are float tensors or
the quantized matrices of shared.quant, computed by its kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shared.quant import Matrix, quantized_ffn

ExpertWeights = tuple[Matrix, Matrix, Matrix]  # gate (F, H), up (F, H), down (H, F)


@dataclass
class Grouped:
    """(token, expert) pairs sorted by expert: rows[i] of `tokens` goes to experts[j] for its span in counts."""

    tokens: torch.Tensor  # (P,) token index of each pair
    weights: torch.Tensor  # (P,) routing weight of each pair
    experts: list[int]  # distinct experts, ascending
    counts: list[int]  # pairs per expert, same order


def group_by_expert(token_idx: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Grouped:
    """Sort flat (token, expert, weight) pairs by expert (stable, so tokens stay in order within an expert)."""
    order = torch.sort(expert_ids, stable=True).indices
    experts, counts = torch.unique_consecutive(expert_ids[order], return_counts=True)
    return Grouped(token_idx[order], weights[order], experts.tolist(), counts.tolist())


def grouped_ffn(
    x: torch.Tensor, experts: Sequence[int], counts: Sequence[int], weights_of: Callable[[int], ExpertWeights]
) -> torch.Tensor:
    """Rows of `x` grouped by expert (counts[i] rows for experts[i]) -> each row through its expert."""
    out = torch.empty_like(x)
    start = 0
    for expert, n in zip(experts, counts, strict=True):
        out[start : start + n] = quantized_ffn(x[start : start + n], *weights_of(expert))
        start += n
    return out
