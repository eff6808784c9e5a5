"""How many warps cut K in the int4 / int8 decode kernel's blocks (gpu_worker.mma_decode.plan_k_warps), their rings'
stages and where gate/up lets down start: pure arithmetic on the GPU's SM count and shared memory, so it runs without
a GPU."""

from __future__ import annotations

import pytest

from gpu_worker.mma_decode import (
    DEEP_STAGES,
    FEW_EXPERTS_RELEASE_EIGHTHS,
    ONE_GROUP_LOOP_EXPERTS,
    RELEASE_EIGHTHS,
    SHALLOW_DOWN_STAGES,
    SHALLOWEST_DOWN_FROM,
    SHALLOWEST_DOWN_STAGES,
    STAGES,
    _shared_bytes,
    _x_tiles,
    plan_k_warps,
    release_eighths_of,
    ring_stages,
    unrolled_rounds,
)

H200 = (132, 227 * 1024)  # SMs, shared memory a block may opt into
RTX_4090 = (128, 99 * 1024)


@pytest.mark.parametrize("used, rows", [(8, 1), (16, 1), (8, 12), (64, 16), (128, 1)])
@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize("gpu", [H200, RTX_4090], ids=["h200", "rtx4090"])
@pytest.mark.parametrize("int8", [False, True], ids=["int4", "int8"])
def test_blocks_fit_the_gpus_shared_memory(used, rows, swiglu, gpu, int8):
    n, k = (768, 2048) if swiglu else (2048, 768)
    k_warps = plan_k_warps(n, k, used, swiglu, rows, *gpu, int8)
    warps = k_warps * (2 if swiglu else 1)
    assert k_warps >= 1 and k_warps & (k_warps - 1) == 0
    assert _shared_bytes(warps, _x_tiles(rows), ring_stages(n, used, swiglu, _x_tiles(rows), int8), int8) <= gpu[1]


def test_one_tokens_experts_take_the_most_warps_the_gpu_holds():
    """8 experts' gate and up: 96 blocks, too few for the SMs, so each block takes as many warps as fit: 16 on the
    H200 (the launch bounds), 8 where a block gets 99 KB of shared memory (16 warps' rings need 152 KB)."""
    assert plan_k_warps(768, 2048, 8, True, 1, *H200) == 8
    assert plan_k_warps(768, 2048, 8, True, 1, *RTX_4090) == 4
    assert plan_k_warps(768, 2048, 128, True, 1, *H200) == 1  # 1,536 blocks fill the SMs with one warp each


def test_only_gate_and_up_over_every_expert_take_the_deeper_ring():
    """128 experts' gate/up (1,536 blocks) at one tile of x and at two; 96 experts, and down, keep the default."""
    assert ring_stages(768, 128, True, 1) == DEEP_STAGES[0]
    assert ring_stages(768, 128, True, 2) == DEEP_STAGES[1]
    assert ring_stages(768, 96, True, 1) == STAGES
    assert ring_stages(2048, 128, False, 1) == STAGES


def test_only_down_of_a_few_experts_takes_the_shallower_ring():
    """One token's 8 experts (and fewer) at int4, and shallower still at two tiles of x from SHALLOWEST_DOWN_FROM
    experts, where int8's down takes it too; int8's down elsewhere, more experts and gate/up keep the default."""
    assert ring_stages(2048, 8, False, 1) == SHALLOW_DOWN_STAGES < STAGES
    fewer = SHALLOWEST_DOWN_FROM - 1
    assert ring_stages(2048, 1, False, 2) == ring_stages(2048, fewer, False, 2) == SHALLOW_DOWN_STAGES
    assert ring_stages(2048, SHALLOWEST_DOWN_FROM, False, 2) == ring_stages(2048, 8, False, 2) == SHALLOWEST_DOWN_STAGES
    assert SHALLOWEST_DOWN_STAGES < SHALLOW_DOWN_STAGES
    assert ring_stages(2048, 8, False, 1, int8=True) == ring_stages(2048, fewer, False, 2, int8=True) == STAGES
    assert ring_stages(2048, SHALLOWEST_DOWN_FROM, False, 2, int8=True) == SHALLOWEST_DOWN_STAGES
    assert ring_stages(2048, 8, False, 2, int8=True) == SHALLOWEST_DOWN_STAGES
    assert ring_stages(2048, 9, False, 1) == ring_stages(2048, 9, False, 2) == STAGES
    assert ring_stages(768, 8, True, 1) == ring_stages(768, 8, True, 2) == STAGES


def test_unrolled_rounds_only_at_two_tiles_outside_a_few_experts():
    """One tile of x always walks one group at a time; two tiles do so over 5-16 experts (8 x 9-16 among them) and
    in unrolled rounds below and above."""
    assert not unrolled_rounds(8, 1) and not unrolled_rounds(128, 1)
    assert [used for used in range(1, 129) if not unrolled_rounds(used, 2)] == list(ONE_GROUP_LOOP_EXPERTS)
    assert 8 in ONE_GROUP_LOOP_EXPERTS and 4 not in ONE_GROUP_LOOP_EXPERTS and 64 not in ONE_GROUP_LOOP_EXPERTS


def test_gate_up_lets_down_start_part_way_through_its_loop_and_later_at_a_few_experts_of_two_tiles():
    """Down launched at gate/up's start copied its weights while gate/up's loop ran and slowed it: gate/up's one-group
    loop lets it in part way through (a half), and later at two tiles of x over one token's 8 experts or fewer;
    gate/up's unrolled rounds and down itself (whose dependents are none) let it in at the start."""
    assert release_eighths_of(8, True, 1) == release_eighths_of(128, True, 1) == RELEASE_EIGHTHS[0] > 0
    assert release_eighths_of(8, True, 2) == release_eighths_of(5, True, 2) == FEW_EXPERTS_RELEASE_EIGHTHS
    assert release_eighths_of(16, True, 2) == RELEASE_EIGHTHS[1] != FEW_EXPERTS_RELEASE_EIGHTHS
    assert release_eighths_of(4, True, 2) == release_eighths_of(64, True, 2) == 0  # unrolled rounds
    assert release_eighths_of(8, False, 1) == release_eighths_of(8, False, 2) == 0
    assert all(0 < e < 8 for e in (*RELEASE_EIGHTHS, FEW_EXPERTS_RELEASE_EIGHTHS))


def test_int8_rings_take_more_shared_memory():
    """An int8 group's 64 rows take 2 KB of a stage where int4's take 1.4 KB: one expert's down on a GPU of 108 SMs
    and 163 KB a block (an A100) gets 16 warps as int4, 8 as int8, whose 16 warps' rings would need 192 KB."""
    a100 = (108, 163 * 1024)
    assert plan_k_warps(2048, 2048, 1, False, 1, *a100) == 16
    assert plan_k_warps(2048, 2048, 1, False, 1, *a100, True) == 8
