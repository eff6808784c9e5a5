"""Token events as a client sees them: text deltas, stop strings, held-back text, timings, and the request table."""

from __future__ import annotations

import pytest

from coordinator.streams import RequestStream, StopMatcher, StreamTable
from shared.protocol import EngineToken, FinalEvent, Generate, TokenEvent


def test_stop_string_across_pushes_cuts_the_text_before_it():
    m = StopMatcher(["lo w"])
    assert m.push("hel") == ("he", False)  # "l" may begin "lo w": held
    assert m.push("lo") == ("l", False)  # the first "l" cannot any more; "lo" still may
    assert m.push(" ") == ("", False)
    assert m.push("world") == ("", True)  # "lo w" complete: nothing of it or after it is released


def test_held_text_is_released_once_it_cannot_start_a_stop_string():
    m = StopMatcher(["abc"])
    assert m.push("xab") == ("x", False)
    assert m.push("d") == ("abd", False)
    assert m.push("a") == ("", False)
    assert m.flush() == "a"
    assert m.flush() == ""


def test_earliest_of_several_stop_strings_wins():
    m = StopMatcher(["END", "\n\n", "x"])
    assert m.push("one\n\ntwo END x") == ("one", True)
    m = StopMatcher(["bc", "abcd"])
    assert m.push("zab") == ("z", False)  # "ab" may begin "abcd"
    assert m.push("c") == ("a", True)  # "bc" is complete before "abcd" could be


def test_the_stop_string_completed_first_wins_however_the_text_is_split():
    # "b" is complete one character before "abc" is: the text ends before "b", in one piece or in several.
    for pieces in (["xabc"], ["x", "a", "bc"], ["x", "a", "b", "c"]):
        m = StopMatcher(["abc", "b"])
        out, stopped = "", False
        for piece in pieces:
            text, stopped = m.push(piece)
            out += text
            if stopped:
                break
        assert (out, stopped) == ("xa", True), pieces


def stream(tokenizer, stop=(), logprobs=0, internal_id="i-1") -> RequestStream:
    request = Generate(request_id="req", prompt="p", stop=list(stop), logprobs=logprobs)
    return RequestStream(internal_id, b"client", request, [1, 2, 3], tokenizer.detokenizer(),
                         tokenizer.eos_token_ids, arrived=100.0)


def feed(s: RequestStream, ids: list[int], last: str | None = "length", t0: float = 101.0) -> list:
    events = []
    for i, token_id in enumerate(ids):
        end = last if i == len(ids) - 1 else None
        events += s.on_token(EngineToken(request_id=s.internal_id, token_id=token_id, logprob=-0.5,
                                         top_logprobs=[[token_id, -0.5], [0, -2.0]], finish_reason=end), t0 + i)
        if s.finished:
            break
    return events


def test_a_character_split_across_tokens_is_never_split_in_the_text(tokenizer):
    ids = tokenizer.encode("a 日本 b")
    assert tokenizer.decode(ids[3:4]) == "\ufffd"  # the tokenizer really splits 本 across two byte tokens
    events = feed(stream(tokenizer), ids)
    texts = [e.text for e in events if isinstance(e, TokenEvent)]
    assert len(texts) == len(ids)
    assert all("\ufffd" not in t for t in texts)
    assert texts[3] == "" and texts[4] == "本"
    assert "".join(texts) == "a 日本 b"


def test_stop_string_spanning_tokens_ends_the_stream_and_cuts_the_text(tokenizer):
    ids = tokenizer.encode("hello world, this is it")
    s = stream(tokenizer, stop=["o wor"])
    events = feed(s, ids, last=None)
    tokens, final = events[:-1], events[-1]
    assert "".join(e.text for e in tokens) == "hell"
    assert [e.token_id for e in tokens] == ids[:5]  # "he" "ll" "o" " w" "or": ends at the token completing it
    assert isinstance(final, FinalEvent) and final.finish_reason == "stop"
    assert final.completion_tokens == 5 and s.finished


def test_text_held_for_a_stop_string_that_never_comes_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("hello world")
    events = feed(stream(tokenizer, stop=["world peace"]), ids, last="length")
    texts = [e.text for e in events[:-1]]
    assert texts[-3:] == [" ", "", "world"]  # "w", "wor", "world" may each begin "world peace"
    assert "".join(texts) == "hello world"
    assert events[-1].finish_reason == "length"


def test_end_of_turn_token_finishes_with_stop_and_adds_no_text(tokenizer):
    im_end = tokenizer.tokens.index("<|im_end|>")
    ids = [*tokenizer.encode("hi there"), im_end]
    events = feed(stream(tokenizer), ids, last="stop")
    assert [e.token_id for e in events[:-1]] == ids
    assert events[-2].text == "" and "".join(e.text for e in events[:-1]) == "hi there"
    assert events[-1].finish_reason == "stop"


def test_top_logprobs_only_when_asked(tokenizer):
    plain = feed(stream(tokenizer), [40])[0]
    asked = feed(stream(tokenizer, logprobs=2), [40])[0]
    assert plain.logprob == asked.logprob == -0.5
    assert plain.top_logprobs is None and asked.top_logprobs == [[40, -0.5], [0, -2.0]]


