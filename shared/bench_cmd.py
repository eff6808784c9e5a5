"""`tierserve bench`: the whole system measured through its client API, next to this machine's physical limit
and, optionally, llama.cpp on the same file.

    tierserve bench --preset qwen3-30b-a3b --dtype q4_0 --expert-budget 4GB --llama-cpp ~/llama.cpp/build
    tierserve bench --preset tiny --quick
    tierserve bench --model M.gguf --endpoint tcp://127.0.0.1:5555

Starts the system (or uses the one at --endpoint), measures decode at concurrency 1, 4 and 16, prefill of
512- and 4096-token prompts, time to first token and inter-token latency, reads the gpu_worker's tier counters,
measures the machine's links and compute, and writes results.json, results.md and plots under --out. With
--profile-steps N it then starts the system once more, its worker profiling decode steps in windows of N, and
adds where one decode step's time goes (results.json "decode_profile", and results.md).
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
import zmq

from shared import bench_limits, bench_llama, bench_sweep, launcher
from shared.bench_load import TEXT, TIMEOUT_S, WARM_UP_VARIANT, decode_run, prefill_run, prompt_ids
from shared.bench_measure import measure_machine
from shared.bench_metrics import scrape_tiers, tier_delta, worker_metrics_url
from shared.bench_profile import CANDIDATE_PROMPTS, profile_system
from shared.bench_report import markdown, write_results
from shared.cli_client import seconds_argument
from shared.client import AsyncClient, Client, ServerError, run
from shared.config import Config, args_config, bytes_argument, parse_percent, positive_int
from shared.expert_cache import expert_layouts, hot_expert_nbytes
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.make_model import ARCHS, DTYPES, PRESETS, make_model
from shared.memory_use import UsedMemoryPeak
from shared.model_config import EXPERT_TENSOR_KINDS, ModelConfig, ModelError, expert_tensor_name
from shared.process import worker_device, worker_dtype
from shared.protocol import HealthReply
from shared.tokenizer import Tokenizer

CONCURRENCY = (1, 4, 16)
ENDPOINT_CHECK_S = 10.0  # how long --endpoint's system has to answer a first health check


class Progress:
    """A tqdm bar on stderr when tqdm is installed, else a line every few seconds and at the end."""

    def __init__(self, total: int, desc: str, unit: str = "req") -> None:
        self.total, self.desc, self.n, self.printed = total, desc, 0, 0.0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, unit_scale=unit == "B")

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.n >= self.total or time.monotonic() - self.printed > 2.0:
            self.printed = time.monotonic()
            print(f"bench: {self.desc} {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def settings(quick: bool, context_length: int, prompt_lengths: list[int] | None = None,
             max_tokens: int | None = None) -> dict[str, Any]:
    """What is run: --quick keeps every figure but with small prompts, few tokens and one repetition;
    prompt lengths and generated tokens may be set either way."""
    default_tokens, decode_prompt = (8, 16) if quick else (128, 32)
    max_tokens = max_tokens or default_tokens
    requested = prompt_lengths or ([64, 256] if quick else [512, 4096])
    lengths = list(dict.fromkeys(min(n, context_length - 1) for n in requested))  # max_tokens=1 must fit too
    return {"quick": quick, "concurrency": list(CONCURRENCY), "max_tokens": max_tokens,
            "decode_prompt_tokens": min(decode_prompt, context_length - max_tokens), "waves": 1 if quick else 2,
            "requested_prompt_lengths": requested, "prompt_lengths": lengths, "prefill_repeats": 1 if quick else 3}


def preset_model(cache_dir: Path, preset: str, arch: str | None, dtype: str, skew: float) -> Path:
    """The preset's model file, generated into the cache on first use."""
    path = cache_dir / f"{preset}-{arch or PRESETS[preset]['arch']}-{dtype}-skew{skew:g}.gguf"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    bar = Progress(0, f"make {path.name}", unit="B")

    def progress(written: int, total: int, seconds: float) -> None:
        bar.set_total(total)
        bar.update(written - bar.n)

    make_model(partial, arch, preset, dtype, seed=0, routing_skew=skew, progress=progress)
    bar.close()
    os.replace(partial, path)  # only a complete file ever carries the cached name
    return path


