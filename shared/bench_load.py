"""The benchmark's load on a running system, through the client API, timed by the client's own clock.

Decode: `concurrency` streams at once, each running `waves` greedy requests back to back with fixed prompts
and a fixed max_tokens. Prefill: a prompt of an exact number of tokens with max_tokens=1, so the time to
its first token is the prompt's processing (plus one round trip). Every token's arrival is stamped, so
time to first token and inter-token latency come from what a client sees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.client import AsyncClient
from shared.protocol import FinalEvent

TIMEOUT_S = 900.0  # a long prompt on a slow machine may take minutes to its first token
TEXT = ("The expert hosts of a mixture of experts model keep the weights that the GPU has no room for. "
        "Each token picks a few experts in every layer, and the server decides where each one runs: "
        "in video memory when it is hot, on the host's processor, or streamed over the bus. ")


def prompt_ids(base: list[int], length: int, variant: int = 0) -> list[int]:
    """`length` token ids cycling through `base` from an offset picked by `variant` (prompts that differ)."""
    if not base:
        raise ValueError("the prompt text has no tokens")
    start = (variant * 7919) % len(base)
    return [base[(start + i) % len(base)] for i in range(length)]


@dataclass
class Timed:
    """One request as the client saw it."""

    sent: float
    arrivals: list[float] = field(default_factory=list)  # perf_counter() at each token event
    final: FinalEvent | None = None

    @property
    def ttft_s(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def itl_s(self) -> list[float]:
        return list(np.diff(self.arrivals))

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first over the time they took; None with fewer than two tokens."""
        if len(self.arrivals) < 2:
            return None
        return (len(self.arrivals) - 1) / max(self.arrivals[-1] - self.arrivals[0], 1e-9)


async def timed_request(client: AsyncClient, **options: Any) -> Timed:
    timed = Timed(time.perf_counter())
    async for event in await client.generate(**options):
        if isinstance(event, FinalEvent):
            timed.final = event
        else:
            timed.arrivals.append(time.perf_counter())
    if not timed.arrivals:
        raise RuntimeError(f"request ended with no token ({timed.final.finish_reason if timed.final else '?'})")
    return timed


def mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if values else None


def latency(requests: list[Timed]) -> dict[str, float | None]:
    ttft = [r.ttft_s for r in requests]
    itl = [gap for r in requests for gap in r.itl_s]
    return {"ttft_ms_p50": percentile_ms(ttft, 50), "ttft_ms_p99": percentile_ms(ttft, 99),
            "itl_ms_p50": percentile_ms(itl, 50), "itl_ms_p99": percentile_ms(itl, 99)}


async def decode_run(endpoint: str, concurrency: int, waves: int, max_tokens: int, base: list[int],
                     prompt_tokens: int, done: Callable[[], None] = lambda: None, variant: int = 0) -> dict[str, Any]:
    """Aggregate tokens/s over the run's wall time, mean per-request decode tokens/s, latency percentiles; the
    prompts are variants `variant` .. `variant` + concurrency * waves - 1.

    Each stream has a client (a socket) of its own: on a shared one, whichever coroutine reads the socket
    drains other streams' events too, and they would be stamped when their reader next runs, in bursts."""
    requests: list[Timed] = []

    async def stream(worker: int) -> None:
        async with AsyncClient(endpoint, timeout_s=TIMEOUT_S) as client:
            for wave in range(waves):
                ids = prompt_ids(base, prompt_tokens, variant + worker * waves + wave)
                requests.append(await timed_request(client, token_ids=ids, max_tokens=max_tokens, temperature=0.0))
                done()

    start = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(len(r.arrivals) for r in requests)
    per_request = [s for r in requests if (s := r.decode_tok_s) is not None]
    return {"concurrency": concurrency, "requests": len(requests), "max_tokens": max_tokens,
            "prompt_tokens": prompt_tokens, "prompt_variants": [variant, variant + concurrency * waves - 1],
            "completion_tokens": tokens, "wall_s": wall,
            "aggregate_tok_s": tokens / wall,
            "per_request_tok_s": mean_or_none(per_request),
            # the server's figure is 0 for a request of one token, which has no decode time: left out, as above
            "server_decode_tok_s": mean_or_none([r.final.decode_tok_s for r in requests
                                                 if r.final and r.final.completion_tokens >= 2]),
            **latency(requests)}


WARM_UP_VARIANT = 2000  # prompt variants a warm-up sends: not the measured ones, whose experts it would leave in VRAM


async def prefill_run(client: AsyncClient, base: list[int], length: int, repeats: int,
                      done: Callable[[], None] = lambda: None, variant: int = 1000) -> dict[str, Any]:
    """Prompt tokens over time to first token, median of `repeats` prompts of exactly `length` tokens (prompt
    variants `variant`, `variant` + 1, ...)."""
    ttfts = []
    for i in range(repeats):
        timed = await timed_request(client, token_ids=prompt_ids(base, length, variant + i), max_tokens=1,
                                    temperature=0.0)
        ttfts.append(timed.ttft_s)
        done()
    ttft = float(np.median(ttfts))
    return {"prompt_tokens": length, "repeats": repeats, "ttft_s": ttft, "tok_s": length / ttft}