def test_final_event_carries_usage_and_timings(tokenizer):
    s = stream(tokenizer)
    final = feed(s, [40, 41, 42, 43, 44], t0=101.0)[-1]  # tokens at 101, 102, ..., 105; arrived at 100
    assert (final.prompt_tokens, final.completion_tokens, final.prompt_token_ids) == (3, 5, [1, 2, 3])
    assert final.ttft_s == pytest.approx(1.0)
    assert final.decode_tok_s == pytest.approx(4 / 4.0)
    assert final.total_s == pytest.approx(5.0)
    cancelled = stream(tokenizer).final("cancelled", 100.5)
    assert (cancelled.completion_tokens, cancelled.ttft_s, cancelled.decode_tok_s) == (0, 0.0, 0.0)
    assert cancelled.finish_reason == "cancelled" and cancelled.total_s == pytest.approx(0.5)


def test_engine_request_carries_the_sampling_and_the_stop_tokens(tokenizer):
    request = Generate(request_id="req", prompt="p", max_tokens=9, temperature=0.7, top_p=0.9, top_k=5, seed=3,
                       logprobs=2)
    s = RequestStream("c0-7", b"client", request, [4, 5], tokenizer.detokenizer(), {509, 511}, 0.0)
    e = s.engine_request()
    assert (e.request_id, e.prompt_token_ids, e.max_tokens, e.temperature, e.top_p, e.top_k, e.seed, e.logprobs,
            e.stop_token_ids, e.output_offset) == ("c0-7", [4, 5], 9, 0.7, 0.9, 5, 3, 2, [509, 511], 0)


def test_a_resumed_request_continues_from_its_streamed_tokens_under_a_new_engine_id(tokenizer):
    table = StreamTable("w")
    streams = [RequestStream(table.next_id(), b"c", Generate(request_id=f"r{i}", prompt="p", max_tokens=10), [4, 5],
                             tokenizer.detokenizer(), [], float(i)) for i in range(4)]
    for s in streams:
        table.add(s)
    assert table.start_next(3) == streams[:3]
    feed(streams[1], [7, 8, 9], last=None)
    streams[0].engine_started = streams[1].engine_started = True  # the engine had started them, not streams[2]
    old_ids = [s.internal_id for s in streams[:3]]
    table.resume([streams[2], streams[0]])  # in the order the engine's errors come
    table.resume([streams[1]])
    assert (table.num_running, table.num_waiting) == (0, 4)
    assert [s.resumes for s in streams] == [1, 1, 0, 0] and not any(s.engine_started for s in streams)
    assert all(s.internal_id != old and table.get(old) is None for s, old in zip(streams[:3], old_ids, strict=True))
    assert table.find(b"c", "r1") is streams[1] and table.get(streams[1].internal_id) is streams[1]
    assert table.start_next(4) == streams  # in arrival order: the resumed first, then the one that waited
    e = streams[1].engine_request()
    assert (e.request_id, e.prompt_token_ids, e.max_tokens, e.output_offset) == (
        streams[1].internal_id, [4, 5, 7, 8, 9], 7, 3)
    assert streams[1].prompt_ids == [4, 5]  # usage counts the client's prompt, not the tokens resumed from
    events = feed(streams[1], [10], last="length")
    assert events[0].index == 3 and events[-1].completion_tokens == 4


def test_table_queues_in_order_and_lets_max_running_into_the_engine(tokenizer):
    table = StreamTable("abcd")
    streams = []
    for i in range(5):
        internal_id = table.next_id()
        s = RequestStream(internal_id, b"c1" if i % 2 else b"c2", Generate(request_id=f"r{i}", prompt="p"), [1],
                          tokenizer.detokenizer(), [], 0.0)
        table.add(s)
        streams.append(s)
    assert len({s.internal_id for s in streams}) == 5 and all(s.internal_id.startswith("abcd-") for s in streams)
    assert table.start_next(2) == streams[:2]
    assert table.start_next(2) == []
    assert (table.num_running, table.num_waiting) == (2, 3)
    table.remove(streams[0])  # a running one ends: the next in line may start
    table.remove(streams[3])  # a waiting one is cancelled: it never starts
    assert table.start_next(2) == [streams[2]]
    assert table.start_next(3) == [streams[4]]
    assert table.find(b"c1", "r1") is streams[1] and table.find(b"c2", "r1") is None
    assert table.of_client(b"c2") == [streams[2], streams[4]]
    assert table.is_running(streams[4]) and len(table) == 3


def test_streams_the_engine_could_not_take_wait_again_first_in_their_order(tokenizer):
    table = StreamTable("q")
    streams = [RequestStream(table.next_id(), b"c", Generate(request_id=f"r{i}", prompt="p"), [1],
                             tokenizer.detokenizer(), [], 0.0) for i in range(4)]
    for s in streams:
        table.add(s)
    started = table.start_next(3)
    table.requeue(started[1:])  # the first reached the engine, the send of the second failed
    assert (table.num_running, table.num_waiting) == (1, 3) and table.is_running(streams[0])
    assert table.start_next(4) == streams[1:]


def test_same_request_id_from_two_clients_are_two_requests(tokenizer):
    table = StreamTable("x")
    a = RequestStream(table.next_id(), b"A", Generate(request_id="r", prompt="p"), [1], tokenizer.detokenizer(), [], 0)
    b = RequestStream(table.next_id(), b"B", Generate(request_id="r", prompt="p"), [1], tokenizer.detokenizer(), [], 0)
    table.add(a)
    table.add(b)
    assert table.find(b"A", "r") is a and table.find(b"B", "r") is b and a.internal_id != b.internal_id
