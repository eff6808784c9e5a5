"""The worker's liveness inside a step: a step can outlast the heartbeat timeout (a first prompt whose cold
experts come off a disk), so the engine calls its keep-alive before every layer with cold work (in float32 on a
CPU, that is every layer: an all-hot layer skips the host only where its experts are stacked, in bf16 or on a
GPU), and so does loading a new hot set."""

from __future__ import annotations

from gpu_worker.scheduler import SamplingParams, Sequence
from gpu_worker.service import Engine
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.placement import round_robin_placement


def tiny_engine(tmp_path) -> Engine:
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=3)
    return Engine(Config(model=str(path), device="cpu", expert_hosts=0), GGUFModel(path), None)


def test_every_layer_of_every_step_keeps_the_worker_alive(tmp_path):
    engine = tiny_engine(tmp_path)
    cfg = engine.model.config
    engine.apply(round_robin_placement(cfg, cfg.n_experts, 0))
    calls: list[int] = []
    engine.keep_alive = lambda: calls.append(len(calls))
    engine.scheduler.add(Sequence("r", list(range(5, 17)), SamplingParams(max_tokens=3)))
    steps = 0
    while engine.scheduler.has_work():
        engine.step()
        steps += 1
        assert len(calls) == steps * cfg.n_layers
    assert steps == 3


def test_loading_a_new_hot_set_keeps_the_worker_alive_between_layers(tmp_path):
    """16 GB of hot experts take seconds to load; the coordinator declared the worker lost meanwhile."""
    engine = tiny_engine(tmp_path)
    cfg = engine.model.config
    loaded: list[int] = []
    engine.keep_alive = lambda: loaded.append(len(engine.hot.ids))
    engine.apply(round_robin_placement(cfg, cfg.n_experts, 0))
    assert loaded == list(range(cfg.n_layers))  # once before each layer's experts, with the layers before it done
