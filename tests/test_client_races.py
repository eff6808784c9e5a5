"""Races of the Python clients against a stand-in server (a bare ROUTER): no model, no coordinator."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from shared.client import DEFAULT_TIMEOUT_S, AsyncClient, Client, ServerError
from shared.config import Config
from shared.protocol import Cancel, ErrorEvent, FinalEvent, Generate, HealthReply, decode, encode

ROOT = Path(__file__).resolve().parents[1]


def final(request_id: str) -> list:
    return encode(FinalEvent(request_id=request_id, finish_reason="length", prompt_tokens=1, completion_tokens=1,
                             ttft_s=0.0, decode_tok_s=0.0, total_s=0.0))


def test_generate_while_another_coroutine_reads_never_waits_for_a_later_message():
    """Two generates look at the socket while a third coroutine waits in the poller and a message sits unread:
    a blocking receive in generate queued behind the reader's poll, took its wake-up, and then waited for the
    next message, which this server never sends (a dropped connection never does either). On asyncio's own loop
    (uvloop runs the callbacks in another order)."""

    async def main(server: zmq.Socket, client: AsyncClient) -> None:
        stream = await client.generate(request_id="a", token_ids=[1], max_tokens=1)
        identity, *_ = server.recv_multipart()
        reader = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.1)  # the reader waits in the poller
        server.send_multipart([identity, *final("a")])
        time.sleep(0.2)  # the final event is in the client's socket, and the loop has not looked yet
        await asyncio.wait_for(asyncio.gather(client.generate(request_id="b", token_ids=[1], max_tokens=1),
                                              client.generate(request_id="c", token_ids=[1], max_tokens=1)), 3)
        assert (await asyncio.wait_for(reader, 3)).KIND == "final"

    against_a_bare_router(main)


def bare_router() -> tuple[zmq.Socket, str]:
    """A ROUTER socket standing in for the coordinator, and its endpoint."""
    server = zmq.Context.instance().socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    return server, f"tcp://127.0.0.1:{port}"


def against_a_bare_router(main: Callable[[zmq.Socket, AsyncClient], Coroutine[Any, Any, None]]) -> None:
    """main(server, client) on asyncio's own loop, the server a bare ROUTER the client is connected to."""

    async def run() -> None:
        server, endpoint = bare_router()
        client = AsyncClient(endpoint, timeout_s=5.0)
        try:
            await main(server, client)
        finally:
            client.close()
            server.close(linger=0)

    asyncio.run(run())



