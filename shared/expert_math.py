"""Expert FFNs over rows grouped by expert: one matrix product per expert per batch, never per token.

The gpu_worker (hot experts) and the expert hosts (cold experts) both compute through
here, so every placement of an expert gives the same numbers. Weights are float tensors or
the quantized matrices of shared.quant: int8 / int4 experts at a few rows each go through
shared.native_kernels' one call for the whole group (the same roundings as shared.quant's kernels,
only the fp32 sums in another order), everything else through shared.quant's kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shared.native_kernels import grouped_swiglu
from shared.quant import ExpertWeights, quantized_ffn


def grouped_ffn(
    x: torch.Tensor, experts: Sequence[int], counts: Sequence[int], weights_of: Callable[[int], ExpertWeights]
) -> torch.Tensor:
    """Rows of `x` grouped by expert (counts[i] rows for experts[i]) -> each row through its expert."""
    if len(experts) != len(counts):
        raise ValueError(f"{len(experts)} experts but {len(counts)} counts")
    weights = [weights_of(e) for e in experts]  # once, for whichever path runs
    native = grouped_swiglu(x, weights, counts)
    if native is not None:
        return native
    out = torch.empty_like(x)
    start = 0
    for matrices, n in zip(weights, counts, strict=True):
        out[start : start + n] = quantized_ffn(x[start : start + n], *matrices)
        start += n
    return out
