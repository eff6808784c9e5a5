"""`tierserve bench` on this machine: the tiny preset through the whole system, every figure in results.json,
and the pieces it is made of (the worker's metrics, the load's timing helpers)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from shared.bench_cmd import limits, model_facts, served_model, settings, system_config
from shared.bench_cmd import main as bench_main
from shared.bench_limits import Machine, model_traffic
from shared.bench_load import Timed, latency, prompt_ids
from shared.bench_metrics import PATHS, parse_tiers, tier_delta, worker_metrics_url
from shared.bench_report import cost_model_table
from shared.cli import main as tierserve
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem, free_tcp_port
from shared.make_model import make_model
from shared.model_config import ModelError
from shared.protocol import HealthReply

LAYERS, TOP_K = 4, 2  # the tiny preset


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One quick run: 2 hot experts per layer, one expert host, 4 soft slots streamed into, a decode-step profile,
    and a setting the bench does not know itself, passed on to the system."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out"
    code = tierserve(["bench", "--preset", "tiny", "--quick", "--cache-dir", str(tmp / "models"), "--out", str(out),
                      "--hot-experts", "2", "--expert-hosts", "1", "--soft-slots", "4", "--cold-path", "stream",
                      "--profile-steps", "4", "--prefill-chunk", "64"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_decode_figures_at_each_concurrency(bench_run):
    _, r = bench_run
    assert r["settings"]["quick"] and r["system"]["started_by_bench"]
    assert r["system"]["options"][-2:] == ["--prefill-chunk", "64"]
    assert [d["concurrency"] for d in r["decode"]] == [1, 4, 16]
    for d in r["decode"]:
        assert d["requests"] == d["concurrency"]
        assert 0 < d["completion_tokens"] <= d["requests"] * d["max_tokens"]
        assert d["aggregate_tok_s"] > 0 and d["per_request_tok_s"] > 0 and d["server_decode_tok_s"] > 0
        assert 0 < d["ttft_ms_p50"] <= d["ttft_ms_p99"] and 0 < d["itl_ms_p50"] <= d["itl_ms_p99"]
    assert r["latency"] == {k: v for k, v in r["decode"][0].items() if k.endswith(("_p50", "_p99"))}


@pytest.mark.slow
def test_the_warm_up_and_each_concurrency_send_prompts_none_of_the_others_send(bench_run):
    """A warm-up on a measured prompt would leave that prompt's experts in VRAM for the run that measures it; so
    would a concurrency level on the prompts of the one before it (each level began again at variant 0)."""
    _, r = bench_run
    ranges = [r["warm_up"]["decode"]["prompt_variants"], *(d["prompt_variants"] for d in r["decode"])]
    for d, (low, high) in zip(r["decode"], ranges[1:], strict=True):
        assert high - low + 1 == d["requests"]
    for i, (low, high) in enumerate(ranges):
        assert all(other_high < low or high < other_low for other_low, other_high in ranges[i + 1 :])
    assert r["warm_up"]["prefill"]["prompt_tokens"] == max(r["settings"]["prompt_lengths"])


@pytest.mark.slow
def test_prefill_figures(bench_run):
    _, r = bench_run
    assert [p["prompt_tokens"] for p in r["prefill"]] == r["settings"]["prompt_lengths"] == [64, 256]
    for p in r["prefill"]:
        assert p["ttft_s"] > 0 and p["tok_s"] == pytest.approx(p["prompt_tokens"] / p["ttft_s"])


@pytest.mark.slow
def test_tier_counters_account_for_every_token_the_bench_sent(bench_run):
    """Each token the worker forwarded routes TOP_K pairs per layer: a decode request forwards its prompt and
    every generated token but the last, a prefill request its prompt."""
    _, r = bench_run
    decode, prefill = r["tiers"]["decode"], r["tiers"]["prefill"]
    forwarded = sum(d["requests"] * (d["prompt_tokens"] - 1) + d["completion_tokens"] for d in r["decode"])
    assert sum(decode["pairs"].values()) == forwarded * LAYERS * TOP_K
    assert sum(prefill["pairs"].values()) == sum(p["prompt_tokens"] for p in r["prefill"]) * LAYERS * TOP_K
    # --cold-path stream into 4 slots (and the default staging slots): every cold pair is a soft hit, streamed into
    # a slot or staged for the step, never computed by the host; which one depends on the slots' policy
    for phase in (decode, prefill):
        pairs = phase["pairs"]
        assert sum(phase["share"].values()) == pytest.approx(1.0)
        assert pairs["hot"] > 0 and pairs["soft_hit"] + pairs["streamed"] + pairs["staged"] > 0 and pairs["cpu"] == 0
        assert phase["vram_hit_rate"] == pytest.approx(phase["share"]["hot"] + phase["share"]["soft_hit"])
        copied = pairs["streamed"] + pairs["staged"] > 0
        assert (phase["streamed_bytes"] > 0) == (phase["streamed_gb_s"] > 0) == copied
        assert 0 < phase["soft_tier_hit_rate"] < 1
        # the cold planner's constants (the worker has soft slots, so it plans): the tiny model's f32 experts
        cost = phase["cost_model"]
        assert list(cost["cpu_read_bw"]) == ["F32"] and cost["cpu_read_bw"]["F32"] > 0
        assert cost["pcie_bw"] > 0 and cost["cpu_flops"] > 0 and cost["round_trip_s"] > 0


@pytest.mark.slow
def test_physical_limits_and_efficiency(bench_run):
    _, r = bench_run
    m, lim = r["machine"], r["limits"]
    assert m["cpu_read_bw"] > 1e8 and m["device_flops"] > 1e8
    assert r["model"]["bytes_per_expert"] == 3 * 64 * 32 * 4  # f32 gate, up and down
    assert r["model"]["served_format"] == "float" and r["model"]["served_bytes_per_expert"] == 3 * 64 * 32 * 4
    assert r["system"]["hot_experts_per_layer"] == 2 and r["system"]["expert_hosts"] == 1
    decode = lim["decode"]
    assert decode["cold_share"] == pytest.approx(r["tiers"]["decode"]["cold_share"])
    assert decode["cold_bytes_per_token"] == pytest.approx(LAYERS * TOP_K * decode["cold_share"] * 3 * 64 * 32 * 4)
    assert decode["cpu_only_tok_s"] > 0 and decode["bound_tok_s"] > 0
    if m["pcie_h2d_bw"] is None:
        assert decode["pcie_only_tok_s"] is None
    assert [p["prompt_tokens"] for p in lim["prefill"]] == [64, 256]
    efficiencies = lim["efficiency"]
    assert set(efficiencies) == {"decode", "prefill_64", "prefill_256"}
    assert all(0 < e < 1 for e in efficiencies.values())  # nothing beats the physical limit


@pytest.mark.slow
def test_outputs_on_disk(bench_run):
    out, r = bench_run
    md = (out / "results.md").read_text()
    for heading in ("## Decode", "## Prefill", "## Expert tiers", "## Cold planner", "## Physical limit",
                    "## llama.cpp", "## Decode step profile"):
        assert heading in md
    assert r["decode_profile"]["table"] in md and "moe" in r["decode_profile"]["table"]
    assert "no --llama-cpp" in md and "skipped" in r["llama_cpp"]
    plots = {p.name for p in out.glob("*.png")}
    assert plots == ({"decode.png", "prefill.png"} if importlib.util.find_spec("matplotlib") else set())


@pytest.mark.slow
def test_host_memory_of_every_process_the_bench_started(bench_run):
    out, r = bench_run
    memory = r["system"]["host_memory"]
    roles = [p["role"] for p in memory["processes"]]
    assert {"shared.cli", "coordinator", "gpu_worker", "expert_host"} <= set(roles)
    for p in memory["processes"]:
        assert p["peak_rss"] >= p["rssanon"] > 0
    assert memory["used_peak_above_start"] > 0  # three Python processes with torch loaded, at least
    assert "## Host memory" in (out / "results.md").read_text()


def test_hot_expert_bytes_are_counted_as_the_system_the_bench_starts_holds_them(tmp_path, capsys):
    """The system's dtype, set in a --config file passed on, changes what a float hot expert takes: the f32 tiny
    model held in bfloat16 is half the bytes of the CPU worker's default float32. The bench's own --dtype (a preset
    model's storage type) would shadow the system's: with --model it is refused, not dropped."""
    make_model(tmp_path / "f.gguf", preset="tiny", dtype="f32")
    model = GGUFModel(tmp_path / "f.gguf")
    default = model_facts(model, system_config(model.path, []))["hot_bytes_per_expert"]
    (tmp_path / "bf16.toml").write_text('dtype = "bfloat16"\n')
    for options in (["--dtype", "bfloat16"], ["--config", str(tmp_path / "bf16.toml")]):
        assert model_facts(model, system_config(model.path, options))["hot_bytes_per_expert"] == default // 2
    with pytest.raises(ValueError, match="dtype must be auto, float32 or bfloat16"):  # as `tierserve up` refuses it
        system_config(model.path, ["--dtype", "float16"])
    for dtype in ("bf16", "bfloat16"):  # a preset's storage type, and the system's own spelling
        with pytest.raises(SystemExit) as refused:
            tierserve(["bench", "--model", str(model.path), "--dtype", dtype, "--device", "cpu"])
        assert refused.value.code == 2 and "goes in a --config file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tierserve(["bench", "--preset", "tiny", "--dtype", "bfloat16"])
    assert "invalid choice: 'bfloat16'" in capsys.readouterr().err


def test_decode_bound_reads_a_quantized_model_s_vram_experts_in_their_serving_format(tmp_path):
    """The worker holds a quantized model's hot and soft-tier experts as their int8 / int4 cache regions, not at its
    own dtype: only the trunk is read at the device's bytes per parameter."""
    make_model(tmp_path / "q.gguf", preset="tiny", dtype="q4_0")
    model = GGUFModel(tmp_path / "q.gguf")
    facts = model_facts(model, Config())
    cpu = Machine(cpu_read_bw=100e9, pcie_bw=None, device_mem_bw=100e9, device_flops=1e12, device_bytes_per_param=4)
    measured = {"tiers": {"decode": {"pairs": {"hot": 3.0, "cpu": 1.0}, "cold_share": 0.25}},
                "decode": [{"per_request_tok_s": 100.0}], "prefill": []}
    decode = limits(facts, model.config, cpu, 2.0, measured)["decode"]
    trunk = model_traffic(model.config, facts["served_bytes_per_expert"]).trunk_params
    assert decode["resident_bytes_per_token"] == pytest.approx(
        4 * trunk + LAYERS * TOP_K * 0.75 * facts["served_bytes_per_expert"])


def worker_metrics_page(hot: int, streamed: int, soft_hits: int, soft_misses: int, streamed_bytes: float,
                        started: float = 1e9) -> str:
    """A /metrics page with the gpu_worker's tier metrics, written by prometheus_client as the worker does."""
    registry = CollectorRegistry()
    Gauge("process_start_time_seconds", "start time of the process", registry=registry).set(started)
    dispatch = Counter("tierserve_worker_expert_dispatch_total", "pairs by path", ["path"], registry=registry)
    dispatch.labels("hot").inc(hot)
    dispatch.labels("streamed").inc(streamed)
    lookups = Counter("tierserve_worker_soft_tier_lookups_total", "lookups", ["result"], registry=registry)
    lookups.labels("hit").inc(soft_hits)
    lookups.labels("miss").inc(soft_misses)
    Gauge("tierserve_worker_soft_tier_hit_rate", "since start", registry=registry).set(
        soft_hits / max(soft_hits + soft_misses, 1))
    Counter("tierserve_worker_streamed_bytes", "bytes", registry=registry).inc(streamed_bytes)
    Gauge("tierserve_worker_hot_expert_bytes", "other metric", registry=registry).set(7)
    Gauge("tierserve_worker_cost_pcie_bytes_per_second", "pcie", registry=registry).set(50e9)
    read = Gauge("tierserve_worker_cost_cpu_read_bytes_per_second", "read", ["format"], registry=registry)
    read.labels("int4").set(60e9)
    read.labels("int4+int8").set(40e9 + hot)
    Gauge("tierserve_worker_cost_cpu_flops", "flops", registry=registry).set(2e12)
    Gauge("tierserve_worker_cost_round_trip_seconds", "rtt", registry=registry).set(25e-6)
    return generate_latest(registry).decode()


def test_tier_counters_from_a_metrics_page_and_their_change():
    before = parse_tiers(worker_metrics_page(hot=10, streamed=0, soft_hits=0, soft_misses=0, streamed_bytes=0))
    assert before.pairs == {"hot": 10, "soft_hit": 0, "streamed": 0, "staged": 0, "cpu": 0}  # never taken: 0
    after = parse_tiers(worker_metrics_page(hot=40, streamed=10, soft_hits=1, soft_misses=3, streamed_bytes=4e9))
    d = tier_delta(before, after, seconds=2.0)
    assert d["pairs"] == {"hot": 30, "soft_hit": 0, "streamed": 10, "staged": 0, "cpu": 0}
    assert d["share"]["hot"] == 0.75 and d["vram_hit_rate"] == 0.75 and d["cold_share"] == 0.25
    assert d["streamed_gb_s"] == 2.0 and d["soft_tier_hit_rate"] == 0.25
    assert set(d["share"]) == set(PATHS)
    # the planner's constants as they are at the phase's end
    assert d["cost_model"] == {"pcie_bw": 50e9, "cpu_read_bw": {"int4": 60e9, "int4+int8": 40e9 + 40},
                               "cpu_flops": 2e12, "round_trip_s": 25e-6}
    idle = tier_delta(after, after, 1.0)
    assert idle["vram_hit_rate"] == 0.0 and idle["streamed_gb_s"] == 0.0


def test_the_soft_tier_hit_rate_of_a_phase_is_over_its_own_lookups():
    """A phase's hit rate is its lookups', not the worker's since start: after a warm-up that hit 900 of 1,000,
    a phase that hit 10 of 100 is at 10%, not the 83% the worker's gauge shows."""
    before = parse_tiers(worker_metrics_page(hot=0, streamed=100, soft_hits=900, soft_misses=100, streamed_bytes=0))
    after = parse_tiers(worker_metrics_page(hot=0, streamed=190, soft_hits=910, soft_misses=190, streamed_bytes=0))
    assert tier_delta(before, after, seconds=1.0)["soft_tier_hit_rate"] == pytest.approx(0.1)
    assert tier_delta(after, after, seconds=1.0)["soft_tier_hit_rate"] == 0.0  # no lookups: no rate


def test_a_worker_without_a_cold_planner_has_no_planner_constants():
    """Without soft slots the worker never sets its cost gauges, which prometheus_client then exports as 0."""
    registry = CollectorRegistry()
    Counter("tierserve_worker_expert_dispatch_total", "pairs by path", ["path"], registry=registry).labels("hot").inc(8)
    Gauge("tierserve_worker_cost_pcie_bytes_per_second", "pcie", registry=registry)
    Gauge("tierserve_worker_cost_cpu_read_bytes_per_second", "read", ["format"], registry=registry)
    Gauge("tierserve_worker_cost_cpu_flops", "flops", registry=registry)
    Gauge("tierserve_worker_cost_round_trip_seconds", "rtt", registry=registry)
    snapshot = parse_tiers(generate_latest(registry).decode())
    assert snapshot.pairs["hot"] == 8 and snapshot.cost == {}
    assert cost_model_table({"decode": tier_delta(snapshot, snapshot, 1.0)}) == []


def test_tier_counters_of_a_worker_restarted_during_the_phase_count_from_its_restart():
    before = parse_tiers(worker_metrics_page(hot=1000, streamed=500, soft_hits=90, soft_misses=10, streamed_bytes=9e9,
                                             started=1e9))
    after = parse_tiers(worker_metrics_page(hot=30, streamed=10, soft_hits=1, soft_misses=3, streamed_bytes=4e9,
                                            started=1e9 + 60))
    d = tier_delta(before, after, seconds=2.0)
    assert d["worker_restarted"]
    assert d["pairs"] == {"hot": 30, "soft_hit": 0, "streamed": 10, "staged": 0, "cpu": 0}
    assert d["share"]["hot"] == 0.75 and d["cold_share"] == 0.25 and d["streamed_gb_s"] == 2.0
    assert d["soft_tier_hit_rate"] == 0.25
    assert not tier_delta(after, after, 1.0)["worker_restarted"]


def test_worker_metrics_url_from_health():
    health = HealthReply(status="ready", members=[{"role": "coordinator", "metrics_port": 1},
                                                  {"role": "gpu_worker", "metrics_port": 9401}])
    assert worker_metrics_url(health, "tcp://10.0.0.5:5555") == "http://10.0.0.5:9401/metrics"
    assert worker_metrics_url(health, "tcp://*:5555") == "http://127.0.0.1:9401/metrics"
    with pytest.raises(RuntimeError, match="no gpu_worker"):
        worker_metrics_url(HealthReply(status="starting", members=[]), "tcp://127.0.0.1:5555")


def test_prompts_and_latency_from_client_timestamps():
    base = list(range(10))
    assert prompt_ids(base, 25, 0) == base + base + base[:5]
    assert prompt_ids(base, 4, 1) != prompt_ids(base, 4, 0)
    a = Timed(sent=0.0, arrivals=[0.1, 0.2, 0.4])
    b = Timed(sent=1.0, arrivals=[1.3])
    assert a.ttft_s == pytest.approx(0.1) and a.itl_s == pytest.approx([0.1, 0.2])
    assert a.decode_tok_s == pytest.approx(2 / 0.3) and b.decode_tok_s is None
    lat = latency([a, b])
    assert lat["ttft_ms_p50"] == pytest.approx(200) and lat["itl_ms_p50"] == pytest.approx(150)
    assert lat["ttft_ms_p99"] == pytest.approx(100 + 0.99 * 200)


def test_prompt_lengths_and_tokens_can_be_set_on_a_quick_run():
    s = settings(True, 40960, [512, 4096], 32)
    assert (s["prompt_lengths"], s["max_tokens"], s["prefill_repeats"], s["waves"]) == ([512, 4096], 32, 1, 1)
    assert settings(False, 1024, [512, 4096])["prompt_lengths"] == [512, 1023]  # one token must still fit


def test_the_system_configuration_is_that_of_the_up_the_bench_starts(tmp_path):
    """A --config file passed on was checked without the ports the bench's own `tierserve up` gives on top of it:
    metrics_port 65534 (no port left for its hosts) was refused, though that up serves with metrics port 0."""
    config_file = tmp_path / "c.toml"
    config_file.write_text("metrics_port = 65534\nprefill_chunk = 64\n")
    config = system_config(tmp_path / "m.gguf", ["--config", str(config_file)])
    assert config.metrics_port == 0 and config.prefill_chunk == 64 and config.client_endpoint == "tcp://127.0.0.1:0"


def test_system_options_cannot_go_to_a_running_system():
    with pytest.raises(SystemExit):
        tierserve(["bench", "--model", "m.gguf", "--endpoint", "tcp://127.0.0.1:1", "--prefill-chunk", "64"])


@pytest.mark.parametrize(("args", "message"), [
    (["--max-tokens", "0"], "argument --max-tokens: must be 1 or more, not 0"),
    (["--prompt-lengths", "64,-5"], "argument --prompt-lengths: must be 1 or more, not -5"),
    (["--endpoint", "tcp://127.0.0.1:5555", "--hot-experts", "8"],
     "--hot-experts 8: options for the system it starts, but --endpoint measures a running one"),
    (["--budget-sweep", "nan"], "argument --budget-sweep: a percentage must be in 0..100, not 'nan'"),
    (["--budget-sweep=10,-5"], "argument --budget-sweep: a percentage must be in 0..100, not '-5'"),
    (["--ready-timeout", "-1"], "argument --ready-timeout: a timeout must be above 0 s"),
    (["--expert-budget", "4XB"], "argument --expert-budget: not a size: '4XB' (examples: 16GB"),
    (["--profile-steps", "-5"], "argument --profile-steps: must be 1 or more, not -5"),
    (["--kv-cache-tokens", "-5"], "tierserve up would refuse its options: kv_cache_tokens must be >= 1, not -5"),
    (["--prefill-chunk", "big"], "tierserve up would refuse its options: config prefill_chunk: 'big' is not a valid"),
    (["--bogus-flag", "3"], "tierserve up would refuse its options: unrecognized arguments: --bogus-flag 3"),
])
def test_flags_a_run_cannot_use_are_refused_before_anything_is_measured(capsys, args, message):
    """--max-tokens 0 ran with the default; 0 or negative lengths started the system, then failed naming no flag;
    --hot-experts with --endpoint was recorded with the results, though the running system never used it. A budget
    sweep of NaN ended in a traceback, one of -5%, a negative --ready-timeout or --profile-steps failed only once
    the machine had been measured; a bad option passed on to `tierserve up` exited with status 1 and up's usage
    page, once a preset's model was made."""
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--preset", "tiny", "--quick", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_out_or_llama_cpp_that_cannot_be_used_is_refused_before_anything_is_measured(capsys, tmp_path):
    """--out naming a file and --llama-cpp naming no build failed only after the measurements."""
    taken = tmp_path / "results"
    taken.write_text("not a directory")
    for args, message in [(["--out", str(taken)], f"argument --out: cannot make the results directory {taken}"),
                          (["--out", str(tmp_path / "r"), "--llama-cpp", str(tmp_path)],
                           f"argument --llama-cpp: no llama-bench in {tmp_path}")]:
        with pytest.raises(SystemExit) as exit_:
            bench_main(["--preset", "tiny", "--quick", *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "measuring this machine" not in err
    assert not (tmp_path / "r").exists()  # --llama-cpp is looked at before --out is made


def test_an_endpoint_serving_another_model_is_named_before_anything_is_measured(capsys, tmp_path):
    """The running system's figures were filed under --model's facts, whatever model it served."""
    served, other = tmp_path / "served.gguf", tmp_path / "other.gguf"
    make_model(served, preset="tiny", seed=0)
    make_model(other, preset="tiny", seed=1)
    with RunningSystem(str(served), "--expert-hosts", "0", "--hot-experts", "8", "--device", "cpu") as system:
        assert bench_main(["--model", str(other), "--quick", "--endpoint", system.endpoint,
                           "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"serves another model ({GGUFModel(served).identity}) than {other}" in err
    assert "measuring this machine" not in err and not (tmp_path / "out").exists()


def test_a_health_reply_that_names_no_model_is_an_error_not_a_traceback():
    """A coordinator's member entry without a model (or no coordinator at all) ended in StopIteration or KeyError."""
    for members in ([{"role": "coordinator"}], [{"role": "gpu_worker", "model": "1 bytes, 00"}], []):
        with pytest.raises(ModelError, match="at tcp://h:1 does not say which model it serves"):
            served_model(HealthReply(status="ready", members=members), "tcp://h:1")
    assert served_model(HealthReply(status="ready", members=[{"role": "coordinator", "model": "m"}]), "x") == "m"


@pytest.mark.parametrize(("endpoint", "message"), [("127.0.0.1:5555", "endpoint must be tcp://HOST:PORT"),
                                                    (None, "no answer from")])
def test_an_endpoint_with_no_system_to_measure_is_named_before_anything_is_measured(capsys, tmp_path, endpoint,
                                                                                    message):
    """A malformed one ended in a ZMQError traceback; one nobody serves was waited on for 15 minutes."""
    endpoint = endpoint or f"tcp://127.0.0.1:{free_tcp_port()}"
    out = tmp_path / "new" / "results"
    assert bench_main(["--preset", "tiny", "--quick", "--endpoint", endpoint, "--out", str(out)]) == 1
    assert not (tmp_path / "new").exists()  # made before anything was measured, parents too, and removed with the error
    err = capsys.readouterr().err
    assert "tierserve bench: error:" in err and message in err and "measuring this machine" not in err
