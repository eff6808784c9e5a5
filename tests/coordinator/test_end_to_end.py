"""The coordinator's contract with clients and the engine, through the whole system (`tierserve up`): queueing in
order with a bounded queue, cancellation, duplicate ids, and a worker or coordinator that dies mid-stream, checked
against the oracle's tokens.
(Bad input, clients that vanish mid-stream and bursts of requests are in tests/test_bad_input.py.)"""

from __future__ import annotations

import os
import signal
import time

import pytest
import zmq

from shared.client import Client, ServerError
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.protocol import Cancel, FinalEvent, Generate, decode, encode
from shared.reference import ReferenceModel

MAX_RUNNING, MAX_WAITING = 4, 100
HEARTBEAT_TIMEOUT_S = 2
PROMPT = [11, 22, 33, 44]


@pytest.fixture(scope="module")
def system(tiny_model):
    with RunningSystem(str(tiny_model), "--expert-hosts", "1", "--hot-experts", "4", "--max-running",
                       str(MAX_RUNNING), "--max-waiting", str(MAX_WAITING), "--heartbeat-timeout-s",
                       str(HEARTBEAT_TIMEOUT_S)) as s:
        yield s


@pytest.fixture(scope="module")
def oracle(tiny_model) -> ReferenceModel:
    return ReferenceModel(GGUFModel(tiny_model))


@pytest.fixture
def client(system):
    with Client(system.endpoint, timeout_s=30) as c:
        yield c


def wait_until_idle(client: Client, timeout_s: float = 10.0) -> dict:
    """Stats once the coordinator holds nothing and the worker has reported an empty KV cache."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats().stats
        worker = stats["members"].get("gpu-worker", {})
        if stats["running"] == stats["waiting"] == 0 and worker.get("running") == 0 and worker.get("kv_used") == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy: {stats}")
        time.sleep(0.1)


def test_requests_wait_their_turn_and_the_queue_has_a_limit(system, oracle):
    """Raw socket, so the arrival order of every event is seen: request i starts (first token) only after at
    least i - MAX_RUNNING + 1 requests have finished; past MAX_WAITING queued, requests are refused."""
    n = MAX_RUNNING + MAX_WAITING + 40
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 30_000)
    socket.connect(system.endpoint)
    try:
        for i in range(n):
            socket.send_multipart(encode(Generate(request_id=str(i), token_ids=PROMPT, max_tokens=16)))
        finished, refused, first_token_after = 0, set(), {}
        tokens: dict[int, list[int]] = {}
        while finished + len(refused) < n:
            event = decode(socket.recv_multipart())
            i = int(event.request_id)
            if event.KIND == "error":
                assert event.code == "overloaded", event
                refused.add(i)
            elif event.KIND == "token":
                first_token_after.setdefault(i, finished)
                tokens.setdefault(i, []).append(event.token_id)
            else:
                finished += 1
    finally:
        socket.close()
    expected = oracle.greedy(PROMPT, 16)
    served = sorted(tokens)
    assert all(tokens[i] == expected for i in served)
    assert set(range(MAX_RUNNING + MAX_WAITING)) <= set(served)  # these can never find the queue full
    assert refused and min(refused) >= MAX_RUNNING + MAX_WAITING
    for i in served:
        assert first_token_after[i] >= i - MAX_RUNNING + 1 - len({r for r in refused if r < i}), i


def test_cancel_ends_running_and_waiting_requests(client, oracle):
    running = [client.generate(token_ids=PROMPT, max_tokens=400) for _ in range(MAX_RUNNING)]
    waiting = client.generate(token_ids=PROMPT, max_tokens=400)
    first = next(running[0])
    assert first.token_id == oracle.greedy(PROMPT, 1)[0]
    client.cancel(waiting.request_id)
    (final,) = list(waiting)
    assert final.finish_reason == "cancelled" and final.completion_tokens == 0
    client.cancel(running[0].request_id)
    rest = list(running[0])
    assert isinstance(rest[-1], FinalEvent) and rest[-1].finish_reason == "cancelled"
    assert rest[-1].completion_tokens == len(rest)  # the first token and those that came before the cancel
    for stream in running[1:]:
        stream.close()
    stats = wait_until_idle(client)
    assert stats["requests"]["cancelled"] >= MAX_RUNNING + 1


def test_a_duplicate_request_id_is_refused_while_the_first_is_in_flight(system, client):
    """By the server, to a raw socket (the Python clients refuse it before sending), and the first goes on."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 30_000)
    socket.connect(system.endpoint)
    try:
        socket.send_multipart(encode(Generate(request_id="same", token_ids=PROMPT, max_tokens=200)))
        assert decode(socket.recv_multipart()).KIND == "token"
        socket.send_multipart(encode(Generate(request_id="same", token_ids=PROMPT, max_tokens=2)))
        while (event := decode(socket.recv_multipart())).KIND == "token":
            pass
        assert (event.KIND, event.code, event.request_id) == ("error", "duplicate_request", "same")
        socket.send_multipart(encode(Cancel(request_id="same")))
        while (event := decode(socket.recv_multipart())).KIND == "token":
            pass
        assert (event.KIND, event.finish_reason) == ("final", "cancelled")
    finally:
        socket.close()
    first = client.generate(request_id="same", token_ids=PROMPT, max_tokens=200)
    next(first)
    with pytest.raises(ValueError, match="already in flight"):
        client.generate(request_id="same", token_ids=PROMPT, max_tokens=2)
    assert next(first).KIND == "token"
    first.close()
    wait_until_idle(client)


