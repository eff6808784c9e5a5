"""The benchmark's results on disk: results.json (everything), results.md (the tables) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared import bench_sweep
from shared.bench_metrics import PATHS


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _scaled(value: float | None, scale: float, unit: str, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value / scale:,.{digits}f} {unit}"


def _pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if value == 0 or value >= 1e-3 else f"{100 * value:.2g}%"  # small efficiencies


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def markdown(results: dict[str, Any]) -> str:
    model, system, machine = results["model"], results["system"], results["machine"]
    placement = "" if "decode" not in results else (f" · {system['hot_experts_per_layer']:g} hot experts per layer · "
                                                    f"{system['expert_hosts']} expert host"
                                                    f"{'' if system['expert_hosts'] == 1 else 's'}")
    lines = [f"# tierserve bench: {model['name']}", "",
             f"{results['started']} · {machine['device']} · {model['n_layers']} layers × {model['n_experts']} "
             f"experts (top-{model['n_experts_used']}), {model['bytes_per_expert'] / 1e6:.2f} MB per expert "
             f"({model['expert_type']}; served as {model['served_format']}, "
             f"{model['served_bytes_per_expert'] / 1e6:.2f} MB)" + placement
             + (" · quick run" if results["settings"]["quick"] else ""), ""]
    if "decode" in results:
        lines += measured_tables(results)
    if "decode_profile" in results:
        lines += ["## Decode step profile (concurrency 1)", "", "```", results["decode_profile"]["table"], "```", ""]
    if "sweep" in results:
        lines += sweep_table(results["sweep"])
    return "\n".join(lines)


def cost_model_table(tiers: dict[str, dict[str, Any]]) -> list[str]:
    """The cold planner's constants at the end of each phase, where the worker plans (it has soft slots)."""
    rows = [[phase, _scaled(c["pcie_bw"], 1e9, "GB/s"),
             ", ".join(f"{fmt} {bw / 1e9:.1f} GB/s" for fmt, bw in c.get("cpu_read_bw", {}).items()),
             _scaled(c["cpu_flops"], 1e12, "Tflop/s", 2), _scaled(c["round_trip_s"], 1e-6, "us", 0)]
            for phase, t in tiers.items() if (c := t.get("cost_model"))]
    if not rows:
        return []
    return ["## Cold planner (its constants at the end of each phase: measured at start-up, the CPU's and the "
            "round trip refitted from the hosts' timings)", "",
            *_table(["phase", "PCIe", "CPU reads experts at", "CPU compute", "round trip to a host"], rows)]


def measured_tables(results: dict[str, Any]) -> list[str]:
    """Decode, prefill, tiers, host memory, the physical limit and llama.cpp at the bench's own budget."""
    model, system, machine, limits = results["model"], results["system"], results["machine"], results["limits"]
    ratios = (results.get("llama_cpp") or {}).get("ratios", {})
    lines = ["## Decode", ""]
    lines += _table(
        ["concurrency", "aggregate tok/s", "per request tok/s", "TTFT p50 / p99 ms", "ITL p50 / p99 ms",
         "vs llama.cpp best"],
        [[str(d["concurrency"]), _num(d["aggregate_tok_s"]), _num(d["per_request_tok_s"]),
          f"{_num(d['ttft_ms_p50'])} / {_num(d['ttft_ms_p99'])}", f"{_num(d['itl_ms_p50'], 2)} / "
          f"{_num(d['itl_ms_p99'], 2)}", _num(ratios.get(f"decode_c{d['concurrency']}"), 2)]
         for d in results["decode"]])
    lines += ["## Prefill", ""]
    bounds = {b["prompt_tokens"]: b for b in limits["prefill"]}
    lines += _table(
        ["prompt tokens", "tok/s", "TTFT ms", "bound tok/s (limited by)", "efficiency", "vs llama.cpp best"],
        [[str(p["prompt_tokens"]), _num(p["tok_s"]), _num(p["ttft_s"] * 1e3),
          f"{_num(bounds[p['prompt_tokens']]['bound_tok_s'])} ({bounds[p['prompt_tokens']]['limited_by']})",
          _pct(limits["efficiency"].get(f"prefill_{p['prompt_tokens']}")),
          _num(ratios.get(f"prefill_{p['prompt_tokens']}"), 2)] for p in results["prefill"]])
    lines += ["## Expert tiers (gpu_worker metrics, change over each phase; the decode phase's pairs include its "
              "requests' short prompts)", ""]
    lines += _table(
        ["phase", "hot", "soft hit", "streamed", "staged", "cpu", "VRAM hit rate", "soft tier hit rate",
         "streamed GB/s"],
        [[phase, *(_pct(t["share"][p]) for p in PATHS), _pct(t["vram_hit_rate"]),
          _pct(t["soft_tier_hit_rate"]), _num(t["streamed_gb_s"], 3)] for phase, t in results["tiers"].items()])
    lines += cost_model_table(results["tiers"])
    if system.get("host_memory"):
        lines += host_memory_table(system["host_memory"], model)
    d = limits["decode"]
    lines += ["## Physical limit (this machine, measured)", ""]
    lines += _table(["figure", "value"], [
        ["PCIe host-to-device, pinned", _scaled(machine["pcie_h2d_bw"], 1e9, "GB/s")],
        ["CPU memory read", _scaled(machine["cpu_read_bw"], 1e9, "GB/s")],
        ["device memory", _scaled(machine["device_mem_bw"], 1e9, "GB/s")],
        ["device compute", _scaled(machine["device_flops"], 1e12, "Tflop/s", 2)],
        [f"cold share of routed experts in decode ({d['cold_share_source']})", _pct(d["cold_share"])],
        ["cold bytes per token", _scaled(d["cold_bytes_per_token"], 1e6, "MB", 2)],
        ["decode bound, PCIe and CPU in parallel", _scaled(d["links_parallel_tok_s"], 1, "tok/s")],
        ["decode bound, PCIe alone", _scaled(d["pcie_only_tok_s"], 1, "tok/s")],
        ["decode bound, CPU alone", _scaled(d["cpu_only_tok_s"], 1, "tok/s")],
        ["decode bound, one stream (cold and resident bytes)", _scaled(d["bound_tok_s"], 1, "tok/s")],
        ["decode efficiency (concurrency 1, per request)", _pct(limits["efficiency"]["decode"])],
    ])
    llama = results.get("llama_cpp") or {"skipped": "llama.cpp not measured yet"}
    lines += ["## llama.cpp", "", llama.get("skipped") or
              "\n".join([*(f"- best {key}: {r['tok_s']:,.1f} tok/s ({r['placement']}, {r['load_mode']}, "
                            f"{r['threads']} threads, ubatch {r['n_ubatch']})" for key, r in llama["best"].items()),
                          *(f"- failed: {why}" for why in llama.get("failed", []))]), ""]
    return lines


