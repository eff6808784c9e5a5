"""The coordinator process alone (`python -m coordinator --config F`, no worker), over its real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from shared.client import AsyncClient, Client, ServerError, run
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.launcher import free_tcp_port
from shared.protocol import (
    Cancel,
    EngineCancel,
    EngineError,
    EngineGenerate,
    EngineStarted,
    EngineToken,
    ErrorEvent,
    FinalEvent,
    Generate,
    Heartbeat,
    Superseded,
    TokenEvent,
    Welcome,
    decode,
    encode,
)
from shared.tokenizer import Tokenizer
from tests.test_tokenizer import byte_level_metadata, sentencepiece_metadata, write_gguf

MAX_REQUEST_BYTES = 65536


class Coordinator:
    def __init__(self, model: Path, tmp_path: Path, **settings) -> None:
        self.config = Config(model=str(model), run_dir=str(tmp_path / "run"), metrics_port=0,
                             **{"client_endpoint": f"tcp://127.0.0.1:{free_tcp_port()}", "heartbeat_interval_s": 0.1,
                                "heartbeat_timeout_s": 1.0, "max_request_bytes": MAX_REQUEST_BYTES, **settings})
        path = tmp_path / "config.toml"
        path.write_text(self.config.to_toml())
        self.log = tmp_path / "coordinator.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "coordinator", "--config", str(path)],
                                            stdout=log, stderr=subprocess.STDOUT)
        self.client = Client(self.config.client_endpoint, timeout_s=0.5)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.health()
                break
            except TimeoutError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"coordinator did not answer:\n{self.log.read_text()}") from None
        self.client.timeout_s = 5.0

    def stop(self) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture(scope="module")
def coordinator(tiny_model, tmp_path_factory):
    c = Coordinator(tiny_model, tmp_path_factory.mktemp("alone"))
    yield c
    c.stop()


def raw_client(coordinator: Coordinator, timeout_ms: int) -> zmq.Socket:
    """A client socket of its own, to send frames the Python client would not (or without waiting for replies)."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
    socket.connect(coordinator.config.client_endpoint)
    return socket


@pytest.fixture
def raw(coordinator):
    socket = raw_client(coordinator, 5000)
    yield socket
    socket.close()


def test_health_is_starting_and_lists_the_coordinator_with_its_metrics(coordinator):
    health = coordinator.client.health()
    assert health.status == "starting"
    assert [m["member_id"] for m in health.members] == ["coordinator"]
    me = health.members[0]
    assert me["pid"] == coordinator.process.pid and me["alive"] and me["placement_version"] >= 1
    with urllib.request.urlopen(f"http://127.0.0.1:{me['metrics_port']}/metrics", timeout=5) as r:
        text = r.read().decode()
    for name in ("tierserve_requests_total", "tierserve_generated_tokens_total", "tierserve_prompt_tokens_total",
                 "tierserve_time_to_first_token_seconds", "tierserve_inter_token_latency_seconds",
                 "tierserve_running_requests", "tierserve_waiting_requests", "process_resident_memory_bytes"):
        assert name in text, name


def test_generate_without_a_worker_is_unavailable(coordinator):
    before = coordinator.client.stats().stats["requests"]["rejected"]
    with pytest.raises(ServerError) as info:
        coordinator.client.complete(request_id="early", prompt="hello", max_tokens=4)
    assert (info.value.code, info.value.request_id) == ("unavailable", "early")
    assert "gpu-worker has not joined" in info.value.message
    stats = coordinator.client.stats().stats
    assert stats["requests"]["rejected"] == before + 1
    assert (stats["status"], stats["running"], stats["waiting"]) == ("starting", 0, 0)
    placement = stats["placement"]
    assert (placement["hot_experts"], placement["hosts"]) == (0, ["expert-host-0", "expert-host-1"])
    assert placement["version"] == coordinator.client.health().members[0]["placement_version"]


def test_a_request_with_a_bad_value_is_refused_for_it_even_while_the_server_is_not_ready(coordinator):
    """The server's state was checked before the request's values: a max_tokens of 0 was refused as `unavailable`
    (and would have been as `overloaded`), which a client retries, to be refused again once the server is ready."""
    with pytest.raises(ServerError) as info:
        coordinator.client.complete(request_id="zero", prompt="hello", max_tokens=0)
    assert (info.value.code, info.value.request_id) == ("invalid_request", "zero")
    assert "max_tokens must be at least 1" in info.value.message


