"""Measured expert popularity of generated models against the Zipf target of --routing-skew.

Makes one preset at several skews, routes random tokens through the fp32 oracle and prints, per
layer, the share of all selections taken by the top-1, top-2, top-4, ... experts next to the target,
and whether the most popular expert is the one the generator meant to make hot. The whole rank
curves go to a JSON file.

    .venv/bin/python -m bench.routing_popularity [--preset small] [--tokens 4096] [--skews 0 0.8 1.2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

from shared.gguf_file import GGUFModel
from shared.make_model import make_model, preset_config
from shared.reference import ReferenceModel
from shared.weights_gen import hot_ranking, zipf_shares


def selection_counts(path: str | os.PathLike[str], n_tokens: int, seq_len: int = 64, seed: int = 0) -> np.ndarray:
    """How often the oracle routes to each expert: (layers, experts) counts over random token sequences."""
    model = ReferenceModel(GGUFModel(path))
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    routing: list[torch.Tensor] = []
    for _ in range(-(-n_tokens // seq_len)):
        model.forward(torch.randint(0, cfg.vocab_size, (seq_len,), generator=gen).tolist(), routing)
    counts = np.zeros((cfg.n_layers, cfg.n_experts), dtype=np.int64)
    for i, ids in enumerate(routing):  # forward appends one (T, k) tensor per layer, in layer order
        counts[i % cfg.n_layers] += np.bincount(ids.flatten().numpy(), minlength=cfg.n_experts)
    return counts


def top_m_shares(shares: np.ndarray, ms: list[int]) -> list[float]:
    """Share of the selections taken by the m most popular experts, for each m."""
    ranked = np.sort(shares)[::-1]
    return [float(ranked[:m].sum()) for m in ms]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default="f32")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--skews", type=float, nargs="+", default=[0.0, 0.8, 1.2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/routing_popularity.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg, _ = preset_config(args.preset)
    ms = [m for m in (1, 2, 4, 8, 16, 32, 64) if m < cfg.n_experts]
    report: dict = {"preset": args.preset, "dtype": args.dtype, "tokens": args.tokens, "seed": args.seed, "skews": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for skew in args.skews:
            path = os.path.join(tmp, f"skew{skew}.gguf")
            make_model(path, None, args.preset, args.dtype, args.seed, skew)
            counts = selection_counts(path, args.tokens)
            shares = counts / counts.sum(axis=1, keepdims=True)
            target = zipf_shares(cfg.n_experts, cfg.n_experts_used, skew)
            # The measured favourite should be one of the experts meant to have the top share (several
            # when the 1/k cap flattens the top); with no skew there is none to find.
            n_top = int(np.sum(np.isclose(target, target[0])))
            hot_as_meant = [bool(skew) and int(shares[i].argmax()) in hot_ranking(args.seed, i, cfg.n_experts)[:n_top]
                            for i in range(cfg.n_layers)]
            print(f"\nskew {skew:g}: share of selections of the top-m experts, measured (target), "
                  f"{args.tokens} random tokens, {cfg.n_experts} experts, top-{cfg.n_experts_used}")
            print("layer " + "".join(f"{'top-' + str(m):>16}" for m in ms) + "   hottest as meant")
            for i in range(cfg.n_layers):
                cells = "".join(f"{100 * got:8.1f} ({100 * want:4.1f})"
                                for got, want in zip(top_m_shares(shares[i], ms), top_m_shares(target, ms),
                                                     strict=True))
                print(f"{i:5d} {cells}   {('yes' if hot_as_meant[i] else 'no') if skew else '-'}")
            report["skews"][str(skew)] = {
                "target_by_rank": target.tolist(),
                "measured_by_rank": [np.sort(s)[::-1].tolist() for s in shares],
                "hottest_as_meant": hot_as_meant,
            }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nrank curves written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