def host_memory_table(memory: dict[str, Any], model: dict[str, Any]) -> list[str]:
    rows = [[f"{p['role']} ({p['pid']})", _scaled(p["peak_rss"], 1e9, "GB", 2), _scaled(p["rssanon"], 1e9, "GB", 2),
             _scaled(p["rssfile"], 1e9, "GB", 2), _scaled(p["rssshmem"], 1e9, "GB", 2)] for p in memory["processes"]]
    expert_bytes = model["bytes_per_expert"] * model["n_experts"] * model["n_layers"]
    return ["## Host memory", "",
            f"Model file {model['file_bytes'] / 1e9:,.2f} GB, of which experts {expert_bytes / 1e9:,.2f} GB. "
            f"Machine's used memory at its peak while the system ran, above its level before it started: "
            f"{memory['used_peak_above_start'] / 1e9:,.2f} GB (a model file in tmpfs was counted before). "
            f"Per process (peak resident set; resident at the end by kind, where a page of a file that several "
            f"processes map counts in each):", "",
            *_table(["process", "peak RSS", "anonymous", "file", "shared memory"], rows)]


def _paths(shares: dict[str, float] | None) -> str:
    """Shares by path; a result saved before the sweep recorded them has none."""
    return " / ".join(_pct(shares[path]) for path in PATHS) if shares else "n/a"


def sweep_table(sweep: dict[str, Any]) -> list[str]:
    llama = {p["percent"]: p for p in sweep.get("llama_cpp") or []}
    lines = ["## VRAM budget sweep (decode: one stream; prefill: the shortest prompt)", ""]
    return lines + _table(
        ["budget (% of experts)", "budget GB", "hot experts per layer", "decode tok/s",
         f"decode run's pairs by path, prompt included ({' / '.join(PATHS)})", "decode run's VRAM hit rate",
         "prefill tok/s",
         "llama.cpp --n-cpu-moe", "llama.cpp decode tok/s", "llama.cpp prefill tok/s"],
        [[f"{p['percent']:g}", _scaled(p["budget_bytes"], 1e9, "", 2).strip(), f"{p['hot_experts_per_layer']:g}",
          _num(p["decode_tok_s"]), _paths(p.get("decode_paths")), _pct(p.get("decode_vram_hit_rate")),
          _num(p["prefill_tok_s"]),
          str(llama[p["percent"]]["n_cpu_moe"]) if p["percent"] in llama else "n/a",
          _num(llama.get(p["percent"], {}).get("llama_decode_tok_s")),
          _num(llama.get(p["percent"], {}).get("llama_prefill_tok_s"))] for p in sweep["tierserve"]])


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """decode.png and prefill.png (measured against the bound and llama.cpp), sweep.png; [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    written = _measured_plots(results, out) if "decode" in results else []
    if "sweep" in results:
        written += bench_sweep.plot(results["sweep"], out, results["model"]["name"])
    return written


def _measured_plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    llama_best = (results.get("llama_cpp") or {}).get("best", {})
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    conc = [d["concurrency"] for d in results["decode"]]
    ax.plot(conc, [d["aggregate_tok_s"] for d in results["decode"]], "o-", label="tierserve aggregate")
    ax.plot(conc, [d["per_request_tok_s"] or 0 for d in results["decode"]], "s--", label="tierserve per request")
    ax.axhline(results["limits"]["decode"]["bound_tok_s"], color="k", ls=":", label="physical bound (1 stream)")
    if "decode" in llama_best:
        ax.axhline(llama_best["decode"]["tok_s"], color="r", ls="-.", label="llama.cpp best")
    ax.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="tokens/s", title="Decode")
    ax.set_xticks(conc, [str(c) for c in conc], minor=False)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=120)
    written.append("decode.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = [p["prompt_tokens"] for p in results["prefill"]]
    series = [("tierserve", [p["tok_s"] for p in results["prefill"]]),
              ("physical bound", [b["bound_tok_s"] for b in results["limits"]["prefill"]])]
    if any(f"prefill_{n}" in llama_best for n in lengths):
        series.append(("llama.cpp best", [llama_best.get(f"prefill_{n}", {}).get("tok_s", 0.0) for n in lengths]))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(lengths))], values, width, label=label)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set(yscale="log", xlabel="prompt tokens", ylabel="tokens/s", title="Prefill")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "prefill.png", dpi=120)
    plt.close("all")
    written.append("prefill.png")
    return written


def write_results(results: dict[str, Any], out: Path) -> list[str]:
    """results.json, results.md and the plots under `out`; returns the file names written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    return ["results.json", "results.md", *plots(results, out)]
