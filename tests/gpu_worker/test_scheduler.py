"""Continuous batching and KV block bookkeeping, driven by feeding sequences and sampled tokens."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from gpu_worker.kv_blocks import KVBlockAllocator
from gpu_worker.scheduler import SamplingParams, ScheduledBatch, Scheduler, Sequence, SequenceStatus

TOKEN = 7


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_batch_tokens: int = 16, max_running: int = 4,
                   prefill_chunk: int = 8, max_context: int = 256) -> Scheduler:
    return Scheduler(KVBlockAllocator(num_blocks, block_size), max_batch_tokens=max_batch_tokens,
                     max_running=max_running, prefill_chunk=prefill_chunk, max_context=max_context)


def make_seq(request_id: str, prompt_len: int, max_tokens: int = 4, stop: tuple[int, ...] = ()) -> Sequence:
    prompt = [100 + i for i in range(prompt_len)]
    return Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens, stop_token_ids=frozenset(stop)))


def step(sched: Scheduler, token: int = TOKEN) -> tuple[ScheduledBatch, list[Sequence]]:
    """One engine step with a model that always predicts `token`."""
    batch = sched.schedule()
    assert batch is not None
    return batch, sched.postprocess(batch, {c.seq.request_id: token for c in batch.chunks if c.samples})


def steps_until_idle(sched: Scheduler, max_steps: int = 1000) -> Iterator[tuple[ScheduledBatch, list[Sequence]]]:
    for _ in range(max_steps):
        if not sched.has_work():
            return
        yield step(sched)
    raise AssertionError("scheduler did not drain")


def run_to_completion(sched: Scheduler) -> list[Sequence]:
    return [seq for _, finished in steps_until_idle(sched) for seq in finished]


# --- allocator


def test_allocator_hands_out_and_takes_back_blocks():
    alloc = KVBlockAllocator(5, 16)
    assert (alloc.blocks_needed(0), alloc.blocks_needed(1), alloc.blocks_needed(16), alloc.blocks_needed(17)) == (
        0, 1, 1, 2)
    a = alloc.allocate(3)
    assert a is not None and len(set(a)) == 3 and alloc.num_free == 2 and alloc.num_used == 3
    assert alloc.allocate(3) is None and alloc.num_free == 2  # a refusal takes nothing
    b = alloc.allocate(2)
    assert b is not None and not set(a) & set(b) and alloc.num_free == 0
    alloc.free(a)
    assert alloc.num_free == 3
    assert sorted(alloc.allocate(3)) == sorted(a)


def test_allocator_refuses_double_and_foreign_frees():
    alloc = KVBlockAllocator(4, 8)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(ValueError):
        alloc.free(blocks)
    with pytest.raises(ValueError):
        alloc.free([99])
    blocks = alloc.allocate(1)
    with pytest.raises(ValueError):
        alloc.free(blocks + blocks)
    assert alloc.num_free == 3  # the refused free changed nothing


# --- batching


def test_prompt_prefilled_then_decoded_one_token_per_step():
    sched = make_scheduler(prefill_chunk=8, max_batch_tokens=16)
    seq = make_seq("a", 5, max_tokens=3)
    sched.add(seq)
    assert sched.num_waiting == 1 and sched.has_work()
    batch, finished = step(sched, token=11)
    (chunk,) = batch.chunks
    assert (chunk.start, chunk.token_ids, chunk.samples) == (0, seq.prompt_token_ids, True)
    assert seq.status is SequenceStatus.RUNNING and seq.num_computed == 5 and seq.output_token_ids == [11]
    batch, _ = step(sched, token=12)
    (chunk,) = batch.chunks
    assert (chunk.start, chunk.token_ids, chunk.samples) == (5, [11], True)
    _, finished = step(sched, token=13)
    assert finished == [seq] and seq.output_token_ids == [11, 12, 13] and seq.finish_reason == "length"
    assert not sched.has_work() and sched.schedule() is None
    assert sched.kv_blocks_used == 0


def test_long_prompt_is_chunked_while_decodes_keep_running():
    sched = make_scheduler(prefill_chunk=8, max_batch_tokens=9, max_running=4)
    short = [make_seq(f"s{i}", 3, max_tokens=100) for i in range(2)]
    for s in short:
        sched.add(s)
    step(sched)  # both short prompts prefilled in one step
    long = make_seq("long", 45, max_tokens=2)
    sched.add(long)
    seen = []
    for _ in range(7):  # 45 prompt tokens in the 7 a step leaves beside the two decodes
        before = [len(s.output_token_ids) for s in short]
        batch, _ = step(sched)
        # decodes lead the batch, one token each, and every one of them samples
        assert [c.seq for c in batch.chunks[:2]] == short
        assert all(len(c.token_ids) == 1 and c.samples for c in batch.chunks[:2])
        assert [len(s.output_token_ids) for s in short] == [n + 1 for n in before]
        (prefill,) = batch.chunks[2:]
        assert prefill.seq is long and len(prefill.token_ids) <= 7 and batch.num_tokens <= 9
        assert prefill.samples == (prefill.start + len(prefill.token_ids) == 45)
        seen.append(prefill)
    assert [c.start for c in seen] == [0, 7, 14, 21, 28, 35, 42] and long.num_computed == 45
    assert [t for c in seen for t in c.token_ids] == long.prompt_token_ids
    assert long.output_token_ids == [TOKEN]  # only the final chunk sampled
    batch, _ = step(sched)
    assert [c.seq for c in batch.chunks] == [*short, long] and batch.chunks[2].token_ids == [TOKEN]


def test_token_budget_splits_prefill_across_sequences():
    sched = make_scheduler(prefill_chunk=6, max_batch_tokens=10, max_running=4)
    seqs = [make_seq(str(i), 9) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch, _ = step(sched)
    assert [(c.seq.request_id, c.start, len(c.token_ids)) for c in batch.chunks] == [("0", 0, 6), ("1", 0, 4)]
    assert sched.num_running == 2 and sched.num_waiting == 1  # no budget left to start the third
    batch, _ = step(sched)
    assert [(c.seq.request_id, c.start, len(c.token_ids)) for c in batch.chunks] == [
        ("0", 6, 3), ("1", 4, 5), ("2", 0, 2)]
    assert batch.num_tokens == 10


def test_max_running_caps_the_batch():
    sched = make_scheduler(max_running=3, max_batch_tokens=64, prefill_chunk=64)
    seqs = [make_seq(str(i), 2, max_tokens=3) for i in range(7)]
    for s in seqs:
        sched.add(s)
    order = []
    for batch, finished in steps_until_idle(sched):
        assert len(batch.chunks) <= 3 and sched.num_running <= 3
        order += [s.request_id for s in finished]
    assert order == [str(i) for i in range(7)]  # FCFS all the way through


def test_postprocess_appends_only_for_chunks_that_sample():
    sched = make_scheduler(prefill_chunk=4)
    seq = make_seq("a", 10)
    sched.add(seq)
    batch = sched.schedule()
    assert not batch.chunks[0].samples
    assert sched.postprocess(batch, {"a": 5}) == []  # a token offered for a mid-prompt chunk is ignored
    assert seq.output_token_ids == [] and seq.num_computed == 4


# --- KV capacity


def test_requests_beyond_kv_capacity_wait_then_reuse_freed_blocks():
    # 8 blocks of 4 tokens; each request reserves 6 + 6 = 12 tokens = 3 blocks, so two fit at a time
    sched = make_scheduler(num_blocks=8, block_size=4, max_running=8, max_batch_tokens=32, prefill_chunk=32)
    seqs = [make_seq(str(i), 6, max_tokens=6) for i in range(5)]
    for s in seqs:
        sched.add(s)
    batch, _ = step(sched)
    assert sched.num_running == 2 and sched.num_waiting == 3 and sched.kv_blocks_used == 6
    admitted = list(batch.admitted)  # the sequences the engine reports started (EngineStarted)
    assert admitted == seqs[:2]
    first_blocks = {b for s in seqs[:2] for b in s.block_table}
    peak = 0
    for batch, _ in steps_until_idle(sched):
        assert all(seq.block_table for seq in batch.admitted)
        admitted += batch.admitted
        peak = max(peak, sched.num_running)
        assert sched.kv_blocks_used == sum(len(s.block_table) for s in sched.running) <= sched.kv_blocks_total
        if seqs[2].status is SequenceStatus.RUNNING:
            assert set(seqs[2].block_table) <= first_blocks
    assert peak == 2 and admitted == seqs  # each once, as it got its blocks
    assert all(s.finish_reason == "length" and len(s.output_token_ids) == 6 for s in seqs)
    assert sched.allocator.num_free == 8


def test_the_last_token_takes_no_kv_slot():
    """A sequence's last token is sampled and never fed back: reserving a slot for it took a block more whenever
    prompt + max_tokens was one past a block, so two requests that fit the cache side by side ran one by one."""
    sched = make_scheduler(num_blocks=2, block_size=16, max_batch_tokens=64, prefill_chunk=64)
    seqs = [make_seq(r, 15, max_tokens=2) for r in "ab"]  # 17 tokens, 16 of them cached
    for s in seqs:
        sched.add(s)
    batch, _ = step(sched)
    assert batch.admitted == seqs and [len(s.block_table) for s in seqs] == [1, 1]
    batch, finished = step(sched)  # each decodes its first token at position 15, the block's last slot
    assert [c.start for c in batch.chunks] == [15, 15] and finished == seqs
    assert all(len(s.output_token_ids) == 2 for s in seqs) and sched.allocator.num_free == 2


def test_waiting_head_is_not_overtaken_by_smaller_requests():
    sched = make_scheduler(num_blocks=10, block_size=4, max_running=8, max_batch_tokens=64, prefill_chunk=64)
    big0 = make_seq("big0", 20, max_tokens=4)  # 6 blocks
    big1 = make_seq("big1", 20, max_tokens=4)  # 6 blocks: must wait for big0
    small = make_seq("small", 2, max_tokens=2)  # 1 block: would fit, but arrived after big1
    for s in (big0, big1, small):
        sched.add(s)
    step(sched)
    assert list(sched.waiting) == [big1, small]
    run_to_completion(sched)
    assert small.finish_reason == "length"


def test_reservation_is_capped_at_max_context_and_length_finishes_there():
    sched = make_scheduler(num_blocks=16, block_size=4, max_context=14)
    seq = make_seq("a", 10, max_tokens=1000)
    assert sched.never_fits(seq) is None
    sched.add(seq)
    step(sched)
    assert len(seq.block_table) == 4  # ceil(14 / 4), not ceil(1010 / 4)
    run_to_completion(sched)
    assert seq.total_len == 14 and seq.finish_reason == "length"


def test_what_could_never_run_is_refused_saying_which_limit():
    """The worker's refusal reached clients as one fixed sentence about the KV cache, whatever the limit was; an
    empty prompt or max_tokens 0, which no cache could take, were refused as context_exceeded too."""
    sched = make_scheduler(num_blocks=4, block_size=4, max_context=64)
    # the last token is sampled, never fed back: 10 + 7 tokens need 16 slots, and fit exactly
    assert sched.never_fits(make_seq("ok", 10, max_tokens=7)) is None
    assert sched.never_fits(make_seq("too-big", 10, max_tokens=8)) == ("context_exceeded",  # 17 slots > 16
        "a prompt of 10 tokens plus max_tokens 8 needs 5 KV blocks of 4 tokens, more than the cache's 4 (16 tokens)")
    assert sched.never_fits(make_seq("empty", 0)) == ("invalid_request", "the prompt is empty")
    assert sched.never_fits(make_seq("no-tokens", 3, max_tokens=0)) == (
        "invalid_request", "max_tokens is 0, not at least 1")
    assert make_scheduler(max_context=10).never_fits(make_seq("full-context", 10)) == (
        "context_exceeded", "a prompt of 10 tokens leaves no room in the context of 10")
    with pytest.raises(ValueError, match="can never run"):
        sched.add(make_seq("too-big", 10, max_tokens=8))
    assert not sched.has_work()


def test_max_running_must_fit_in_the_token_budget():
    with pytest.raises(ValueError):
        make_scheduler(max_running=17, max_batch_tokens=16)


# --- finishing


def test_stop_token_finishes_and_is_kept():
    sched = make_scheduler()
    seq = make_seq("a", 3, max_tokens=10, stop=(2, 9))
    sched.add(seq)
    for token in (5, 6):
        assert step(sched, token)[1] == []
    _, finished = step(sched, 9)
    assert finished == [seq] and seq.output_token_ids == [5, 6, 9] and seq.finish_reason == "stop"
    assert seq.block_table == [] and sched.kv_blocks_used == 0


def test_cancel_frees_blocks_of_waiting_and_running_sequences():
    sched = make_scheduler(num_blocks=6, block_size=4, max_batch_tokens=32, prefill_chunk=32)
    running, waiting = make_seq("run", 8, max_tokens=8), make_seq("wait", 8, max_tokens=8)  # 4 blocks each
    sched.add(running)
    sched.add(waiting)
    step(sched)
    assert sched.num_running == 1 and sched.num_waiting == 1 and sched.kv_blocks_used == 4
    assert sched.cancel("wait") is waiting and waiting.finish_reason == "cancelled"
    assert sched.num_waiting == 0 and sched.kv_blocks_used == 4
    assert sched.cancel("run") is running and running.finish_reason == "cancelled" and running.is_finished
    assert sched.num_running == 0 and sched.kv_blocks_used == 0 and not sched.has_work()
    assert sched.cancel("run") is None and sched.cancel("nobody") is None
    assert sched.schedule() is None


def test_cancel_between_schedule_and_postprocess_is_not_resurrected():
    sched = make_scheduler()
    a, b = make_seq("a", 4), make_seq("b", 4)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sched.cancel("a", reason="error")
    assert sched.postprocess(batch, {"a": 1, "b": 2}) == []
    assert a.output_token_ids == [] and a.finish_reason == "error" and b.output_token_ids == [2]
    assert sched.num_running == 1 and sched.kv_blocks_used == len(b.block_table)


# --- invariants under random traffic


def test_random_traffic_keeps_every_invariant():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=40, block_size=4, max_batch_tokens=24, max_running=6, prefill_chunk=10,
                           max_context=64)
    added, done = [], []
    for i in range(600):
        if i < 400 and rng.random() < 0.3:
            seq = make_seq(f"r{i}", rng.randint(1, 50), max_tokens=rng.randint(1, 40), stop=(3,))
            if sched.never_fits(seq) is None:
                sched.add(seq)
                added.append(seq)
        if sched.has_work() and rng.random() < 0.03:
            victim = rng.choice(list(sched.waiting) + list(sched.running))
            assert sched.cancel(victim.request_id) is victim
            done.append(victim)
        batch = sched.schedule()
        if batch is None:
            assert not sched.has_work()
            continue
        kinds = [c.seq.is_decoding for c in batch.chunks]
        assert kinds == sorted(kinds, reverse=True)  # decodes first
        assert batch.num_tokens <= 24 and len(batch.chunks) <= 6
        assert len({c.seq.request_id for c in batch.chunks}) == len(batch.chunks)
        for c in batch.chunks:
            assert c.start == c.seq.num_computed and 0 < len(c.token_ids) <= 10
            assert c.token_ids == c.seq.token_slice(c.start, c.start + len(c.token_ids))
            assert len(c.seq.block_table) * 4 >= c.start + len(c.token_ids)
        # every running decode is in the batch
        assert sum(kinds) == sum(s.is_decoding for s in sched.running)
        done += sched.postprocess(batch, {c.seq.request_id: rng.choice([3, 5, 6, 8, 9, 10]) for c in batch.chunks
                                          if c.samples})
        assert sched.kv_blocks_used == sum(len(s.block_table) for s in sched.running)
    assert not sched.has_work() and sched.allocator.num_free == 40
    assert sorted(s.request_id for s in done) == sorted(s.request_id for s in added)
    for s in done:
        if s.finish_reason == "stop":
            assert s.output_token_ids[-1] == 3
        elif s.finish_reason == "length":
            assert s.total_len == min(s.num_prompt_tokens + s.params.max_tokens, 64)
        else:
            assert s.finish_reason == "cancelled"
