"""Every bad input a client can send is refused with its own code and a message naming the problem."""

from __future__ import annotations

import msgpack
import pytest

from coordinator.admission import (
    Admission,
    Limits,
    Rejected,
    check_state,
    parse_request,
    recover_request_id,
)
from coordinator.service import Coordinator
from gpu_worker.scheduler import SamplingParams, Sequence
from gpu_worker.service import Engine
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.launcher import free_tcp_port
from shared.protocol import Cancel, Generate, Health, Heartbeat, encode

MAX_BYTES = 4096


@pytest.fixture(scope="module")
def admission(tokenizer) -> Admission:
    return Admission(tokenizer, Limits(context_length=512, kv_cache_tokens=256))


def header(**fields) -> list[bytes]:
    return [msgpack.packb({"v": 1, **fields})]


def rejected(frames: list) -> Rejected:
    with pytest.raises(Rejected) as info:
        parse_request(frames, MAX_BYTES)
    return info.value


@pytest.mark.parametrize(
    ("frames", "code", "words", "request_id"),
    [
        ([b"\xc1\x00random bytes\xff"], "malformed", "not valid msgpack", None),
        ([b""], "malformed", "not valid msgpack", None),
        ([msgpack.packb([1, 2, 3])], "malformed", "must be a msgpack map", None),
        (header(kind="shout", request_id="r1"), "unknown_kind", "'shout'", "r1"),
        ([msgpack.packb({"v": 7, "kind": "generate", "request_id": "r2"})], "bad_version", "version 7", "r2"),
        (header(kind="cancel"), "missing_field", "'request_id'", None),
        (header(kind="generate", request_id="r3", max_tokens="ten"), "bad_field", "generate.max_tokens must be int",
         "r3"),
        (header(kind="generate", request_id="r4", stop="."), "bad_field", "generate.stop must be a list", "r4"),
        (header(kind="generate", request_id="r5", token_ids=[1, "2"]), "bad_field", "token_ids[1] must be int", "r5"),
        (header(kind="generate", request_id="r6", messages=["hi"]), "bad_field", "messages[0] must be a map", "r6"),
        (header(kind="generate", request_id="r7", colour="red"), "bad_field", "unknown field(s) colour", "r7"),
        (header(kind="generate", request_id=12), "bad_field", "request_id must be str", None),
        (encode(Heartbeat(member_id="x", role="gpu_worker", incarnation="i", pid=1, host="h", metrics_port=0,
                          placement_version=0, model="m")),
         "unexpected_kind", "'heartbeat' is not expected here: send one of generate", None),
        (header(kind="generate", request_id="big", prompt="x" * MAX_BYTES), "too_large", f"limit of {MAX_BYTES}",
         "big"),
        # another role's message is refused for its kind, whatever its fields: they are not the client's to get right
        (header(kind="engine_token", request_id="r8", token_id=1, logprob=0.0, top_logprobs=[5]), "unexpected_kind",
         "'engine_token' is not expected here", "r8"),
        (header(kind="token", request_id="r9"), "unexpected_kind", "'token' is not expected here", "r9"),
    ],
)
def test_unreadable_requests_are_refused_naming_the_problem(frames, code, words, request_id):
    r = rejected(frames)
    assert (r.code, r.request_id) == (code, request_id)
    assert words in r.message


def test_client_requests_are_read_back():
    for msg in (Generate(request_id="a", prompt="hi", stop=["\n"]), Cancel(request_id="a"), Health()):
        assert parse_request(encode(msg), MAX_BYTES) == msg


def test_request_id_is_recovered_without_reading_a_huge_prompt():
    frames = [msgpack.packb({"prompt": "x" * 100_000, "kind": "generate", "request_id": "late"})]
    assert recover_request_id(frames) == "late"
    assert recover_request_id([b"\x85\xa1v"]) is None  # truncated map
    assert recover_request_id([msgpack.packb({"request_id": 5})]) is None


