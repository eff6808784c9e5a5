"""The hot experts' share of a layer's MoE, computed in the decode front (attention, router, hot experts: one
CUDA graph on a GPU, its static buffers run eagerly here) while the host plans only the cold experts; and the
whole-layer path of layers whose experts are all hot. bf16 stacks the hot experts for torch._grouped_mm, which
runs on a CPU too, so these are the GPU's code paths (captured: tests/gpu/test_decode_graphs.py)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.model import Chunk, Trunk
from gpu_worker.service import Engine
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.model_config import EXPERT_TENSOR_KINDS
from shared.placement import round_robin_placement
from shared.reference import ReferenceModel, expert_ffn, route

BLOCKS_PER_SEQUENCE, BLOCK_SIZE = 4, 16
# bf16 keeps ~3 significant digits: the relative L2 error of the logits against the fp32 oracle, as on the GPU
# (tests/gpu/test_gpu_paths.py); measured 1.1% here
BF16_LOGIT_TOLERANCE = 5e-2


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> GGUFModel:
    path = tmp_path_factory.mktemp("m") / "small.gguf"
    make_model(path, preset="small", dtype="f32", seed=7, routing_skew=1.0)
    return GGUFModel(path)


def bf16_engine(model: GGUFModel, hot: int, graphs: bool, device: str = "cpu") -> Engine:
    """A bf16 worker with `hot` experts per layer and every cold expert streamed into soft slots (no host)."""
    config = Config(model=str(model.path), device=device, dtype="bfloat16", soft_slots=4, soft_policy="lru",
                    soft_staging=model.config.n_experts, cold_path="stream", kv_block_size=BLOCK_SIZE)
    engine = Engine(config, model, remote=None)
    engine.trunk = Trunk(model, engine.device, torch.bfloat16, num_blocks=64, block_size=BLOCK_SIZE,
                         decode_graphs=graphs)
    engine.apply(round_robin_placement(model.config, hot, 0 if hot == model.config.n_experts else 1))
    return engine


def decode(engine: Engine, sequences: list[list[int]], steps: int) -> torch.Tensor:
    """Each sequence's prompt (all but its last `steps` tokens) alone, then `steps` decode steps of all of them
    together: logits (sequences, steps + 1, vocab)."""
    tables = [list(range(BLOCKS_PER_SEQUENCE * s, BLOCKS_PER_SEQUENCE * (s + 1))) for s in range(len(sequences))]
    out = [[engine.trunk.forward([Chunk(seq[:-steps], 0, table)], engine.moe)[0]]
           for seq, table in zip(sequences, tables, strict=True)]
    for back in range(steps, 0, -1):
        chunks = [Chunk(seq[len(seq) - back : len(seq) - back + 1], len(seq) - back, table)
                  for seq, table in zip(sequences, tables, strict=True)]
        for s, row in enumerate(engine.trunk.forward(chunks, engine.moe)):
            out[s].append(row)
    return torch.stack([torch.stack(rows) for rows in out]).float()


SEQUENCES = [[(5 * i + 11 * s) % 4000 + 3 for i in range(n + 6)] for s, n in enumerate((4, 9, 17))]


@pytest.mark.parametrize("hot", [8, 32], ids=["some-hot", "all-hot"])
def test_hot_share_in_the_decode_front_matches_the_oracle(model, hot):
    engine = bf16_engine(model, hot, graphs=True)
    paths: dict[str, int] = {}
    engine.moe.on_dispatch = lambda path, n: paths.__setitem__(path, paths.get(path, 0) + n)
    planned_hot: list[int] = []  # layers whose hot experts the host planned and launched
    compute = engine.hot.compute
    engine.hot.compute = lambda layer, *args: planned_hot.append(layer) or compute(layer, *args)
    steps = 6
    got = decode(engine, SEQUENCES, steps)
    oracle = ReferenceModel(model)
    for s, seq in enumerate(SEQUENCES):
        want = oracle.forward(seq)[-steps - 1 :]
        relative = ((got[s] - want).norm() / want.norm()).item()
        assert relative < BF16_LOGIT_TOLERANCE, f"sequence {s}: relative logit error {relative:.2e}"
    k, layers = model.config.n_experts_used, model.config.n_layers
    decode_pairs = steps * len(SEQUENCES) * k * layers
    prompt_pairs = sum(len(seq) - steps for seq in SEQUENCES) * k * layers
    assert sum(paths.values()) == decode_pairs + prompt_pairs, "every routed pair is counted once"
    if hot == model.config.n_experts:
        assert paths == {"hot": decode_pairs + prompt_pairs}
        assert not planned_hot, "all-hot layers never plan on the host"
    else:
        assert paths["hot"] > 0 and paths["soft_hit"] + paths["streamed"] + paths["staged"] > 0
        # the host launched hot experts only for the prompts: 3 prefill forwards x layers at most
        assert len(planned_hot) <= len(SEQUENCES) * layers


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_hot_share_plus_the_planned_cold_experts_is_the_layers_moe(model, rows):
    """One layer's MoE both ways: the hot share computed on its own (as the decode front does) and passed in, with
    the host planning the cold experts; and all of it planned on the host. Both match each routed expert computed
    alone in fp32."""
    cfg = model.config
    engine = bf16_engine(model, 12, graphs=False)
    generator = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, cfg.hidden, generator=generator).to(torch.bfloat16)
    weights, expert_ids = route(torch.randn(rows, cfg.n_experts, generator=generator), cfg.n_experts_used, True)
    weights = weights.to(torch.bfloat16)
    part = engine.moe.on_device(1, rows, rows)
    assert part is not None and not part.whole
    share = part.moe(h, weights, expert_ids)
    with_share = engine.moe(1, h, weights, expert_ids, share.clone())
    planned = engine.moe(1, h, weights, expert_ids)
    want = torch.zeros(h.shape)
    hot_want = torch.zeros(h.shape)
    for token, k in [(t, j) for t in range(rows) for j in range(cfg.n_experts_used)]:
        e = int(expert_ids[token, k])
        y = weights[token, k].float() * expert_ffn(h[token].float(), *(model.expert(1, kind, e).float()
                                                                       for kind in EXPERT_TENSOR_KINDS))
        want[token] += y
        if e in engine.hot.ids[1]:
            hot_want[token] += y

    def worst(got: torch.Tensor, expected: torch.Tensor) -> float:
        return ((got.float() - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-6)).max().item()

    assert hot_want.any(dim=1).sum() > 0, "some token must route to a hot expert"
    assert worst(share, hot_want) < 2e-2 and not share[~hot_want.any(dim=1)].any()
    assert worst(with_share, want) < 2e-2 and worst(planned, want) < 2e-2
