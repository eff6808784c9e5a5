"""`tierserve bench --budget-sweep`: the system started once per VRAM budget, llama-bench run over the matching
`--n-cpu-moe` values, and the table and plot made of them."""

from __future__ import annotations

import importlib.util
import json

import pytest

from shared.bench_llama import parse_results
from shared.bench_metrics import PATHS
from shared.bench_report import sweep_table
from shared.bench_sweep import by_cpu_moe, run_llama, sweep_options
from shared.cli import main as tierserve
from tests.test_bench_llama import fake_llama_bench, record

LAYERS, EXPERTS = 4, 8  # the tiny preset


def test_sweep_options_set_the_budget_in_place_of_any_other():
    assert sweep_options(["--hot-experts", "2", "--expert-hosts", "1"], 1000) == [
        "--expert-hosts", "1", "--gpu-expert-budget", "1000"]
    assert sweep_options(["--gpu-expert-budget", "5", "--soft-slots", "4"], 7) == [
        "--soft-slots", "4", "--gpu-expert-budget", "7"]


def test_llama_records_are_picked_by_their_cpu_moe_layers():
    records = parse_results(json.dumps([record(0, 32, 40.0, n_cpu_moe=3), record(0, 32, 90.0),
                                        record(512, 0, 800.0, n_cpu_moe=3)]))
    assert by_cpu_moe(records, 3) == {"llama_decode_tok_s": 40.0, "llama_prefill_tok_s": 800.0}
    assert by_cpu_moe(records, 0) == {"llama_decode_tok_s": 90.0, "llama_prefill_tok_s": None}


def test_llama_sweep_runs_each_budget_s_cpu_moe_in_one_call_per_figure(tmp_path):
    fake_llama_bench(tmp_path)
    # 4 layers of 100 bytes of experts: 0% keeps all 4 on the CPU, 50% two, 100% none
    points = run_llama(str(tmp_path), "m.gguf", [0, 50, 100], 400, LAYERS, gen_tokens=8, prompt_tokens=64, threads=2)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 3 and all("-ncmoe 0,2,4" in c and "-lm none" in c for c in calls[1:])
    assert [(p["percent"], p["n_cpu_moe"]) for p in points] == [(0, 4), (50, 2), (100, 0)]
    assert [p["llama_decode_tok_s"] for p in points] == [46.0, 48.0, 50.0]
    assert [p["llama_prefill_tok_s"] for p in points] == [1060.0, 1062.0, 1064.0]


def test_llama_sweep_maps_the_model_where_loading_it_runs_out_of_memory(tmp_path):
    fake_llama_bench(tmp_path)
    points = run_llama(str(tmp_path), "big.gguf", [50], 400, LAYERS, gen_tokens=8, prompt_tokens=64, threads=2)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert ["-lm none" in c for c in calls[1:]] == [True, False, True, False]
    assert points == [{"percent": 50, "n_cpu_moe": 2, "llama_decode_tok_s": 48.0, "llama_prefill_tok_s": 1062.0}]


def test_llama_sweep_maps_the_model_where_loading_it_runs_past_the_timeout(tmp_path):
    fake_llama_bench(tmp_path)
    points = run_llama(str(tmp_path), "slow.gguf", [50], 400, LAYERS, gen_tokens=8, prompt_tokens=64, threads=2,
                       timeout_s=5)
    assert points == [{"percent": 50, "n_cpu_moe": 2, "llama_decode_tok_s": 48.0, "llama_prefill_tok_s": 1062.0}]


@pytest.mark.slow
def test_bench_sweeps_the_budget_on_the_tiny_model(tmp_path):
    """--sweep-only: the sweep without the figures at the bench's own budget first."""
    out = tmp_path / "out"
    code = tierserve(["bench", "--preset", "tiny", "--quick", "--cache-dir", str(tmp_path / "models"),
                      "--out", str(out), "--hot-experts", "2", "--expert-hosts", "1", "--budget-sweep", "25,100",
                      "--sweep-only"])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    points = r["sweep"]["tierserve"]
    served = r["model"]["served_bytes_per_expert"] * LAYERS * EXPERTS
    assert [p["percent"] for p in points] == [25, 100]
    assert [p["budget_bytes"] for p in points] == [int(served / 4), int(served)]
    assert [p["hot_experts_per_layer"] for p in points] == [EXPERTS / 4, EXPERTS]
    assert all(p["decode_tok_s"] > 0 and p["prefill_tok_s"] > 0 for p in points)
    # the decode's pairs by path: at 25% some go to the host, at 100% every one is hot
    assert all(abs(sum(p["decode_paths"].values()) - 1) < 1e-9 for p in points)
    assert points[0]["decode_paths"]["cpu"] > 0 and points[0]["decode_vram_hit_rate"] < 1
    assert points[1]["decode_paths"]["hot"] == 1 and points[1]["decode_vram_hit_rate"] == 1
    assert r["sweep"]["llama_cpp"] is None
    assert "decode" not in r and "limits" not in r
    md = (out / "results.md").read_text()
    assert "## VRAM budget sweep" in md and "## Decode" not in md
    plots = {p.name for p in out.glob("*.png")}
    assert plots == ({"sweep.png"} if importlib.util.find_spec("matplotlib") else set())


@pytest.mark.slow
def test_a_budget_of_every_expert_s_bytes_holds_every_expert_of_a_quantized_model(tmp_path):
    """A quantized hot expert is its cache region (whole pages), larger than its tensors: 100% is every expert."""
    out = tmp_path / "out"
    code = tierserve(["bench", "--preset", "tiny", "--dtype", "q4_0", "--quick", "--cache-dir",
                      str(tmp_path / "models"), "--out", str(out), "--expert-hosts", "1", "--budget-sweep", "100",
                      "--sweep-only"])
    assert code == 0
    point, = json.loads((out / "results.json").read_text())["sweep"]["tierserve"]
    assert point["hot_experts_per_layer"] == EXPERTS
    assert point["decode_paths"]["hot"] == 1 and point["decode_vram_hit_rate"] == 1


def test_sweep_only_needs_a_sweep():
    with pytest.raises(SystemExit):
        tierserve(["bench", "--preset", "tiny", "--sweep-only"])


def test_a_sweep_cannot_measure_a_running_system():
    with pytest.raises(SystemExit):
        tierserve(["bench", "--model", "m.gguf", "--endpoint", "tcp://127.0.0.1:1", "--budget-sweep", "50"])


def test_a_sweep_saved_before_paths_were_recorded_still_makes_its_table():
    """bench/results holds sweeps from before the paths column; the report shows n/a there, not a KeyError."""
    old = {"percent": 25, "budget_bytes": 4e9, "hot_experts_per_layer": 32, "decode_tok_s": 18.0,
           "prefill_tokens": 512, "prefill_tok_s": 900.0}
    new = {**old, "percent": 100, "decode_paths": {p: 0.0 for p in PATHS} | {"hot": 1.0}, "decode_vram_hit_rate": 1.0}
    rows = [line for line in sweep_table({"tierserve": [old, new], "llama_cpp": None}) if line.startswith("| 25")
            or line.startswith("| 100")]
    assert "n/a" in rows[0].split("|")[5] and "n/a" in rows[0].split("|")[6]
    assert "100.0%" in rows[1].split("|")[5] and rows[1].split("|")[6].strip() == "100.0%"
