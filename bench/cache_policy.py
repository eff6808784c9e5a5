"""Hit rates of the soft-tier policies on routing traces of the fp32 oracle.

Makes one preset at several routing skews, runs the oracle over one long random token sequence cut
into windows, and keeps the expert ids every token picks in every layer. Each token is one decode
step: its layers' experts are looked up in order, a miss is offered a slot, and the experts of the
layer being computed stay pinned until it is done. Slot counts are fractions of all the experts.
For reference, "best fixed set" is the hit rate of the slots holding the experts the whole trace
uses most (known only afterwards). Then the same with a hard tier in front holding each layer's most
used experts, so the soft tier sees only the rest; and a trace that joins two models of the same skew
with different hot experts, to see how fast each policy follows when the hot set moves.

    .venv/bin/python -m bench.cache_policy [--preset small] [--tokens 4096] [--skews 0 0.8 1.2]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gpu_worker.expert_cache import (
    DEFAULT_POLICY,
    HALF_LIFE_PER_EXPERT,
    DecayedLFUPolicy,
    EvictionPolicy,
    SoftTier,
    make_policy,
)
from shared.config import SOFT_POLICIES
from shared.gguf_file import GGUFModel
from shared.make_model import make_model, preset_config
from shared.reference import ReferenceModel

CACHE_DIR = Path(tempfile.gettempdir()) / "tierserve-bench-cache"
BEST_FIXED = "best fixed set (hindsight)"


def routing_trace(path: str | os.PathLike[str], n_tokens: int, window: int, seed: int) -> np.ndarray:
    """Expert ids (tokens, layers, k) the oracle picks for a random token sequence cut into windows."""
    model = ReferenceModel(GGUFModel(path))
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.vocab_size, (n_tokens,), generator=gen).tolist()
    windows = []
    for start in range(0, n_tokens, window):
        routing: list[torch.Tensor] = []  # forward appends one (T, k) tensor per layer, in layer order
        model.forward(tokens[start:start + window], routing)
        windows.append(torch.stack(routing, dim=1).numpy())
    return np.concatenate(windows)


def cached_trace(preset: str, dtype: str, seed: int, skew: float, n_tokens: int, window: int) -> np.ndarray:
    """`routing_trace` of a generated model, with the model and the trace kept under CACHE_DIR."""
    CACHE_DIR.mkdir(exist_ok=True)
    name = f"{preset}-{dtype}-seed{seed}-skew{skew:g}"
    trace_path = CACHE_DIR / f"{name}-{n_tokens}x{window}.npy"
    if not trace_path.exists():
        model_path = CACHE_DIR / f"{name}.gguf"
        if not model_path.exists():
            make_model(model_path, None, preset, dtype, seed, skew)
        partial = trace_path.with_suffix(".partial.npy")  # an interrupted run leaves no truncated trace
        np.save(partial, routing_trace(model_path, n_tokens, window, seed))
        partial.replace(trace_path)
    return np.load(trace_path)


def hard_sets(trace: np.ndarray, per_layer: int) -> list[set[int]]:
    """Each layer's `per_layer` most used experts over the trace, as a planner would pick a hard tier."""
    return [{e for e, _ in Counter(trace[:, layer].ravel().tolist()).most_common(per_layer)}
            for layer in range(trace.shape[1])]


def replay(trace: np.ndarray, tier: SoftTier, hard: list[set[int]], measure_from: int = 0) -> float:
    """Hit rate of `tier` over the steps of `trace` from `measure_from` on (earlier ones warm it up);
    experts in `hard` (per layer) never reach the soft tier."""
    for t, step in enumerate(trace):
        if t == measure_from:
            tier.hits = tier.misses = 0
        for layer, experts in enumerate(step.tolist()):
            pinned = []
            for e in experts:
                if e in hard[layer]:
                    continue
                key = (layer, e)
                if tier.lookup(key) is not None or tier.admit(key) is not None:
                    tier.pin(key)
                    pinned.append(key)
            for key in pinned:
                tier.unpin(key)
    return tier.hit_rate


def best_fixed_rate(trace: np.ndarray, n_slots: int, hard: list[set[int]]) -> float:
    counts = Counter((layer, e) for step in trace.tolist() for layer, experts in enumerate(step)
                     for e in experts if e not in hard[layer])
    return sum(c for _, c in counts.most_common(n_slots)) / max(sum(counts.values()), 1)


def half_life_name(half_life: float) -> str:
    return "no decay" if math.isinf(half_life) else f"half-life {half_life:g} x experts"


