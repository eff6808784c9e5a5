"""llama-bench's command lines and the parsing of its JSON output (records shaped as a real build writes them)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from shared.bench_llama import (
    best,
    commands,
    cpu_moe_layers,
    find_llama_bench,
    load_modes,
    parse_results,
    placements,
    ratios,
    run_llama_bench,
    thread_sweep,
)


def record(n_prompt: int, n_gen: int, avg_ts: float, **fields) -> dict:
    """One test as llama-bench `-o json` reports it (a subset of its fields, with their real names and types)."""
    return {"build_commit": "0c1e570", "backends": "CPU", "model_filename": "m.gguf", "n_batch": 4096,
            "n_ubatch": 512, "n_threads": 2, "n_gpu_layers": 99, "n_cpu_moe": 0, "tensor_buft_overrides": "exps=CPU",
            "load_mode": "mmap", "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": 0, "avg_ns": 971705,
            "stddev_ns": 39589, "avg_ts": avg_ts, "stddev_ts": 670.99, "samples_ts": [avg_ts], **fields}


RUN = [
    record(0, 128, 37.5),
    record(0, 128, 43.0, load_mode="none"),
    record(0, 128, 40.1, n_cpu_moe=40, tensor_buft_overrides="none", n_threads=16),
    record(512, 0, 1200.0),
    record(4096, 0, 249.0),
    record(4096, 0, 5816.0, load_mode="none", n_ubatch=4096),
]


def test_parse_results_reads_each_test_and_its_setup():
    records = parse_results(json.dumps(RUN))
    assert [r["test"] for r in records] == ["decode"] * 3 + ["prefill"] * 3
    assert records[1] == {"test": "decode", "n_prompt": 0, "n_gen": 128, "tok_s": 43.0, "threads": 2,
                          "n_ubatch": 512, "load_mode": "none", "n_cpu_moe": 0, "placement": "-ot exps=CPU"}
    assert records[2]["placement"] == "--n-cpu-moe 40" and records[2]["n_cpu_moe"] == 40
    assert records[2]["threads"] == 16
    old = {k: v for k, v in record(0, 16, 10.0).items() if k not in ("load_mode", "n_cpu_moe")}
    assert parse_results(json.dumps([{**old, "use_mmap": False}]))[0]["load_mode"] == "none"  # older builds


def test_best_takes_the_fastest_record_of_each_figure():
    top = best(parse_results(json.dumps(RUN)))
    assert set(top) == {"decode", "prefill_512", "prefill_4096"}
    assert top["decode"]["tok_s"] == 43.0
    assert top["prefill_4096"]["tok_s"] == 5816.0 and top["prefill_4096"]["n_ubatch"] == 4096


def test_ratios_hold_every_figure_against_the_best():
    top = best(parse_results(json.dumps(RUN)))
    r = ratios({"decode_c1": 86.0, "decode_c16": 430.0, "prefill_4096": 2908.0, "prefill_2048": 100.0,
                "decode_c4": None}, top)
    assert r == {"decode_c1": pytest.approx(2.0), "decode_c16": pytest.approx(10.0),
                 "prefill_4096": pytest.approx(0.5), "prefill_2048": None, "decode_c4": None}


def test_cpu_moe_layers_match_the_vram_budget():
    assert cpu_moe_layers(48, layer_expert_bytes=100, expert_budget=0) == 48
    assert cpu_moe_layers(48, 100, 850) == 40  # 8 whole layers fit
    assert cpu_moe_layers(48, 100, 10_000) == 0
    assert placements(48, 100, 50) == [["-ot", "exps=CPU"]]  # not one layer fits: experts all on the CPU
    assert placements(48, 100, 850) == [["-ot", "exps=CPU"], ["--n-cpu-moe", "40"]]


def test_command_lines():
    assert load_modes("  -lm, --load-mode <auto|none|mmap|mlock|mmap+mlock|dio>") == [["-lm", "mmap"], ["-lm", "none"]]
    assert load_modes("  -mmp, --mmap <0|1>") == [["-mmp", "1"], ["-mmp", "0"]]
    assert thread_sweep(16, quick=False) == [4, 8, 15, 16]
    assert thread_sweep(16, quick=True) == [16]
    decode, prefill = commands(Path("/b/llama-bench"), "m.gguf", ["-lm", "none"], [512, 4096], 128, [8, 16],
                               ["-ot", "exps=CPU"], 3)
    common = ["/b/llama-bench", "-m", "m.gguf", "-ngl", "99", "-ot", "exps=CPU", "-lm", "none", "-t", "8,16",
              "-r", "3", "-o", "json"]
    assert decode == [*common, "-p", "0", "-n", "128"]
    assert prefill == [*common, "-n", "0", "-p", "512,4096", "-b", "4096", "-ub", "512,4096"]


def fake_llama_bench(directory: Path) -> Path:
    """A stand-in for llama-bench (no llama.cpp here): it answers --help like a new build and prints one
    record per prompt length or one decode record, as `-o json` does, for each `-ncmoe` value given (faster
    with fewer layers of experts on the CPU), fails on a model it cannot load, is killed as by the kernel's
    out-of-memory killer when it loads (not maps) a model too big for RAM and hangs loading slow.gguf; it logs its
    arguments."""
    path = directory / "bin" / "llama-bench"
    path.parent.mkdir(parents=True)
    path.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
with open({str(directory / "calls.log")!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
value = lambda flag: args[args.index(flag) + 1]
if args == ["--help"]:
    print("  -lm, --load-mode <auto|none|mmap|mlock|mmap+mlock|dio>")
    sys.exit(0)
if value("-m") == "missing.gguf":
    sys.exit("error: failed to load model")
if value("-m") == "big.gguf" and value("-lm") == "none":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
if value("-m") == "slow.gguf" and value("-lm") == "none":
    import time
    time.sleep(600)
prompts = [int(p) for p in value("-p").split(",")]
records = [dict(n_prompt=p, n_gen=0, avg_ts=1000.0 + p) for p in prompts if p] or [
    dict(n_prompt=0, n_gen=int(value("-n")), avg_ts=50.0)]
base = dict(n_threads=1, n_ubatch=512, n_cpu_moe=0, tensor_buft_overrides="exps=CPU", load_mode="mmap")
cpu_moe = [int(v) for v in value("-ncmoe").split(",")] if "-ncmoe" in args else [0]
print(json.dumps([{{**base, **r, "n_cpu_moe": n, "avg_ts": r["avg_ts"] - n}} for n in cpu_moe for r in records]))
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_run_llama_bench_runs_each_placement_and_gathers_the_best(tmp_path):
    binary = fake_llama_bench(tmp_path)
    assert find_llama_bench(tmp_path) == binary
    out = run_llama_bench(str(tmp_path), "m.gguf", [64, 256], 8, cores=2, n_layers=4, layer_expert_bytes=100,
                          expert_budget=250, quick=True)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0] == "--help" and len(calls) == 9  # decode and prefill, mapped and loaded, for 2 placements
    assert "-ot exps=CPU -lm mmap" in calls[1] and "-ot exps=CPU -lm none" in calls[3]
    assert "--n-cpu-moe 2" in calls[5]
    assert out["best"]["decode"]["tok_s"] == 50.0 and out["best"]["prefill_256"]["tok_s"] == 1256.0
    assert len(out["records"]) == 12 and len(out["commands"]) == 8 and out["failed"] == []


def test_a_llama_bench_run_killed_for_memory_is_reported_and_the_others_go_on(tmp_path):
    fake_llama_bench(tmp_path)
    out = run_llama_bench(str(tmp_path), "big.gguf", [64], 8, cores=2, n_layers=4, layer_expert_bytes=100,
                          expert_budget=0, quick=True)
    assert {r["load_mode"] for r in out["records"]} == {"mmap"} and out["best"]["decode"]["tok_s"] == 50.0
    assert len(out["failed"]) == 2
    assert all("killed by SIGKILL (the kernel's out-of-memory killer" in f and "-lm none" in f for f in out["failed"])


def test_missing_or_failing_llama_bench_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no llama-bench"):
        find_llama_bench(tmp_path)
    fake_llama_bench(tmp_path)
    with pytest.raises(RuntimeError, match="every llama-bench run failed:\n.*llama-bench failed"):
        run_llama_bench(str(tmp_path), "missing.gguf", [64], 8, 2, 4, 100, 0, quick=True)
