"""Decode steps through captured CUDA graphs: several sequences of different lengths decoding together give
each sequence the oracle's logits (fp32) and the same logits as the eager path, and the graphs are reused."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.experts import HotExperts, MoEDispatch
from gpu_worker.model import Chunk, Trunk
from shared.expert_source import ExpertSource
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.placement import round_robin_placement
from shared.reference import ReferenceModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


def decode(model: GGUFModel, graphs: bool, sequences: list[list[int]], steps: int) -> tuple[torch.Tensor, Trunk]:
    """Each sequence's prompt (all but its last `steps` tokens) alone, then `steps` decode steps of all of them
    together; logits (sequences, steps + 1, vocab)."""
    cfg = model.config
    placement = round_robin_placement(cfg, cfg.n_experts, 0)
    hot = HotExperts(ExpertSource(model, None), CUDA, torch.float32)
    hot.apply(placement)
    moe = MoEDispatch(placement, hot, None)
    trunk = Trunk(model, CUDA, torch.float32, num_blocks=64, block_size=16, decode_graphs=graphs)
    tables = [list(range(5 * s, 5 * s + 5)) for s in range(len(sequences))]
    out = [[trunk.forward([Chunk(seq[:-steps], 0, table)], moe)[0]]
           for seq, table in zip(sequences, tables, strict=True)]
    for back in range(steps, 0, -1):
        chunks = [Chunk(seq[len(seq) - back : len(seq) - back + 1], len(seq) - back, table)
                  for seq, table in zip(sequences, tables, strict=True)]
        for s, row in enumerate(trunk.forward(chunks, moe)):
            out[s].append(row)
    return torch.stack([torch.stack(rows) for rows in out]).cpu(), trunk


def test_graph_decode_matches_the_oracle_and_the_eager_path(tmp_path):
    path = tmp_path / "small.gguf"
    make_model(path, preset="small", dtype="f32", seed=5, routing_skew=1.0)
    model = GGUFModel(path)
    sequences = [[(11 * i + 5 * s) % 4000 + 3 for i in range(n)] for s, n in enumerate((10, 30, 70))]
    got, trunk = decode(model, True, sequences, 8)
    eager, _ = decode(model, False, sequences, 8)
    assert trunk.graphs is not None and all(b.graphs for b in trunk.graphs.batches.values())
    assert set(trunk.graphs.batches) == {(4, 64), (4, 128)}
    oracle = ReferenceModel(model)
    for s, seq in enumerate(sequences):
        want = oracle.forward(seq)[-9:]
        assert torch.allclose(got[s], want, atol=2e-3, rtol=2e-3)
        assert got[s].argmax(-1).tolist() == want.argmax(-1).tolist()
    assert torch.allclose(got, eager, atol=1e-3, rtol=1e-3)
