"""`tierserve bench --budget-sweep`: decode and prefill tokens/s against the VRAM budget for experts, tierserve
started once per budget and llama.cpp with the matching `--n-cpu-moe`, on the same file.

A budget is a share of the experts' bytes: as tierserve serves them (what its hot pool holds) for tierserve,
as stored in the GGUF for llama.cpp's layers of experts, so each system gets the same share of its own bytes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from shared import bench_llama
from shared.bench_load import TIMEOUT_S, WARM_UP_VARIANT, decode_run, prefill_run
from shared.bench_metrics import scrape_tiers, tier_delta, worker_metrics_url
from shared.client import AsyncClient, run
from shared.launcher import RunningSystem


def sweep_options(options: list[str], budget: int) -> list[str]:
    """The bench's system options with the expert budget set to `budget` (and no fixed hot-expert count)."""
    out, skip = [], False
    for i, opt in enumerate(options):
        if skip:
            skip = False
            continue
        if opt in ("--gpu-expert-budget", "--hot-experts"):
            skip = i + 1 < len(options)
            continue
        out.append(opt)
    return [*out, "--gpu-expert-budget", str(budget)]


async def _measure(endpoint: str, base: list[int], run_settings: dict[str, Any]) -> dict[str, Any]:
    s = run_settings
    async with AsyncClient(endpoint, timeout_s=TIMEOUT_S) as client:
        metrics_url = worker_metrics_url(await client.health(), endpoint)
        placement = (await client.stats()).stats["placement"]
        # warm-up of both phases, as the bench's own run does: a system's first prompt pays one-time set-up
        # (kernel tuning, allocator growth) that the prompt measured here would otherwise carry
        await decode_run(endpoint, 1, 1, 4, base, s["decode_prompt_tokens"], variant=WARM_UP_VARIANT)
        await prefill_run(client, base, min(s["prompt_lengths"]), 1, variant=WARM_UP_VARIANT)
        before = scrape_tiers(metrics_url)
        decode = await decode_run(endpoint, 1, 1, s["max_tokens"], base, s["decode_prompt_tokens"])
        tiers = tier_delta(before, scrape_tiers(metrics_url), decode["wall_s"])
        prefill = await prefill_run(client, base, min(s["prompt_lengths"]), 1)
    return {"hot_experts": placement["hot_experts"], "decode_tok_s": decode["per_request_tok_s"],
            "decode_paths": tiers["share"], "decode_vram_hit_rate": tiers["vram_hit_rate"],
            "prefill_tokens": prefill["prompt_tokens"], "prefill_tok_s": prefill["tok_s"]}


def run_tierserve(model: str, options: list[str], percents: list[float], served_expert_bytes: float, n_layers: int,
                  run_settings: dict[str, Any], base: list[int], ready_timeout_s: float) -> list[dict[str, Any]]:
    points = []
    for pct in percents:
        budget = int(served_expert_bytes * pct / 100)
        print(f"bench: budget sweep, {pct:g}% of the experts ({budget / 1e9:.2f} GB)", file=sys.stderr, flush=True)
        with RunningSystem(model, *sweep_options(options, budget), ready_timeout_s=ready_timeout_s) as system:
            measured = run(_measure(system.endpoint, base, run_settings))
        points.append({"percent": pct, "budget_bytes": budget,
                       "hot_experts_per_layer": measured.pop("hot_experts") / n_layers, **measured})
    return points


def run_llama(build_dir: str, model: str, percents: list[float], gguf_expert_bytes: float, n_layers: int,
              gen_tokens: int, prompt_tokens: int, threads: int, timeout_s: float = 3600.0) -> list[dict[str, Any]]:
    """llama-bench once for decode and once for prefill over every budget's `--n-cpu-moe` (a list it sweeps
    itself), all layers on the GPU, the model loaded rather than mapped (its faster setting on the H100), or
    mapped where loading fails or runs past `timeout_s` (a second copy of the model in RAM may not fit)."""
    binary = bench_llama.find_llama_bench(build_dir)
    n_cpu = {pct: bench_llama.cpu_moe_layers(n_layers, int(gguf_expert_bytes / n_layers),
                                             int(gguf_expert_bytes * pct / 100)) for pct in percents}
    mapped, loaded = bench_llama.load_modes(bench_llama.options_help(binary))
    batch = str(max(prompt_tokens, 512))
    figures = [["-p", "0", "-n", str(gen_tokens)], ["-n", "0", "-p", str(prompt_tokens), "-b", batch, "-ub", batch]]
    cpu_moe = ",".join(map(str, sorted(set(n_cpu.values()))))
    records = []
    for figure in figures:
        for load_mode in (loaded, mapped):
            argv = [str(binary), "-m", model, "-ngl", "99", "-ncmoe", cpu_moe, *load_mode, "-t", str(threads),
                    "-r", "1", "-o", "json", *figure]
            try:
                records += bench_llama.run(argv, timeout_s)
                break
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"bench: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
    return [{"percent": pct, "n_cpu_moe": n, **by_cpu_moe(records, n)} for pct, n in n_cpu.items()]


def by_cpu_moe(records: list[dict[str, Any]], n_cpu_moe: int) -> dict[str, float | None]:
    """llama-bench's decode and prefill tokens/s at one `--n-cpu-moe` (0: every expert in VRAM)."""
    def pick(test: str) -> float | None:
        found = [r["tok_s"] for r in records if r["test"] == test and r["n_cpu_moe"] == n_cpu_moe]
        return found[0] if found else None
    return {"llama_decode_tok_s": pick("decode"), "llama_prefill_tok_s": pick("prefill")}


def plot(sweep: dict[str, Any], out: Path, title: str) -> list[str]:
    """sweep.png: decode and prefill tokens/s against the budget, both systems; [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sweep["tierserve"]
    llama = {p["percent"]: p for p in sweep.get("llama_cpp") or []}
    x = [p["percent"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("decode_tok_s", "Decode (1 stream)"),
              ("prefill_tok_s", f"Prefill ({points[0]['prefill_tokens']} tokens)")]
    for ax, (key, name) in zip(axes, panels, strict=True):
        ax.plot(x, [p[key] or 0 for p in points], "o-", label="tierserve")
        if llama:
            ax.plot(x, [llama.get(pct, {}).get(f"llama_{key}") or 0 for pct in x], "s--", color="r", label="llama.cpp")
        ax.set(xlabel="VRAM budget, % of the experts' bytes", ylabel="tokens/s", yscale="log", title=name)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    return ["sweep.png"]