SLOW_READER = """
import sys, time
import zmq
from shared.client import Client
from shared.protocol import FinalEvent, TokenEvent, encode

n, close = 150_000, sys.argv[1] == "close"
ctx = zmq.Context()
server = ctx.socket(zmq.ROUTER)
server.setsockopt(zmq.SNDHWM, 0)
port = server.bind_to_random_port("tcp://127.0.0.1")
with Client(f"tcp://127.0.0.1:{port}", timeout_s=10.0) as client:
    stream = client.generate(request_id="a", token_ids=[1], max_tokens=n)
    identity, *_ = server.recv_multipart()
    for i in range(n):
        server.send_multipart([identity, *encode(TokenEvent(request_id="a", index=i, token_id=i, text="x"))])
    server.send_multipart([identity, *encode(FinalEvent(request_id="a", finish_reason="length", prompt_tokens=1,
                                                        completion_tokens=n, ttft_s=0, decode_tok_s=0, total_s=0))])
    if close:
        server.close(linger=-1)
    time.sleep(float(sys.argv[2]))  # the client reads nothing; its heartbeats go on
    events = list(stream)
    print(len(events), events[-1].KIND)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("how", "sleep_s"), [("alive", 9.0), ("close", 3.0)])
def test_a_client_that_reads_late_gets_every_event_and_does_not_abort(how, sleep_s):
    """More events than a receive limit would hold wait while the client does not read (a slow consumer, a busy
    event loop). With the limit, the socket stopped reading its connection, and once the client's own heartbeat
    timed out (the server alive: no pong can be read) or met the reset of a server that had closed after sending
    everything, libzmq aborted the process (Assertion failed: _input_stopped / !_io_error), or the events still
    in the kernel were lost to connection_lost. In a child process, since the failure is an abort."""
    done = subprocess.run([sys.executable, "-c", SLOW_READER, how, str(sleep_s)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["150001", "final"]


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_late_answer_to_a_call_that_timed_out_is_not_taken_for_the_next_ones(kind):
    server = zmq.Context.instance().socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")

    def answer_late_then_on_time() -> None:
        identity, *_ = server.recv_multipart()  # the first health call, left to time out
        server.send_multipart([identity, *encode(HealthReply(status="late"))])
        time.sleep(0.2)  # in the client's socket before its next call
        identity, *_ = server.recv_multipart()
        server.send_multipart([identity, *encode(HealthReply(status="ready"))])

    try:
        if kind == "blocking":
            with Client(f"tcp://127.0.0.1:{port}", timeout_s=0.5) as client:
                with pytest.raises(TimeoutError):
                    client.health()
                answering = threading.Thread(target=answer_late_then_on_time)
                answering.start()
                time.sleep(0.5)
                assert client.health().status == "ready"
                answering.join()
        else:
            async def main() -> str:
                async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout_s=0.5) as client:
                    with pytest.raises(TimeoutError):
                        await client.health()
                    answering = asyncio.create_task(asyncio.to_thread(answer_late_then_on_time))
                    await asyncio.sleep(0.5)
                    status = (await client.health()).status
                    await answering
                    return status

            assert asyncio.run(main()) == "ready"
    finally:
        server.close(linger=0)


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_health_call_in_flight_when_the_connection_drops_ends_with_connection_lost(kind):
    """Like a stream's, a health or stats call waiting when the server goes ends at once instead of waiting out
    its timeout (10 s here) for an answer that will never come."""
    server = zmq.Context.instance().socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")

    def close_after_the_call_arrives() -> None:
        server.recv_multipart()
        server.close(linger=0)

    closing = threading.Thread(target=close_after_the_call_arrives)
    closing.start()
    start = time.monotonic()
    if kind == "blocking":
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=10.0) as client, pytest.raises(ServerError) as info:
            client.health()
    else:
        async def main() -> pytest.ExceptionInfo[ServerError]:
            async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout_s=10.0) as client:
                with pytest.raises(ServerError) as caught:
                    await client.stats()
                return caught

        info = asyncio.run(main())
    closing.join()
    assert info.value.code == "connection_lost" and f"127.0.0.1:{port}" in info.value.message
    assert time.monotonic() - start < 5.0


@pytest.fixture
def fake_server() -> Iterator[tuple[zmq.Socket, str]]:
    server, endpoint = bare_router()
    yield server, endpoint
    server.close(linger=0)


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_request_id_already_in_flight_on_the_client_is_refused_before_it_is_sent(kind, fake_server):
    """Events carry only the request id: a second stream under an id in flight would take the first one's events,
    and the server's duplicate_request error would end the first stream while the second waited for ever."""
    server, endpoint = fake_server
    if kind == "blocking":
        with Client(endpoint, timeout_s=5.0) as client:
            stream = client.generate(request_id="a", token_ids=[1], max_tokens=1)
            with pytest.raises(ValueError, match="'a' is already in flight"):
                client.generate(request_id="a", token_ids=[1], max_tokens=1)
            identity, *_ = server.recv_multipart()
            assert not server.poll(200)  # the refused request was not sent
            server.send_multipart([identity, *final("a")])
            assert [e.KIND for e in stream] == ["final"]
            client.generate(request_id="a", token_ids=[1], max_tokens=1).close()  # ended: the id is free again
    else:
        async def main() -> list[str]:
            async with AsyncClient(endpoint, timeout_s=5.0) as client:
                stream = await client.generate(request_id="a", token_ids=[1], max_tokens=1)
                with pytest.raises(ValueError, match="'a' is already in flight"):
                    await client.generate(request_id="a", token_ids=[1], max_tokens=1)
                identity, *_ = server.recv_multipart()
                assert not server.poll(200)
                server.send_multipart([identity, *final("a")])
                return [e.KIND async for e in stream]

        assert asyncio.run(main()) == ["final"]


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_cancel_answered_after_its_request_ended_does_not_end_the_next_request_under_its_id(kind, fake_server):
    """A Stop pressed as the reply ends: the server answers the cancel with unknown_request. Arriving after a new
    request under the same id was sent, that answer ended the new one's stream with a ServerError, while the
    server ran it on unread. The new request now waits for the answer before it is sent."""
    server, endpoint = fake_server

    def serve() -> None:
        identity, *frames = server.recv_multipart()
        assert isinstance(decode(frames), Generate)
        server.send_multipart([identity, *final("job")])
        identity, *frames = server.recv_multipart()
        assert isinstance(decode(frames), Cancel)
        time.sleep(0.3)  # the answer is late
        server.send_multipart([identity, *encode(ErrorEvent(request_id="job", code="unknown_request",
                                                             message="no request 'job' is in flight"))])
        identity, *frames = server.recv_multipart()
        assert isinstance(decode(frames), Generate)
        server.send_multipart([identity, *final("job")])

    serving = threading.Thread(target=serve, daemon=True)
    serving.start()
    if kind == "blocking":
        with Client(endpoint, timeout_s=5.0) as client:
            assert [e.KIND for e in client.generate(request_id="job", token_ids=[1], max_tokens=1)] == ["final"]
            client.cancel("job")
            assert client.complete(request_id="job", token_ids=[1], max_tokens=1).finish_reason == "length"
    else:
        async def main() -> None:
            async with AsyncClient(endpoint, timeout_s=5.0) as client:
                stream = await client.generate(request_id="job", token_ids=[1], max_tokens=1)
                assert [e.KIND async for e in stream] == ["final"]
                await client.cancel("job")
                assert (await client.complete(request_id="job", token_ids=[1], max_tokens=1)).finish_reason == \
                    "length"

        asyncio.run(main())
    serving.join(timeout=5)
    assert not serving.is_alive()


