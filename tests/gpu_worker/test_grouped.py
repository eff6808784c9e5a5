"""The hot experts' grouped SwiGLU from counts on the device, against each expert computed on its own.

torch._grouped_mm runs on the CPU too, so the bf16 form of a layer's hot share (gpu_worker.experts.MoEDispatch
computes it without the host) is checked here; its quantized form is in tests/gpu/test_quant_kernels.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_worker.grouped import all_experts_grouped, swiglu_grouped

EXPERTS, HIDDEN, FFN = 6, 32, 16


def stack(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(EXPERTS, 2 * FFN, HIDDEN, generator=g).to(torch.bfloat16)
    down = torch.randn(EXPERTS, HIDDEN, FFN, generator=g).to(torch.bfloat16)
    return gate_up, down


def one_by_one(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out, start = [], 0
    for e, n in enumerate(counts):
        rows = x[start:start + n].float()
        gate, up = (rows @ gate_up[e].float().T).chunk(2, dim=-1)
        out.append((F.silu(gate) * up) @ down[e].float().T)
        start += n
    return torch.cat(out)


def test_all_experts_from_device_counts_match_each_expert_alone():
    gate_up, down = stack(0)
    counts = [2, 0, 0, 5, 1, 0]  # empty experts at the start, the middle and the end
    x = torch.randn(sum(counts), HIDDEN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = all_experts_grouped(x, (gate_up, down), torch.tensor(counts), used_at_most=3, rows_at_most=5)
    want = one_by_one(x, gate_up, down, counts)
    assert got.shape == want.shape
    assert ((got.float() - want).norm(dim=1) / want.norm(dim=1)).max() < 2e-2


def test_all_experts_agree_with_the_host_planned_launch():
    gate_up, down = stack(2)
    counts = [1, 1, 0, 3, 0, 2]
    x = torch.randn(sum(counts), HIDDEN, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    used = [e for e, n in enumerate(counts) if n]
    planned = swiglu_grouped(x, gate_up, down, used, [counts[e] for e in used])
    on_device = all_experts_grouped(x, (gate_up, down), torch.tensor(counts), used_at_most=4, rows_at_most=3)
    assert torch.equal(planned, on_device)
