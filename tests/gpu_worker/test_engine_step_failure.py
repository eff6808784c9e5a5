"""A step whose batch holds a request with non-finite logits: that request alone ends. Were the step's bookkeeping
to fail while it records the tokens, every request of the batch, that one included, is still the engine's to fail
(the worker's loop answers each with an error), but for those it had already finished, whose samples come with the
failure; were it to fail after, all the step's samples come with the failure, for the loop to send."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from prometheus_client import REGISTRY

from gpu_worker.scheduler import SamplingParams, Sequence
from gpu_worker.service import (
    COST_PCIE,
    Engine,
    FailedAfterSampling,
    check_hot_experts_fit,
    fail_running,
    send_samples,
)
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.placement import round_robin_placement
from shared.protocol import EngineError, EngineToken
from tests.damaged_models import nan_embedding

DAMAGED = 50  # the token whose embedding is NaN: a prompt ending in it samples from NaN logits


@pytest.fixture
def engine(tmp_path) -> Engine:
    """A CPU engine on a tiny model with token DAMAGED's embedding NaN, holding requests "nan" (ending in it) and
    "good"."""
    path = tmp_path / "tiny.gguf"
    make_model(path, arch="qwen3moe", preset="tiny", dtype="f32", seed=9)
    nan_embedding(path, DAMAGED)
    model = GGUFModel(path)
    engine = Engine(Config(model=str(path), device="cpu", expert_hosts=0), model, None)
    engine.apply(round_robin_placement(model.config, model.config.n_experts, 0))
    engine.scheduler.add(Sequence("nan", [5, DAMAGED], SamplingParams(max_tokens=4)))
    engine.scheduler.add(Sequence("good", [5, 6], SamplingParams(max_tokens=4)))
    return engine


def test_only_the_request_of_non_finite_logits_ends(engine):
    sampled, finished = engine.step()
    assert {seq.request_id: r.valid for seq, r in sampled} == {"nan": False, "good": True}
    assert finished == []
    assert [seq.request_id for seq in engine.scheduler.running] == ["good"]
    nan = next(seq for seq, _ in sampled if seq.request_id == "nan")
    assert nan.is_finished and nan.finish_reason == "error" and nan.output_token_ids == []


def test_a_step_failing_after_sampling_leaves_the_non_finite_request_to_be_failed(engine, monkeypatch):
    def broken(*args):
        raise RuntimeError("bookkeeping failed")

    monkeypatch.setattr(engine.scheduler, "postprocess", broken)
    with pytest.raises(RuntimeError, match="bookkeeping failed"):
        engine.step()
    assert sorted(seq.request_id for seq in engine.fail_all_running()) == ["good", "nan"]
    assert not engine.scheduler.has_work()


def test_a_step_failing_after_its_tokens_are_recorded_hands_them_over(engine, monkeypatch):
    engine.scheduler.add(Sequence("short", [5, 7], SamplingParams(max_tokens=1)))  # its one token ends it

    def broken():
        raise RuntimeError("gauges failed")

    monkeypatch.setattr(engine, "update_gauges", broken)
    with pytest.raises(FailedAfterSampling) as failure:
        engine.step()
    assert isinstance(failure.value.__cause__, RuntimeError)
    samples = {seq.request_id: r for seq, r in failure.value.sampled}
    assert {rid: r.valid for rid, r in samples.items()} == {"nan": False, "good": True, "short": True}
    assert [seq.request_id for seq in failure.value.finished] == ["short"]
    short = next(seq for seq, _ in failure.value.sampled if seq.request_id == "short")
    assert short.finish_reason == "length" and short.output_token_ids == [samples["short"].token_id]
    assert [seq.request_id for seq in engine.scheduler.running] == ["good"]

    # as the worker's loop answers it: every sample, then an error for each request still running (the gauges,
    # which failing them updates, still failing)
    sent = []
    send_samples(failure.value.sampled, sent.append, logging.getLogger("test"))
    fail_running(engine, failure.value.__cause__, sent.append, logging.getLogger("test"))
    assert [(type(m), m.request_id) for m in sent] == [
        (EngineError, "nan"), (EngineToken, "good"), (EngineToken, "short"), (EngineError, "good")]
    assert sent[2].finish_reason == "length" and sent[1].finish_reason is None
    assert sent[3].code == "internal_error" and "gauges failed" in sent[3].message
    assert not engine.scheduler.has_work()


def test_a_step_whose_bookkeeping_fails_partway_hands_over_the_requests_it_finished(engine, monkeypatch):
    engine.scheduler.add(Sequence("short", [5, 7], SamplingParams(max_tokens=1)))
    engine.scheduler.add(Sequence("doomed", [5, 8], SamplingParams(max_tokens=1)))
    max_len = engine.scheduler.max_len

    def failing_for_doomed_once_sampled(seq: Sequence) -> int:
        if seq.request_id == "doomed" and seq.output_token_ids:  # recording its token, after "short" finished
            raise RuntimeError("bookkeeping failed")
        return max_len(seq)

    monkeypatch.setattr(engine.scheduler, "max_len", failing_for_doomed_once_sampled)
    with pytest.raises(FailedAfterSampling) as failure:
        engine.step()
    assert [seq.request_id for seq in failure.value.finished] == ["short"]
    assert [seq.request_id for seq, _ in failure.value.sampled] == ["short"]
    assert sorted(seq.request_id for seq in engine.scheduler.running) == ["doomed", "good", "nan"]

    sent = []
    send_samples(failure.value.sampled, sent.append, logging.getLogger("test"))
    fail_running(engine, failure.value.__cause__, sent.append, logging.getLogger("test"))
    assert [(type(m), m.request_id) for m in sent] == [
        (EngineToken, "short"), (EngineError, "nan"), (EngineError, "good"), (EngineError, "doomed")]
    assert sent[0].finish_reason == "length"
    assert all(m.code == "internal_error" and "bookkeeping failed" in m.message for m in sent[1:])
    assert not engine.scheduler.has_work()


def test_a_request_whose_kv_blocks_cannot_be_freed_is_still_answered(engine, monkeypatch):
    """Freeing a finished request's KV blocks fails (a bookkeeping fault, which fails again when the loop ends the
    request): the step fails, and the loop still answers that request and every other, each once."""
    short = Sequence("short", [5, 7], SamplingParams(max_tokens=1))
    engine.scheduler.add(short)
    free = engine.scheduler.allocator.free

    def failing_for_short(blocks: list[int]) -> None:
        if blocks is short.block_table:
            raise ValueError("blocks not allocated")
        free(blocks)

    monkeypatch.setattr(engine.scheduler.allocator, "free", failing_for_short)
    with pytest.raises(ValueError, match="blocks not allocated") as failure:
        engine.step()
    sent = []
    fail_running(engine, failure.value, sent.append, logging.getLogger("test"))
    assert [(type(m), m.request_id) for m in sent] == [(EngineError, "nan"), (EngineError, "good"),
                                                         (EngineError, "short")]
    assert not engine.scheduler.has_work()


def test_the_gauges_hold_the_cost_model_from_the_start_and_no_batch_once_idle(tmp_path):
    """The cost model's gauges read 0 B/s until the first step, and the batch size kept the last step's for as long
    as the worker was idle after it."""
    path = tmp_path / "tiny.gguf"
    make_model(path, arch="qwen3moe", preset="tiny", dtype="f32", seed=9)
    model = GGUFModel(path)
    COST_PCIE.set(0)
    engine = Engine(Config(model=str(path), device="cpu", expert_hosts=0, soft_slots=4), model, None)
    assert gauge("tierserve_worker_cost_pcie_bytes_per_second") == engine.planner.constants.pcie_bw > 0
    engine.apply(round_robin_placement(model.config, model.config.n_experts, 0))
    engine.scheduler.add(Sequence("one", [5, 6], SamplingParams(max_tokens=2)))
    engine.step()
    assert gauge("tierserve_worker_batch_size") == 1
    while engine.scheduler.has_work():
        engine.step()
    assert gauge("tierserve_worker_batch_size") == 0


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


def test_a_placement_that_adds_no_hot_experts_is_not_refused_for_want_of_room(engine):
    """Below the floor, a placement adding nothing was refused: "its hot experts need 0.0 MB ... lower
    gpu_expert_budget or hot_experts", of which there was nothing to lower."""
    placement = round_robin_placement(engine.model.config, engine.model.config.n_experts, 0)
    engine.config = dataclasses.replace(engine.config, host_memory_floor="100%")
    check_hot_experts_fit(engine, placement)  # the one it holds