@pytest.mark.parametrize(
    ("frames", "code", "request_id"),
    [
        # 0xc1 is the one byte msgpack never uses: random bytes alone sometimes decoded (0x9c: an array of 12)
        ([b"\xc1" + os.urandom(63)], "malformed", None),
        ([b"\xff\xfe\xfd"], "malformed", None),
        ([msgpack.packb("just a string")], "malformed", None),
        ([msgpack.packb({"v": 1, "kind": "teleport", "request_id": "t1"})], "unknown_kind", "t1"),
        ([msgpack.packb({"v": 1, "kind": "generate"})], "missing_field", None),
        ([msgpack.packb({"v": 1, "kind": "generate", "request_id": "t2", "temperature": "hot"})], "bad_field", "t2"),
        ([msgpack.packb({"v": 1, "kind": "generate", "request_id": "t3", "prompt": "x" * MAX_REQUEST_BYTES})],
         "too_large", "t3"),
        (encode(Welcome(placement={})), "unexpected_kind", None),
        ([msgpack.packb({"v": 1, "kind": "cancel", "request_id": "nobody"})], "unknown_request", "nobody"),
    ],
)
def test_bad_frames_each_get_an_error_event_and_the_server_goes_on(coordinator, raw, frames, code, request_id):
    raw.send_multipart(frames)
    reply = decode(raw.recv_multipart())
    assert isinstance(reply, ErrorEvent)
    assert (reply.code, reply.request_id) == (code, request_id)
    assert reply.message
    assert coordinator.client.health().status == "starting"


