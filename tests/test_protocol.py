"""Wire format: round trips with zero-copy tensor frames, and a named error for every kind of bad input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import msgpack
import pytest
import torch

from shared.protocol import (
    ExpertWork,
    FinalEvent,
    Generate,
    Health,
    Message,
    ProtocolError,
    TokenEvent,
    decode,
    encode,
    recover_fields,
)


def test_round_trip_plain_message():
    msg = Generate(request_id="r1", prompt="hi", max_tokens=5, stop=["\n"], seed=3, temperature=0.7)
    assert decode(encode(msg)) == msg
    assert decode(encode(Health())) == Health()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
def test_tensors_travel_as_separate_frames(dtype):
    hidden = (torch.arange(24, dtype=torch.float32).reshape(6, 4) / 7).to(dtype)
    msg = ExpertWork(step=1, layer=2, expert_ids=[3, 5], counts=[4, 2], hidden=hidden)
    frames = encode(msg)
    assert len(frames) == 2 and b"hidden" in frames[0]
    assert bytes(frames[1]) == hidden.view(torch.uint8).numpy().tobytes() if dtype != torch.bfloat16 else True
    back = decode([bytes(f) for f in frames])
    assert back.expert_ids == [3, 5] and back.hidden.dtype == dtype
    assert torch.equal(back.hidden, hidden)


def test_empty_tensor_round_trips():
    msg = ExpertWork(step=0, layer=0, expert_ids=[], counts=[], hidden=torch.empty(0, 8))
    assert decode([bytes(f) for f in encode(msg)]).hidden.shape == (0, 8)


def test_an_integer_in_a_float_field_is_read_as_a_float():
    header = {"v": 1, "kind": "generate", "request_id": "r", "temperature": 2**64 - 1, "top_p": 1, "seed": 5}
    msg = decode([msgpack.packb(header)])
    assert type(msg.temperature) is float and msg.temperature == 2.0**64 and type(msg.top_p) is float
    assert type(msg.seed) is int  # an int field's int stays one, an Optional's too
    event = decode(encode(TokenEvent(request_id="r", index=0, token_id=1, text="", logprob=0)))
    assert type(event.logprob) is float


@pytest.mark.parametrize(("fields", "name"), [({"seed": 2**64}, "seed"),
                                              ({"token_ids": [1, -(2**63) - 1]}, "token_ids")])
def test_an_integer_msgpack_cannot_carry_is_refused_by_the_sender_by_name(fields, name):
    """msgpack's OverflowError named no field: `tierserve generate --seed 99999999999999999999999` ended in it."""
    with pytest.raises(ValueError, match=rf"generate\.{name} holds an integer outside -2\*\*63\.\.2\*\*64-1"):
        encode(Generate(request_id="r", **fields))


def test_a_tensor_field_holding_something_else_is_refused_by_the_sender_by_name():
    with pytest.raises(ValueError, match="expert_work.hidden must be a tensor, not list"):
        encode(ExpertWork(step=0, layer=0, expert_ids=[], counts=[], hidden=[1.0]))


def test_a_message_whose_tensor_field_is_annotated_otherwise_is_refused_where_it_is_defined():
    """Tensor fields are found by their annotation, torch.Tensor exactly: another spelling would travel as msgpack."""
    with pytest.raises(TypeError, match="Odd.hidden: a tensor field is annotated torch.Tensor, not torch.Tensor [|]"):
        @dataclass
        class Odd(Message):
            KIND: ClassVar[str] = ""
            hidden: torch.Tensor | None


def _frames(header: dict) -> list[bytes]:
    return [msgpack.packb(header)]


