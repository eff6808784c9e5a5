"""The cold-expert cost model: how a layer's cold experts are split between host CPUs and PCIe, and
constants that follow observed timings."""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from gpu_worker.cold_path import ColdPlanner
from gpu_worker.cost_model import (
    H100_MACHINE,
    ColdExpert,
    CostConstants,
    LayerPlan,
    LiveConstants,
    expert_flops_per_token,
    expert_format,
    plan_layer,
    single_link_plans,
)
from shared.config import Config
from shared.expert_source import ExpertSource, open_expert_source
from shared.gguf_file import GGUFModel
from shared.gguf_write import write_model
from shared.make_model import make_model, preset_config
from shared.model_config import ModelConfig, tensor_shapes

QWEN3_30B, _ = preset_config("qwen3-30b-a3b")
FLOPS = expert_flops_per_token(QWEN3_30B)
PARAMS = QWEN3_30B.expert_params
INT8_BYTES = PARAMS + 2 * (2 * 768 + 2048)  # int8: a byte per weight and a bf16 scale per row (gate, up, down)
BF16_BYTES = PARAMS * 2
EXPERT_BYTES = {"BF16": BF16_BYTES, "int8": INT8_BYTES, "int4": PARAMS * 5 // 8}  # int4: 5 bits per weight


def experts(n: int, tokens: int | list[int], host: int | list[int] = 0, nbytes: int = INT8_BYTES,
            dtype: str = "int8") -> list[ColdExpert]:
    tokens = tokens if isinstance(tokens, list) else [tokens] * n
    host = host if isinstance(host, list) else [host] * n
    return [ColdExpert(e, host[e], tokens[e], nbytes, dtype, FLOPS) for e in range(n)]


def seconds(cold: list[ColdExpert], c: CostConstants, cpu: set[int]) -> tuple[dict[int, float], float]:
    """Host and stream seconds of an assignment, straight from the time model's formulas."""
    hosts: dict[int, float] = {}
    stream = 0.0
    for e in cold:
        flops = e.tokens * e.flops_per_token
        if e.expert in cpu:
            hosts[e.host] = hosts.get(e.host, c.round_trip_s) + e.nbytes / c.cpu_read_bw[e.dtype] + flops / c.cpu_flops
        else:
            stream += e.nbytes / c.pcie_bw + flops / c.gpu_flops
    return hosts, stream


def makespan(cold: list[ColdExpert], c: CostConstants, cpu: set[int]) -> float:
    hosts, stream = seconds(cold, c, cpu)
    return max(stream, *hosts.values(), 0.0)


def check_accounting(plan: LayerPlan, cold: list[ColdExpert], c: CostConstants) -> None:
    """Every cold expert is on exactly one path, on its own host, and the predicted times are the model's."""
    on_cpu = [e for experts_ in plan.cpu.values() for e in experts_]
    assert sorted(on_cpu + plan.stream) == sorted(e.expert for e in cold)
    owner = {e.expert: e.host for e in cold}
    assert all(owner[e] == host for host, experts_ in plan.cpu.items() for e in experts_)
    assert set(plan.cpu) == set(plan.cpu_s) == set(owner.values())
    hosts, stream = seconds(cold, c, set(on_cpu))
    assert plan.stream_s == pytest.approx(stream, rel=1e-9, abs=1e-15)
    for host, s in plan.cpu_s.items():
        assert s == pytest.approx(hosts.get(host, 0.0), rel=1e-9, abs=1e-15)
    assert plan.layer_s == pytest.approx(makespan(cold, c, set(on_cpu)), rel=1e-9, abs=1e-15)


# --- decisions on the H100 machine


def test_decode_computes_most_experts_on_the_cpu_and_streams_the_rest_so_both_links_work():
    cold = experts(64, 1)
    plan = plan_layer(cold, H100_MACHINE)
    check_accounting(plan, cold, H100_MACHINE)
    assert 0.5 < plan.cpu_share < 0.9 and plan.stream
    cpu_s = plan.cpu_s[0]
    assert 0.8 < cpu_s / plan.stream_s < 1.25  # both links finish at about the same time
    all_cpu, all_stream = single_link_plans(cold, H100_MACHINE)
    assert all_stream.stream_share == 1.0 and all_cpu.cpu_share == 1.0
    # Both links at once beat the better one alone by far: ~1.7x with these constants.
    assert plan.layer_s < 0.7 * min(all_cpu.layer_s, all_stream.layer_s)


def test_prefill_streams_nearly_everything():
    cold = experts(64, 256)
    plan = plan_layer(cold, H100_MACHINE)
    check_accounting(plan, cold, H100_MACHINE)
    assert plan.stream_share >= 0.85
    assert plan.layer_s <= single_link_plans(cold, H100_MACHINE)[1].layer_s


def test_experts_that_cost_more_on_the_cpu_go_over_pcie_first():
    """Decode and prefill experts in one layer: the ones with many tokens are streamed."""
    tokens = [512] * 4 + [1] * 32  # the lowest ids, so an order by id would keep them on the CPU
    cold = experts(36, tokens)
    plan = plan_layer(cold, H100_MACHINE)
    check_accounting(plan, cold, H100_MACHINE)
    assert set(range(4)) <= set(plan.stream)
    assert plan.cpu[0] and set(plan.cpu[0]) <= set(range(4, 36))


def test_a_slow_link_is_left_out():
    cold = experts(48, [1, 2, 3] * 16)
    slow_pcie = dataclasses.replace(H100_MACHINE, pcie_bw=1e8)
    plan = plan_layer(cold, slow_pcie)
    assert plan.cpu_share == 1.0 and plan.stream_s == 0.0
    slow_cpu = dataclasses.replace(H100_MACHINE, cpu_read_bw={"int8": 1e8})
    plan = plan_layer(cold, slow_cpu)
    assert plan.stream_share == 1.0 and plan.cpu_s == {0: 0.0}
    check_accounting(plan, cold, slow_cpu)


def test_two_hosts_with_uneven_loads_stream_from_the_busy_one():
    cold = experts(48, 1, host=[0] * 40 + [1] * 8)
    plan = plan_layer(cold, H100_MACHINE)
    check_accounting(plan, cold, H100_MACHINE)
    assert plan.cpu[1] == list(range(40, 48))  # the light host keeps all its experts
    assert plan.stream and set(plan.stream) <= set(range(40))
    assert plan.cpu_s[1] < plan.cpu_s[0]
    # The busy host and the link are balanced to within one expert's time on either.
    one = max(INT8_BYTES / H100_MACHINE.pcie_bw, INT8_BYTES / H100_MACHINE.cpu_read_bw["int8"])
    assert abs(plan.cpu_s[0] - plan.stream_s) <= one * 1.01


def test_no_cold_experts_is_an_empty_plan():
    plan = plan_layer([], H100_MACHINE)
    assert (plan.cpu, plan.stream, plan.cpu_s, plan.stream_s, plan.layer_s) == ({}, [], {}, 0.0, 0.0)
    assert plan.cpu_share == plan.stream_share == 0.0


def test_an_expert_dtype_without_a_cpu_rate_is_named():
    with pytest.raises(ValueError, match="no CPU read rate for expert dtype 'int4'"):
        plan_layer(experts(2, 1, dtype="int4"), H100_MACHINE)


def test_the_plan_does_not_depend_on_the_order_of_its_input():
    rng = random.Random(3)
    cold = experts(40, [rng.randint(1, 6) for _ in range(40)], host=[rng.randint(0, 2) for _ in range(40)])
    shuffled = cold[:]
    rng.shuffle(shuffled)
    assert plan_layer(shuffled, H100_MACHINE) == plan_layer(cold, H100_MACHINE)


# --- properties over random layers


def random_case(rng: random.Random, max_experts: int) -> tuple[list[ColdExpert], CostConstants]:
    c = CostConstants(
        pcie_bw=rng.uniform(5e9, 60e9), cpu_read_bw={"BF16": rng.uniform(5e9, 100e9), "int8": rng.uniform(5e9, 100e9)},
        cpu_flops=rng.uniform(1e11, 1e13), round_trip_s=rng.uniform(0.0, 1e-4), gpu_flops=rng.uniform(1e13, 1e15),
    )
    n_hosts = rng.randint(1, 3)
    cold = [ColdExpert(e, rng.randrange(n_hosts), rng.choice([1, 1, 2, 3, 8, 64, 300]), rng.randint(1, 20) << 20,
                       rng.choice(["BF16", "int8"]), FLOPS) for e in range(rng.randint(1, max_experts))]
    return cold, c


def test_the_plan_is_never_worse_than_the_better_single_link():
    rng = random.Random(20240611)
    both_used = 0
    for _ in range(400):
        cold, c = random_case(rng, 80)
        plan = plan_layer(cold, c)
        check_accounting(plan, cold, c)
        all_cpu, all_stream = single_link_plans(cold, c)
        assert plan.layer_s <= min(all_cpu.layer_s, all_stream.layer_s) * (1 + 1e-12)
        both_used += bool(plan.stream) and plan.n_cpu > 0
    assert both_used > 100  # the property was checked where it matters, not only on one-link answers


def test_the_plan_is_within_one_expert_per_host_of_the_optimum():
    """Against every assignment of small layers: the bound plan_layer's docstring states."""
    rng = random.Random(7)
    gaps = []
    for _ in range(150):
        cold, c = random_case(rng, 10)
        best = min(makespan(cold, c, {e.expert for e, on in zip(cold, cpu, strict=True) if on})
                   for cpu in itertools.product((False, True), repeat=len(cold)))
        worst_stream = {}
        for e in cold:
            t = e.nbytes / c.pcie_bw + e.tokens * e.flops_per_token / c.gpu_flops
            worst_stream[e.host] = max(worst_stream.get(e.host, 0.0), t)
        got = plan_layer(cold, c).layer_s
        assert best * (1 - 1e-12) <= got <= best + sum(worst_stream.values()) + 1e-12
        gaps.append(got / best - 1)
    assert np.median(gaps) < 0.05  # usually optimal or close to it


# --- constants that follow the machine


# the PCIe link's and the GPU's constants stay as measured at start-up
TRUE = CostConstants(pcie_bw=H100_MACHINE.pcie_bw, cpu_read_bw={"BF16": 19e9, "int8": 52e9, "int4": 88e9},
                     cpu_flops=1.5e12, round_trip_s=45e-6, gpu_flops=H100_MACHINE.gpu_flops)


def cpu_time(c: CostConstants, dtype: str, nbytes: int, flops: float) -> float:
    return nbytes / c.cpu_read_bw[dtype] + flops / c.cpu_flops


def feed(live: LiveConstants, truth: CostConstants, rng: random.Random, n: int, tokens: tuple[int, ...],
         noise: float = 0.05) -> None:
    """n observations of each kind drawn from `truth`, each with `noise` relative jitter."""
    for _ in range(n):
        dtype = rng.choice(list(truth.cpu_read_bw))
        n_experts = rng.randint(1, 8)
        nbytes = n_experts * EXPERT_BYTES[dtype]
        flops = sum(rng.choice(tokens) for _ in range(n_experts)) * FLOPS
        jitter = 1 + rng.uniform(-noise, noise)
        live.observe_cpu(dtype, nbytes, flops, cpu_time(truth, dtype, nbytes, flops) * jitter)
        live.observe_round_trip(truth.round_trip_s * (1 + rng.uniform(-noise, noise)))


def assert_close(got: CostConstants, want: CostConstants, rel: float) -> None:
    assert got.pcie_bw == pytest.approx(want.pcie_bw, rel=rel)
    assert got.round_trip_s == pytest.approx(want.round_trip_s, rel=rel)
    assert got.cpu_flops == pytest.approx(want.cpu_flops, rel=rel)
    assert set(got.cpu_read_bw) == set(want.cpu_read_bw)
    for dtype, bw in want.cpu_read_bw.items():
        assert got.cpu_read_bw[dtype] == pytest.approx(bw, rel=rel), dtype


def test_live_constants_start_from_the_start_up_values():
    live = LiveConstants(H100_MACHINE)
    assert live.current == H100_MACHINE
    live.observe_round_trip(30e-6)
    assert live.current.round_trip_s == pytest.approx(30e-6)
    assert live.current.cpu_read_bw == H100_MACHINE.cpu_read_bw and live.current.cpu_flops == H100_MACHINE.cpu_flops
    assert live.current.pcie_bw == H100_MACHINE.pcie_bw  # the link's start-up measurement stands


def test_live_constants_converge_to_the_machine_and_follow_it_when_it_changes():
    rng = random.Random(11)
    live = LiveConstants(H100_MACHINE)
    feed(live, TRUE, rng, 600, tokens=(1, 1, 2, 3, 16, 128))
    # The averages weigh the last ~20 items (alpha 0.05) of 5% noise: over 40 seeds the worst constant was within
    # 8% of the truth, 12 of them beyond 5%.
    assert_close(live.current, TRUE, rel=0.1)  # int4 was never measured at start-up: learnt from the stream
    # The CPU gets busy with something else and the crossings slow down: the constants move with them.
    slower = dataclasses.replace(TRUE, cpu_read_bw={d: bw / 2 for d, bw in TRUE.cpu_read_bw.items()},
                                 round_trip_s=80e-6)
    feed(live, slower, rng, 300, tokens=(1, 1, 2, 3, 16, 128))
    assert_close(live.current, slower, rel=0.1)


def test_decode_only_timings_predict_decode_work_even_though_reading_and_computing_are_not_separable():
    """All items at one token per expert: the fit cannot split read from compute time, but what it
    predicts for such items (and so every decode plan) matches the machine."""
    rng = random.Random(5)
    live = LiveConstants(H100_MACHINE)
    feed(live, TRUE, rng, 300, tokens=(1,), noise=0.0)
    got = live.current
    for dtype, nbytes in EXPERT_BYTES.items():
        assert cpu_time(got, dtype, nbytes, FLOPS) == pytest.approx(cpu_time(TRUE, dtype, nbytes, FLOPS), rel=0.01)
    decode = experts(64, 1)
    assert plan_layer(decode, got).cpu[0] == plan_layer(decode, TRUE).cpu[0]


def test_a_term_lost_in_the_noise_stays_a_positive_rate():
    """When computing costs next to nothing, noise scatters its fitted cost around zero; it must not
    turn into a negative or infinite rate that would make plans nonsense."""
    rng = random.Random(2)
    live = LiveConstants(H100_MACHINE)
    feed(live, dataclasses.replace(TRUE, cpu_flops=1e18), rng, 200, tokens=(1, 1, 2, 3, 16, 128), noise=0.2)
    got = live.current
    assert 0 < got.cpu_flops <= 100 * H100_MACHINE.cpu_flops
    assert all(bw > 0 for bw in got.cpu_read_bw.values())


def test_identical_items_far_faster_than_the_references_still_fit():
    """Hosts that answer one kind of item in next to no time (their rates millions of times the references'):
    the moments are singular up to rounding, and the pull towards the start-up values must still settle them
    into fast, finite rates rather than fail the worker's step."""
    # start-up rates with which np.linalg.solve found the system exactly singular (a tiny model's f32 experts)
    start = dataclasses.replace(H100_MACHINE, cpu_read_bw={"F32": 5e9}, cpu_flops=1e10)
    live = LiveConstants(start)
    for _ in range(200):
        live.observe_cpu("F32", 4 * 24576, 4 * 12288.0, 1e-12)
    got = live.current
    assert start.cpu_read_bw["F32"] < got.cpu_read_bw["F32"] < float("inf")
    assert 0 < got.cpu_flops < float("inf")


@pytest.mark.parametrize("seconds", [0.0, -1e-3, float("nan"), float("inf")])
def test_live_constants_refuse_impossible_timings(seconds):
    """A NaN passed the check and made every later refit fail (the moments it poisoned never recover)."""
    live = LiveConstants(H100_MACHINE)
    live.observe_cpu("BF16", 1 << 20, FLOPS, 1e-3)
    with pytest.raises(ValueError):
        live.observe_cpu("BF16", 1 << 20, FLOPS, seconds)
    with pytest.raises(ValueError):
        live.observe_round_trip(seconds if seconds != 0.0 else -1.0)
    assert all(np.isfinite([*live.current.cpu_read_bw.values(), live.current.cpu_flops, live.current.round_trip_s]))


# --- inputs from a real file


def test_expert_format_reads_the_served_format_and_size_of_one_expert(tmp_path):
    cfg = ModelConfig(arch="qwen3moe", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, rope_base=1e6,
                      norm_eps=1e-6, n_experts=4, n_experts_used=2, expert_ffn=32, vocab_size=64, context_length=128)
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in tensor_shapes(cfg).items()}
    qtypes = {}
    for kind in ("ffn_gate_exps", "ffn_up_exps"):  # layer 1: Q8_0 gate and up, F32 down
        name = f"blk.1.{kind}.weight"
        tensors[name] = quants.quantize(tensors[name], Q.Q8_0).view(np.uint8)
        qtypes[name] = Q.Q8_0
    write_model(tmp_path / "m.gguf", cfg, tensors, qtypes=qtypes)
    model = GGUFModel(tmp_path / "m.gguf")
    source = open_expert_source(model, Config(expert_cache_dir=str(tmp_path)))
    per_matrix = cfg.hidden * cfg.expert_ffn
    assert (expert_format(source, 0), source.expert_nbytes(0)) == ("F32", 3 * per_matrix * 4)
    # a layer with a quantized matrix is served in int8 (a byte per weight, a bf16 scale per row)
    rows = 2 * cfg.expert_ffn + cfg.hidden
    assert (expert_format(source, 1), source.expert_nbytes(1)) == ("int8", 3 * per_matrix + 2 * rows)
    assert expert_flops_per_token(cfg) == 2 * 3 * per_matrix


