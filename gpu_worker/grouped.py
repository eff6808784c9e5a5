"""Many experts in one launch: SwiGLU over rows grouped by expert with torch's grouped GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.expert_cache import ExpertLayout
from shared.expert_math import ExpertWeights


def swiglu_grouped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, groups: list[int],
                   counts: list[int]) -> torch.Tensor:
    """x rows grouped by `groups` (ascending indices into the stacks), counts[i] rows for groups[i].

    gate_up is (G, 2F, H), gate rows then up rows, and down (G, H, F): the GGUF's row layout, so a
    stack is filled by plain copies; the GEMMs read them transposed. Groups with no rows cost nothing.
    """
    per_group = torch.zeros(gate_up.shape[0], dtype=torch.int32)
    per_group[groups] = torch.tensor(counts, dtype=torch.int32)
    return _swiglu_offsets(x, gate_up, down, per_group.cumsum(0, dtype=torch.int32).to(x.device, non_blocking=True))


def _swiglu_offsets(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)


def experts_grouped(x: torch.Tensor, stack: ExpertWeights | tuple[torch.Tensor, torch.Tensor], groups: list[int],
                    counts: list[int]) -> torch.Tensor:
    """A stack of experts in either form the worker keeps on a GPU: bf16 (gate_up, down) for
    swiglu_grouped, or quantized (gate, up, down) views of cache regions for the int8 / int4 kernels."""
    if len(stack) == 2:
        return swiglu_grouped(x, *stack, groups, counts)
    from gpu_worker.quant_kernels import quant_swiglu_grouped  # Triton comes only with CUDA builds of torch

    return quant_swiglu_grouped(x.to(torch.bfloat16), *stack, groups, counts).to(x.dtype)


def takes_device_counts(stack: ExpertWeights | tuple[torch.Tensor, torch.Tensor], rows_at_most: int) -> bool:
    """Whether all_experts_grouped can run this stack for up to `rows_at_most` rows per expert: bf16 always,
    quantized stacks within their decode kernels' rows (above, prefill needs the counts on the host)."""
    if len(stack) == 2:
        return True
    from gpu_worker.quant_kernels import DECODE_MAX_ROWS

    return rows_at_most <= DECODE_MAX_ROWS


def all_experts_grouped(x: torch.Tensor, stack: ExpertWeights | tuple[torch.Tensor, torch.Tensor],
                        counts: torch.Tensor, used_at_most: int, rows_at_most: int) -> torch.Tensor:
    """experts_grouped over every expert of a stack, from x's first rows sorted by their place in the stack and
    `counts` (rows per place, at most rows_at_most) on the device, so nothing waits on the device (see
    takes_device_counts); used_at_most experts have rows. Rows of x after the counted ones come out undefined."""
    if len(stack) == 2:
        return _swiglu_offsets(x, *stack, counts.cumsum(0, dtype=torch.int32))
    from gpu_worker.quant_kernels import quant_swiglu_all_experts

    return quant_swiglu_all_experts(x.to(torch.bfloat16), *stack, counts, used_at_most, rows_at_most).to(x.dtype)


def warm_up_quantized(layout: ExpertLayout, n_experts: int, device: torch.device) -> None:
    """Run the int8 / int4 kernels once for every launch size they are tuned or compiled for (few, some and
    many experts at decode, one and two 8-row tiles of x, and the prefill path), on zero weights. Triton tunes
    a kernel on its first call for a shape and NVRTC compiles the CUDA decode kernel, which takes seconds: done while
    serving, it would stall the first requests and the heartbeats."""
    regions = torch.zeros(n_experts, layout.region_nbytes, dtype=torch.uint8, device=device)
    stack = layout.views(regions)
    hidden = stack[0].shape[-1]
    # every expert at one row, 2 and 9: int4 gate/up over many experts takes a deeper ring, a kernel of its own
    # for each number of x's 8-row tiles (mma_decode.ring_stages); one row and 2-8 rows each take a kernel of their
    # own too (int8's down on the CUDA kernel only at up to 8 experts); int4's down of up to 8 experts takes a
    # shallower ring, so 16 experts of 2 rows compile the default one at 2-8 rows, and at 9-16 rows one expert
    # and 8 take rings of their own
    for n_used, rows in ((1, 1), (min(8, n_experts), 2), (min(16, n_experts), 1), (min(16, n_experts), 2),
                         (n_experts, 1), (n_experts, 2), (n_experts, 9), (1, 16), (min(8, n_experts), 9),
                         (min(8, n_experts), 32)):
        x = torch.zeros(n_used * rows, hidden, dtype=torch.bfloat16, device=device)
        experts_grouped(x, stack, list(range(n_used)), [rows] * n_used)
    torch.cuda.synchronize(device)