def model_facts(model: GGUFModel, config: Config) -> dict[str, Any]:
    """The model's shapes and bytes, its experts' as the file holds them, as they are served, and as a worker
    running with `config` counts them against its budget for hot experts."""
    cfg = model.config
    expert_bytes = sum(model.nbytes(expert_tensor_name(layer, kind))
                       for layer in range(cfg.n_layers) for kind in EXPERT_TENSOR_KINDS)
    types = dict.fromkeys(model.qtype(expert_tensor_name(layer, kind)).name
                          for layer in range(cfg.n_layers) for kind in EXPERT_TENSOR_KINDS)
    served = expert_layouts(model)
    return {"served_format": ", ".join(dict.fromkeys(layout.format for layout in served)),
            "served_bytes_per_expert": sum(layout.expert_nbytes for layout in served) / cfg.n_layers,
            "hot_bytes_per_expert": hot_expert_nbytes(model, worker_dtype(config, worker_device(config))),
            "path": str(model.path), "name": model.metadata.get("general.name", model.path.stem), "arch": cfg.arch,
            "n_layers": cfg.n_layers, "n_experts": cfg.n_experts, "n_experts_used": cfg.n_experts_used,
            "hidden": cfg.hidden, "expert_ffn": cfg.expert_ffn, "context_length": cfg.context_length,
            "expert_type": "+".join(types), "bytes_per_expert": expert_bytes / (cfg.n_layers * cfg.n_experts),
            "file_bytes": model.file_size}


def system_config(model: Path, options: list[str]) -> Config:
    """The configuration of the `tierserve up` the bench starts (RunningSystem's arguments, its --config file
    included): ValueError or OSError naming what up would refuse."""
    up = launcher.parser()

    def refuse(message: str) -> NoReturn:  # argparse's own exits, printing up's usage for a command not typed
        raise ValueError(message)

    up.error = refuse
    return args_config(up.parse_args(launcher.up_arguments(str(model), *options)))


def system_options(args: argparse.Namespace) -> list[str]:
    """`tierserve up` options: the bench's own, then any it does not know (e.g. --prefill-chunk 2048)."""
    options = []
    for flag, value in (("--gpu-expert-budget", args.expert_budget), ("--hot-experts", args.hot_experts),
                        ("--expert-hosts", args.expert_hosts), ("--soft-slots", args.soft_slots),
                        ("--cold-path", args.cold_path)):
        if value is not None:
            options += [flag, str(value)]
    return options + args.passed_on


async def measure_system(endpoint: str, run_settings: dict[str, Any], base: list[int]) -> dict[str, Any]:
    """Decode, prefill and latency through the client API, with the worker's tier counters around each phase."""
    s = run_settings
    async with AsyncClient(endpoint, timeout_s=TIMEOUT_S) as client:
        metrics_url = worker_metrics_url(await client.health(), endpoint)
        placement = (await client.stats()).stats["placement"]
        # warm-up, on prompts none of the measured runs send: first steps pay set-up
        warm_up = {"decode": await decode_run(endpoint, 1, 1, 4, base, s["decode_prompt_tokens"],
                                              variant=WARM_UP_VARIANT),
                   "prefill": await prefill_run(client, base, max(s["prompt_lengths"]), 1, variant=WARM_UP_VARIANT)}
        phases = {}
        before, start = scrape_tiers(metrics_url), time.perf_counter()
        bar = Progress(sum(c * s["waves"] for c in s["concurrency"]), "decode")
        # each level on prompts of its own: greedy, a prompt sent again routes to the experts its first run left in
        # the soft slots
        firsts = list(itertools.accumulate((c * s["waves"] for c in s["concurrency"]), initial=0))
        decode = [await decode_run(endpoint, c, s["waves"], s["max_tokens"], base, s["decode_prompt_tokens"],
                                   bar.update, variant=first)
                  for c, first in zip(s["concurrency"], firsts[:-1], strict=True)]
        bar.close()
        after, end = scrape_tiers(metrics_url), time.perf_counter()
        phases["decode"] = tier_delta(before, after, end - start)
        bar = Progress(len(s["prompt_lengths"]) * s["prefill_repeats"], "prefill")
        prefill = [await prefill_run(client, base, n, s["prefill_repeats"], bar.update) for n in s["prompt_lengths"]]
        bar.close()
        phases["prefill"] = tier_delta(after, scrape_tiers(metrics_url), time.perf_counter() - end)
    return {"placement": placement, "warm_up": warm_up, "decode": decode, "prefill": prefill, "tiers": phases}


