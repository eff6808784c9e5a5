"""Expert FFNs over rows grouped by expert: one matrix product per expert per batch, never per token.

The gpu_worker (hot experts) and the expert hosts (cold experts) both compute through
here, so every placement of an expert gives the same numbers. Weights are float tensors or
the quantized matrices of shared.quant, computed by its kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shared.quant import Matrix, quantized_ffn

ExpertWeights = tuple[Matrix, Matrix, Matrix]  # gate (F, H), up (F, H), down (H, F)


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