def worker_socket(routing_id: bytes | None = None) -> zmq.Socket:
    """A DEALER as the worker's are: its engine socket has the worker's identity, its control socket none."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    if routing_id is not None:
        socket.setsockopt(zmq.ROUTING_ID, routing_id)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    return socket


def engine_socket() -> zmq.Socket:
    return worker_socket(b"gpu-worker")


def join_as_worker(coordinator: Coordinator, member: zmq.Socket) -> tuple[Heartbeat, Welcome]:
    """Heartbeat as a joining worker, take the welcome, heartbeat at its placement and wait until ready."""
    member.connect(coordinator.config.control_endpoint)
    hb = Heartbeat(member_id="gpu-worker", role="gpu_worker", incarnation="first", pid=4242, host="node-a",
                   metrics_port=1234, placement_version=0, model=GGUFModel(coordinator.config.model).identity)
    return hb, welcomed(coordinator, member, hb)


def welcomed(coordinator: Coordinator, member: zmq.Socket, hb: Heartbeat) -> Welcome:
    """Heartbeat without a placement, take the welcome, heartbeat at its placement and wait until ready."""
    member.send_multipart(encode(hb))
    welcome = decode(member.recv_multipart())
    assert isinstance(welcome, Welcome)
    hb.placement_version = welcome.placement["version"]
    member.send_multipart(encode(hb))
    deadline = time.monotonic() + 5
    while coordinator.client.health().status != "ready":
        assert time.monotonic() < deadline, "the worker did not make the system ready"
        time.sleep(0.05)
    return welcome


def test_a_joining_worker_is_welcomed_makes_the_system_ready_and_is_lost_when_silent(tiny_model, tmp_path):
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8, resume_timeout_s=1.0)
    member = worker_socket()
    try:
        _, welcome = join_as_worker(coordinator, member)
        version = welcome.placement["version"]
        assert welcome.placement["hosts"] == []
        assert welcome.placement["owner"] == [[-1] * 8] * 4  # every expert on the worker
        health = coordinator.client.health()
        assert health.status == "ready"
        worker = next(m for m in health.members if m["member_id"] == "gpu-worker")
        assert (worker["pid"], worker["metrics_port"], worker["alive"], worker["placement_version"]) == (
            4242, 1234, True, version)
        # Ready, but nothing is connected to the engine socket: the request waits for the engine connection,
        # then for a successor of the silent worker once it is taken for gone, and fails, not lost, when none
        # comes within resume_timeout_s.
        with pytest.raises(ServerError) as info:
            coordinator.client.complete(prompt="hello", max_tokens=2)
        assert info.value.code == "unavailable"
        assert "stopped responding, and the system was not ready again within 1 s" in info.value.message
        health = coordinator.client.health()
        assert health.status == "starting"
        assert not next(m for m in health.members if m["member_id"] == "gpu-worker")["alive"]
    finally:
        member.close()
        assert coordinator.stop() == 0
    log = coordinator.log.read_text()
    for line in ("gpu-worker joined", f"ready: placement v{version}", "gpu-worker lost", "draining", "stopped"):
        assert line in log, line


def test_a_request_waits_for_the_engine_connection_of_a_live_worker(tiny_model, tmp_path):
    """A worker's heartbeats can reach a restarted coordinator before its engine socket reconnects: a request
    sent then goes to the engine once that connection is there, instead of failing."""
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8)
    member, engine = worker_socket(), engine_socket()
    try:
        hb, _ = join_as_worker(coordinator, member)
        stream = coordinator.client.generate(request_id="late", prompt="hello", max_tokens=2)
        for _ in range(10):  # heartbeats for a second, the engine socket not yet connected
            member.send_multipart(encode(hb))
            time.sleep(0.1)
        engine.connect(coordinator.config.engine_endpoint)
        member.send_multipart(encode(hb))
        request = decode(engine.recv_multipart())
        assert isinstance(request, EngineGenerate) and request.max_tokens == 2
        stream.close()
        assert isinstance(decode(engine.recv_multipart()), EngineCancel)  # before the engine socket goes
    finally:
        member.close()
        engine.close()
        assert coordinator.stop() == 0
    # every tick retried the send: the log says so once, and once more when the worker is reached
    log = coordinator.log.read_text()
    assert log.count("cannot reach the gpu worker") == 1
    assert log.count("the gpu worker is reachable again") == 1


def test_a_worker_started_twice_is_served_by_the_later_and_the_first_is_told_to_stop(tiny_model, tmp_path):
    """Two processes under one member id: the one started later is the member, as a restarted one would be. The
    first heartbeated on, unheard and never told, for ever; now each of its heartbeats is answered that it must stop,
    naming the other, and counts for nothing."""
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8)
    first, second = worker_socket(), worker_socket()
    try:
        hb, _ = join_as_worker(coordinator, first)
        second.connect(coordinator.config.control_endpoint)
        later = dataclasses.replace(hb, incarnation="second", pid=4343, host="node-b", placement_version=0)
        welcomed(coordinator, second, later)
        for _ in range(2):
            first.send_multipart(encode(hb))
            assert decode(first.recv_multipart()) == Superseded(member_id="gpu-worker", pid=4343, host="node-b")
        members = {m["member_id"]: m for m in coordinator.client.health().members}
        worker = members["gpu-worker"]
        assert (worker["pid"], worker["host"], worker["incarnation"]) == (4343, "node-b", "second")
        coordinator_entry = members["coordinator"]
        assert coordinator_entry["host"] == socket.gethostname() and len(coordinator_entry["incarnation"]) == 16
    finally:
        first.close()
        second.close()
        assert coordinator.stop() == 0
    warnings = [line for line in coordinator.log.read_text().splitlines() if "started twice" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], warnings
    assert "gpu-worker was started twice: pid 4343 on node-b took it over from pid 4242 on node-a" in warnings[0]


def restart_as_worker(coordinator: Coordinator, member: zmq.Socket, hb: Heartbeat, pid: int) -> None:
    """Heartbeat as a new worker process under the same member id, take the welcome and wait until ready."""
    hb.incarnation, hb.pid, hb.placement_version = f"restarted as {pid}", pid, 0
    welcomed(coordinator, member, hb)


@contextlib.contextmanager
def joined_worker(coordinator: Coordinator) -> Iterator[tuple[zmq.Socket, zmq.Socket, Heartbeat]]:
    """A worker's control and engine sockets, joined and connected; the coordinator is stopped at the end."""
    member, engine = worker_socket(), engine_socket()
    try:
        hb, _ = join_as_worker(coordinator, member)
        engine.connect(coordinator.config.engine_endpoint)
        member.send_multipart(encode(hb))
        yield member, engine, hb
    finally:
        member.close()
        engine.close()
        coordinator.stop()


def token(request_id: str, token_id: int, finish_reason: str | None = None) -> list:
    return encode(EngineToken(request_id=request_id, token_id=token_id, logprob=-1.0, top_logprobs=[],
                              finish_reason=finish_reason))


