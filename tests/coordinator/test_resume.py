"""Resuming requests after a lost process, at the edges: clients gone meanwhile, timeouts against the hold after a
host's failure, a worker still alive, refusals by a stopping worker, a drain. The coordinator runs in-process with
its real sockets, driven by hand: heartbeats, engine messages and ticks at chosen times."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq

from coordinator import service
from coordinator.service import Coordinator
from coordinator.streams import RequestStream
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.launcher import free_tcp_port
from shared.protocol import EngineError, EngineGenerate, EngineStarted, Generate, Heartbeat, decode, encode


def heartbeat(c: Coordinator, member: str = "gpu-worker", pid: int = 1, version: int | None = None,
              now: float | None = None) -> None:
    role = "gpu_worker" if member == "gpu-worker" else "expert_host"
    hb = Heartbeat(member_id=member, role=role, incarnation=f"pid-{pid}", pid=pid, host="localhost", metrics_port=0,
                   placement_version=c.placement.version if version is None else version, model=c.membership.model)
    if now is None:
        c.on_control(member.encode(), encode(hb), time.monotonic())
    else:  # at a chosen time, without the welcome's reply
        c.membership.heartbeat(hb, now)
        c.update_ready()


@contextlib.asynccontextmanager
async def ready_worker(tiny_model: Path, tmp_path: Path, **settings) -> AsyncIterator[tuple[Coordinator, zmq.Socket]]:
    """A coordinator whose worker (its engine socket here) has joined; by default no expert hosts."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    config = Config(model=str(tiny_model), run_dir=str(run_dir), client_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}",
                    metrics_port=0, **{"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.0, "expert_hosts": 0,
                                       "hot_experts": 8, **settings})
    c = Coordinator(config, GGUFModel(config.model))
    engine = zmq.Context.instance().socket(zmq.DEALER)
    engine.setsockopt(zmq.ROUTING_ID, b"gpu-worker")
    engine.setsockopt(zmq.LINGER, 0)
    engine.setsockopt(zmq.RCVTIMEO, 2000)
    engine.connect(c.config.engine_endpoint)
    try:
        await asyncio.sleep(0.3)  # connected
        heartbeat(c)
        yield c, engine
    finally:
        engine.close()
        c.close()


def add(c: Coordinator, client: bytes, rid: str) -> RequestStream:
    stream = RequestStream(c.table.next_id(), client, Generate(request_id=rid, token_ids=[5, 6], max_tokens=8),
                           [5, 6], c.tokenizer.detokenizer(), c.stop_token_ids, time.monotonic())
    c.table.add(stream)
    return stream


def sent(c: Coordinator, engine: zmq.Socket, *requests: tuple[bytes, str]) -> list[EngineGenerate]:
    """Requests admitted and dispatched: what the engine received."""
    for client, rid in requests:
        add(c, client, rid)
    c.dispatch()
    return [decode(engine.recv_multipart()) for _ in requests]


def host_failed(c: Coordinator, request: EngineGenerate, code: str = "expert_host_unavailable",
                member_id: str = "") -> None:
    c.on_engine(b"gpu-worker", encode(EngineError(request_id=request.request_id, code=code, message="x",
                                                  member_id=member_id)), time.monotonic())


def test_resume_timeout_with_a_gone_client_of_two_requests_does_not_raise(tiny_model, tmp_path):
    """At the resume timeout the first failure's send finds the client gone, which ends its other request: failing
    every request must not then end that one again (a KeyError out of the tick would stop the ticks for good)."""
    async def body():
        async with ready_worker(tiny_model, tmp_path, resume_timeout_s=1.0) as (c, engine):
            sent(c, engine, (b"gone", "a"), (b"gone", "b"))
            now = time.monotonic()
            c.tick(now + 1.5)  # the worker is taken for gone: both wait for a successor
            assert c.table.num_waiting == 2 and c.lost_at is not None
            c.tick(now + 3.0)  # none came within resume_timeout_s
            assert len(c.table) == 0

    asyncio.run(body())


def test_a_worker_loss_with_a_gone_client_that_has_one_request_over_the_limit(tiny_model, tmp_path):
    """Failing the request resumed MAX_RESUMES times finds its client gone, which ends the client's other request:
    the other clients' requests are still resumed, none is left running under the dead worker's id."""
    async def body():
        async with ready_worker(tiny_model, tmp_path, resume_timeout_s=10.0) as (c, engine):
            sent(c, engine, (b"gone", "a"), (b"gone", "b"), (b"other", "c"))
            a = c.table.find(b"gone", "a")
            a.resumes, a.engine_started = service.MAX_RESUMES, True
            heartbeat(c, pid=2, version=0)  # the worker restarted
            assert c.table.num_running == 0, "a stream left 'running' under an id the dead worker had"
            assert c.table.find(b"other", "c") is not None and c.table.num_waiting == 1

    asyncio.run(body())


def test_a_resume_timeout_shorter_than_the_hold_after_a_host_loss_fails_requests_that_were_fine(tiny_model, tmp_path):
    """resume_timeout_s below heartbeat_timeout_s + heartbeat_interval_s: after a host's failure the system stays
    ready, and the timeout, which counts only while the system is not ready, fails nothing."""
    async def body():
        async with ready_worker(tiny_model, tmp_path, resume_timeout_s=0.5) as (c, engine):
            a, _ = sent(c, engine, (b"gone-a", "a"), (b"gone-b", "b"))
            host_failed(c, a)
            heartbeat(c)
            c.tick(time.monotonic() + 0.6)
            b = c.table.find(b"gone-b", "b")
            assert b is not None and c.table.is_running(b), "b ran fine and was failed"
            assert c.table.find(b"gone-a", "a") is not None, "a waits for the hold, not failed"

    asyncio.run(body())