def limits(model: dict[str, Any], cfg: ModelConfig, machine: bench_limits.Machine, hot_per_layer: float,
           measured: dict[str, Any]) -> dict[str, Any]:
    """Bounds from the model, the placement and the measured hit rates, and measured / bound: the bytes that
    move are the experts as tierserve serves them (its int4 carries a zero per group that Q4_0 does not)."""
    traffic = bench_limits.model_traffic(cfg, model["served_bytes_per_expert"], model["served_format"] != "float")
    tiers = measured["tiers"]["decode"]
    if sum(tiers["pairs"].values()):
        share, source = tiers["cold_share"], "measured routed pairs"
    else:
        share = bench_limits.cold_share(hot_per_layer, cfg.n_experts, tiers["soft_tier_hit_rate"])
        source = "placement and soft-tier hit rate"
    decode = bench_limits.decode_bound(traffic, machine, share)
    prefill = [bench_limits.prefill_bound(traffic, machine, hot_per_layer, p["prompt_tokens"])
               for p in measured["prefill"]]
    efficiency = {"decode": bench_limits.efficiency(measured["decode"][0]["per_request_tok_s"], decode.bound_tok_s)}
    for p, bound in zip(measured["prefill"], prefill, strict=True):
        efficiency[f"prefill_{p['prompt_tokens']}"] = bench_limits.efficiency(p["tok_s"], bound.bound_tok_s)
    return {"decode": {"cold_share": share, "cold_share_source": source, **vars(decode)},
            "prefill": [vars(b) for b in prefill], "efficiency": efficiency}