def test_an_async_stream_dropped_after_its_end_arrived_leaves_its_id_free():
    """A stream dropped unread sends no cancel; its id is kept until its end comes, and an end already in the
    inbox is that end: kept for it, the id stayed taken for the client's life."""

    async def main(server: zmq.Socket, client: AsyncClient) -> None:
        stream = await client.generate(request_id="a", token_ids=[1], max_tokens=1)
        identity, *_ = server.recv_multipart()
        server.send_multipart([identity, *final("a")])
        time.sleep(0.2)
        await client.generate(request_id="b", token_ids=[1], max_tokens=1)  # takes a's end into the inbox
        del stream
        await client.generate(request_id="a", token_ids=[1], max_tokens=1)

    against_a_bare_router(main)


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_request_that_could_not_be_sent_leaves_its_id_free(kind, fake_server):
    """Its id stayed claimed for good: a retry under it was refused as already in flight."""
    server, endpoint = fake_server

    def sent() -> str:  # read before the client closes, which drops what it has not sent yet
        assert server.poll(5000)
        return decode(server.recv_multipart()[1:]).request_id

    if kind == "blocking":
        with Client(endpoint, timeout_s=5.0) as client:
            with pytest.raises(ValueError, match="generate.seed holds an integer"):
                client.generate(request_id="a", token_ids=[1], seed=2**64)
            client.generate(request_id="a", token_ids=[1], max_tokens=1)
            assert sent() == "a"
    else:
        async def main() -> None:
            async with AsyncClient(endpoint, timeout_s=5.0) as client:
                with pytest.raises(ValueError, match="generate.seed holds an integer"):
                    await client.generate(request_id="a", token_ids=[1], seed=2**64)
                await client.generate(request_id="a", token_ids=[1], max_tokens=1)
                assert sent() == "a"

        asyncio.run(main())


def test_an_empty_request_id_or_a_bad_endpoint_or_timeout_is_refused_by_name():
    """An empty id was replaced by a fresh one, as if none were given; port 99999 connected to 34463 (ZeroMQ takes
    ports modulo 65536); a timeout of "5" or None ended in a bare TypeError comparing it, and True was 1 s."""
    with Client("tcp://127.0.0.1:9", timeout_s=1.0) as client:
        with pytest.raises(ValueError, match="request_id must not be empty"):
            client.complete(prompt="x", request_id="")
    for endpoint in ("tcp://127.0.0.1:99999", None):
        with pytest.raises(ValueError, match=f"endpoint must be tcp://HOST:PORT .* not {endpoint!r}"):
            Client(endpoint)
    for timeout in ("5", None, True):
        with pytest.raises(ValueError, match=f"a timeout must be a number of seconds, not {timeout!r}"):
            Client("tcp://127.0.0.1:9", timeout_s=timeout)


def test_a_request_id_that_is_no_string_is_refused_before_it_is_sent():
    """The server's refusal of an int id could not be told to its request, which waited out its timeout; the
    refusal then answered the next health call (and a cancel of that id another)."""
    with Client("tcp://127.0.0.1:9", timeout_s=1.0) as client:
        with pytest.raises(TypeError, match="request_id must be a str, not int"):
            client.complete(prompt="x", request_id=7)
        with pytest.raises(TypeError, match="request_id must be a str, not int"):
            client.cancel(7)

    async def cancel_async() -> None:
        async with AsyncClient("tcp://127.0.0.1:9", timeout_s=1.0) as client:
            await client.cancel(7)

    with pytest.raises(TypeError, match="request_id must be a str, not int"):
        asyncio.run(cancel_async())


def test_a_clients_default_wait_outlasts_a_resume_with_the_servers_defaults():
    """At 60 s, the clients and the command line gave up on a request the server would still resume: an expert
    host's loss is found after expert_timeout_s, and the request then waits up to resume_timeout_s."""
    config = Config()
    assert DEFAULT_TIMEOUT_S > config.expert_timeout_s + config.heartbeat_timeout_s + config.resume_timeout_s
