"""Sampling from logits: greedy, filters, per-request reproducible seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_worker.sampler import Sampler
from gpu_worker.scheduler import SamplingParams, Sequence

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                     reason="no CUDA device")])]


def make_seq(request_id: str, **params) -> Sequence:
    return Sequence(request_id, [1], SamplingParams(max_tokens=100, **params))


def logits_of(probs: list[float], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs], device=device)


def frequencies(tokens: list[int], vocab: int) -> list[float]:
    return (torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)).tolist()


def draw_many(probs: list[float], n: int, device: str = "cpu", **params) -> list[int]:
    """n draws from one distribution, as n seeded requests in one batch."""
    logits = logits_of(probs, device).expand(n, -1)
    seqs = [make_seq(f"r{i}", seed=i, **params) for i in range(n)]
    return [r.token_id for r in Sampler().sample(logits, seqs)]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_with_ties_to_the_lowest_id(device):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).to(device)
    logits[5, 10] = logits[5, 20] = logits[5].max() + 1
    results = Sampler().sample(logits, [make_seq(str(i)) for i in range(6)])
    assert [r.token_id for r in results] == logits.argmax(dim=-1).tolist()
    assert results[5].token_id == 10


def test_top_k_one_is_greedy_at_any_temperature():
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(1))
    seqs = [make_seq(str(i), temperature=5.0, top_k=1) for i in range(32)]
    assert [r.token_id for r in Sampler().sample(logits, seqs)] == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_a_vanishing_temperature_is_greedy_and_leaves_the_rest_of_the_batch_alone(device):
    """1e-40 is a valid temperature (finite, > 0) whose division overflowed float32 into NaN probabilities, and
    multinomial's error failed every sequence in the batch."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)).to(device)
    seqs = [make_seq("tiny", temperature=1e-40), make_seq("small", temperature=1e-6, seed=1),
            make_seq("warm", temperature=0.8, seed=1)]
    results = Sampler().sample(logits, seqs)
    assert [r.token_id for r in results[:2]] == logits[:2].argmax(dim=-1).tolist()
    assert 0 <= results[2].token_id < 50 and math.isfinite(results[2].logprob)


