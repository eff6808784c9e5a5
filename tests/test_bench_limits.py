"""The benchmark's physical-limit arithmetic on hand-made models and machines."""

from __future__ import annotations

import pytest

from shared.bench_limits import (
    Machine,
    ModelTraffic,
    cold_share,
    decode_bound,
    efficiency,
    expected_used_experts,
    model_traffic,
    prefill_bound,
)
from shared.make_model import preset_config

GPU = Machine(cpu_read_bw=100e9, pcie_bw=50e9, device_mem_bw=3e12, device_flops=1e15, device_bytes_per_param=2)
CPU = Machine(cpu_read_bw=100e9, pcie_bw=None, device_mem_bw=100e9, device_flops=1e12, device_bytes_per_param=4)
# 10 layers, top-2 of 8: 20 experts per token of 1 MB (500k params) each, and a 1M-parameter trunk.
SMALL = ModelTraffic(n_layers=10, n_experts=8, experts_used=2, bytes_per_expert=1e6, expert_params=500_000,
                     trunk_params=1_000_000, attn_flops_per_position=0.0)


def test_model_traffic_counts_trunk_matrices_but_not_the_embedding_lookup():
    cfg, _ = preset_config("tiny")  # hidden 64, q 64, kv 32, 8 experts of ffn 32, vocab 512, 4 layers, 4 heads of 16
    t = model_traffic(cfg, bytes_per_expert=24576.0)
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 8 * 64  # q, k and v, output, router
    assert t.trunk_params == 4 * per_layer + 512 * 64  # plus the output head
    assert t.expert_params == 3 * 64 * 32
    assert t.experts_per_token == 4 * 2
    assert t.attn_flops_per_position == 4 * 4 * 16 * 4
    assert t.flops_per_token(10) == 2 * (t.trunk_params + 8 * t.expert_params) + 10 * t.attn_flops_per_position


def test_cold_share_is_what_misses_the_hot_set_and_then_the_soft_tier():
    assert cold_share(0, 8) == 1.0
    assert cold_share(2, 8) == 0.75
    assert cold_share(2, 8, soft_hit_rate=0.5) == 0.375
    assert cold_share(8, 8, 0.3) == 0.0
    with pytest.raises(ValueError):
        cold_share(9, 8)
    with pytest.raises(ValueError):
        cold_share(2, 8, 1.5)


def test_decode_bound_with_both_links_in_parallel_on_a_gpu():
    b = decode_bound(SMALL, GPU, share_cold=0.5)
    assert b.cold_bytes_per_token == 10e6  # 20 experts, half of them cold, 1 MB each
    assert b.links_parallel_tok_s == pytest.approx(150e9 / 10e6)
    assert b.pcie_only_tok_s == pytest.approx(50e9 / 10e6)
    assert b.cpu_only_tok_s == pytest.approx(100e9 / 10e6)
    assert b.resident_bytes_per_token == 2 * (1_000_000 + 10 * 500_000)  # trunk and 10 hot experts in bf16
    assert b.device_tok_s == pytest.approx(3e12 / 12e6)
    assert b.bound_tok_s == pytest.approx(15_000)  # the links are the slower of the two


def test_decode_bound_when_everything_is_in_vram_is_device_memory():
    b = decode_bound(SMALL, GPU, share_cold=0.0)
    assert b.cold_bytes_per_token == 0
    assert b.links_parallel_tok_s is None and b.pcie_only_tok_s is None and b.cpu_only_tok_s is None
    assert b.bound_tok_s == pytest.approx(3e12 / (2 * (1_000_000 + 20 * 500_000)))


def test_decode_bound_on_a_cpu_only_machine_adds_both_reads_from_the_same_ram():
    b = decode_bound(SMALL, CPU, share_cold=0.5)
    assert b.pcie_only_tok_s is None
    assert b.links_parallel_tok_s == b.cpu_only_tok_s == pytest.approx(100e9 / 10e6)
    resident = 4 * (1_000_000 + 10 * 500_000)
    assert b.bound_tok_s == pytest.approx(1 / (resident / 100e9 + 10e6 / 100e9))


def test_decode_bound_matches_the_design_numbers_for_qwen3_30b():
    """DESIGN §8: every expert streamed, bf16 (9.4 MB each): PCIe alone ~15 tok/s, the CPU's ~100 GB/s ~28."""
    cfg, _ = preset_config("qwen3-30b-a3b")
    t = model_traffic(cfg, bytes_per_expert=2 * cfg.expert_params)
    b = decode_bound(t, Machine(100e9, 54.5e9, 3e12, 4e14, 2), share_cold=1.0)
    assert t.experts_per_token == 384
    assert b.pcie_only_tok_s == pytest.approx(15.0, abs=0.1)
    assert b.cpu_only_tok_s == pytest.approx(27.6, abs=0.1)
    assert b.links_parallel_tok_s == pytest.approx(b.pcie_only_tok_s + b.cpu_only_tok_s)


def test_expected_used_experts():
    assert expected_used_experts(8, 2, 0) == 0
    assert expected_used_experts(8, 2, 1) == pytest.approx(2)
    assert expected_used_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))
    assert expected_used_experts(128, 8, 4096) == pytest.approx(128)


def test_prefill_bound_streams_used_cold_experts_once_or_is_compute_bound():
    p = prefill_bound(SMALL, GPU, hot_per_layer=2, prompt_tokens=1000)  # every expert used, 6 of 8 cold
    assert p.moved_bytes == pytest.approx(10 * 6 * 1e6)
    assert p.move_s == pytest.approx(60e6 / 50e9)
    assert p.compute_s == pytest.approx(1000 * 2 * (1_000_000 + 20 * 500_000) / 1e15)
    assert p.limited_by == "pcie"
    assert p.bound_tok_s == pytest.approx(1000 / p.move_s)
    all_hot = prefill_bound(SMALL, GPU, hot_per_layer=8, prompt_tokens=1000)
    assert all_hot.moved_bytes == 0 and all_hot.limited_by == "compute"
    assert all_hot.bound_tok_s == pytest.approx(1000 / all_hot.compute_s)


def test_prefill_bound_on_a_cpu_only_machine_reads_every_used_expert_and_computes_everything():
    p = prefill_bound(SMALL, CPU, hot_per_layer=2, prompt_tokens=1000)
    assert p.moved_bytes == pytest.approx(10 * 8 * 1e6)  # "hot" experts live in the same RAM
    assert p.limited_by == "compute"  # 22 Gflop at 1 Tflop/s outlasts reading 80 MB
    assert p.bound_tok_s == pytest.approx(1000 / p.compute_s)
    fast_cpu = Machine(100e9, None, 100e9, 1e18, 4)
    assert prefill_bound(SMALL, fast_cpu, 2, 1000).limited_by == "cpu-memory"
    with pytest.raises(ValueError):
        prefill_bound(SMALL, CPU, 2, 0)


def test_efficiency():
    assert efficiency(50.0, 200.0) == 0.25
    assert efficiency(None, 200.0) is None
    assert efficiency(50.0, None) is None