def test_an_engine_message_that_trips_a_bug_ends_its_request_with_internal_error(tiny_model, tmp_path):
    """A token the coordinator cannot decode (an id past the vocabulary) raised out of its handler, which logged it
    and went on: the request's client was left waiting for ever. Now it is told, and the server serves on."""
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8)
    with joined_worker(coordinator) as (member, engine, hb):
        stream = coordinator.client.generate(request_id="bad", token_ids=[5], max_tokens=4)
        sent = decode(engine.recv_multipart())
        engine.send_multipart(token(sent.request_id, 10**6))
        with pytest.raises(ServerError) as info:
            next(stream)
        assert info.value.code == "internal_error" and "outside the vocabulary" in info.value.message
        cancel = decode(engine.recv_multipart())  # the worker is told to drop it
        assert isinstance(cancel, EngineCancel) and cancel.request_id == sent.request_id
        stream = coordinator.client.generate(request_id="good", token_ids=[5], max_tokens=1)
        sent = decode(engine.recv_multipart())
        engine.send_multipart(token(sent.request_id, 7, "length"))
        assert [e.KIND for e in stream] == ["token", "final"]


def test_tokens_stream_on_while_a_long_prompt_is_tokenized_and_a_cancel_after_a_request_still_applies(
        tiny_model, tmp_path):
    """A prompt of 1 MiB takes about half a second to tokenize: on the event loop it held up every stream, and a burst
    of such prompts stalled them all for seconds. Client messages are still taken one after another: a cancel sent
    right behind a long request ends it."""
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8, max_request_bytes=2 << 20)
    raw = raw_client(coordinator, 30_000)
    with joined_worker(coordinator) as (member, engine, hb):
        stream = coordinator.client.generate(request_id="running", token_ids=[5], max_tokens=4)
        running = decode(engine.recv_multipart())
        raw.send_multipart(encode(Generate(request_id="huge", prompt="a" * (1 << 20), max_tokens=1)))
        time.sleep(0.1)  # the coordinator is tokenizing it
        engine.send_multipart(token(running.request_id, 7))
        assert next(stream).token_id == 7
        assert not raw.poll(0), "the running stream's token waited for the long prompt's tokenizing"
        refusal = decode(raw.recv_multipart())
        assert (refusal.request_id, refusal.code) == ("huge", "context_exceeded")
        stream.close()

        long_stop = ["x" * (64 << 10)]  # a request this large is tokenized off the event loop too
        raw.send_multipart(encode(Generate(request_id="long", token_ids=[5], max_tokens=4, stop=long_stop)))
        raw.send_multipart(encode(Cancel(request_id="long")))
        final = decode(raw.recv_multipart())
        assert (final.KIND, final.request_id, final.finish_reason) == ("final", "long", "cancelled")
    raw.close()


def test_a_request_behind_a_long_prompt_counts_its_time_to_first_token_from_its_arrival(tiny_model, tmp_path):
    """A client's messages are handled one after another, so a request sent right behind a prompt of 1 MiB waits
    for its tokenizing. It was stamped as it was handled, after that wait: its time to first token (the final
    event's, and the histogram's) left the wait out."""
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8, max_request_bytes=2 << 20)
    raw = raw_client(coordinator, 30_000)
    with joined_worker(coordinator) as (member, engine, hb):
        raw.send_multipart(encode(Generate(request_id="huge", prompt="a" * (1 << 20), max_tokens=1)))
        raw.send_multipart(encode(Generate(request_id="small", token_ids=[5], max_tokens=1)))
        sent_at = time.monotonic()
        assert engine.poll(30_000)
        request = decode(engine.recv_multipart())
        waited = time.monotonic() - sent_at
        assert waited > 0.1, "the long prompt was tokenized too fast to hold the request up"
        engine.send_multipart(token(request.request_id, 7, "length"))
        events = {e.request_id: e for e in (decode(raw.recv_multipart()) for _ in range(3))}
    raw.close()
    assert events["huge"].code == "context_exceeded"
    assert events["small"].KIND == "final" and events["small"].ttft_s >= waited - 0.05  # read just after sent_at