def test_fail_all_at_the_resume_timeout_cancels_what_a_live_worker_still_holds(tiny_model, tmp_path):
    """A host lost, no successor within resume_timeout_s: the requests the live worker still holds (e.g. queued
    behind the failed step) fail with an EngineCancel, so that the worker does not run them for nobody."""
    async def body():
        async with ready_worker(tiny_model, tmp_path, resume_timeout_s=2.0, expert_hosts=1, hot_experts=4) as (
                c, engine):
            t0 = time.monotonic()
            heartbeat(c, "expert-host-0", now=t0)
            heartbeat(c, now=t0)
            assert c.ready
            a, b = sent(c, engine, (b"gone-a", "a"), (b"gone-b", "b"))
            host_failed(c, a)
            for i in range(1, 31):  # ticks as the coordinator's; the worker heartbeats on, the host is silent
                if i % 5 == 0:
                    heartbeat(c, now=t0 + i * service.TICK_S)
                c.tick(t0 + i * service.TICK_S)
            assert len(c.table) == 0
            cancels = []
            while engine.poll(200):
                cancels.append(decode(engine.recv_multipart()))
            assert [m.request_id for m in cancels] == [b.request_id], "b stays in the live worker"

    asyncio.run(body())


@pytest.mark.parametrize("code, started", [("shutting_down", False), ("unavailable", True)])
def test_requests_a_stopping_worker_ends_wait_for_its_successor(tiny_model, tmp_path, code, started):
    """Refused as it stops (shutting_down), a request had not started and is not counted as resumed; ended because
    the stop outlasted drain_timeout_s (unavailable), it had started and is. Either waits until the worker's
    successor holds the placement, not until the heartbeat timeout, and not for the stopping worker's next
    heartbeat."""
    async def body():
        async with ready_worker(tiny_model, tmp_path, resume_timeout_s=10.0, heartbeat_timeout_s=30.0) as (c, engine):
            (first,) = sent(c, engine, (b"client", "a"))
            if started:
                c.on_engine(b"gpu-worker", encode(EngineStarted(request_id=first.request_id)), time.monotonic())
            host_failed(c, first, code=code, member_id="gpu-worker")
            a = c.table.find(b"client", "a")
            assert a is not None and c.table.num_waiting == 1 and a.resumes == int(started)
            heartbeat(c)  # the stopping worker, still heartbeating: it would refuse the request again at once
            c.tick(time.monotonic())
            assert not engine.poll(200)
            heartbeat(c, pid=2, version=0)  # its successor joins ...
            assert not engine.poll(200)
            heartbeat(c, pid=2)  # ... and holds the placement
            again = decode(engine.recv_multipart())
            assert again.prompt_token_ids == [5, 6] and again.request_id != first.request_id

    asyncio.run(body())


def test_a_drain_fails_at_once_the_requests_waiting_for_a_lost_worker(tiny_model, tmp_path):
    async def body():
        async with ready_worker(tiny_model, tmp_path, resume_timeout_s=60.0) as (c, engine):
            sent(c, engine, (b"client", "a"))
            now = time.monotonic()
            c.tick(now + 1.5)  # the worker is taken for gone
            assert c.table.num_waiting == 1
            c.begin_drain()
            c.tick(now + 1.6)
            assert len(c.table) == 0 and c.done.is_set()

    asyncio.run(body())


def test_with_resuming_off_a_hosts_failure_ends_the_request_and_holds_nothing_back(tiny_model, tmp_path):
    async def body():
        async with ready_worker(tiny_model, tmp_path, resume_timeout_s=0.0) as (c, engine):
            (first,) = sent(c, engine, (b"client", "a"))
            host_failed(c, first)
            assert len(c.table) == 0
            (second,) = sent(c, engine, (b"client", "b"))
            assert second.prompt_token_ids == [5, 6]

    asyncio.run(body())


def lose_the_host(c: Coordinator, start: float, until: float) -> None:
    """Ticks from `start` to `until`, 0.1 s apart, in which the worker heartbeats and expert host 0 does not."""
    for k in range(1, round((until - start) * 10) + 1):
        heartbeat(c, now=start + k * 0.1)
        c.tick(start + k * 0.1)


@pytest.mark.parametrize("resume_timeout_s", [0.0, 5.0])
def test_a_request_queued_here_when_a_host_is_lost_waits_no_longer_than_the_resume_timeout(tiny_model, tmp_path,
                                                                                          resume_timeout_s):
    """Nothing but the worker's report of a running request's failure started the resume timeout after a host's
    loss: with those requests cancelled by their client, or failed at once (resume_timeout_s 0), one queued behind
    them waited for good, the server not ready and no error sent."""
    async def body():
        async with ready_worker(tiny_model, tmp_path, expert_hosts=1, hot_experts=2, max_running=2,
                                resume_timeout_s=resume_timeout_s) as (c, engine):
            heartbeat(c, "expert-host-0")
            assert c.ready
            sent(c, engine, (b"x", "a"), (b"x", "b"))
            queued = add(c, b"y", "c")
            c.dispatch()
            start = time.monotonic()
            lose_the_host(c, start, start + 1.5)  # found lost after heartbeat_timeout_s (1 s)
            assert not c.ready
            c.cancel(b"x", "a", start + 1.5)  # its answer finds the client gone, which ends "b" too
            assert not c.table.running_streams()
            if resume_timeout_s:
                lose_the_host(c, start + 1.5, start + 5.5)
                assert c.table.get(queued.internal_id) is queued, "it waits for the host's successor"
                lose_the_host(c, start + 5.5, start + 7.0)
            assert c.table.get(queued.internal_id) is None and len(c.table) == 0

    asyncio.run(body())
