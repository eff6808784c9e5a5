"""Next-token choice from a step's logits: greedy, or temperature / top-k / top-p sampling. A seeded request's
draw of each token is seeded by the request's seed and the token's place, so from the same logits it draws the same
tokens whatever else shares its batches, and when it is resumed on a restarted worker (the logits themselves move by
rounding with the batch: docs/API.md)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from gpu_worker.scheduler import Sequence

# Below this a temperature is greedy: logits / 1e-40 overflow float32 into NaN probabilities, and at 1e-5 a logit
# gap of 1e-3 is already a factor e^100.
GREEDY_BELOW = 1e-5
# Above this a temperature draws uniformly from the finite logits anyway. Past float32's range (admission takes any
# finite temperature) it would be inf, and -inf / inf is NaN: a row with a -inf logit would then take its first-ranked
# token, the impossible one.
HOTTEST = 1e30


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float  # of the chosen token under the raw (untempered) distribution
    top_logprobs: list[tuple[int, float]]  # the params.logprobs most likely (id, logprob), most likely first
    valid: bool = True  # False: the row had a NaN or +inf logit, or none above -inf, and its token means nothing


class Sampler:
    def __init__(self) -> None:
        self._seeded: dict[torch.device, torch.Generator] = {}
        self._unseeded: dict[torch.device, torch.Generator] = {}

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """One token for each row of logits (n, vocab); row i belongs to seqs[i]."""
        if logits.shape[0] != len(seqs):
            raise ValueError(f"{logits.shape[0]} rows of logits for {len(seqs)} sequences")
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        rows = [i for i, seq in enumerate(seqs) if seq.params.temperature >= GREEDY_BELOW]
        if rows:
            tokens[rows] = self._draw(logits[rows], [seqs[i] for i in rows])
        valid = ~(logits.isnan() | logits.isposinf()).any(dim=-1) & (logits > -torch.inf).any(dim=-1)
        chosen, valid = torch.stack((logprobs.gather(1, tokens[:, None])[:, 0], valid.float())).tolist()
        n_top = min(max(seq.params.logprobs for seq in seqs), logits.shape[-1])
        top_values, top_ids = (t.tolist() for t in logprobs.topk(n_top, dim=-1))
        return [SampleResult(token, chosen[i], list(zip(top_ids[i], top_values[i], strict=True))[: seq.params.logprobs],
                             valid[i] == 1.0)
                for i, (token, seq) in enumerate(zip(tokens.tolist(), seqs, strict=True))]

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[-1]
        temperature = torch.tensor([min(seq.params.temperature, HOTTEST) for seq in seqs], device=device)
        top_k = torch.tensor([seq.params.top_k if 0 < seq.params.top_k < vocab else vocab for seq in seqs],
                             device=device)
        top_p = torch.tensor([seq.params.top_p for seq in seqs], device=device)
        # one sort serves both filters: top-k is a rank cut, top-p a cut on the running sum
        ordered, order = (logits / temperature[:, None]).sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        probs = torch.softmax(ordered.masked_fill(ranks >= top_k[:, None], -torch.inf), dim=-1)
        # a NaN or +inf logit (or none above -inf) leaves the row NaN probabilities, and multinomial's error would
        # fail every sequence in the batch: such a row takes its first-ranked token, as greedy takes its argmax
        probs = torch.where(probs.isnan().any(dim=-1, keepdim=True), (ranks == 0).float(), probs)
        # keep a token while the mass before it is short of top_p: the smallest prefix reaching top_p
        keep = (probs.cumsum(dim=-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
        keep[:, 0] = True
        probs = probs.masked_fill(~keep, 0.0)
        picks = torch.cat([torch.multinomial(probs[i], 1, generator=self._generator(seq, device))
                           for i, seq in enumerate(seqs)])
        return order.gather(1, picks[:, None])[:, 0]

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        seed = seq.params.seed
        generators = self._unseeded if seed is None else self._seeded
        generator = generators.get(device)
        if generator is None:
            generator = generators[device] = torch.Generator(device=device)
            if seed is None:
                generator.seed()
        if seed is not None:
            generator.manual_seed(draw_seed(seed, seq.params.output_offset + len(seq.output_token_ids)))
        return generator


def draw_seed(seed: int, position: int) -> int:
    """The seed of a request's draw of its position-th token. A draw that depends on nothing but the request's
    seed and the token's place is the same, from the same logits, alone or in any batch, and on a worker that resumes
    the request from the tokens it had streamed."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
