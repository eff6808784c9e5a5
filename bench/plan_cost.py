"""Host time of the worker's per-layer planning in a decode step: reading a layer's routing into pairs per path,
the soft tier's lookups and admissions, the cost model's split of the misses, and the hosts' timings fed back.

A step of one stream is bound by the worker's Python (bench/README.md), and it plans every layer. This builds a
model with a preset's routing shape (its layers, experts and top-k over tiny matrices), a CPU worker with the
serving settings (hot experts, soft slots, the cost model), and replays decode routing drawn with the generator's
popularity (Zipf, per layer) through the worker's own dispatch, timing each layer's planning. The cost model
plans as on the H100 machine (its constants, the preset's experts at int4 size), not for this model's tiny
experts, so it splits the misses between the links as it does there.

    python -m bench.plan_cost [--preset qwen3-30b-a3b] [--tokens 1,4,16] [--steps 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpu_worker.cold_path import ColdPlanner
from gpu_worker.cost_model import H100_MACHINE, LiveConstants, expert_flops_per_token
from gpu_worker.service import Engine
from shared.config import Config
from shared.expert_cache import ExpertLayout
from shared.gguf_file import GGUFModel
from shared.gguf_write import write_model
from shared.make_model import PRESETS, preset_config
from shared.model_config import ModelConfig, tensor_shapes
from shared.placement import GPU, round_robin_placement
from shared.weights_gen import zipf_shares

WARM_UP_STEPS = 50


def routing_shape_model(path: Path, preset: str) -> tuple[ModelConfig, ModelConfig]:
    """A model file with the preset's layers, experts and top-k, every matrix tiny (planning sees only routing):
    (its config, the preset's)."""
    preset_cfg, _ = preset_config(preset)
    cfg = dataclasses.replace(preset_cfg, hidden=32, n_heads=2, n_kv_heads=1, head_dim=16, expert_ffn=32,
                              vocab_size=256, context_length=256, shared_expert_ffn=0)
    rng = np.random.default_rng(0)
    write_model(path, cfg, {name: rng.standard_normal(shape).astype(np.float32) * 0.1
                            for name, shape in tensor_shapes(cfg).items()})
    return cfg, preset_cfg


def plan_as_on_the_gpu_machine(planner: ColdPlanner, preset_cfg: ModelConfig) -> None:
    """The H100 machine's constants (int8's CPU rate for the experts' format) and the preset's int4 expert size."""
    int8_rate = H100_MACHINE.cpu_read_bw["int8"]
    planner.live = LiveConstants(dataclasses.replace(H100_MACHINE, cpu_read_bw={planner.dtype: int8_rate}))
    f, h = preset_cfg.expert_ffn, preset_cfg.hidden
    int4 = ExpertLayout.build(("int4",) * 3, [((f, h), torch.bfloat16), ((f, h), torch.bfloat16),
                                              ((h, f), torch.bfloat16)])
    planner.expert_bytes = [int4.expert_nbytes] * preset_cfg.n_layers
    planner.flops_per_token = expert_flops_per_token(preset_cfg)
    planner.begin_step()


def time_planning(engine: Engine, cfg: ModelConfig, tokens: int, steps: int, skew: float, seed: int
                  ) -> tuple[float, dict[str, int]]:
    """Seconds of planning per layer over `steps` decode steps of `tokens` tokens, and the pairs each path got."""
    moe, planner = engine.moe, engine.planner
    assert moe is not None and planner is not None and engine.pool is not None
    rng = np.random.default_rng(seed)
    shares = zipf_shares(cfg.n_experts, cfg.n_experts_used, skew)
    ranks = [rng.permutation(cfg.n_experts) for _ in range(cfg.n_layers)]  # each layer's popularity order
    routing = [[ranks[layer][np.stack([rng.choice(cfg.n_experts, cfg.n_experts_used, replace=False, p=shares)
                                        for _ in range(tokens)]).ravel()] for layer in range(cfg.n_layers)]
               for _ in range(WARM_UP_STEPS + steps)]
    # the hosts report what the constants predict, so the plans stay those of the machine they describe
    start = planner.constants
    nbytes, read_bw = planner.expert_bytes[0], start.cpu_read_bw[planner.dtype]
    spent, pairs = 0.0, {}
    for step, layers in enumerate(routing):
        planned = []
        began = time.perf_counter()
        planner.begin_step()
        for layer, ids in enumerate(layers):
            slots: dict[int, int] = {}
            _, groups = moe._plan(layer, ids, slots)
            for e in slots:  # as the dispatch does once the layer is done
                engine.pool.tier.unpin((layer, e))
            for host in (g for g in groups if isinstance(g, int) and g >= 0):
                experts, rows = len(groups[host].keys), groups[host].end - groups[host].start
                compute_s = experts * nbytes / read_bw + rows * planner.flops_per_token / start.cpu_flops
                planner.observe_host(layer, experts, rows, compute_s, compute_s + start.round_trip_s)
            planned.append(groups)
        if step >= WARM_UP_STEPS:
            spent += time.perf_counter() - began
            for groups in planned:
                for path, g in groups.items():
                    name = "hot" if path == GPU else path if isinstance(path, str) else "cpu"
                    pairs[name] = pairs.get(name, 0) + g.end - g.start
    return spent / (steps * cfg.n_layers), pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="qwen3-30b-a3b")
    parser.add_argument("--tokens", default="1,4,16", help="tokens per decode step, comma-separated")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hot-fraction", type=float, default=0.25, help="share of each layer's experts hot")
    parser.add_argument("--soft-slots", type=int, default=64)
    parser.add_argument("--routing-skew", type=float, default=1.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.preset}-routing.gguf"
        cfg, preset_cfg = routing_shape_model(path, args.preset)
        config = Config(model=str(path), device="cpu", soft_slots=args.soft_slots, cold_path="auto")
        engine = Engine(config, GGUFModel(path), remote=None)
        engine.apply(round_robin_placement(cfg, round(args.hot_fraction * cfg.n_experts), 1))
        plan_as_on_the_gpu_machine(engine.planner, preset_cfg)  # type: ignore[arg-type]
        print(f"{args.preset}: {cfg.n_layers} layers, top-{cfg.n_experts_used} of {cfg.n_experts} experts, "
              f"{args.hot_fraction:.0%} hot, {args.soft_slots} soft slots ({config.soft_policy}), cost model auto")
        print("| tokens per step | planning us per layer | per step (ms) | pairs hot / soft slots / staged / "
              "cpu |\n|---|---|---|---|")
        for tokens in (int(t) for t in args.tokens.split(",")):
            per_layer, pairs = time_planning(engine, cfg, tokens, args.steps, args.routing_skew, seed=tokens)
            total = sum(pairs.values())
            split = " / ".join(f"{pairs.get(p, 0) / total:.0%}" for p in ("hot", "soft", "staged", "cpu"))
            print(f"| {tokens} | {per_layer * 1e6:.1f} | {per_layer * cfg.n_layers * 1e3:.2f} | {split} |")
        tier = engine.pool.tier  # type: ignore[union-attr]
        print(f"soft tier: {tier.hits} hits, {tier.misses} misses, {tier.evictions} evictions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