@pytest.mark.parametrize("device", DEVICES)
def test_a_temperature_past_float32s_range_is_uniform_over_the_possible_tokens(device):
    """1e300 became inf as a float32, and a -inf logit over it NaN, which ranked first and was drawn every time."""
    logits = torch.tensor([0.1, 0.2, 0.3, -torch.inf], device=device).expand(300, -1)
    seqs = [make_seq(f"r{i}", seed=i, temperature=1e300) for i in range(300)]
    assert {r.token_id for r in Sampler().sample(logits, seqs)} == {0, 1, 2}


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_of_non_finite_logits_draws_its_argmax_and_leaves_the_rest_of_the_batch_alone(device):
    """A NaN or +inf logit gives the row NaN probabilities, and multinomial's error failed every sequence in
    the batch."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(4))
    logits[0, 7] = math.nan
    logits[1, 9] = logits[1, 30] = math.inf
    logits[2] = -math.inf
    seqs = [make_seq(name, temperature=1.0, top_p=0.9, seed=1) for name in ("nan", "inf", "none")]
    seqs += [make_seq("greedy"), make_seq("warm", temperature=0.8, seed=1)]
    results = Sampler().sample(logits.to(device), seqs)
    assert [r.token_id for r in results[:4]] == [7, 9, 0, logits[3].argmax().item()]
    assert [r.valid for r in results] == [False, False, False, True, True]  # the worker ends the first three
    alone = Sampler().sample(logits[4:].to(device), seqs[4:])[0]
    assert results[4] == alone and math.isfinite(alone.logprob)


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_keeps_the_smallest_nucleus(device):
    # cumulative 0.5, 0.8, 0.95, 1.0: top_p 0.7 keeps the first two, renormalised to 0.625 / 0.375
    tokens = draw_many([0.5, 0.3, 0.15, 0.05], 4000, device, temperature=1.0, top_p=0.7)
    freq = frequencies(tokens, 4)
    assert freq[2] == freq[3] == 0
    assert freq[0] == pytest.approx(0.625, abs=0.03)


def test_top_p_always_keeps_one_token():
    tokens = draw_many([0.25, 0.4, 0.35], 200, temperature=1.0, top_p=0.01)
    assert set(tokens) == {1}


def test_temperature_and_top_k_shape_the_distribution():
    # top_k 2 keeps 0.4 and 0.3; temperature 0.5 squares them: 0.16 / 0.09 -> 0.64 / 0.36
    tokens = draw_many([0.4, 0.3, 0.2, 0.1], 4000, temperature=0.5, top_k=2)
    freq = frequencies(tokens, 4)
    assert freq[2] == freq[3] == 0
    assert freq[0] == pytest.approx(0.64, abs=0.03)
    # and with no filter at temperature 1 every token shows up at its own rate
    freq = frequencies(draw_many([0.4, 0.3, 0.2, 0.1], 4000, temperature=1.0), 4)
    assert freq == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=0.03)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_draws_the_same_tokens_alone_or_in_any_batch(device):
    steps = 20
    gen = torch.Generator().manual_seed(2)
    mine = torch.randn(steps, 64, generator=gen)
    params = dict(temperature=0.9, top_p=0.95, top_k=40, seed=1234)

    me = make_seq("me", **params)
    solo = []
    for t in range(steps):
        solo.append(Sampler().sample(mine[t : t + 1].to(device), [me])[0].token_id)
        me.output_token_ids.append(solo[-1])

    batched = Sampler()
    others = [make_seq("greedy"), make_seq("unseeded", temperature=1.0), make_seq("other", temperature=1.3, seed=7)]
    me = make_seq("me", **params)
    together = []
    for t in range(steps):
        # a different crowd, in a different order, around the same request every step
        crowd = others[: t % 4]
        at = t % (len(crowd) + 1)
        seqs = crowd[:at] + [me] + crowd[at:]
        logits = torch.randn(len(seqs), 64, generator=gen)
        logits[at] = mine[t]
        together.append(batched.sample(logits.to(device), seqs)[at].token_id)
        me.output_token_ids.append(together[-1])
    assert together == solo
    assert len(set(solo)) > 1  # the check means something only if the draws vary


def test_a_seeded_request_resumed_from_its_streamed_tokens_draws_what_it_would_have():
    logits = torch.zeros(1, 1000)  # uniform: streams agreeing by chance is out of the question

    def stream(seq: Sequence, n: int) -> list[int]:
        sampler = Sampler()
        for _ in range(n):
            seq.output_token_ids.append(sampler.sample(logits, [seq])[0].token_id)
        return seq.output_token_ids

    whole = stream(make_seq("a", temperature=1.0, seed=1), 30)
    assert len(set(whole)) > 20
    # the resumed request's prompt ends with the 12 tokens it had streamed; it draws the other 18
    resumed = Sequence("b", [1, *whole[:12]], SamplingParams(max_tokens=18, temperature=1.0, seed=1,
                                                              output_offset=12))
    assert stream(resumed, 18) == whole[12:]
    assert stream(make_seq("c", temperature=1.0, seed=2), 30) != whole
    assert stream(make_seq("u", temperature=1.0), 30) != stream(make_seq("v", temperature=1.0), 30)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_come_from_the_raw_logits(device):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3)).to(device)
    seqs = [make_seq("a", temperature=2.0, top_k=5, seed=0, logprobs=3), make_seq("b", logprobs=0),
            make_seq("c", logprobs=50)]
    results = Sampler().sample(logits.to(torch.bfloat16), seqs)
    reference = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1).cpu()
    for row, r in enumerate(results):
        assert r.logprob == pytest.approx(reference[row, r.token_id].item(), abs=1e-5)
        n = seqs[row].params.logprobs
        values, ids = reference[row].topk(min(n, 40))
        assert [i for i, _ in r.top_logprobs] == ids.tolist()
        assert [v for _, v in r.top_logprobs] == pytest.approx(values.tolist(), abs=1e-5)
    assert results[1].top_logprobs == [] and len(results[2].top_logprobs) == 40


def test_rows_must_match_sequences():
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(2, 5), [make_seq("a")])
