"""Bad input against the running system: each gets an error event naming the problem, and the
server keeps serving (a valid request succeeds after every one)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import msgpack
import pytest
import zmq

from shared.client import AsyncClient, Client, ServerError, run
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.make_model import make_model
from shared.protocol import ErrorEvent, Message, decode
from shared.reference import ReferenceModel
from tests.damaged_models import nan_embedding

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    make_model(path, arch="qwen3moe", preset="tiny", dtype="f32", seed=3)
    with RunningSystem(str(path), "--expert-hosts", "1", "--hot-experts", "4", "--max-waiting", "64") as running:
        yield running


@pytest.fixture
def raw(system):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(system.endpoint)
    yield sock
    sock.close()


def receive(sock: zmq.Socket, timeout_s: float = 30.0) -> Message:
    assert sock.poll(int(timeout_s * 1000)), "no answer from the server"
    return decode(sock.recv_multipart())


def generate_frame(**fields) -> bytes:
    return msgpack.packb({"v": 1, "kind": "generate", **fields})


def assert_still_serving(system) -> None:
    with Client(system.endpoint) as client:
        result = client.complete(prompt="still there?", max_tokens=3)
    assert len(result.token_ids) == 3


@pytest.mark.parametrize(
    "frames, code, text",
    [
        ([b"\x93\xff\x00 random bytes \xc1"], "malformed", "msgpack"),
        ([msgpack.packb({"v": 1, "kind": "generate"})[:-3]], "malformed", "msgpack"),
        ([msgpack.packb("just a string")], "malformed", "map"),
        ([msgpack.packb({"v": 1, "kind": "fly_to_the_moon"})], "unknown_kind", "fly_to_the_moon"),
        ([msgpack.packb({"v": 1, "kind": "generate", "prompt": "hi"})], "missing_field", "request_id"),
        ([generate_frame(request_id="a", prompt=42)], "bad_field", "prompt"),
        ([generate_frame(request_id="a", prompt="hi", max_tokens="many")], "bad_field", "max_tokens"),
        ([generate_frame(request_id="a", token_ids=[1, "two"])], "bad_field", "token_ids"),
        # a bytes key beside str ones: sorting the unknown names raised TypeError, and no answer came
        ([msgpack.packb({"v": 1, "kind": "generate", "request_id": "a", b"x": 1, "y": 2})], "bad_field",
         "field names must be strings"),
    ],
)
def test_malformed_messages(system, raw, frames, code, text):
    raw.send_multipart(frames)
    event = receive(raw)
    assert isinstance(event, ErrorEvent) and event.code == code and text in event.message
    assert_still_serving(system)


@pytest.mark.parametrize(
    "fields, code, text",
    [
        (dict(token_ids=list(range(1, 500)) * 2), "context_exceeded", "context"),
        (dict(prompt="hi", max_tokens=0), "invalid_request", "max_tokens"),
        (dict(prompt="hi", max_tokens=-5), "invalid_request", "max_tokens"),
        (dict(token_ids=[1, 2, 10**6]), "invalid_request", "vocabulary"),
        (dict(token_ids=[-1]), "invalid_request", "vocabulary"),
        (dict(), "invalid_request", "prompt"),
        (dict(prompt="a", token_ids=[1]), "invalid_request", "prompt"),
        (dict(prompt="hi", temperature=-1.0), "invalid_request", "temperature"),
        (dict(prompt="hi", top_p=0.0), "invalid_request", "top_p"),
        (dict(messages=[{"role": "user"}]), "invalid_request", "messages"),
    ],
)
def test_invalid_requests(system, raw, fields, code, text):
    raw.send_multipart([generate_frame(request_id="bad", **fields)])
    event = receive(raw)
    assert isinstance(event, ErrorEvent), event
    assert event.code == code and text in event.message, event
    assert event.request_id == "bad"
    assert_still_serving(system)


def test_oversized_message(system, raw):
    raw.send_multipart([generate_frame(request_id="big", prompt="x" * (2 << 20))])
    event = receive(raw)
    assert isinstance(event, ErrorEvent) and event.code == "too_large"
    assert_still_serving(system)


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def test_a_frame_far_past_the_limit_is_not_held_in_memory(system, raw):
    """64 MiB, 64 times max_request_bytes: the connection is dropped as the frame arrives, unanswered, so the
    coordinator's peak resident set does not grow by the frame."""
    with Client(system.endpoint) as client:
        pid = next(m["pid"] for m in client.health().members if m["role"] == "coordinator")
    before = _peak_rss(pid)
    raw.send_multipart([generate_frame(request_id="huge", prompt="x" * (64 << 20))])
    assert not raw.poll(3_000), "a frame over the cap is dropped, not answered"
    assert _peak_rss(pid) - before < 32 << 20
    assert_still_serving(system)


def _worker_gauge(system, name: str, member: str = "gpu-worker") -> float:
    with Client(system.endpoint) as client:
        port = next(m["metrics_port"] for m in client.health().members if m["member_id"] == member)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_a_stream_the_client_stops_reading_is_cancelled(system):
    """A loop over generate() left with break: the dropped stream cancels its request, which would otherwise run
    to its end on the server while its place and KV blocks waited for it."""
    cancelled = 'tierserve_requests_total{outcome="cancelled"}'
    before = _worker_gauge(system, cancelled, "coordinator")
    with Client(system.endpoint) as client:
        for _ in client.generate(prompt="a long story", max_tokens=400):
            break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _worker_gauge(system, "tierserve_worker_running_requests") > 0:
            time.sleep(0.05)
    assert _worker_gauge(system, cancelled, "coordinator") == before + 1
    assert_still_serving(system)


