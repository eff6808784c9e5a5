"""Requests in flight and the events streamed back for them: pure logic, no sockets.

A `RequestStream` turns the engine's tokens into client events: text deltas from an incremental
detokenizer (never half a character), stop strings cut out of the text (text that may be the start of one
is held back until decided), usage and timings at the end. The `StreamTable` keeps every stream under an
internal id unique across clients (what the engine sees), queues them in arrival order and lets at most
`max_running` into the engine at once.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence

from shared.protocol import EngineGenerate, EngineToken, FinalEvent, Generate, Message, TokenEvent
from shared.tokenizer import IncrementalDetokenizer


class StopMatcher:
    """Releases text as soon as it can no longer be part of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text that may be streamed now, whether a stop string is complete); on a stop the text ends
        right before the earliest stop string and nothing is held any more."""
        text = self.held + text
        # The stop string completed first ends the text, as it would had the text come one character at a time;
        # of those completed by the same character, the longest.
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)[1]], True
        keep = self._partial_stop_length(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """At the end of the stream the held text is no stop string after all."""
        text, self.held = self.held, ""
        return text

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with (shorter than that stop)."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best


class RequestStream:
    """One admitted request, from its arrival to its final event."""

    def __init__(self, internal_id: str, client: bytes, request: Generate, prompt_ids: list[int],
                 detokenizer: IncrementalDetokenizer, stop_token_ids: Iterable[int], arrived: float) -> None:
        self.internal_id, self.client, self.request = internal_id, client, request
        self.prompt_ids = prompt_ids
        self.stop_token_ids = frozenset(stop_token_ids)
        self._detokenizer = detokenizer
        self._stops = StopMatcher(request.stop)
        self.arrived = arrived
        self.sent_at = arrived  # when it last went to the engine
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.token_ids: list[int] = []  # generated so far: a request resumed on another worker continues from them
        self.engine_started = False  # admitted by the worker it last went to (EngineStarted)
        self.resumes = 0
        self.finish_reason: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def engine_request(self) -> EngineGenerate:
        """What the engine runs: the prompt, or, for a request resumed after its worker was lost, the prompt and
        the tokens already streamed, to generate the rest from."""
        r = self.request
        return EngineGenerate(request_id=self.internal_id, prompt_token_ids=self.prompt_ids + self.token_ids,
                              max_tokens=r.max_tokens - self.n_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, seed=r.seed, logprobs=r.logprobs,
                              stop_token_ids=sorted(self.stop_token_ids), output_offset=self.n_tokens)

    def on_token(self, token: EngineToken, now: float) -> list[Message]:
        """The TokenEvent of one generated token, followed by the FinalEvent when it is the last one: the
        engine says so, or the text completed a stop string (the engine must then be told to cancel)."""
        index = self.n_tokens
        self.token_ids.append(token.token_id)
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        ended = token.finish_reason
        # The end-of-turn token that stopped the engine is markup, not text of the reply.
        eos = ended == "stop" and token.token_id in self.stop_token_ids
        text, stopped = self._stops.push("" if eos else self._detokenizer.feed(token.token_id))
        if ended is not None and not stopped:
            tail, stopped = self._stops.push(self._detokenizer.flush())
            text += tail if stopped else tail + self._stops.flush()
        top = token.top_logprobs if self.request.logprobs > 0 else None
        events: list[Message] = [TokenEvent(request_id=self.request_id, index=index, token_id=token.token_id,
                                            text=text, logprob=token.logprob, top_logprobs=top)]
        if stopped or ended is not None:
            events.append(self.final("stop" if stopped else ended, now))
        return events

    def final(self, reason: str, now: float) -> FinalEvent:
        """End the stream; text still held back for a possible stop string is dropped with it."""
        self.finish_reason = reason
        first, last = self.first_token_at, self.last_token_at
        decode_s = (last - first) if first is not None and last is not None else 0.0
        return FinalEvent(
            request_id=self.request_id, finish_reason=reason, prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.n_tokens, ttft_s=(first - self.arrived) if first is not None else 0.0,
            decode_tok_s=(self.n_tokens - 1) / decode_s if self.n_tokens > 1 and decode_s > 0 else 0.0,
            total_s=now - self.arrived, prompt_token_ids=list(self.prompt_ids),
        )


class StreamTable:
    """Every request in flight: waiting here in arrival order, then running in the engine."""

    def __init__(self, id_prefix: str) -> None:
        self._prefix = id_prefix
        self._counter = itertools.count(1)
        self.streams: dict[str, RequestStream] = {}
        self._by_client: dict[tuple[bytes, str], str] = {}
        self.waiting: deque[str] = deque()
        self.running: set[str] = set()

    def next_id(self) -> str:
        """An engine request id no other request of this coordinator has, nor one of an earlier coordinator
        (the prefix differs), so tokens of a request that outlived its coordinator never reach a new one."""
        return f"{self._prefix}-{next(self._counter)}"

    def add(self, stream: RequestStream) -> None:
        self.streams[stream.internal_id] = stream
        self._by_client[(stream.client, stream.request_id)] = stream.internal_id
        self.waiting.append(stream.internal_id)

    def get(self, internal_id: str) -> RequestStream | None:
        return self.streams.get(internal_id)

    def find(self, client: bytes, request_id: str) -> RequestStream | None:
        internal_id = self._by_client.get((client, request_id))
        return self.streams.get(internal_id) if internal_id is not None else None

    def of_client(self, client: bytes) -> list[RequestStream]:
        return [s for s in self.streams.values() if s.client == client]

    def is_running(self, stream: RequestStream) -> bool:
        return stream.internal_id in self.running

    def start_next(self, max_running: int) -> list[RequestStream]:
        """Waiting streams that may enter the engine now, oldest first."""
        started = []
        while self.waiting and len(self.running) < max_running:
            internal_id = self.waiting.popleft()
            self.running.add(internal_id)
            started.append(self.streams[internal_id])
        return started

    def requeue(self, streams: list[RequestStream]) -> None:
        """Started streams that did not reach the engine, back at the head of the queue in their order."""
        for stream in reversed(streams):
            self.running.discard(stream.internal_id)
            self.waiting.appendleft(stream.internal_id)

    def resume(self, streams: list[RequestStream]) -> None:
        """Running streams whose engine state is lost, back in the queue in arrival order (ahead of the requests
        that came after them), each under a new engine id: an engine that was only slow, not gone, may still
        send tokens under the old one, which are then unknown here and cancelled. A resume counts towards the
        request's limit where the engine had started it, not where the request only waited there or was refused."""
        for stream in streams:
            self.running.discard(stream.internal_id)
            del self.streams[stream.internal_id]
            stream.internal_id = self.next_id()
            if stream.engine_started:
                stream.resumes += 1
            stream.engine_started = False
            self.streams[stream.internal_id] = stream
            self._by_client[(stream.client, stream.request_id)] = stream.internal_id
            self.waiting.append(stream.internal_id)
        self.waiting = deque(sorted(self.waiting, key=lambda i: self.streams[i].arrived))

    def running_streams(self) -> list[RequestStream]:
        return [self.streams[i] for i in self.running]

    def waiting_streams(self) -> list[RequestStream]:
        return [self.streams[i] for i in self.waiting]

    def remove(self, stream: RequestStream) -> None:
        del self.streams[stream.internal_id]
        del self._by_client[(stream.client, stream.request_id)]
        if stream.internal_id in self.running:
            self.running.discard(stream.internal_id)
        else:
            self.waiting.remove(stream.internal_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def __len__(self) -> int:
        return len(self.streams)