def test_a_long_prompt_being_tokenized_when_a_drain_begins_is_answered_before_the_coordinator_stops(tiny_model,
                                                                                                    tmp_path):
    """A generate on its tokenizing thread was in no count of the drain's: with nothing else in flight, the drain
    ended at once and its sender never heard back. The drain now waits for it to be answered (here: too long for
    the context, found as it is tokenized), then the coordinator stops."""
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8, max_request_bytes=8 << 20)
    raw = raw_client(coordinator, 30_000)
    with joined_worker(coordinator):
        raw.send_multipart(encode(Generate(request_id="huge", prompt="a " * (2 << 20), max_tokens=1)))
        time.sleep(0.3)  # the coordinator is tokenizing it
        coordinator.process.send_signal(signal.SIGTERM)
        assert raw.poll(30_000), "no answer"
        refusal = decode(raw.recv_multipart())
        assert (refusal.KIND, refusal.request_id, refusal.code) == ("error", "huge", "context_exceeded")
        assert coordinator.process.wait(30) == 0
    raw.close()


def test_tokenizer_metadata_of_the_wrong_type_is_refused_by_name_at_start(tmp_path):
    """A model whose tokenizer.ggml.merges was an integer ended the coordinator with a TypeError's traceback."""
    model = tmp_path / "bad.gguf"
    write_gguf(model, {**byte_level_metadata(), "tokenizer.ggml.merges": 5}, "qwen3moe")
    config = tmp_path / "config.toml"
    config.write_text(Config(model=str(model), run_dir=str(tmp_path / "run"), metrics_port=0).to_toml())
    run = subprocess.run([sys.executable, "-m", "coordinator", "--config", str(config)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    assert "cannot start: metadata key tokenizer.ggml.merges is int 5, expected list[str]" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_completion_keeps_the_leading_space_of_its_first_sentencepiece_word(tmp_path):
    """SentencePiece pieces carry their space in front ("▁dog"), and decoding a text drops the first one's: the
    completion of "The lazy" streamed "dog", so the prompt and its completion read "The lazydog"."""
    model = tmp_path / "spm.gguf"
    write_gguf(model, sentencepiece_metadata(), "llama")
    tokenizer = Tokenizer.from_gguf(model)
    prompt, completion = tokenizer.encode("The lazy"), tokenizer.encode(" dog", add_special=False)[1:]
    assert [tokenizer.token_text(i) for i in completion] == ["\u2581do", "g"]
    coordinator = Coordinator(model, tmp_path, expert_hosts=0, hot_experts=8)
    with joined_worker(coordinator) as (member, engine, hb):
        stream = coordinator.client.generate(prompt="The lazy", max_tokens=len(completion))
        sent = decode(engine.recv_multipart())
        assert sent.prompt_token_ids == prompt
        for i, token_id in enumerate(completion):
            engine.send_multipart(token(sent.request_id, token_id, "length" if i == len(completion) - 1 else None))
        text = "".join(e.text for e in stream if e.KIND == "token")
    assert text == " dog" and tokenizer.decode(prompt, skip_special=True) + text == "The lazy dog"


def test_control_tokens_add_no_text(tiny_model, tokenizer, tmp_path):
    """A control token generated other than the end of turn (<|im_start|> here) was streamed as its markup; as
    vLLM and llama.cpp's server do by default, it adds no text now, and its id is still reported."""
    hi, there = tokenizer.encode("Hi", add_special=False), tokenizer.encode(" there", add_special=False)
    im_start = tokenizer.tokens.index("<|im_start|>")
    completion = [*hi, im_start, *there, im_start]
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8)
    with joined_worker(coordinator) as (member, engine, hb):
        stream = coordinator.client.generate(token_ids=[5], max_tokens=len(completion))
        sent = decode(engine.recv_multipart())
        for i, token_id in enumerate(completion):
            engine.send_multipart(token(sent.request_id, token_id, "length" if i == len(completion) - 1 else None))
        events = [e for e in stream if e.KIND == "token"]
    assert [e.token_id for e in events] == completion
    assert "".join(e.text for e in events) == "Hi there" == tokenizer.decode(completion, skip_special=True)


def test_requests_the_worker_held_resume_on_its_successor_from_their_streamed_tokens(tiny_model, tmp_path):
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8, resume_timeout_s=10.0)
    with joined_worker(coordinator) as (member, engine, hb):
        stream = coordinator.client.generate(request_id="r", token_ids=[5, 6], max_tokens=5, temperature=0.5, seed=3)
        first = decode(engine.recv_multipart())
        assert isinstance(first, EngineGenerate) and first.prompt_token_ids == [5, 6]
        for t in (7, 8):
            engine.send_multipart(token(first.request_id, t))
        assert [next(stream).token_id for _ in range(2)] == [7, 8]

        restart_as_worker(coordinator, member, hb, pid=4343)  # the worker died with the request's KV cache
        # the old id is cancelled (a worker only slow would run it on), then the request goes again under a new one
        assert decode(engine.recv_multipart()) == EngineCancel(request_id=first.request_id)
        again = decode(engine.recv_multipart())
        assert isinstance(again, EngineGenerate) and again.request_id != first.request_id
        assert (again.prompt_token_ids, again.max_tokens, again.output_offset, again.seed, again.temperature) == (
            [5, 6, 7, 8], 3, 2, 3, 0.5)
        engine.send_multipart(token(first.request_id, 99))  # late, from a process taken for gone: not streamed
        assert decode(engine.recv_multipart()) == EngineCancel(request_id=first.request_id)
        for t, end in ((9, None), (10, None), (11, "length")):
            engine.send_multipart(token(again.request_id, t, end))
        rest = list(stream)
        assert [e.index for e in rest[:-1]] == [2, 3, 4] and [e.token_id for e in rest[:-1]] == [9, 10, 11]
        assert isinstance(rest[-1], FinalEvent) and (rest[-1].completion_tokens, rest[-1].prompt_tokens) == (5, 2)

        # A request the worker had started at every loss of it may be what takes it down: resumed twice, it then
        # fails. One that only waited in the worker's queue, never started, is resumed each time without limit.
        stream = coordinator.client.generate(request_id="s", token_ids=[5], max_tokens=9)
        queued = coordinator.client.generate(request_id="q", token_ids=[6], max_tokens=1)
        sent = {m.prompt_token_ids[0]: m for m in (decode(engine.recv_multipart()) for _ in range(2))}
        for i, pid in enumerate((4444, 4545, 4646)):
            engine.send_multipart(encode(EngineStarted(request_id=sent[5].request_id)))
            engine.send_multipart(token(sent[5].request_id, 20 + i))
            assert next(stream).token_id == 20 + i  # the start was read before the loss, on the same socket
            restart_as_worker(coordinator, member, hb, pid=pid)
            cancels = [decode(engine.recv_multipart()) for _ in range(2)]
            assert all(isinstance(m, EngineCancel) for m in cancels)
            assert sorted(m.request_id for m in cancels) == sorted(m.request_id for m in sent.values())
            again = [decode(engine.recv_multipart()) for _ in range(1 if pid == 4646 else 2)]
            assert all(isinstance(m, EngineGenerate) for m in again)
            sent = {m.prompt_token_ids[0]: m for m in again}
        with pytest.raises(ServerError) as info:
            list(stream)
        assert info.value.code == "unavailable" and "resumed 2 times already" in info.value.message
        assert list(sent) == [6]
        engine.send_multipart(token(sent[6].request_id, 30, "length"))
        assert [e.token_id for e in queued if e.KIND == "token"] == [30]
        stats = coordinator.client.stats().stats
        assert stats["requests"]["completed"] == 2 and stats["requests"]["error"] == 1
    assert coordinator.process.returncode == 0
    assert "requests it held resume when it is back" in coordinator.log.read_text()