def named_policies(n_keys: int, half_lives: list[float]) -> dict[str, Callable[[], EvictionPolicy]]:
    """The policies of `make_policy`, then decayed LFU at other half-lives."""
    made: dict[str, Callable[[], EvictionPolicy]] = {}
    for name in SOFT_POLICIES:
        label = name + (f", {half_life_name(HALF_LIFE_PER_EXPERT)}" if name == "decayed-lfu" else "")
        made[label + (" (default)" if name == DEFAULT_POLICY else "")] = lambda name=name: make_policy(name, n_keys)
    for h in half_lives:
        if h != HALF_LIFE_PER_EXPERT:
            made[f"decayed-lfu, {half_life_name(h)}"] = lambda h=h: DecayedLFUPolicy(h * n_keys)
    return made


def hit_rates(trace: np.ndarray, slots: list[int], policies: dict[str, Callable[[], EvictionPolicy]],
              hard: list[set[int]], measure_from: int = 0) -> dict[str, list[float]]:
    rates = {name: [replay(trace, SoftTier(n, make()), hard, measure_from) for n in slots]
             for name, make in policies.items()}
    if not measure_from:  # the best set of a trace whose popularity changes midway means little
        rates[BEST_FIXED] = [best_fixed_rate(trace, n, hard) for n in slots]
    return rates


def table(first: str, rows: dict[tuple[str, str], list[float]], columns: list[str]) -> list[str]:
    lines = [f"| {first} | policy | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    lines += [f"| {group} | {name} | " + " | ".join(f"{100 * r:.1f}" for r in rates) + " |"
              for (group, name), rates in rows.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default="f32")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256, help="tokens per oracle forward")
    parser.add_argument("--skews", type=float, nargs="+", default=[0.0, 0.8, 1.2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10, 0.25, 0.50],
                        help="slot counts as fractions of all experts")
    parser.add_argument("--half-lives", type=float, nargs="+", default=[4, 64, math.inf],
                        help="decayed LFU half-lives besides the default, in accesses per expert of the model")
    parser.add_argument("--hard", type=float, default=0.1, help="hard tier: this fraction of each layer's experts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.monotonic()
    cfg, _ = preset_config(args.preset)
    n_keys = cfg.n_layers * cfg.n_experts
    # A layer's k experts are pinned together, so fewer slots than k could not hold them.
    slots = [max(cfg.n_experts_used, round(f * n_keys)) for f in args.fractions]
    columns = [f"{100 * f:g}% ({n} slots)" for f, n in zip(args.fractions, slots, strict=True)]
    policies = named_policies(n_keys, args.half_lives)
    made_by_name = dict(list(policies.items())[:len(SOFT_POLICIES)])  # without the other half-lives
    no_hard = [set() for _ in range(cfg.n_layers)]
    per_layer = round(args.hard * cfg.n_experts)

    steady: dict[tuple[str, str], list[float]] = {}
    behind_hard: dict[tuple[str, str], list[float]] = {}
    for skew in args.skews:
        trace = cached_trace(args.preset, args.dtype, args.seed, skew, args.tokens, args.window)
        steady.update({(f"{skew:g}", name): r for name, r in hit_rates(trace, slots, policies, no_hard).items()})
        hard = hard_sets(trace, per_layer)
        behind_hard.update({(f"{skew:g}", name): r for name, r in hit_rates(trace, slots, made_by_name, hard).items()})
    skew = max(args.skews)
    before = cached_trace(args.preset, args.dtype, args.seed, skew, args.tokens, args.window)
    after = cached_trace(args.preset, args.dtype, args.seed + 1, skew, args.tokens, args.window)
    moved = {(f"{skew:g}, seed {args.seed} then {args.seed + 1}", name): r for name, r in
             hit_rates(np.concatenate([before, after]), slots, policies, no_hard, len(before)).items()}

    lines = [f"Soft-tier hit rate (%): preset {args.preset} {args.dtype}, {cfg.n_layers} layers x {cfg.n_experts} "
             f"experts = {n_keys}, top-{cfg.n_experts_used}; decode of {args.tokens} random tokens (oracle windows "
             f"of {args.window}), one token per step, {cfg.n_layers * cfg.n_experts_used} accesses per step.", "",
             *table("skew", steady, columns), "",
             f"Behind a hard tier of each layer's {per_layer} most used experts (the soft tier sees only the "
             "others; hit rate of those):", "",
             *table("skew", behind_hard, columns), "",
             f"When the hot set moves: {args.tokens} tokens of one model, then {args.tokens} of another with the "
             "same skew and other hot experts; hit rate over the second model's tokens:", "",
             *table("trace", moved, columns)]
    print("\n".join(lines))
    print(f"\n({time.monotonic() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
