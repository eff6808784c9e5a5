"""Python clients of the tierserve client API: a blocking `Client` and an asyncio `AsyncClient`.

Both speak the messages of `shared.protocol` over one DEALER socket to the coordinator's ROUTER, so
several requests can be in flight on one client: replies carry their request id and are sorted into
per-request inboxes as they arrive, whichever request the caller happens to be waiting for.

    with Client("tcp://127.0.0.1:5555") as client:
        for event in client.generate(prompt="Once upon a time", max_tokens=32):
            print(event.text if event.KIND == "token" else "", end="")
        result = client.complete(messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shared.config import check_endpoint
from shared.protocol import (
    Cancel,
    ErrorEvent,
    FinalEvent,
    Generate,
    Health,
    HealthReply,
    Message,
    Stats,
    StatsReply,
    TokenEvent,
    decode,
    encode,
)

T = TypeVar("T")
Event = TokenEvent | FinalEvent

# Inbox keys: a request's events by its id; replies that carry no id by their kind. An error with no
# request id answers whichever id-less request is waiting (it means the server could not read one).
_ORPHAN_ERROR = ("error", None)


class ServerError(RuntimeError):
    """The server answered a request with an error event."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


@dataclass
class Completion:
    """A whole generation, gathered from its stream."""

    request_id: str
    token_ids: list[int]
    text: str
    prompt_token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[list]] | None  # per token, [[token_id, logprob], ...] when logprobs > 0 was asked
    finish_reason: str
    usage: dict[str, int]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_events(cls, request_id: str, events: list[Event]) -> Completion:
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        final = events[-1]
        if not isinstance(final, FinalEvent):
            raise ValueError("a completion needs the stream's final event")
        top = [e.top_logprobs or [] for e in tokens] if any(e.top_logprobs is not None for e in tokens) else None
        return cls(
            request_id=request_id,
            token_ids=[e.token_id for e in tokens],
            text="".join(e.text for e in tokens),
            prompt_token_ids=list(final.prompt_token_ids),
            logprobs=[e.logprob for e in tokens],
            top_logprobs=top,
            finish_reason=final.finish_reason,
            usage={"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens},
            timings={"ttft_s": final.ttft_s, "decode_tok_s": final.decode_tok_s, "total_s": final.total_s},
        )


def generate_request(request_id: str | None = None, **options: Any) -> Generate:
    """A Generate message; `options` are its fields (prompt / messages / token_ids, max_tokens, temperature,
    top_p, top_k, seed, stop, logprobs). A fresh request id is drawn when none is given."""
    request_id = checked_request_id(request_id)
    return Generate(request_id=uuid.uuid4().hex if request_id is None else request_id, **options)


def checked_request_id(request_id: Any) -> Any:
    """`request_id`, if it is a string or None: the server's refusal of any other could not be told to its request
    (which then waited out its timeout), and answered the next health or stats call instead."""
    if request_id is not None and not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, not {type(request_id).__name__}")
    if request_id == "":  # was replaced by a fresh id, as if none were given
        raise ValueError("request_id must not be empty (None draws a fresh one)")
    return request_id


class _Inbox:
    """Messages received but not yet asked for, by key; events of requests nobody tracks are dropped."""

    def __init__(self) -> None:
        self.boxes: defaultdict[tuple, deque[Message]] = defaultdict(deque)
        self.open: set[str] = set()
        # closed by their reader while the server may still hold them, with no Cancel sent: taken until their last
        # event comes
        self.ending: set[str] = set()
        # Cancels sent and not answered yet, by request id. The server answers each one: with the request's
        # "cancelled" final, or with unknown_request where it is not in flight (ended, or never sent). The id stays
        # taken until then: a late unknown_request ended the next request sent under it, which ran on unread.
        self.cancels: Counter[str] = Counter()
        self.asked: Counter[tuple] = Counter()  # the reply keys of health and stats calls waiting for an answer

    def put(self, frames: list) -> None:
        msg = decode(frames)
        if isinstance(msg, (TokenEvent, FinalEvent, ErrorEvent)) and msg.request_id is not None:
            request_id = msg.request_id
            if self.cancels[request_id] and (getattr(msg, "finish_reason", None) == "cancelled"
                                             or getattr(msg, "code", None) == "unknown_request"):
                self.cancels[request_id] -= 1
                if not self.cancels[request_id]:
                    del self.cancels[request_id]
            if request_id in self.open:
                self.boxes[("request", request_id)].append(msg)
            elif not isinstance(msg, TokenEvent):
                self.ending.discard(request_id)
        elif isinstance(msg, ErrorEvent):
            self.boxes[_ORPHAN_ERROR].append(msg)
        else:
            self.boxes[("reply", msg.KIND)].append(msg)

    def take(self, key: tuple) -> Message | None:
        box = self.boxes.get(key)
        if box:
            return box.popleft()
        if key[0] == "reply" and self.boxes.get(_ORPHAN_ERROR):
            return self.boxes[_ORPHAN_ERROR].popleft()
        return None

    def claim(self, request_id: str) -> None:
        """Open a request's inbox; an id in flight here is refused, since its events could not be told apart."""
        if request_id in self.open or request_id in self.ending or request_id in self.cancels:
            raise ValueError(f"request_id {request_id!r} is already in flight on this client")
        self.open.add(request_id)

    def release(self, request_id: str) -> None:
        """A claimed request that was never sent (a value it cannot carry, or no room to send it): its id is free."""
        self.open.discard(request_id)
        self.forget(("request", request_id))

    def forget(self, key: tuple) -> None:
        self.boxes.pop(key, None)

    @contextlib.contextmanager
    def asking(self, key: tuple) -> Iterator[None]:
        """While a health or stats call waits for its reply under `key` (a drop then answers it with an error)."""
        self.forget(key)  # a late answer to an earlier call that timed out
        self.asked[key] += 1
        try:
            yield
        finally:
            self.asked[key] -= 1

    def lost(self, endpoint: str) -> None:
        """The connection dropped: the server has forgotten every request in flight on it (a restarted server
        does not know them), so each one's stream ends with an error after the events already here, and each
        call waiting for a reply gets the error instead."""
        message = f"the connection to {endpoint} dropped (the server stopped, restarted or closed it): "
        self.ending.clear()
        self.cancels.clear()
        for request_id in self.open:
            self.boxes[("request", request_id)].append(ErrorEvent(
                request_id=request_id, code="connection_lost", message=message + "the request is gone"))
        for key in +self.asked:
            self.boxes[key].extend(ErrorEvent(request_id=None, code="connection_lost", message=message + "ask again")
                                   for _ in range(self.asked[key]))

    def finish(self, request_id: str) -> None:
        self.open.discard(request_id)
        self.boxes.pop(("request", request_id), None)

    def cancel_sent(self, request_id: str) -> None:
        self.cancels[request_id] += 1

    def abandon(self, request_id: str) -> None:
        """Its reader stopped before its end: its id stays taken until the server's last event for it (the answer
        to a cancel sent for it, or its end if that is not here already)."""
        ended = any(not isinstance(m, TokenEvent) for m in self.boxes.get(("request", request_id), ()))
        self.finish(request_id)
        if not ended and request_id not in self.cancels:
            self.ending.add(request_id)

    def settle(self, request_id: str, msg: Message) -> Event:
        """A request's next event for its reader: the last one closes the request, an error raises."""
        if not isinstance(msg, TokenEvent):
            self.finish(request_id)
        return _checked(msg, request_id)


def _checked(msg: Message, request_id: str | None = None) -> Message:
    if isinstance(msg, ErrorEvent):
        raise ServerError(msg.code, msg.message, msg.request_id or request_id)
    return msg


def _new_socket(ctx: zmq.Context, endpoint: str) -> tuple[zmq.Socket, zmq.Socket]:
    """The DEALER, and its monitor's socket, which tells of a dropped connection: the DEALER itself would
    reconnect without a word, and the streams in flight would wait out their timeout for events that never
    come."""
    check_endpoint(endpoint, "endpoint")
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 10_000)
    # no receive limit: a socket at its limit stops reading its connection, and libzmq 4.3 then aborts the whole
    # process (zeromq/libzmq#3596) when the heartbeats below time out or meet a reset; what comes is taken into
    # the (unbounded) inbox at the next call anyway
    socket.setsockopt(zmq.RCVHWM, 0)
    # a server whose machine vanished without closing the connection is found by ZMTP heartbeats
    socket.setsockopt(zmq.HEARTBEAT_IVL, 2_000)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6_000)
    monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    socket.connect(endpoint)
    return socket, monitor


