"""The experts in VRAM slots (the soft tier's residents and a pass of staged experts) computed from counts on the
device in a decode step, as one graph of the step's (captured on a GPU: tests/gpu/test_decode_graphs.py; its body
runs eagerly here): the host copies the slots' pairs and counts over and replays, instead of launching the slots'
experts itself. bf16 slots are computed by torch._grouped_mm, which runs on a CPU too."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.decode_graphs import DecodeGraphs
from gpu_worker.service import Engine
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.model_config import EXPERT_TENSOR_KINDS
from shared.placement import round_robin_placement
from shared.reference import ReferenceModel, expert_ffn, route
from tests.gpu_worker.test_hot_share import BF16_LOGIT_TOLERANCE, SEQUENCES, bf16_engine, decode


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> GGUFModel:
    path = tmp_path_factory.mktemp("m") / "small.gguf"
    make_model(path, preset="small", dtype="f32", seed=7, routing_skew=1.0)
    return GGUFModel(path)


def count_slot_launches(engine: Engine) -> dict[str, int]:
    """Calls of the pool's two ways to compute its slots: from the host's groups, and from counts on the device."""
    calls = {"host_groups": 0, "device_counts": 0}
    by_groups, by_counts = engine.pool.compute, engine.pool.compute_all
    engine.pool.compute = lambda *a: calls.__setitem__("host_groups", calls["host_groups"] + 1) or by_groups(*a)
    engine.pool.compute_all = lambda *a: calls.__setitem__("device_counts", calls["device_counts"] + 1) or \
        by_counts(*a)
    return calls


@pytest.mark.parametrize("hot", [0, 8], ids=["no-hot", "some-hot"])
def test_decode_computes_the_slots_from_device_counts_and_matches_the_oracle(model, hot):
    engine = bf16_engine(model, hot, graphs=True)
    calls = count_slot_launches(engine)
    paths: dict[str, int] = {}
    engine.moe.on_dispatch = lambda path, n: paths.__setitem__(path, paths.get(path, 0) + n)
    steps, layers = 6, model.config.n_layers
    got = decode(engine, SEQUENCES, steps)
    # prompts plan their slots on the host (one launch a layer: every staged expert fits the staging slots);
    # every decode step's layers use the device's counts
    assert calls == {"host_groups": len(SEQUENCES) * layers, "device_counts": steps * layers}
    assert paths["streamed"] > 0 and paths["staged"] > 0  # tier slots and staging slots, in one launch
    k = model.config.n_experts_used
    assert sum(paths.values()) == sum(len(seq) for seq in SEQUENCES) * k * layers, "every routed pair counted once"
    eager = decode(bf16_engine(model, hot, graphs=False), SEQUENCES, steps)
    assert ((got - eager).norm() / eager.norm()).item() < 2e-2
    oracle = ReferenceModel(model)
    for s, seq in enumerate(SEQUENCES):
        want = oracle.forward(seq)[-steps - 1 :]
        assert ((got[s] - want).norm() / want.norm()).item() < BF16_LOGIT_TOLERANCE


def test_decode_with_each_graph_body_replayed_as_captured_matches_the_eager_path(model, monkeypatch):
    """A CUDA graph replays what its first run recorded: here the first body run for each key stands in for every
    later run of that key (fronts, whole layers and the slots' graphs), so a key that misses something its body
    depends on, or a buffer that moves between steps, gives wrong logits on a CPU too."""
    recorded: dict[tuple, object] = {}

    def replay(self, graphs, key, body):
        body = recorded.setdefault((id(graphs), key), body)
        body()

    monkeypatch.setattr(DecodeGraphs, "_run", replay)
    for hot in (0, 8):
        recorded.clear()
        engine = bf16_engine(model, hot, graphs=True)
        calls = count_slot_launches(engine)
        got = decode(engine, SEQUENCES, 6)
        assert calls["device_counts"] > 0
        eager = decode(bf16_engine(model, hot, graphs=False), SEQUENCES, 6)
        assert ((got - eager).norm() / eager.norm()).item() < 2e-2


def layer_moe_want(model: GGUFModel, layer: int, h: torch.Tensor, weights: torch.Tensor,
                   expert_ids: torch.Tensor) -> torch.Tensor:
    """Each routed expert computed alone in fp32, weighted and summed per token."""
    want = torch.zeros(h.shape)
    for token, k in [(t, j) for t in range(h.shape[0]) for j in range(expert_ids.shape[1])]:
        e = int(expert_ids[token, k])
        want[token] += weights[token, k].float() * expert_ffn(
            h[token].float(), *(model.expert(layer, kind, e).float() for kind in EXPERT_TENSOR_KINDS))
    return want


def worst_row(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-6)).max().item()


@pytest.mark.parametrize(("rows", "staging"), [(1, 32), (3, 32), (16, 32), (16, 2)])
def test_the_slot_share_is_the_layers_moe(model, rows, staging):
    """One layer's MoE from static buffers with a graph runner (here: the body, run as it is) and the front's hot
    share: the same as each routed expert computed alone. Without the hot share the host launches the hot experts
    and the slots' (their pairs come first); staged experts beyond the staging slots take the host's passes."""
    cfg = model.config
    config = Config(model=str(model.path), device="cpu", dtype="bfloat16", soft_slots=4, soft_policy="lru",
                    soft_staging=staging, cold_path="stream")
    engine = Engine(config, model, remote=None)
    engine.apply(round_robin_placement(cfg, 8, 1))
    calls = count_slot_launches(engine)
    keys: list[tuple] = []

    def graph(key, body):
        keys.append(key)
        body()

    generator = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, cfg.hidden, generator=generator).to(torch.bfloat16)
    weights, expert_ids = route(torch.randn(rows, cfg.n_experts, generator=generator), cfg.n_experts_used, True)
    weights = weights.to(torch.bfloat16)
    want = layer_moe_want(model, 1, h, weights, expert_ids)
    share = engine.moe.on_device(1, rows, rows).moe(h, weights, expert_ids)
    for hot in (share, None):
        got = engine.moe(1, h, weights, expert_ids, None if hot is None else hot.clone(), graph)
        assert worst_row(got, want) < 2e-2
    if staging == 2:  # 16 tokens' cold experts: more than 4 tier slots and 2 staging slots take in one pass
        assert calls["device_counts"] == 0 and not keys and calls["host_groups"] > 2
    else:
        assert calls == {"host_groups": 1, "device_counts": 1}
        # one graph a layout, batch and whether a hot share comes in, whatever the layer
        assert keys == [(engine.experts.layout(1), rows, True)]