def test_a_request_ended_by_a_lost_expert_host_resumes_after_the_host_had_time_to_be_found_missing(tiny_model,
                                                                                                      tmp_path):
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8)
    with joined_worker(coordinator) as (member, engine, hb):
        stream = coordinator.client.generate(request_id="h", token_ids=[5, 6], max_tokens=3)
        first = decode(engine.recv_multipart())
        engine.send_multipart(token(first.request_id, 7))
        assert next(stream).token_id == 7
        engine.send_multipart(encode(EngineError(request_id=first.request_id, code="expert_host_unavailable",
                                                 message="expert host 0: no answer within 1.0 s")))
        failed_at = time.monotonic()
        while not engine.poll(100):  # the worker stays alive meanwhile
            member.send_multipart(encode(hb))
        again = decode(engine.recv_multipart())
        held = time.monotonic() - failed_at
        hold = coordinator.config.heartbeat_timeout_s + coordinator.config.heartbeat_interval_s
        assert hold - 0.05 <= held < hold + 2.0
        assert isinstance(again, EngineGenerate) and again.request_id != first.request_id
        assert (again.prompt_token_ids, again.max_tokens, again.output_offset) == ([5, 6, 7], 2, 1)
        engine.send_multipart(token(again.request_id, 8))
        engine.send_multipart(token(again.request_id, 9, "length"))
        events = list(stream)
        assert [e.token_id for e in events[:-1]] == [8, 9] and events[-1].completion_tokens == 3
    assert coordinator.process.returncode == 0