@pytest.mark.parametrize(
    "frames, code, text",
    [
        ([b"\xc1\xff random bytes"], "malformed", "not valid msgpack"),
        # valid msgpack whose prompt is no UTF-8: it was called "not valid msgpack"
        ([b"\x83\xa1v\x01\xa4kind\xa8generate\xa6prompt\xa2\xff\xfe"], "malformed",
         r"a string in the message is not valid UTF-8 \(invalid start byte at its byte 0\)"),
        ([msgpack.packb([1, 2, 3])], "malformed", "must be a msgpack map"),
        ([], "malformed", "empty message"),
        (_frames({"v": 99, "kind": "health"}), "bad_version", "protocol version 99"),
        (_frames({"v": 1, "kind": "launch_rockets"}), "unknown_kind", "unknown message kind 'launch_rockets'"),
        (_frames({"v": 1, "kind": "generate"}), "missing_field", "missing field 'request_id'"),
        (_frames({"v": 1, "kind": "generate", "request_id": 7}), "bad_field", "generate.request_id must be str"),
        (_frames({"v": 1, "kind": "generate", "request_id": "a", "max_tokens": "ten"}), "bad_field",
         "generate.max_tokens must be int"),
        (_frames({"v": 1, "kind": "generate", "request_id": "a", "token_ids": [1, "x"]}), "bad_field",
         r"generate.token_ids\[1\] must be int"),
        (_frames({"v": 1, "kind": "generate", "request_id": "a", "colour": "red"}), "bad_field",
         r"unknown field\(s\) colour"),
        ([msgpack.packb({"v": 1, "kind": "generate", "request_id": "a", b"x": 1})], "bad_field",
         "field names must be strings, not b'x'"),
        # valid msgpack with a key of another type, at the top or inside a field: called "not valid msgpack"
        ([msgpack.packb({"v": 1, "kind": "generate", "request_id": "a", 5: 1})], "bad_field",
         "map keys must be strings"),
        ([msgpack.packb({"v": 1, "kind": "generate", "request_id": "a",
                         "messages": [{"role": "user", "content": "x", 1: "y"}]})], "bad_field",
         "map keys must be strings"),
        # equal to 1, but no version number
        (_frames({"v": True, "kind": "health"}), "bad_version", "protocol version True"),
        (_frames({"v": 1.0, "kind": "health"}), "bad_version", "protocol version 1.0"),
        # frames no tensor field names were skipped over (a generate with 1,000 of them ran)
        ([*_frames({"v": 1, "kind": "health"}), b"stray"], "malformed",
         r"health: 1 frame\(s\) after the header, where its tensors take 0"),
        (_frames({"v": 1, "kind": "expert_work", "step": 0, "layer": 0, "expert_ids": [], "counts": [],
                  "hidden": {"__tensor__": 0, "dtype": "f4", "shape": [2, 2]}}), "bad_field", "frame 0 is missing"),
        # a dtype that cannot be a key raised TypeError (a host's socket loop ended on it); an index of True was
        # taken for frame 1
        *[(_frames({"v": 1, "kind": "expert_work", "step": 0, "layer": 0, "expert_ids": [], "counts": [],
                    "hidden": {"__tensor__": index, "dtype": dtype, "shape": [2, 2]}}), "bad_field",
           "expert_work.hidden: malformed tensor header") for index, dtype in [(0, [1]), (0, {"a": 1}), (True, "f4")]],
        # an item of a list of lists that is no list raised TypeError
        (_frames({"v": 1, "kind": "token", "request_id": "a", "index": 0, "token_id": 1, "text": "",
                  "top_logprobs": [5]}), "bad_field", r"token.top_logprobs\[0\] must be list, got int"),
        (_frames({"v": 1, "kind": "engine_token", "request_id": "a", "token_id": 1, "logprob": 0.0,
                  "top_logprobs": ["x"]}), "bad_field", r"engine_token.top_logprobs\[0\] must be list, got str"),
    ],
)
def test_bad_input_names_the_problem(frames, code, text):
    with pytest.raises(ProtocolError, match=text) as info:
        decode(frames)
    assert info.value.code == code


def test_tensor_size_must_match_shape():
    frames = encode(ExpertWork(step=0, layer=0, expert_ids=[1], counts=[2], hidden=torch.zeros(2, 4)))
    with pytest.raises(ProtocolError, match="shape needs 32"):
        decode([frames[0], b"\x00" * 8])


@pytest.mark.parametrize("shape, payload, text", [
    ([2**32, 2**32], b"", "shape needs 73786976294838206464"),  # numpy's int64 product wrapped round to 0
    ([2**63, 2], b"", "shape needs 73786976294838206464"),
    ([2**64 - 1, 1], bytes(8), "shape needs 73786976294838206460"),
    ([2**40, 2**40, 0], b"", "is too large"),
    ([2**64 - 1, 0], b"", "is too large"),
])
def test_huge_tensor_shapes_are_refused(shape, payload, text):
    header = {"v": 1, "kind": "expert_work", "step": 0, "layer": 0, "expert_ids": [], "counts": [],
              "hidden": {"__tensor__": 0, "dtype": "f4", "shape": shape}}
    with pytest.raises(ProtocolError, match=text) as info:
        decode([msgpack.packb(header), payload])
    assert info.value.code == "bad_field"


def test_float_fields_accept_ints_and_optional_fields_accept_none():
    msg = decode(_frames({"v": 1, "kind": "generate", "request_id": "a", "temperature": 1, "seed": None}))
    assert msg.temperature == 1 and msg.seed is None
    final = FinalEvent(request_id="a", finish_reason="length", prompt_tokens=3, completion_tokens=2,
                       ttft_s=0.1, decode_tok_s=10.0, total_s=0.3)
    assert decode(encode(final)) == final


def test_fields_are_recovered_from_a_header_that_does_not_decode_as_far_as_it_can_be_read():
    header = {"v": 1, "kind": "expert_work", "step": 7, "hidden": {"shape": ["a"]}, "layer": 2}
    assert recover_fields([msgpack.packb(header), b""], ("step", "layer")) == {"step": 7, "layer": 2}
    assert recover_fields([msgpack.packb(header)[:30]], ("step", "layer")) == {"step": 7}  # cut short after step
    assert recover_fields([b"\x93\xff garbage"], ("step",)) == {}
    assert recover_fields([], ("step",)) == {}