def test_an_async_stream_left_inside_its_async_with_is_cancelled(system):
    """The client stays connected (a closed connection would cancel the request anyway): the stream's exit does."""
    cancelled = 'tierserve_requests_total{outcome="cancelled"}'
    before = _worker_gauge(system, cancelled, "coordinator")

    async def first_token_only() -> float:
        async with AsyncClient(system.endpoint) as client:
            async with await client.generate(prompt="a long story", max_tokens=400) as stream:
                async for _ in stream:
                    break
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _worker_gauge(system, cancelled, "coordinator") == before:
                await asyncio.sleep(0.05)
            return _worker_gauge(system, cancelled, "coordinator")

    assert run(first_token_only()) == before + 1


def test_client_disconnecting_mid_stream_cancels_and_frees_kv(system):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(system.endpoint)
    sock.send_multipart([generate_frame(request_id="gone", prompt="a long story", max_tokens=400)])
    assert receive(sock).KIND == "token"
    sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _worker_gauge(system, "tierserve_worker_running_requests") > 0:
        time.sleep(0.2)
    assert _worker_gauge(system, "tierserve_worker_running_requests") == 0
    assert _worker_gauge(system, "tierserve_worker_kv_cache_used_ratio") == 0
    assert_still_serving(system)


def test_a_hundred_requests_at_once(system, raw):
    ids = [uuid.uuid4().hex for _ in range(100)]
    for rid in ids:
        raw.send_multipart([generate_frame(request_id=rid, token_ids=[5, 6, 7], max_tokens=3)])
    ended: dict[str, Message] = {}
    deadline = time.monotonic() + 240
    while len(ended) < len(ids) and time.monotonic() < deadline:
        event = receive(raw, timeout_s=max(1.0, deadline - time.monotonic()))
        if event.KIND in ("final", "error"):
            ended[event.request_id] = event
    assert set(ended) == set(ids)
    completed = [e for e in ended.values() if e.KIND == "final"]
    refused = [e for e in ended.values() if e.KIND == "error"]
    assert all(e.code == "overloaded" for e in refused), {e.code for e in refused}
    assert len(completed) >= 64  # max_waiting requests queue; only the excess may be refused
    assert all(e.completion_tokens == 3 for e in completed)
    assert_still_serving(system)


def test_sampling_parameters_sent_as_integers_out_of_every_int64_are_sampled_with_and_cost_no_neighbour(system, raw):
    """msgpack carries 2**64 - 1 as an integer, which a float field takes. Kept an int, the worker's sampler could not
    make a tensor of it: the step failed with internal_error, and so did every request in its batch."""
    rid = "huge-temperature"
    raw.send_multipart([generate_frame(request_id=rid, token_ids=[5, 6, 7], max_tokens=4, temperature=2**64 - 1,
                                       top_p=1, seed=2**64 - 1, top_k=2**64 - 1)])
    with Client(system.endpoint) as client:
        beside = client.complete(token_ids=[5, 6, 7], max_tokens=4)
    events = []
    while not events or events[-1].KIND not in ("final", "error"):
        events.append(receive(raw))
    assert events[-1].KIND == "final", events[-1]
    assert events[-1].completion_tokens == 4 and len(beside.token_ids) == 4


def test_a_request_whose_logits_are_not_finite_ends_by_name_and_the_batch_beside_it_goes_on(tmp_path):
    """Non-finite logits (here from a NaN row in the token embeddings, as a damaged model file has) drew their
    argmax or first-ranked token and streamed it with a NaN logprob, without a word. That request now ends with
    internal_error saying so; the requests in its batch are untouched. It is admitted first, so its KV cache is
    the first block's: a decode batch's padding read slot 0, and its NaN came through the mask into the shorter
    rows. The worker is stopped (SIGSTOP) while the requests arrive, so they reach it together and in order."""
    path = tmp_path / "tiny.gguf"
    make_model(path, arch="qwen3moe", preset="tiny", dtype="f32", seed=9)
    model = GGUFModel(path)
    good = [[1, 2, 3], [30, 31]]
    expected = [ReferenceModel(model).greedy(p, 8) for p in good]
    damaged = next(t for t in range(40, model.config.vocab_size) if all(t not in e for e in expected))
    del model
    nan_embedding(path, damaged)
    with RunningSystem(str(path), "--expert-hosts", "0", "--hot-experts", "8", "--device", "cpu",
                       "--heartbeat-timeout-s", "60") as system, Client(system.endpoint) as client:

        def run_one(prompt: list[int]) -> list[int] | ServerError:
            with Client(system.endpoint) as c:
                try:
                    return c.complete(token_ids=prompt, max_tokens=8, logprobs=1).token_ids
                except ServerError as e:
                    return e

        def arrived(n: int) -> None:
            deadline = time.monotonic() + 30
            while client.stats().stats["running"] < n:
                assert time.monotonic() < deadline
                time.sleep(0.05)

        worker = next(m for m in client.health().members if m["member_id"] == "gpu-worker")
        os.kill(worker["pid"], signal.SIGSTOP)
        try:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                answers = [pool.submit(run_one, [5, damaged, 6])]
                arrived(1)
                answers += [pool.submit(run_one, p) for p in good]
                arrived(3)
                os.kill(worker["pid"], signal.SIGCONT)
                answers = [a.result() for a in answers]
        finally:
            os.kill(worker["pid"], signal.SIGCONT)
        assert isinstance(answers[0], ServerError) and answers[0].code == "internal_error"
        assert "the model's logits were not finite (NaN or inf)" in answers[0].message
        assert answers[1:] == expected
        assert run_one(good[0]) == expected[0]