def test_a_request_ended_by_a_host_resumes_as_soon_as_the_host_it_names_has_a_successor(tiny_model, tmp_path):
    """The error names the host: its requests wait for that host's successor, not for the heartbeat timeout
    (30 s here), and go at once when the successor joined before the error came; one whose host has no successor
    yet still waits."""
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=1, hot_experts=4, heartbeat_timeout_s=30.0)
    model = GGUFModel(coordinator.config.model).identity
    host = worker_socket()
    host.connect(coordinator.config.control_endpoint)
    host_hb = Heartbeat(member_id="expert-host-0", role="expert_host", incarnation="first", pid=5000, host="node-a",
                        metrics_port=1235, placement_version=0, model=model)
    member, engine = worker_socket(), engine_socket()
    member.connect(coordinator.config.control_endpoint)
    worker_hb = Heartbeat(member_id="gpu-worker", role="gpu_worker", incarnation="first", pid=4242, host="node-a",
                          metrics_port=1234, placement_version=0, model=model)

    def join(sock: zmq.Socket, hb: Heartbeat) -> None:
        sock.send_multipart(encode(hb))
        hb.placement_version = decode(sock.recv_multipart()).placement["version"]
        sock.send_multipart(encode(hb))

    def engine_message(within_s: float) -> EngineGenerate | None:
        """The next message to the engine within `within_s`, the worker and host heartbeating meanwhile."""
        deadline = time.monotonic() + within_s
        while not engine.poll(100):
            if time.monotonic() > deadline:
                return None
            member.send_multipart(encode(worker_hb))
            host.send_multipart(encode(host_hb))
        return decode(engine.recv_multipart())

    def fail(request_id: str) -> None:
        engine.send_multipart(encode(EngineError(request_id=request_id, code="expert_host_unavailable",
                                                 message="expert host 0: the host restarted with this step's work "
                                                         "unanswered", member_id="expert-host-0")))

    def restart_host(incarnation: str, pid: int) -> None:
        host_hb.incarnation, host_hb.pid, host_hb.placement_version = incarnation, pid, 0
        join(host, host_hb)

    try:
        join(member, worker_hb)
        join(host, host_hb)
        engine.connect(coordinator.config.engine_endpoint)
        stream = coordinator.client.generate(request_id="h", token_ids=[5, 6], max_tokens=3)
        first = engine_message(10)
        engine.send_multipart(token(first.request_id, 7))
        assert next(stream).token_id == 7
        fail(first.request_id)
        assert engine_message(1.0) is None  # the host it names is still the one that failed
        restart_host("second", 5001)
        again = engine_message(10)
        assert isinstance(again, EngineGenerate) and again.prompt_token_ids == [5, 6, 7]
        restart_host("third", 5002)  # before its error comes: the request went to the host that failed
        fail(again.request_id)
        third = engine_message(5)
        assert isinstance(third, EngineGenerate) and third.prompt_token_ids == [5, 6, 7]
        engine.send_multipart(token(third.request_id, 8))
        engine.send_multipart(token(third.request_id, 9, "length"))
        assert [e.token_id for e in list(stream)[:-1]] == [8, 9]
    finally:
        for sock in (host, member, engine):
            sock.close()
        assert coordinator.stop() == 0


