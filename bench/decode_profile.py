"""Where a decode step's time goes, layer by layer: the gpu_worker's step profile of a running system.

Starts the system (`tierserve up`) with the worker profiling its decode steps in windows of --steps steps,
warms it up with greedy requests (keeping prompts that decode to max_tokens), runs --concurrency of them side
by side, and prints the table of the run's last full window: per section, ms per step, ms per layer and share
of the step; "other" rows are a section's time outside the sections inside it. Options it does not know are
passed to `tierserve up`.

    python -m bench.decode_profile --preset tiny [--steps 16] [--concurrency 1] [--out bench/decode_profile.md]
    python -m bench.decode_profile --model M.gguf --steps 8 --hot-experts 16 --expert-hosts 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from shared.bench_load import TEXT, prompt_ids
from shared.bench_profile import CANDIDATE_PROMPTS, profile_system
from shared.gguf_file import GGUFModel
from shared.make_model import PRESETS, make_model
from shared.tokenizer import Tokenizer

PROMPT_TOKENS = 16
SECTIONS = """\
- *schedule*: the scheduler picking the step's tokens; *prepare*: token ids, positions, KV slots, embeddings.
- *layer*, once per layer: *attention* (norm, projections, RoPE, KV write, attention, output projection;
  in a decode graph, the router and the hot experts too), *router* (norm, gate, top-k), *moe* (the routed
  experts: inside it *cold_send* / *cold_wait* are the crossings to the expert hosts, sent before and gathered
  after the worker's own experts; *hot* is the worker's hot experts where the host launches them (outside
  decode graphs); with soft slots, *soft* is the soft tier's planning (which experts are resident, which
  to stream) and the one launch over the experts in VRAM slots, the staged ones' first pass included, and
  *staged* queueing the staged experts' copies into the staging slots and any further passes; the rest of
  *moe* is the dispatch's grouping), *shared_expert* where the model has one.
- *lm_head*: final norm and output projection; *sampling*: the sampler, logits to token ids on the host;
  *postprocess*: the scheduler's bookkeeping.
- *whole_layer* in place of *attention*, *router* and *moe*: a layer run as one graph replay, attention,
  router and experts, with decode crossings its crossings to the expert hosts too (none of its parts are timed).
- *other* under the step: the engine's Python between those sections (metrics, gauges)."""


def machine() -> str:
    cpus = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")]
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpus[0] if cpus else platform.machine()}, {os.cpu_count()} cores{gpu}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def report(command: str, model: GGUFModel, options: list[str], result: dict, load: tuple[float, float]) -> str:
    cfg = model.config
    window = result["window"]
    return "\n".join([
        "# Decode step profile", "", f"    {command}", "", f"Machine: {machine()}.", "",
        f"Model: {model.path.name} ({cfg.arch}, {cfg.n_layers} layers, {cfg.n_experts} experts, "
        f"top-{cfg.n_experts_used}, hidden {cfg.hidden}); `tierserve up {' '.join(options)}`.", "",
        f"{result['concurrency']} request(s) decoding side by side; the window: {window['steps']} decode steps. "
        f"The requests saw {result['decode_tok_s']:.1f} tok/s each while profiled "
        f"({1e3 / result['decode_tok_s']:.2f} ms per token, the step plus the worker's loop around it).", "",
        "```", result["table"], "```", "",
        f"Load average (1 min) before the run {load[0]:.1f}, after {load[1]:.1f}: on a machine shared with other work "
        f"absolute times move between runs; the shares within one run are what to read.", "",
        "Sections:", "", SECTIONS, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="GGUF model to serve")
    which.add_argument("--preset", choices=list(PRESETS), help="generate this preset (f32, seed 1) for the run")
    parser.add_argument("--steps", type=int, default=16, help="decode steps in the profiled window")
    parser.add_argument("--concurrency", type=int, default=1, help="requests decoding side by side")
    parser.add_argument("--expert-hosts", default="2")
    parser.add_argument("--hot-experts", default="2")
    parser.add_argument("--ready-timeout", type=float, default=1800.0)
    parser.add_argument("--out", help="also write the report (markdown) here")
    args, passed_on = parser.parse_known_args(argv)
    options = ["--expert-hosts", args.expert_hosts, "--hot-experts", args.hot_experts, *passed_on]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else Path(tmp) / f"{args.preset}.gguf"
        if args.preset:
            make_model(path, preset=args.preset, dtype="f32", seed=1)
        model = GGUFModel(path)
        base = Tokenizer.from_metadata(model.metadata).encode(TEXT * 4, add_special=False)
        prompts = [prompt_ids(base, PROMPT_TOKENS, variant) for variant in range(CANDIDATE_PROMPTS)]
        load_before = os.getloadavg()[0]
        result = profile_system(str(path), options, args.steps, args.concurrency, prompts, args.ready_timeout)
        print(result["table"])
        if args.out:
            command = "python -m bench.decode_profile " + " ".join(argv if argv is not None else sys.argv[1:])
            Path(args.out).write_text(report(command, model, options, result, (load_before, os.getloadavg()[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
