"""What the coordinator accepts from a client: pure checks, no sockets.

Each refusal is a `Rejected(code, message, request_id)`, sent back as an ErrorEvent while the server goes
on serving. The frames are read first (size, msgpack, kind, field types: `shared.protocol.decode`), then
a Generate's values, then its prompt is rendered and tokenized and measured against the context.

Error codes: malformed, bad_version, unknown_kind, missing_field, bad_field (from decode), too_large,
unexpected_kind, invalid_request, context_exceeded, duplicate_request, overloaded, shutting_down,
unavailable, unknown_request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared.chat_template import ChatTemplateError
from shared.protocol import Cancel, Generate, Health, Message, ProtocolError, Stats, decode, recover_fields
from shared.tokenizer import Tokenizer

CLIENT_REQUESTS = (Generate, Cancel, Health, Stats)
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_REQUEST_ID = 256


class Rejected(Exception):
    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id


def frames_size(frames: list) -> int:
    return sum(len(memoryview(f.buffer if hasattr(f, "buffer") else f)) for f in frames)


def recover_request_id(frames: list) -> str | None:
    """The request_id of a message that fails to decode, when its header is a readable map that has one: the
    refusal can then name the request."""
    value = recover_fields(frames, ("request_id",)).get("request_id")
    return value if isinstance(value, str) else None


def parse_request(frames: list, max_bytes: int) -> Message:
    """A client's frames as one of the client requests; anything else is Rejected."""
    size = frames_size(frames)
    if size > max_bytes:
        raise Rejected("too_large", f"request is {size} bytes, more than the limit of {max_bytes}",
                       recover_request_id(frames))
    try:
        return decode(frames, CLIENT_REQUESTS)
    except ProtocolError as e:
        raise Rejected(e.code, e.message, recover_request_id(frames)) from None


@dataclass(frozen=True)
class Limits:
    context_length: int  # the model's
    kv_cache_tokens: int  # the setting
    kv_block_size: int = 1

    @property
    def kv_capacity(self) -> tuple[int, str]:
        """The tokens the worker's KV cache holds (whole blocks, one at the least), and how the setting made it."""
        tokens = max(1, self.kv_cache_tokens // self.kv_block_size) * self.kv_block_size
        if tokens == self.kv_cache_tokens:
            return tokens, "the KV cache capacity (kv_cache_tokens)"
        return tokens, (f"the KV cache capacity (kv_cache_tokens {self.kv_cache_tokens} in whole blocks of "
                        f"{self.kv_block_size} tokens)")


class Admission:
    """Checks a Generate's values and turns its prompt into token ids."""

    def __init__(self, tokenizer: Tokenizer, limits: Limits) -> None:
        self.tokenizer, self.limits = tokenizer, limits

    def prompt_ids(self, msg: Generate) -> list[int]:
        """The prompt's token ids, once every value of the request is known to be usable."""
        check_values(msg)
        ids = self._tokenize(msg)
        if not ids:
            raise Rejected("invalid_request", "the prompt is empty (it has no tokens)", msg.request_id)
        asked = f"prompt of {len(ids)} tokens plus max_tokens {msg.max_tokens}"
        need = len(ids) + msg.max_tokens
        if need > self.limits.context_length:
            raise Rejected("context_exceeded", f"{asked} is {need} tokens, more than the model's context length of "
                           f"{self.limits.context_length}", msg.request_id)
        kv_tokens, what = self.limits.kv_capacity
        if need - 1 > kv_tokens:  # the last token is sampled, never fed back: the worker reserves for the rest
            raise Rejected("context_exceeded", f"{asked} needs {need - 1} tokens of KV cache (all but the last), more "
                           f"than {what} of {kv_tokens}", msg.request_id)
        return ids

    def _tokenize(self, msg: Generate) -> list[int]:
        if msg.token_ids is not None:
            vocab = self.tokenizer.vocab_size
            bad = next((t for t in msg.token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise Rejected("invalid_request", f"token id {bad} is outside the vocabulary of {vocab} tokens",
                               msg.request_id)
            return list(msg.token_ids)
        if msg.messages is not None:
            check_messages(msg)
            try:
                text = self.tokenizer.apply_chat_template(msg.messages, add_generation_prompt=True)
            except ChatTemplateError as e:
                raise Rejected("invalid_request", f"messages: {e}", msg.request_id) from None
            # The template writes the special tokens (BOS included) itself, as Hugging Face's does.
            return self.tokenizer.encode(text, add_special=False)
        return self.tokenizer.encode(msg.prompt, add_special=True)


def check_values(msg: Generate) -> None:
    """Every value of a Generate other than the prompt's content, each refusal naming the field."""

    def bad(message: str) -> Rejected:
        return Rejected("invalid_request", message, msg.request_id)

    if not msg.request_id or len(msg.request_id) > MAX_REQUEST_ID:
        raise bad(f"request_id must be 1 to {MAX_REQUEST_ID} characters")
    given = [name for name in ("prompt", "messages", "token_ids") if getattr(msg, name) is not None]
    if len(given) != 1:
        which = "none" if not given else " and ".join(given)
        raise bad(f"give exactly one of prompt, messages or token_ids (got {which})")
    if msg.max_tokens <= 0:
        raise bad(f"max_tokens must be at least 1, got {msg.max_tokens}")
    if not (math.isfinite(msg.temperature) and msg.temperature >= 0):
        raise bad(f"temperature must be a finite number >= 0, got {msg.temperature}")
    if not 0 < msg.top_p <= 1:
        raise bad(f"top_p must be in (0, 1], got {msg.top_p}")
    if msg.top_k < 0:
        raise bad(f"top_k must be >= 0 (0: off), got {msg.top_k}")
    if not 0 <= msg.logprobs <= MAX_LOGPROBS:
        raise bad(f"logprobs must be in 0..{MAX_LOGPROBS}, got {msg.logprobs}")
    if msg.seed is not None and not 0 <= msg.seed < 1 << 64:
        raise bad(f"seed must be in 0..2**64-1, got {msg.seed}")
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise bad(f"at most {MAX_STOP_STRINGS} stop strings, got {len(msg.stop)}")
    if any(not s for s in msg.stop):
        raise bad("stop strings must not be empty")


def check_messages(msg: Generate) -> None:
    """Chat messages: a non-empty list of maps, each with a string role and string content."""
    messages: list[Any] = msg.messages or []
    if not messages:
        raise Rejected("invalid_request", "messages must not be empty", msg.request_id)
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise Rejected("invalid_request", f"{where}.role must be a non-empty string", msg.request_id)
        if not isinstance(m.get("content"), str):
            raise Rejected("invalid_request", f"{where}.content must be a string", msg.request_id)


def check_state(msg: Generate, *, draining: bool, missing: list[str], duplicate: bool, waiting: int,
                max_waiting: int) -> None:
    """Whether the server can take the request now, before any work is spent on it."""
    if draining:
        raise Rejected("shutting_down", "the server is shutting down and takes no new requests", msg.request_id)
    if missing:
        raise Rejected("unavailable", f"the server is not ready: {'; '.join(missing)}", msg.request_id)
    if duplicate:
        raise Rejected("duplicate_request", f"request_id {msg.request_id!r} is already in flight on this connection",
                       msg.request_id)
    if waiting >= max_waiting:
        raise Rejected("overloaded", f"{waiting} requests are already waiting (max_waiting = {max_waiting})",
                       msg.request_id)
