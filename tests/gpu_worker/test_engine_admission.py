"""The engine tells of each request it admits before its prompt runs: the worker sends EngineStarted for it, and
the coordinator counts a request lost with the worker as resumed only then (one that only waited in the worker's
queue cannot be what crashed it)."""

from __future__ import annotations

from gpu_worker.scheduler import SamplingParams, Sequence
from gpu_worker.service import Engine
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.placement import round_robin_placement


def test_each_request_is_told_admitted_once_and_before_its_prompt_runs(tmp_path):
    path = tmp_path / "tiny.gguf"
    make_model(path, preset="tiny", dtype="f32", seed=3)
    engine = Engine(Config(model=str(path), device="cpu", expert_hosts=0, max_running=1), GGUFModel(path), None)
    cfg = engine.model.config
    engine.apply(round_robin_placement(cfg, cfg.n_experts, 0))
    told: list[tuple[str, int]] = []
    engine.on_admitted = lambda seq: told.append((seq.request_id, seq.num_computed))
    for request_id in ("a", "b"):
        engine.scheduler.add(Sequence(request_id, [5, 6, 7], SamplingParams(max_tokens=2)))
    engine.step()
    assert told == [("a", 0)]  # before its prompt ran; b waits behind it (max_running 1)
    while engine.scheduler.has_work():
        engine.step()
    assert told == [("a", 0), ("b", 0)]
