"""Continuous batching over a paged KV cache: which tokens of which sequences the next model step runs.

Every sequence admitted reserves KV blocks for its whole possible length up front, so a running
sequence never runs out of cache and nothing is ever preempted; requests that do not fit yet wait
in arrival order. Each step puts every decoding sequence's one token first, then prompt chunks
up to the step's token budget, so a long prompt is prefilled over several steps without stalling
the decodes running beside it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from gpu_worker.kv_blocks import KVBlockAllocator


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    logprobs: int = 0  # how many top alternatives to return with each token
    stop_token_ids: frozenset[int] = frozenset()
    output_offset: int = 0  # tokens of the prompt that are the request's own output, streamed before a resume


class SequenceStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "length", "stop", "cancelled" or "error"
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_decoding(self) -> bool:
        return bool(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens start .. end-1 of prompt + output, without building the whole list."""
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[start:end] + self.output_token_ids[max(0, start - p) : max(0, end - p)]


@dataclass
class ScheduledChunk:
    """Tokens start .. start+len-1 of one sequence to run in this step."""

    seq: Sequence
    start: int
    token_ids: list[int]
    # whether the chunk reaches the end of the known tokens, so its last logits give the next token;
    # fixed when scheduled, as the sequence grows once the token is appended
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.start + len(self.token_ids) == self.seq.total_len


@dataclass
class ScheduledBatch:
    chunks: list[ScheduledChunk]
    admitted: list[Sequence] = field(default_factory=list)  # the sequences this step admits, whose prompts start

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Refusal(NamedTuple):
    """Why a request could never run, as the error its client gets: invalid_request for values no cache could take,
    context_exceeded for a request too long for this one."""

    code: str
    message: str


class Scheduler:
    def __init__(self, allocator: KVBlockAllocator, max_batch_tokens: int, max_running: int, prefill_chunk: int,
                 max_context: int) -> None:
        # with at most one decode token per running sequence, this keeps room for every decode in every step
        if not 1 <= max_running <= max_batch_tokens:
            raise ValueError(f"max_running ({max_running}) must be between 1 and max_batch_tokens ({max_batch_tokens})")
        if prefill_chunk < 1 or max_context < 2:
            raise ValueError(f"prefill_chunk ({prefill_chunk}) must be >= 1 and max_context ({max_context}) >= 2")
        self.allocator = allocator
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.prefill_chunk, self.max_context = prefill_chunk, max_context
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # in admission order

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_blocks_used(self) -> int:
        return self.allocator.num_used

    @property
    def kv_blocks_total(self) -> int:
        return self.allocator.num_blocks

    def max_len(self, seq: Sequence) -> int:
        """The longest prompt + output the sequence may reach."""
        return min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_context)

    def kv_blocks_reserved(self, seq: Sequence) -> int:
        """The blocks that hold every token of the sequence's longest length but the last, which is sampled and
        never fed back: reserving it too took a block more whenever that length was one past a block, and refused a
        request that fits the cache exactly."""
        return self.allocator.blocks_needed(self.max_len(seq) - 1)

    def never_fits(self, seq: Sequence) -> Refusal | None:
        """Why the sequence could never run, or None: it needs a prompt, room for at least one new token, and a
        reservation that fits in an empty cache. One that does not would wait forever, so the service refuses it."""
        prompt = seq.num_prompt_tokens
        if prompt == 0:
            return Refusal("invalid_request", "the prompt is empty")
        if seq.params.max_tokens < 1:
            return Refusal("invalid_request", f"max_tokens is {seq.params.max_tokens}, not at least 1")
        if prompt >= self.max_context:
            return Refusal("context_exceeded",
                           f"a prompt of {prompt} tokens leaves no room in the context of {self.max_context}")
        blocks, block_size = self.kv_blocks_reserved(seq), self.allocator.block_size
        if blocks > self.allocator.num_blocks:
            return Refusal("context_exceeded",
                           f"a prompt of {prompt} tokens plus max_tokens {seq.params.max_tokens} needs {blocks} KV "
                           f"blocks of {block_size} tokens, more than the cache's {self.allocator.num_blocks} "
                           f"({self.allocator.num_blocks * block_size} tokens)")
        return None

    def add(self, seq: Sequence) -> None:
        if (refusal := self.never_fits(seq)) is not None:
            raise ValueError(f"request {seq.request_id} can never run ({refusal.message}); check never_fits before "
                             f"adding")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel(self, request_id: str, reason: str = "cancelled") -> Sequence | None:
        """End a waiting or running sequence now and free its KV blocks; None if it is not here."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, reason)
                    return seq
        return None

    def schedule(self) -> ScheduledBatch | None:
        budget = self.max_batch_tokens
        chunks, admitted = [], []
        # decodes first: __init__ guarantees the budget covers all of them
        for seq in self.running:
            if seq.is_decoding:
                chunks.append(ScheduledChunk(seq, seq.num_computed, [seq.last_token_id]))
                budget -= 1
        for seq in self.running:
            if budget == 0:
                break
            if not seq.is_decoding:
                budget -= self._add_prefill_chunk(chunks, seq, budget)
        # FCFS: the head of the queue blocks the rest until its reservation fits
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            blocks = self.allocator.allocate(self.kv_blocks_reserved(seq))
            if blocks is None:
                break
            self.waiting.popleft()
            seq.block_table, seq.status = blocks, SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= self._add_prefill_chunk(chunks, seq, budget)
        return ScheduledBatch(chunks, admitted) if chunks else None

    def _add_prefill_chunk(self, chunks: list[ScheduledChunk], seq: Sequence, budget: int) -> int:
        end = min(seq.num_prompt_tokens, seq.num_computed + self.prefill_chunk, seq.num_computed + budget)
        chunks.append(ScheduledChunk(seq, seq.num_computed, seq.token_slice(seq.num_computed, end)))
        return end - seq.num_computed

    def postprocess(self, batch: ScheduledBatch, sampled: dict[str, int | None],
                    finished: list[Sequence] | None = None) -> list[Sequence]:
        """Record the step: advance what is cached, append the token sampled for every chunk that samples
        (`sampled` maps request id to token id, or to None where the logits were not finite: no token, and the
        caller ends it), and finish and free the sequences that are done. Returns those, appended to `finished` (a
        new list if None) as each is done: were a later one to fail, the caller still knows which have left the
        running set and must be answered."""
        finished = [] if finished is None else finished
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.is_finished:  # cancelled after this batch was scheduled
                continue
            seq.num_computed = chunk.start + len(chunk.token_ids)
            if not chunk.samples:
                continue
            token = sampled[seq.request_id]
            if token is None:
                continue
            seq.output_token_ids.append(token)
            if token in seq.params.stop_token_ids:
                reason = "stop"
            elif seq.total_len >= self.max_len(seq):
                reason = "length"
            else:
                continue
            self._finish(seq, reason)  # first: were it to fail, the sequence is still running, for the caller to fail
            self.running.remove(seq)
            finished.append(seq)
        return finished

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.block_table:
            self.allocator.free(seq.block_table)
            seq.block_table = []
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