# ZeroMQ takes its timeouts as int32 milliseconds: about 24.8 days
MAX_TIMEOUT_S = (2**31 - 1) / 1000


def check_timeout(timeout_s: float) -> float:
    """`timeout_s` if a client can wait that long: above 0 (no answer comes within 0 s) and within MAX_TIMEOUT_S."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):  # "5" and None: a bare TypeError
        raise ValueError(f"a timeout must be a number of seconds, not {timeout_s!r}")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"a timeout must be above 0 s and at most {MAX_TIMEOUT_S:,.0f} s, not {timeout_s}")
    return timeout_s


# A client's wait for its next event, by default: longer than a request may go silent while the server resumes it
# after a lost process (an expert host is found out after expert_timeout_s, 10 s, and the request then waits up to
# resume_timeout_s, 60 s), so that the client does not give up on a request the server would continue.
DEFAULT_TIMEOUT_S = 120.0


class Client:
    """A blocking client; `timeout_s` bounds every wait for the server (raises TimeoutError)."""

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoint, self.timeout_s = endpoint, check_timeout(timeout_s)
        self._socket, self._monitor = _new_socket(zmq.Context.instance(), endpoint)
        self._socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._inbox = _Inbox()

    def generate(self, request_id: str | None = None, **options: Any) -> Stream:
        """Send a request now; iterate the returned stream for its TokenEvents and then its FinalEvent."""
        msg = generate_request(request_id, **options)
        self._take_arrived()  # a drop noticed now ends the requests sent before it, not this one
        self._await_cancels(msg.request_id)
        self._inbox.claim(msg.request_id)
        try:
            self._send(msg)
        except BaseException:
            self._inbox.release(msg.request_id)
            raise
        return Stream(self, msg.request_id)

    def complete(self, request_id: str | None = None, **options: Any) -> Completion:
        stream = self.generate(request_id, **options)
        return Completion.from_events(stream.request_id, list(stream))

    def cancel(self, request_id: str) -> None:
        """Ask the server to end the request; its stream then ends with finish_reason "cancelled"."""
        self._send(Cancel(request_id=checked_request_id(request_id)))
        self._inbox.cancel_sent(request_id)

    def _await_cancels(self, request_id: str) -> None:
        """Until the cancels sent for `request_id` are answered (or the timeout passes: claim then refuses it)."""
        deadline = time.monotonic() + self.timeout_s
        while request_id in self._inbox.cancels and self._read_once(deadline):
            pass

    def health(self) -> HealthReply:
        return self._ask(Health(), "health_reply")

    def stats(self) -> StatsReply:
        return self._ask(Stats(), "stats_reply")

    def _ask(self, msg: Message, reply_kind: str) -> Any:
        key = ("reply", reply_kind)
        self._take_arrived()
        with self._inbox.asking(key):
            self._send(msg)
            return _checked(self._next(key))

    def _send(self, msg: Message) -> None:
        try:
            self._socket.send_multipart(encode(msg), copy=False)
        except zmq.Again:
            raise TimeoutError(f"could not send to {self.endpoint} within {self.timeout_s} s") from None

    def _take_arrived(self) -> None:
        """Into the inbox: what has come, then the news of a drop (after the events the server sent before it)."""
        dropped = False
        while self._monitor.poll(0):
            dropped = _disconnected(self._monitor.recv_multipart()) or dropped
        while self._socket.poll(0):
            self._inbox.put(self._socket.recv_multipart())
        if dropped:
            self._inbox.lost(self.endpoint)

    def _next(self, key: tuple) -> Message:
        deadline = time.monotonic() + self.timeout_s
        while (msg := self._inbox.take(key)) is None:
            if not self._read_once(deadline):
                raise TimeoutError(f"no answer from {self.endpoint} within {self.timeout_s} s")
        return msg

    def _read_once(self, deadline: float) -> bool:
        """What comes next into the inbox, waiting for it until `deadline`; False if nothing came."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._poller.poll(remaining * 1000):
            return False
        self._take_arrived()
        return True

    def close(self) -> None:
        _close(self._socket, self._monitor)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _disconnected(frames: list) -> bool:
    return parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED


async def _received(socket: zmq.asyncio.Socket) -> list | None:
    try:
        return await socket.recv_multipart(flags=zmq.NOBLOCK)
    except zmq.Again:
        return None


def _close(socket: zmq.Socket, monitor: zmq.Socket) -> None:
    if not socket.closed:
        socket.disable_monitor()
    monitor.close(linger=0)
    socket.close(linger=0)


class Stream:
    """The events of one request: TokenEvents, then a FinalEvent; an ErrorEvent raises ServerError."""

    def __init__(self, client: Client, request_id: str) -> None:
        self.client, self.request_id = client, request_id
        self.done = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Event:
        if self.done:
            raise StopIteration
        try:
            msg = self.client._next(("request", self.request_id))
        except TimeoutError:
            self.close()
            raise
        self.done = not isinstance(msg, TokenEvent)
        return self.client._inbox.settle(self.request_id, msg)

    def close(self) -> None:
        """Stop reading this stream; a request still running is cancelled."""
        if not self.done:
            self.done = True
            try:
                self.client.cancel(self.request_id)
            finally:  # unsent, the id stays taken until the request's end instead
                self.client._inbox.abandon(self.request_id)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # dropped unfinished (a loop left by break): cancel, as closing an abandoned generator would; the request
        # would otherwise run to its end on the server, and its events pile up in the client's inbox. Without
        # blocking: the collector may run this anywhere, and the client may be closed already.
        if not self.done:
            self.done = True
            try:
                self.client._socket.send_multipart(encode(Cancel(request_id=self.request_id)), flags=zmq.NOBLOCK)
                self.client._inbox.cancel_sent(self.request_id)
            except zmq.ZMQError:
                pass
            self.client._inbox.abandon(self.request_id)