def llama_cpp(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    if not args.llama_cpp:
        return {"skipped": "llama.cpp comparison skipped: no --llama-cpp build directory given"}
    model, s = results["model"], results["settings"]
    print(f"bench: running llama-bench from {args.llama_cpp} (this takes a while)", file=sys.stderr, flush=True)
    out = bench_llama.run_llama_bench(
        args.llama_cpp, model["path"], s["prompt_lengths"], s["max_tokens"], os.cpu_count() or 1,
        model["n_layers"], int(model["bytes_per_expert"] * model["n_experts"]),
        int(results["system"]["hot_experts_per_layer"] * model["bytes_per_expert"] * model["n_layers"]), s["quick"])
    decode = results["decode"]
    ours = {f"decode_c{d['concurrency']}": d["per_request_tok_s"] if d["concurrency"] == 1 else d["aggregate_tok_s"]
            for d in decode}
    ours.update({f"prefill_{p['prompt_tokens']}": p["tok_s"] for p in results["prefill"]})
    return {**out, "ratios": bench_llama.ratios(ours, out["best"])}


def machine_info(machine: bench_limits.Machine) -> dict[str, Any]:
    device = torch.cuda.get_device_name(0) if machine.has_gpu else f"CPU only ({os.cpu_count()} cores)"
    return {"device": device, "cpu_count": os.cpu_count(), "cpu_read_bw": machine.cpu_read_bw,
            "pcie_h2d_bw": machine.pcie_bw, "device_mem_bw": machine.device_mem_bw,
            "device_flops": machine.device_flops, "device_bytes_per_param": machine.device_bytes_per_param}


def served_model(health: HealthReply, endpoint: str) -> str:
    """The identity (GGUFModel.identity) of the model a running system's coordinator serves."""
    model = next((m.get("model") for m in health.members if isinstance(m, dict) and m.get("role") == "coordinator"),
                 None)
    if not isinstance(model, str):
        raise ModelError(f"the system at {endpoint} does not say which model it serves (no coordinator's model in "
                         f"its health reply)")
    return model


def _missing_dirs(path: Path) -> list[Path]:
    """The directories that making `path` with its parents would create, deepest first."""
    missing, p = [], path.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(made: list[Path]) -> None:
    """A failed run's results directory and the parents it made, while nothing was written in them."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            return


def bench(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Measures, writing what it has under `out` after each stage, so a run cut short (a long llama.cpp
    comparison, say) keeps the figures already measured."""
    started = datetime.datetime.now().astimezone()
    path = Path(args.model) if args.model else preset_model(Path(args.cache_dir), args.preset, args.arch,
                                                            args.dtype or "f32", args.routing_skew)
    model = GGUFModel(path)
    if args.endpoint and model.identity != args.served_model:  # its figures would be filed under this model's facts
        raise ModelError(f"the system at {args.endpoint} serves another model ({args.served_model}) than {path} "
                         f"({model.identity})")
    options = system_options(args)
    # a running system's configuration is its own: the bench can only assume the defaults
    facts = model_facts(model, Config() if args.endpoint else system_config(path, options))
    run_settings = settings(args.quick, model.config.context_length, args.prompt_lengths, args.max_tokens)
    tokenizer = Tokenizer.from_metadata(model.metadata)
    base = tokenizer.encode(TEXT * 4, add_special=False)
    print("bench: measuring this machine's memory, PCIe and compute", file=sys.stderr, flush=True)
    machine = measure_machine(args.quick)
    results: dict[str, Any] = {"version": 1, "started": started.isoformat(timespec="seconds"),
                               "settings": run_settings, "model": facts, "machine": machine_info(machine)}
    if args.sweep_only:
        results["system"] = {"options": options}
        results["sweep"] = sweep(args, results, str(path), options, base)
        return results
    host_memory = None
    if args.endpoint:
        measured = run(measure_system(args.endpoint, run_settings, base))
        endpoint = args.endpoint
    else:
        print(f"bench: starting tierserve on {path} {' '.join(options)}", file=sys.stderr, flush=True)
        used = UsedMemoryPeak()
        with RunningSystem(str(path), *options, ready_timeout_s=args.ready_timeout) as system:
            endpoint = system.endpoint
            measured = run(measure_system(endpoint, run_settings, base))
            processes = system.memory()
        host_memory = {"used_peak_above_start": used.stop(), "processes": processes}
    placement = measured["placement"]
    hot_per_layer = placement["hot_experts"] / model.config.n_layers
    results.update({
        "system": {"endpoint": endpoint, "started_by_bench": not args.endpoint, "options": options,
                   "hot_experts_per_layer": hot_per_layer, "expert_hosts": len(placement["hosts"]),
                   "host_memory": host_memory},
        "decode": measured["decode"], "latency": {k: v for k, v in measured["decode"][0].items() if "_ms_" in k},
        "prefill": measured["prefill"], "tiers": measured["tiers"], "warm_up": measured["warm_up"],
        "limits": limits(facts, model.config, machine, hot_per_layer, measured),
    })
    write_results(results, out)
    if args.profile_steps:
        print(f"bench: profiling decode steps (windows of {args.profile_steps})", file=sys.stderr, flush=True)
        prompts = [prompt_ids(base, run_settings["decode_prompt_tokens"], v) for v in range(CANDIDATE_PROMPTS)]
        results["decode_profile"] = profile_system(str(path), options, args.profile_steps, 1, prompts,
                                                   args.ready_timeout)
        write_results(results, out)
    results["llama_cpp"] = llama_cpp(args, results)
    if args.budget_sweep:
        write_results(results, out)
        results["sweep"] = sweep(args, results, str(path), options, base)
    return results


def sweep(args: argparse.Namespace, results: dict[str, Any], path: str, options: list[str],
          base: list[int]) -> dict[str, Any]:
    model, s = results["model"], results["settings"]
    experts = model["n_layers"] * model["n_experts"]
    points = bench_sweep.run_tierserve(path, options, args.budget_sweep, model["hot_bytes_per_expert"] * experts,
                                       model["n_layers"], s, base, args.ready_timeout)
    if not args.llama_cpp:
        return {"tierserve": points, "llama_cpp": None}
    print("bench: budget sweep of llama.cpp", file=sys.stderr, flush=True)
    llama = bench_sweep.run_llama(args.llama_cpp, path, args.budget_sweep, model["bytes_per_expert"] * experts,
                                  model["n_layers"], s["max_tokens"], min(s["prompt_lengths"]), os.cpu_count() or 1)
    return {"tierserve": points, "llama_cpp": llama}


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tierserve", "models")


def _percent_list(text: str) -> list[float]:
    """Budgets in percent of the experts' bytes: one out of 0..100 (or NaN) failed only after the machine's
    measurements, as `up` refused the budget made of it, or as a traceback."""
    try:
        return [parse_percent(v) for v in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_list(text: str) -> list[int]:
    return [positive_int(n) for n in text.split(",")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierserve bench", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="GGUF model to serve and measure")
    which.add_argument("--preset", choices=list(PRESETS), help="generate this preset's synthetic model (cached)")
    p.add_argument("--arch", choices=list(ARCHS), help="architecture of the preset model (default: the preset's)")
    # choices are checked in main: with --model, the explanation comes before argparse's "invalid choice"
    p.add_argument("--dtype", metavar="{" + ",".join(DTYPES) + "}",
                   help="storage type of the preset model (default f32)")
    p.add_argument("--routing-skew", type=float, default=1.0, help="expert popularity skew of the preset model")
    p.add_argument("--cache-dir", default=default_cache_dir(), help="where generated preset models are kept")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--endpoint", help="measure the system running at this client endpoint instead of starting one")
    system.add_argument("--profile-steps", type=positive_int, default=0, metavar="N",
                        help="then start it again profiling decode steps in windows of N, for where a step's time goes")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--expert-budget", type=bytes_argument, metavar="BYTES", help="VRAM for hot experts (e.g. 4GB)")
    budget.add_argument("--hot-experts", type=int, metavar="K", help="hot experts per layer")
    p.add_argument("--expert-hosts", type=int, metavar="N")
    p.add_argument("--soft-slots", type=int, metavar="N", help="VRAM slots cold experts are streamed into")
    p.add_argument("--cold-path", choices=["auto", "cpu", "stream"])
    p.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp build directory holding llama-bench")
    p.add_argument("--out", help="results directory (default: results/<timestamp>/)")
    p.add_argument("--quick", action="store_true", help="small prompts, few tokens, one repetition and one llama.cpp "
                                                        "thread count: a check that it all runs")
    p.add_argument("--prompt-lengths", type=_int_list, metavar="N,N",
                   help="prefill prompt lengths (default 512,4096; 64,256 with --quick)")
    # tokens: 0 or fewer started the system, then failed on an empty prompt naming no flag
    p.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help="tokens generated per decode request (default 128, 8 with --quick)")
    p.add_argument("--budget-sweep", type=_percent_list, metavar="P,P",
                   help="then measure decode and prefill again at each of these VRAM budgets, in percent of the "
                        "experts' bytes (e.g. 10,25,50,100), llama.cpp too when given")
    p.add_argument("--sweep-only", action="store_true",
                   help="measure the budget sweep alone, without the figures at --expert-budget first")
    p.add_argument("--ready-timeout", type=seconds_argument, default=1800.0,
                   help="seconds to wait for the system to start")
    return p


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args, passed_on = cli.parse_known_args(argv)
    args.passed_on = passed_on  # options for `tierserve up`
    if args.model and args.dtype:  # `tierserve up --dtype` is another setting, which this one would shadow
        cli.error("--dtype is the storage type of a --preset model; the system's dtype (float32 or bfloat16) goes "
                  "in a --config file passed on")
    if args.dtype is not None and args.dtype not in DTYPES:
        cli.error(f"argument --dtype: invalid choice: {args.dtype!r} (choose from {', '.join(DTYPES)})")
    if args.endpoint and system_options(args):  # recorded with the results, though the running system ignores them
        cli.error(f"{' '.join(system_options(args))}: options for the system it starts, but --endpoint measures a "
                  f"running one")
    if args.sweep_only and not args.budget_sweep:
        cli.error("--sweep-only needs --budget-sweep")
    if args.budget_sweep and args.endpoint:
        cli.error("--budget-sweep starts the system once per budget, so it cannot measure the one at --endpoint")
    # what would fail only after the measurements, which take minutes, fails before them
    if not args.endpoint:  # before a preset's model is made, too
        try:
            system_config(Path(args.model or "model.gguf"), system_options(args))
        except (OSError, ValueError) as e:
            cli.error(f"tierserve up would refuse its options: {e}")
    if args.llama_cpp:
        try:
            bench_llama.find_llama_bench(args.llama_cpp)
        except FileNotFoundError as e:
            cli.error(f"argument --llama-cpp: {e}")
    out = Path(args.out or Path("results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    made = _missing_dirs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        cli.error(f"argument --out: cannot make the results directory {out}: {e.strerror}")
    if not os.access(out, os.W_OK | os.X_OK):
        cli.error(f"argument --out: cannot write in the results directory {out}")
    try:
        if args.endpoint:  # before the machine is measured; a bench's own client waits up to TIMEOUT_S
            with Client(args.endpoint, timeout_s=ENDPOINT_CHECK_S) as client:
                args.served_model = served_model(client.health(), args.endpoint)
        results = bench(args, out)
    # OSError: TimeoutError too; ValueError: an endpoint no client can take
    except (ModelError, ServerError, RuntimeError, OSError, ValueError, zmq.ZMQError) as e:
        print(f"tierserve bench: error: {e}", file=sys.stderr)
        _remove_empty(made)
        return 1
    except BaseException:  # Ctrl-C
        _remove_empty(made)
        raise
    written = write_results(results, out)
    print(markdown(results))
    if not any(name.endswith(".png") for name in written):
        print("bench: matplotlib is not installed: no plots", file=sys.stderr)
    print(f"bench: wrote {', '.join(written)} under {out}", file=sys.stderr)
    return 0