def test_a_cancel_that_comes_after_its_request_ended_counts_the_request_once(tiny_model, tmp_path):
    """A client that stops reading a stream cancels it; when the request has just ended on the server, the cancel
    is answered unknown_request, and the request stays counted once, as completed, not as rejected too."""
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8)
    with joined_worker(coordinator) as (member, engine, hb):
        client = zmq.Context.instance().socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.setsockopt(zmq.RCVTIMEO, 5000)
        client.connect(coordinator.config.client_endpoint)
        try:
            client.send_multipart(encode(Generate(request_id="done", token_ids=[5], max_tokens=1)))
            sent = decode(engine.recv_multipart())
            engine.send_multipart(token(sent.request_id, 7, "length"))
            assert isinstance(decode(client.recv_multipart()), TokenEvent)
            assert isinstance(decode(client.recv_multipart()), FinalEvent)
            client.send_multipart(encode(Cancel(request_id="done")))
            reply = decode(client.recv_multipart())
            assert isinstance(reply, ErrorEvent) and reply.code == "unknown_request"
        finally:
            client.close()
        requests = coordinator.client.stats().stats["requests"]
        assert requests == {"completed": 1, "cancelled": 0, "error": 0, "rejected": 0}


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_stream_in_flight_when_the_server_goes_ends_with_connection_lost(tiny_model, tmp_path, kind):
    """The client's socket would reconnect without a word, and its streams wait out their timeout (5 s here) for
    events a restarted server will never send: they end at once, after the events that came before."""
    coordinator = Coordinator(tiny_model, tmp_path, expert_hosts=0, hot_experts=8)
    with joined_worker(coordinator) as (member, engine, hb):

        def serve_one_token_and_die() -> None:
            sent = decode(engine.recv_multipart())
            engine.send_multipart(token(sent.request_id, 7))
            time.sleep(0.3)  # the token reaches the client first
            coordinator.process.kill()

        if kind == "blocking":
            with Client(coordinator.config.client_endpoint, timeout_s=5.0) as client:
                stream = client.generate(token_ids=[5], max_tokens=4)
                serve_one_token_and_die()
                assert next(stream).token_id == 7
                with pytest.raises(ServerError) as info:
                    next(stream)
        else:
            async def read() -> ServerError:
                async with AsyncClient(coordinator.config.client_endpoint, timeout_s=5.0) as client:
                    stream = await client.generate(token_ids=[5], max_tokens=4)
                    await asyncio.to_thread(serve_one_token_and_die)
                    assert (await anext(stream)).token_id == 7
                    with pytest.raises(ServerError) as caught:
                        await anext(stream)
                    return caught

            info = run(read())
        assert info.value.code == "connection_lost" and coordinator.config.client_endpoint in info.value.message


def test_sigterm_exits_zero_and_leaves_no_socket_files(tiny_model, tmp_path):
    coordinator = Coordinator(tiny_model, tmp_path)
    run_dir = Path(coordinator.config.run_dir)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in run_dir.iterdir()) == ["control.sock", "engine.sock"]
    assert coordinator.stop() == 0
    assert list(run_dir.iterdir()) == []


def test_a_socket_file_made_by_another_process_at_its_path_is_left_on_exit(tiny_model, tmp_path):
    """Its exit removed whatever file was at its endpoints' paths, though another process had bound its own socket
    there since (this one's file unlinked by hand, or a successor's bound over it)."""
    coordinator = Coordinator(tiny_model, tmp_path)
    control = Path(coordinator.config.control_endpoint.removeprefix("ipc://"))
    control.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(control))
        assert coordinator.stop() == 0
        assert control.exists()
        assert not Path(coordinator.config.engine_endpoint.removeprefix("ipc://")).exists()


def test_a_second_coordinator_on_an_ipc_client_endpoint_in_use_is_refused_and_leaves_the_first_serving(tiny_model,
                                                                                                     tmp_path):
    """With its own run dir, it bound the endpoint over the first's, took its clients, and removed the socket file
    when it stopped, leaving the first unreachable."""
    endpoint = f"ipc://{tmp_path}/clients.sock"
    (tmp_path / "first").mkdir()
    first = Coordinator(tiny_model, tmp_path / "first", client_endpoint=endpoint)
    try:
        pid = next(m["pid"] for m in first.client.health().members if m["member_id"] == "coordinator")
        second = Config(model=str(tiny_model), run_dir=str(tmp_path / "second" / "run"), client_endpoint=endpoint,
                        metrics_port=0)
        path = tmp_path / "second.toml"
        path.write_text(second.to_toml())
        run = subprocess.run([sys.executable, "-m", "coordinator", "--config", str(path)], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 1
        assert f"cannot start: something already accepts connections on client_endpoint {endpoint} (another " \
               "coordinator?)" in run.stderr, run.stderr
        assert next(m["pid"] for m in first.client.health().members if m["member_id"] == "coordinator") == pid
    finally:
        assert first.stop() == 0