class AsyncClient:
    """The asyncio client: the same calls, awaited; `generate` returns an async iterator of events.

    Many coroutines may share one client: whichever is waiting reads the socket for all of them.
    """

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoint, self.timeout_s = endpoint, check_timeout(timeout_s)
        self._socket, self._monitor = _new_socket(zmq.asyncio.Context.instance(), endpoint)
        self._poller = zmq.asyncio.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._inbox = _Inbox()
        self._reading = False
        self._arrived = asyncio.Condition()
        self._taken = asyncio.Event()  # set by a coroutine that took messages while another one was reading

    async def generate(self, request_id: str | None = None, **options: Any) -> AsyncStream:
        """Send a request now; `async for` over the returned stream for its events."""
        msg = generate_request(request_id, **options)
        await self._take_arrived()  # a drop noticed now ends the requests sent before it, not this one
        await self._await_cancels(msg.request_id)
        self._inbox.claim(msg.request_id)
        try:
            await self._send(msg)
        except BaseException:
            self._inbox.release(msg.request_id)
            raise
        return AsyncStream(self, msg.request_id)

    async def complete(self, request_id: str | None = None, **options: Any) -> Completion:
        stream = await self.generate(request_id, **options)
        return Completion.from_events(stream.request_id, [event async for event in stream])

    async def cancel(self, request_id: str) -> None:
        await self._send(Cancel(request_id=checked_request_id(request_id)))
        self._inbox.cancel_sent(request_id)

    async def _await_cancels(self, request_id: str) -> None:
        """As Client._await_cancels."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                while request_id in self._inbox.cancels:
                    await self._read_once()

    async def health(self) -> HealthReply:
        return await self._ask(Health(), "health_reply")

    async def stats(self) -> StatsReply:
        return await self._ask(Stats(), "stats_reply")

    async def _ask(self, msg: Message, reply_kind: str) -> Any:
        key = ("reply", reply_kind)
        await self._take_arrived()
        with self._inbox.asking(key):
            await self._send(msg)
            return _checked(await self._next(key))

    async def _send(self, msg: Message) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._socket.send_multipart(encode(msg), copy=False)
        except TimeoutError:
            raise TimeoutError(f"could not send to {self.endpoint} within {self.timeout_s} s") from None

    async def _next(self, key: tuple) -> Message:
        try:
            async with asyncio.timeout(self.timeout_s):
                while (msg := self._inbox.take(key)) is None:
                    await self._read_once()
                return msg
        except TimeoutError:
            raise TimeoutError(f"no answer from {self.endpoint} within {self.timeout_s} s") from None

    async def _read_once(self) -> None:
        """Until something more is in the inbox: read by this coroutine, or by another that is reading."""
        if self._reading:
            async with self._arrived:
                await self._arrived.wait_for(lambda: not self._reading)
            return
        self._reading = True
        self._taken.clear()
        try:
            await self._wait_for_news()
            await self._take_arrived()
        finally:
            self._reading = False
            async with self._arrived:
                self._arrived.notify_all()

    async def _wait_for_news(self) -> None:
        """Until either socket has something, or another coroutine (generate) took messages into the inbox."""
        poll = asyncio.ensure_future(self._poller.poll())
        taken = asyncio.ensure_future(self._taken.wait())
        try:
            await asyncio.wait((poll, taken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            poll.cancel()
            taken.cancel()

    async def _take_arrived(self) -> None:
        """Into the inbox: what has come, then the news of a drop (after the events the server sent before it).
        Never waits: a blocking receive would queue behind the reader's poll, take its wake-up, and then wait
        for the next message itself (for ever, after a drop)."""
        dropped, took = False, False
        while (frames := await _received(self._monitor)) is not None:
            dropped = _disconnected(frames) or dropped
        while (frames := await _received(self._socket)) is not None:
            self._inbox.put(frames)
            took = True
        if dropped:
            self._inbox.lost(self.endpoint)
        if took or dropped:
            self._taken.set()  # the reader, if another coroutine is one, looks at the inbox again

    def close(self) -> None:
        _close(self._socket, self._monitor)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncStream:
    """The asyncio twin of `Stream`."""

    def __init__(self, client: AsyncClient, request_id: str) -> None:
        self.client, self.request_id = client, request_id
        self.done = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        try:
            msg = await self.client._next(("request", self.request_id))
        except TimeoutError:
            await self.close()
            raise
        self.done = not isinstance(msg, TokenEvent)
        return self.client._inbox.settle(self.request_id, msg)

    async def close(self) -> None:
        """Stop reading this stream; a request still running is cancelled."""
        if not self.done:
            self.done = True
            try:
                await self.client.cancel(self.request_id)
            finally:
                self.client._inbox.abandon(self.request_id)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __del__(self) -> None:
        # dropped unfinished: nothing can be awaited here, but its events stop piling up in the inbox (`async with`
        # the stream cancels the request too)
        if not self.done:
            self.client._inbox.abandon(self.request_id)


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where it is installed (it is a dependency on Linux), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