def test_requests_in_flight_when_the_worker_dies_continue_on_its_successor_as_if_it_had_not(client, oracle):
    """Killed mid-stream, the worker is restarted; the requests it held resume there from the tokens they had
    streamed: greedy ones give the oracle's tokens, seeded samples the tokens of the same request run whole."""
    sampled = dict(temperature=0.9, top_k=20, seed=5)
    worker = next(m for m in client.health().members if m["member_id"] == "gpu-worker")
    greedy = client.generate(token_ids=PROMPT, max_tokens=200)
    seeded = client.generate(token_ids=PROMPT, max_tokens=200, **sampled)
    heads = [next(greedy), next(seeded)]
    os.kill(worker["pid"], signal.SIGKILL)
    greedy_ids = [heads[0].token_id] + [e.token_id for e in list(greedy)[:-1]]
    seeded_ids = [heads[1].token_id] + [e.token_id for e in list(seeded)[:-1]]
    stats = client.stats().stats
    assert stats["resumed"] >= 2, "the worker was killed after the requests had ended: nothing was resumed"
    assert greedy_ids == oracle.greedy(PROMPT, 200)
    assert seeded_ids == client.complete(token_ids=PROMPT, max_tokens=200, **sampled).token_ids
    assert len(set(seeded_ids)) > 10


def test_a_coordinator_stopped_past_the_heartbeat_timeout_finds_every_member_alive_and_resumes_nothing(
        client, oracle):
    """Stopped (SIGSTOP, a frozen container) for longer than heartbeat_timeout_s: on SIGCONT its first tick took
    every member for lost before reading the heartbeats waiting in its socket, and resumed the request in flight
    (failed it, with resuming off)."""
    coordinator = next(m for m in client.health().members if m["member_id"] == "coordinator")
    before = client.stats().stats
    stream = client.generate(token_ids=PROMPT, max_tokens=400)
    head = next(stream)
    os.kill(coordinator["pid"], signal.SIGSTOP)
    try:
        time.sleep(HEARTBEAT_TIMEOUT_S + 3)
    finally:
        os.kill(coordinator["pid"], signal.SIGCONT)
    tokens = [head.token_id] + [e.token_id for e in list(stream)[:-1]]
    assert tokens == oracle.greedy(PROMPT, 400)
    after = client.stats().stats
    assert after["resumed"] == before["resumed"] and after["requests"]["error"] == before["requests"]["error"]


def test_a_coordinator_killed_mid_stream_ends_its_streams_and_the_same_client_goes_on_with_its_successor(
        client, oracle):
    """The client's connection drops with the coordinator: its stream in flight ends with connection_lost instead of
    waiting out its timeout, and the client, reconnected to the launcher's new coordinator, is served again (the
    drop it noticed does not end the requests sent after it)."""
    coordinator = next(m for m in client.health().members if m["member_id"] == "coordinator")
    stream = client.generate(token_ids=PROMPT, max_tokens=400)
    next(stream)
    os.kill(coordinator["pid"], signal.SIGKILL)
    with pytest.raises(ServerError) as info:
        list(stream)
    assert info.value.code == "connection_lost"
    deadline = time.monotonic() + 60
    while client.health().status != "ready":
        assert time.monotonic() < deadline, "the restarted coordinator never made the system ready"
        time.sleep(0.2)
    assert client.complete(token_ids=PROMPT, max_tokens=6).token_ids == oracle.greedy(PROMPT, 6)
    wait_until_idle(client)  # the old coordinator's request, unknown to the new one, was cancelled in the engine


def test_a_drain_that_runs_out_of_time_cancels_what_is_left_and_exits_cleanly(tiny_model):
    system = RunningSystem(str(tiny_model), "--expert-hosts", "0", "--hot-experts", "8", "--drain-timeout-s", "0.1")
    with Client(system.endpoint, timeout_s=30) as client:
        stream = client.generate(token_ids=PROMPT, max_tokens=400)
        next(stream)
        system.process.send_signal(signal.SIGTERM)
        rest = list(stream)
    # Left alone it would end with "length" after 400 tokens (~0.8 s here); the drain gave up after 0.1 s.
    assert rest[-1].finish_reason == "cancelled" and 1 < rest[-1].completion_tokens < 400
    assert system.stop() == 0


def test_with_max_waiting_0_requests_that_find_room_in_the_engine_run_and_only_the_rest_are_refused(tiny_model, oracle):
    """No queue: a request the engine has room for runs at once; only one that would have to wait is refused."""
    with RunningSystem(str(tiny_model), "--expert-hosts", "0", "--hot-experts", "8", "--max-running", "1",
                       "--max-waiting", "0") as system, Client(system.endpoint, timeout_s=30) as client:
        assert client.complete(token_ids=PROMPT, max_tokens=4).token_ids == oracle.greedy(PROMPT, 4)
        running = client.generate(token_ids=PROMPT, max_tokens=400)
        next(running)
        with pytest.raises(ServerError) as info:
            client.complete(token_ids=PROMPT, max_tokens=4)
        assert info.value.code == "overloaded"
        running.close()
        stats = wait_until_idle(client)
        assert stats["requests"] == {"completed": 1, "cancelled": 1, "error": 0, "rejected": 1}
