"""llama.cpp's llama-bench on the same GGUF, set up the way its users run MoE models larger than the GPU:
every layer on the GPU (-ngl 99) but the experts in RAM (`-ot exps=CPU`), and, when tierserve has a VRAM
budget for experts, `--n-cpu-moe N` keeping the experts of as many layers on the GPU as that budget holds.
Each is run with the model mapped and loaded, micro-batches of 512 and 4096 for prefill, over a sweep of
thread counts; the best result of each figure is what tierserve is compared with.

The project ships no llama.cpp code: point --llama-cpp at a build directory holding llama-bench.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

UBATCHES = (512, 4096)


def find_llama_bench(build_dir: str | os.PathLike[str]) -> Path:
    for candidate in (Path(build_dir) / "bin" / "llama-bench", Path(build_dir) / "llama-bench"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"no llama-bench in {build_dir} (looked in bin/ and the directory itself)")


def options_help(binary: Path) -> str:
    """What this llama-bench says of its options (their spelling changed between builds)."""
    return subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout


def run(argv: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """One llama-bench run's records; a failed run is an error naming its command line."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        why = " (the kernel's out-of-memory killer, most likely)" if done.returncode == -signal.SIGKILL else ""
        raise RuntimeError(f"llama-bench was killed by {name}{why}: {' '.join(argv)}\n{done.stderr[-2000:]}")
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}")
    return parse_results(done.stdout)


def load_modes(help_text: str) -> list[list[str]]:
    """Mapped, then loaded (mmap on, off), in the spelling this llama-bench knows: newer builds replaced
    `-mmp 1|0` with `-lm mmap|none`. Each is its own run: loading needs a second copy of the model in RAM,
    which a machine that fits the mapped run may not have."""
    return [["-lm", "mmap"], ["-lm", "none"]] if "--load-mode" in help_text else [["-mmp", "1"], ["-mmp", "0"]]


def thread_sweep(cores: int, quick: bool) -> list[int]:
    if quick:
        return [cores]
    return sorted({max(1, cores // 4), max(1, cores // 2), max(1, cores - 1), cores})


def cpu_moe_layers(n_layers: int, layer_expert_bytes: int, expert_budget: int) -> int:
    """--n-cpu-moe matching a VRAM budget for experts: the layers whose experts do not fit stay in RAM."""
    return max(0, n_layers - expert_budget // max(1, layer_expert_bytes))


def placements(n_layers: int, layer_expert_bytes: int, expert_budget: int) -> list[list[str]]:
    """`-ot exps=CPU` always; `--n-cpu-moe N` too when the budget holds at least one layer's experts."""
    out = [["-ot", "exps=CPU"]]
    n_cpu = cpu_moe_layers(n_layers, layer_expert_bytes, expert_budget)
    if n_cpu < n_layers:
        out.append(["--n-cpu-moe", str(n_cpu)])
    return out


def commands(binary: Path, model: str, load_mode: list[str], prompt_lengths: list[int], gen_tokens: int,
             threads: list[int], placement: list[str], repetitions: int) -> list[list[str]]:
    """One llama-bench run for decode and one for prefill (it runs the product of every list given)."""
    common = [str(binary), "-m", model, "-ngl", "99", *placement, *load_mode,
              "-t", ",".join(map(str, threads)), "-r", str(repetitions), "-o", "json"]
    batch = str(max(max(prompt_lengths), *UBATCHES))
    return [[*common, "-p", "0", "-n", str(gen_tokens)],
            [*common, "-n", "0", "-p", ",".join(map(str, prompt_lengths)), "-b", batch,
             "-ub", ",".join(map(str, UBATCHES))]]


def parse_results(text: str) -> list[dict[str, Any]]:
    """llama-bench's `-o json` output: one record per test, reduced to what the comparison needs."""
    records = []
    for r in json.loads(text):
        records.append({
            "test": "decode" if int(r["n_prompt"]) == 0 else "prefill",
            "n_prompt": int(r["n_prompt"]), "n_gen": int(r["n_gen"]), "tok_s": float(r["avg_ts"]),
            "threads": int(r["n_threads"]), "n_ubatch": int(r["n_ubatch"]),
            # older builds report use_mmap, newer ones load_mode
            "load_mode": str(r.get("load_mode", "mmap" if r.get("use_mmap", True) else "none")),
            "n_cpu_moe": int(r.get("n_cpu_moe", 0)),
            "placement": f"--n-cpu-moe {r['n_cpu_moe']}" if int(r.get("n_cpu_moe", 0))
            else f"-ot {r.get('tensor_buft_overrides', 'none')}",
        })
    return records


def best(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fastest record of each figure: "decode" and "prefill_<n_prompt>"."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        key = "decode" if r["test"] == "decode" else f"prefill_{r['n_prompt']}"
        if key not in out or r["tok_s"] > out[key]["tok_s"]:
            out[key] = r
    return out


def run_llama_bench(build_dir: str, model: str, prompt_lengths: list[int], gen_tokens: int, cores: int,
                    n_layers: int, layer_expert_bytes: int, expert_budget: int, quick: bool,
                    timeout_s: float = 3600.0) -> dict[str, Any]:
    """Every placement, load mode and figure; a run that fails is reported and the others go on (loading the
    model can run out of RAM where mapping it does not), and only if every run fails is that an error."""
    binary = find_llama_bench(build_dir)
    options = options_help(binary)
    records: list[dict[str, Any]] = []
    runs, failed = [], []
    for placement in placements(n_layers, layer_expert_bytes, expert_budget):
        for load_mode in load_modes(options):
            for argv in commands(binary, model, load_mode, prompt_lengths, gen_tokens, thread_sweep(cores, quick),
                                 placement, 1 if quick else 3):
                runs.append(" ".join(argv))
                try:
                    records += run(argv, timeout_s)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    failed.append(str(e).splitlines()[0])
    if not records:
        raise RuntimeError("every llama-bench run failed:\n" + "\n".join(failed))
    return {"binary": str(binary), "commands": runs, "records": records, "best": best(records), "failed": failed}


def ratios(tierserve: dict[str, float | None], llama_best: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """tierserve / llama.cpp's best for each figure both have (tokens/s: above 1, tierserve is faster).
    tierserve's figure keys: "decode_c<N>" (llama-bench runs one stream, so every concurrency is held
    against that) and "prefill_<n_prompt>"."""
    out: dict[str, float | None] = {}
    for key, ours in tierserve.items():
        theirs = llama_best.get("decode" if key.startswith("decode") else key)
        out[key] = ours / theirs["tok_s"] if ours and theirs and theirs["tok_s"] else None
    return out