def test_the_planner_plans_a_step_with_the_constants_it_began_with(tmp_path):
    """Hosts report after every layer; the refit they call for is taken at the next step, not within one."""
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=3)
    source = ExpertSource(GGUFModel(path), None)
    planner = ColdPlanner(source, "auto", stream_bw=2e9, gpu_flops=1e15, activation_dtype=torch.float32,
                          host_threads=1)
    # a link that moves these experts in a fraction of the start-up round trip (100 us), so every one goes over it,
    # until the hosts are seen to answer at once with nothing to cross
    cold = [(e, 0, 1) for e in range(4)]
    assert planner.to_stream(0, cold) == [0, 1, 2, 3]
    for _ in range(200):  # hosts that compute a layer in no time and cross instantly
        planner.observe_host(0, 4, 4, 1e-12, 1e-12)
    assert planner.to_stream(0, cold) == [0, 1, 2, 3], "the step's plan keeps the constants it began with"
    planner.begin_step()
    assert len(planner.to_stream(0, cold)) < 4


def test_a_host_compute_time_of_zero_is_not_learnt_from(tmp_path):
    """A host whose clock is coarser than its work reports 0 s: a right answer, which failed the whole batch as an
    internal_error (the CPU fit refuses 0 s) rather than being left out of the fit."""
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=3)
    planner = ColdPlanner(ExpertSource(GGUFModel(path), None), "auto", stream_bw=2e9, gpu_flops=1e15,
                          activation_dtype=torch.float32, host_threads=1)
    before = planner.live.current
    planner.observe_host(0, 4, 4, 0.0, None)
    assert planner.live.current == before
