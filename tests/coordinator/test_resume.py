"""Resuming requests after a lost process, at the edges: clients gone meanwhile, timeouts against the hold after a
host's failure, a worker still alive, refusals by a stopping worker, a drain. The coordinator runs in-process with
its real sockets, driven by hand: heartbeats, engine messages and ticks at chosen times."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import zmq

from coordinator import service
from coordinator.service import Coordinator
from coordinator.streams import RequestStream
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.launcher import free_tcp_port
from shared.protocol import EngineError, Generate, Heartbeat, decode, encode


def run(coro):
    return asyncio.run(coro)


def make(tiny_model: Path, tmp_path: Path, **settings) -> Coordinator:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    settings = {"expert_hosts": 0, "hot_experts": 8, **settings}
    config = Config(model=str(tiny_model), run_dir=str(run_dir),
                    client_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", metrics_port=0,
                    heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0, **settings)
    return Coordinator(config, GGUFModel(config.model))


def heartbeat(c: Coordinator, pid: int = 1, version: int | None = None) -> None:
    hb = Heartbeat(member_id="gpu-worker", role="gpu_worker", pid=pid, metrics_port=0,
                   placement_version=c.placement.version if version is None else version, model=c.membership.model)
    c.on_control(b"gpu-worker", encode(hb))


def engine_peer(c: Coordinator) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, b"gpu-worker")
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 2000)
    s.connect(c.config.engine_endpoint)
    return s


def add(c: Coordinator, client: bytes, rid: str, max_tokens: int = 8) -> RequestStream:
    stream = RequestStream(c.table.next_id(), client, Generate(request_id=rid, token_ids=[5, 6], max_tokens=max_tokens),
                           [5, 6], c.tokenizer.detokenizer(), c.stop_token_ids, time.monotonic())
    c.table.add(stream)
    return stream


def test_resume_timeout_with_a_gone_client_of_two_requests_does_not_raise(tiny_model, tmp_path):
    """At the resume timeout the first failure's send finds the client gone, which ends its other request: failing
    every request must not then end that one again (a KeyError out of the tick would stop the ticks for good)."""

    async def body():
        c = make(tiny_model, tmp_path, resume_timeout_s=1.0)
        try:
            engine = engine_peer(c)
            await asyncio.sleep(0.3)
            heartbeat(c)
            assert c.ready
            add(c, b"gone", "a")
            add(c, b"gone", "b")
            c.dispatch()
            assert c.table.num_running == 2
            now = time.monotonic()
            c.tick(now + 1.5)  # the worker is taken for gone: both wait for a successor
            assert c.table.num_waiting == 2 and c.lost_at is not None
            c.tick(now + 3.0)  # none came within resume_timeout_s
            assert len(c.table) == 0
            engine.close()
        finally:
            c.close()

    run(body())


def test_a_worker_loss_with_a_gone_client_that_has_one_request_over_the_limit(tiny_model, tmp_path):
    """Failing the request resumed MAX_RESUMES times finds its client gone, which ends the client's other request:
    the other clients' requests are still resumed, none is left running under the dead worker's id."""

    async def body():
        c = make(tiny_model, tmp_path, resume_timeout_s=10.0)
        try:
            engine = engine_peer(c)
            await asyncio.sleep(0.3)
            heartbeat(c)
            a = add(c, b"gone", "a")
            add(c, b"gone", "b")
            other = add(c, b"other", "c")
            a.resumes = service.MAX_RESUMES
            c.dispatch()
            assert c.table.num_running == 3
            error = None
            try:  # _receive would log it and go on, with the table half resumed
                heartbeat(c, pid=2, version=0)  # the worker restarted
            except KeyError as e:
                error = e
            assert c.table.num_running == 0, "a stream left 'running' under an id the dead worker had"
            assert error is None
            assert c.table.find(b"other", "c") is other and c.table.num_waiting == 1
            engine.close()
        finally:
            c.close()

    run(body())


def test_a_resume_timeout_shorter_than_the_hold_after_a_host_loss_fails_requests_that_were_fine(tiny_model, tmp_path):
    """resume_timeout_s below heartbeat_timeout_s + heartbeat_interval_s: after a host's failure the system stays
    ready, and the timeout, which counts only while the system is not ready, fails nothing."""

    async def body():
        c = make(tiny_model, tmp_path, resume_timeout_s=0.5)
        try:
            engine = engine_peer(c)
            await asyncio.sleep(0.3)
            heartbeat(c)
            a, b = add(c, b"gone-a", "a"), add(c, b"gone-b", "b")
            c.dispatch()
            ga = decode(engine.recv_multipart())
            decode(engine.recv_multipart())
            c.on_engine(b"gpu-worker", encode(EngineError(request_id=ga.request_id, code="expert_host_unavailable",
                                                          message="x")))
            heartbeat(c)
            c.tick(time.monotonic() + 0.6)
            assert c.table.find(b"gone-b", "b") is b and c.table.is_running(b), "b ran fine and was failed"
            assert c.table.find(b"gone-a", "a") is a, "a waits for the hold, not failed"
            engine.close()
        finally:
            c.close()

    run(body())


def test_fail_all_at_the_resume_timeout_cancels_what_a_live_worker_still_holds(tiny_model, tmp_path):
    """A host lost, no successor within resume_timeout_s: the requests the live worker still holds (e.g. queued
    behind the failed step) fail with an EngineCancel, so that the worker does not run them for nobody."""

    async def body():
        c = make(tiny_model, tmp_path, resume_timeout_s=2.0, expert_hosts=1, hot_experts=4)
        try:
            engine = engine_peer(c)
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            for member, role in (("gpu-worker", "gpu_worker"), ("expert-host-0", "expert_host")):
                c.membership.heartbeat(Heartbeat(member_id=member, role=role, pid=1, metrics_port=0,
                                                 placement_version=c.placement.version, model=c.membership.model), t0)
            c.update_ready()
            assert c.ready
            add(c, b"gone-a", "a")
            add(c, b"gone-b", "b")
            c.dispatch()
            ga, gb = decode(engine.recv_multipart()), decode(engine.recv_multipart())
            c.on_engine(b"gpu-worker", encode(EngineError(request_id=ga.request_id, code="expert_host_unavailable",
                                                          message="x")))
            for dt in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):  # the worker heartbeats on, the host is silent
                c.membership.heartbeat(Heartbeat(member_id="gpu-worker", role="gpu_worker", pid=1, metrics_port=0,
                                                 placement_version=c.placement.version, model=c.membership.model),
                                       t0 + dt)
                c.tick(t0 + dt)
            assert len(c.table) == 0
            cancels = []
            while engine.poll(200):
                cancels.append(decode(engine.recv_multipart()))
            assert [m.request_id for m in cancels] == [gb.request_id], "b stays in the live worker"
            engine.close()
        finally:
            c.close()

    run(body())


def test_a_stopping_workers_refusal_waits_for_its_successor_without_counting_as_a_resume(tiny_model, tmp_path):
    async def body():
        c = make(tiny_model, tmp_path, resume_timeout_s=10.0)
        try:
            engine = engine_peer(c)
            await asyncio.sleep(0.3)
            heartbeat(c)
            a = add(c, b"client", "a")
            c.dispatch()
            sent = decode(engine.recv_multipart())
            c.on_engine(b"gpu-worker", encode(EngineError(request_id=sent.request_id, code="shutting_down",
                                                          message="the worker is shutting down")))
            assert c.table.find(b"client", "a") is a and c.table.num_waiting == 1 and a.resumes == 0
            now = time.monotonic()
            c.tick(now)  # held: the stopping worker would refuse it again at once
            assert not engine.poll(200)
            heartbeat(c, pid=2, version=0)  # its successor joins ...
            heartbeat(c, pid=2)  # ... and holds the placement
            assert c.ready and not engine.poll(200)  # still held
            await asyncio.sleep(c.config.heartbeat_timeout_s + c.config.heartbeat_interval_s)
            heartbeat(c, pid=2)
            again = decode(engine.recv_multipart())
            assert again.prompt_token_ids == [5, 6] and again.request_id != sent.request_id
            engine.close()
        finally:
            c.close()

    run(body())


def test_a_drain_fails_at_once_the_requests_waiting_for_a_lost_worker(tiny_model, tmp_path):
    async def body():
        c = make(tiny_model, tmp_path, resume_timeout_s=60.0)
        try:
            engine = engine_peer(c)
            await asyncio.sleep(0.3)
            heartbeat(c)
            add(c, b"client", "a")
            c.dispatch()
            decode(engine.recv_multipart())
            now = time.monotonic()
            c.tick(now + 1.5)  # the worker is taken for gone
            assert c.table.num_waiting == 1
            c.begin_drain()
            c.tick(now + 1.6)
            assert len(c.table) == 0 and c.done.is_set()
            engine.close()
        finally:
            c.close()

    run(body())


def test_with_resuming_off_a_hosts_failure_ends_the_request_and_holds_nothing_back(tiny_model, tmp_path):
    async def body():
        c = make(tiny_model, tmp_path, resume_timeout_s=0.0)
        try:
            engine = engine_peer(c)
            await asyncio.sleep(0.3)
            heartbeat(c)
            add(c, b"client", "a")
            c.dispatch()
            sent = decode(engine.recv_multipart())
            c.on_engine(b"gpu-worker", encode(EngineError(request_id=sent.request_id, code="expert_host_unavailable",
                                                          message="x")))
            assert len(c.table) == 0
            add(c, b"client", "b")
            c.dispatch()
            assert decode(engine.recv_multipart()).prompt_token_ids == [5, 6]
            engine.close()
        finally:
            c.close()

    run(body())
