"""Cold experts the cost model streams but the soft tier's policy does not keep: streamed into the staging
slots for the step and computed there, in passes when there are more of them than staging slots."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.model import Chunk
from gpu_worker.service import Engine
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.placement import round_robin_placement
from shared.reference import ReferenceModel


def test_refused_experts_are_computed_from_the_staging_slots_in_passes(tmp_path):
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=5)
    model = GGUFModel(path)
    cfg = model.config
    # one tier slot that keeps its first expert (decayed LFU), two staging slots; no expert host at all, so a
    # refused expert that fell back to a host would fail the step
    config = Config(model=str(path), device="cpu", soft_slots=1, soft_policy="decayed-lfu", soft_staging=2,
                    cold_path="stream")
    engine = Engine(config, model, remote=None)
    engine.apply(round_robin_placement(cfg, 2, 1))
    paths: dict[str, int] = {}
    engine.moe.on_dispatch = lambda path, n: paths.__setitem__(path, paths.get(path, 0) + n)
    staged_layers: list[int] = []
    stage = engine.pool.stage
    engine.pool.stage = lambda layer, experts: staged_layers.append(layer) or stage(layer, experts)
    tokens = list(range(3, 23))
    table = list(range(4))
    got = torch.cat([engine.trunk.forward([Chunk(tokens[:12], 0, table)], engine.moe)] +
                    [engine.trunk.forward([Chunk(tokens[p : p + 1], p, table)], engine.moe) for p in range(12, 20)])
    want = ReferenceModel(model).forward(tokens)[11:]
    assert paths["staged"] > paths.get("soft_hit", 0) > 0 and paths["streamed"] > 0 and "cpu" not in paths
    assert sum(paths.values()) == len(tokens) * cfg.n_experts_used * cfg.n_layers, "every routed pair counted once"
    assert engine.pool.tier.refusals > 0
    repeats = [a == b for a, b in zip(staged_layers, staged_layers[1:], strict=False)]
    assert any(repeats), "some layer must take several passes"
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_staged_experts_that_fit_the_staging_slots_are_computed_with_the_soft_tier_in_one_launch(tmp_path):
    """One stream's cold experts in VRAM slots cost one launch a layer: the staged ones are copied first and
    computed with the soft tier's residents."""
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=5)
    model = GGUFModel(path)
    cfg = model.config
    config = Config(model=str(path), device="cpu", soft_slots=2, soft_policy="decayed-lfu",
                    soft_staging=cfg.n_experts, cold_path="stream")
    engine = Engine(config, model, remote=None)
    engine.apply(round_robin_placement(cfg, 1, 1))
    launches: list[tuple[int, list[int]]] = []
    compute = engine.pool.compute
    engine.pool.compute = lambda layer, x, slots, counts: launches.append((layer, slots)) or compute(
        layer, x, slots, counts)
    tokens = list(range(3, 19))
    table = list(range(4))
    got, per_step = [], []
    for p in range(len(tokens)):
        launches.clear()
        got.append(engine.trunk.forward([Chunk(tokens[p : p + 1], p, table)], engine.moe))
        per_step.append(list(launches))
    want = ReferenceModel(model).forward(tokens)
    staging = set(engine.pool.staging_slots)
    for launched in per_step:
        layers = [layer for layer, _ in launched]
        assert len(layers) == len(set(layers)), "a layer's slots took more than one launch"
    mixed = [slots for launched in per_step for _, slots in launched
             if staging & set(slots) and set(slots) - staging]
    assert mixed, "no launch took soft-tier and staging slots together"
    assert all(slots == sorted(slots) for slots in mixed)
    got = torch.cat(got)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def streaming_engine(tmp_path) -> tuple[GGUFModel, Engine]:
    """A CPU engine that streams every cold expert into 8 soft-tier slots (2 staging), with no expert host."""
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=5)
    model = GGUFModel(path)
    config = Config(model=str(path), device="cpu", soft_slots=8, soft_staging=2, cold_path="stream")
    engine = Engine(config, model, remote=None)
    engine.apply(round_robin_placement(model.config, 2, 1))
    return model, engine


@pytest.mark.parametrize("failing", ["stream", "compute"])
def test_a_layer_that_raises_leaves_no_soft_tier_expert_pinned(tmp_path, failing):
    """A step that failed between pinning the layer's slots and computing them (a CUDA out-of-memory error in a
    copy or a launch, a host lost) left them pinned for good: the tier then refused every expert that would have
    evicted them. Streaming fails after the layer's resident experts are pinned, the launch after all of them."""
    model, engine = streaming_engine(tmp_path)
    table = list(range(4))
    engine.trunk.forward([Chunk([3], 0, table)], engine.moe)  # a few residents, for the next step to find
    tier = engine.pool.tier
    hits = tier.hits
    working = getattr(engine.pool, failing)

    def fails(*args):
        raise RuntimeError(f"{failing} failed")

    setattr(engine.pool, failing, fails)
    tokens = list(range(20, 40))
    with pytest.raises(RuntimeError, match=f"{failing} failed"):
        engine.trunk.forward([Chunk(tokens, 0, table)], engine.moe)
    setattr(engine.pool, failing, working)
    assert tier.hits > hits, "the failed layer pinned resident experts before it raised"
    resident = [(layer, e) for layer in range(model.config.n_layers) for e in range(model.config.n_experts)
                if (layer, e) in tier]
    for key in resident:
        with pytest.raises(KeyError, match="is not pinned"):
            tier.unpin(key)
    got = engine.trunk.forward([Chunk(tokens, 0, table)], engine.moe)
    assert got.argmax(-1).tolist() == ReferenceModel(model).forward(tokens)[-1:].argmax(-1).tolist()


def test_an_expert_whose_copy_into_its_slot_failed_is_not_left_in_the_slot(tmp_path):
    """Admitted before its copy, it stayed mapped to the slot: the next step's hit computed from the slot's old
    weights."""
    model, engine = streaming_engine(tmp_path)
    weights = engine.pool.source.weights

    def fails(*args):
        raise RuntimeError("the copy failed")

    engine.pool.source.weights = fails
    tokens = list(range(3, 15))
    table = list(range(4))
    with pytest.raises(RuntimeError, match="the copy failed"):
        engine.trunk.forward([Chunk(tokens, 0, table)], engine.moe)
    engine.pool.source.weights = weights
    assert len(engine.pool.tier) == 0
    got = engine.trunk.forward([Chunk(tokens, 0, table)], engine.moe)
    assert got.argmax(-1).tolist() == ReferenceModel(model).forward(tokens)[-1:].argmax(-1).tolist()