def test_a_kv_cache_in_whole_blocks_is_named_as_the_setting_made_it(tokenizer):
    """kv_cache_tokens = 330 in blocks of 8 holds 328: a refusal quoting 328 as kv_cache_tokens read as a number
    the user never set."""
    admission = Admission(tokenizer, Limits(context_length=512, kv_cache_tokens=330, kv_block_size=8))
    with pytest.raises(Rejected, match=r"needs 329 tokens of KV cache \(all but the last\), more than the KV cache "
                                       r"capacity \(kv_cache_tokens 330 in whole blocks of 8 tokens\) of 328"):
        admission.prompt_ids(Generate(request_id="req", token_ids=[1] * 200, max_tokens=130))
    assert admission.prompt_ids(Generate(request_id="req", token_ids=[1] * 200, max_tokens=129)) == [1] * 200


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({}, "invalid_request", "exactly one of prompt, messages or token_ids (got none)"),
        ({"prompt": "a", "token_ids": [1]}, "invalid_request", "(got prompt and token_ids)"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}], "token_ids": [1]}, "invalid_request",
         "(got prompt and messages and token_ids)"),
        ({"prompt": "a", "max_tokens": 0}, "invalid_request", "max_tokens must be at least 1, got 0"),
        ({"prompt": "a", "max_tokens": -5}, "invalid_request", "max_tokens must be at least 1, got -5"),
        ({"prompt": "a", "temperature": -0.1}, "invalid_request", "temperature must be a finite number >= 0"),
        ({"prompt": "a", "temperature": float("nan")}, "invalid_request", "temperature must be a finite number"),
        ({"prompt": "a", "top_p": 0.0}, "invalid_request", "top_p must be in (0, 1], got 0.0"),
        ({"prompt": "a", "top_p": 1.5}, "invalid_request", "top_p must be in (0, 1], got 1.5"),
        ({"prompt": "a", "top_k": -1}, "invalid_request", "top_k must be >= 0"),
        ({"prompt": "a", "logprobs": 21}, "invalid_request", "logprobs must be in 0..20, got 21"),
        ({"prompt": "a", "logprobs": -1}, "invalid_request", "logprobs must be in 0..20, got -1"),
        ({"prompt": "a", "seed": -1}, "invalid_request", "seed must be in 0..2**64-1"),
        ({"prompt": "a", "stop": [""]}, "invalid_request", "stop strings must not be empty"),
        ({"prompt": "a", "stop": ["s"] * 17}, "invalid_request", "at most 16 stop strings"),
        ({"token_ids": [1, 512]}, "invalid_request", "token id 512 is outside the vocabulary of 512 tokens"),
        ({"token_ids": [-1]}, "invalid_request", "token id -1 is outside the vocabulary"),
        ({"token_ids": []}, "invalid_request", "the prompt is empty"),
        ({"prompt": ""}, "invalid_request", "the prompt is empty"),
        ({"messages": []}, "invalid_request", "messages must not be empty"),
        ({"messages": [{"content": "hi"}]}, "invalid_request", "messages[0].role must be a non-empty string"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": None}]}, "invalid_request",
         "messages[1].content must be a string"),
        ({"messages": [{"role": "user", "content": ["parts"]}]}, "invalid_request",
         "messages[0].content must be a string"),
        ({"token_ids": [1] * 200, "max_tokens": 100}, "context_exceeded",
         "needs 299 tokens of KV cache (all but the last), more than the KV cache capacity (kv_cache_tokens) of 256"),
        ({"token_ids": [1] * 10, "max_tokens": 600}, "context_exceeded",
         "is 610 tokens, more than the model's context length of 512"),
    ],
)
def test_unusable_values_are_refused_naming_the_field(admission, fields, code, words):
    with pytest.raises(Rejected) as info:
        admission.prompt_ids(Generate(request_id="req", **fields))
    assert (info.value.code, info.value.request_id) == (code, "req")
    assert words in info.value.message


def test_request_id_must_be_usable(admission):
    for request_id in ("", "x" * 257):
        with pytest.raises(Rejected, match="request_id must be 1 to 256 characters"):
            admission.prompt_ids(Generate(request_id=request_id, prompt="a"))


def test_prompts_become_the_tokens_the_model_reads(admission, tokenizer):
    assert admission.prompt_ids(Generate(request_id="a", prompt="hello world")) == tokenizer.encode("hello world")
    assert admission.prompt_ids(Generate(request_id="b", token_ids=[5, 6, 7])) == [5, 6, 7]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = admission.prompt_ids(Generate(request_id="c", messages=chat))
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(tokenizer.tokens.index("<|im_start|>")) == 3  # markup became control tokens, not text


def test_a_prompt_exactly_at_the_limit_is_admitted(admission):
    assert len(admission.prompt_ids(Generate(request_id="a", token_ids=[1] * 200, max_tokens=56))) == 200


@pytest.mark.parametrize(
    ("state", "code", "words"),
    [
        ({"draining": True}, "shutting_down", "shutting down"),
        ({"missing": ["gpu-worker has not joined"]}, "unavailable", "not ready: gpu-worker has not joined"),
        ({"duplicate": True}, "duplicate_request", "request_id 'req' is already in flight"),
        ({"waiting": 8}, "overloaded", "8 requests are already waiting (max_waiting = 8)"),
    ],
)
def test_the_server_state_refuses_requests_it_cannot_take(state, code, words):
    values = {"draining": False, "missing": [], "duplicate": False, "waiting": 0, "max_waiting": 8, **state}
    with pytest.raises(Rejected) as info:
        check_state(Generate(request_id="req", prompt="a"), **values)
    assert (info.value.code, info.value.request_id) == (code, "req")
    assert words in info.value.message


def test_a_server_with_room_takes_the_request():
    check_state(Generate(request_id="req", prompt="a"), draining=False, missing=[], duplicate=False, waiting=7,
                max_waiting=8)


def test_the_kv_limit_is_the_cache_the_worker_has_when_kv_cache_tokens_is_not_whole_blocks(tiny_model, tmp_path):
    """The worker's cache is whole blocks: with kv_cache_tokens = 100 in blocks of 16 it holds 96 tokens, and a
    request of 97 (the last token is never cached) at most. One of 98 to 100 tokens was admitted, then refused by
    the worker: an error after the request had been taken."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    config = Config(model=str(tiny_model), run_dir=str(run_dir), client_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}",
                    metrics_port=0, device="cpu", expert_hosts=0, hot_experts=8, kv_cache_tokens=100,
                    kv_block_size=16)
    model = GGUFModel(config.model)
    worker = Engine(config, model, None).scheduler
    coordinator = Coordinator(config, model)
    try:
        for n in (97, 98, 100):
            request = Generate(request_id="r", token_ids=[1] * (n - 10), max_tokens=10)
            fits = worker.never_fits(Sequence("r", [1] * (n - 10), SamplingParams(max_tokens=10))) is None
            try:
                coordinator.admission.prompt_ids(request)
                admitted = True
            except Rejected as r:
                assert r.code == "context_exceeded"
                admitted = False
            assert admitted == fits == (n <= 97), n
    finally:
        coordinator.close()
