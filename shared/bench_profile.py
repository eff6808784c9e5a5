"""The decode-profile phase of a benchmark: decode through a system whose gpu_worker profiles its steps
(config profile_steps = N) and read the window of profiled steps back from the coordinator.

The worker sums every N decode steps into a window and reports the last full one in its heartbeat load, which
the coordinator's health and stats replies show. A run of requests that each decode 2N tokens side by side holds
at least one full window, so the last window once the run is over is of this run's steps alone. The run takes
less than a heartbeat interval on a small model, so the window is read from the first heartbeat that reached the
coordinator after the run ended with the worker idle: one sent after the run's last step.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from shared.client import AsyncClient, run
from shared.launcher import RunningSystem
from shared.profile_table import ProfileWindow, format_table

WORKER = "gpu-worker"
POLL_S = 0.1
LAST_SEEN_ROUNDING_S = 1e-3  # the health reply rounds seconds since a heartbeat to the millisecond
CANDIDATE_PROMPTS = 64


@dataclass
class WorkerReport:
    window: ProfileWindow | None  # the last full window of profiled steps
    running: int  # requests the worker held
    heard_at: float  # time.monotonic(): the coordinator got the heartbeat no earlier than this


async def worker_report(client: AsyncClient) -> WorkerReport:
    """What the worker's last heartbeat said (the coordinator's health reply carries it)."""
    asked = time.monotonic()  # the coordinator answers later: its "seconds since" counts from after this
    member = next(m for m in (await client.health()).members if m["member_id"] == WORKER)
    load = member["load"]
    window = ProfileWindow.from_dict(load["profile"]) if "profile" in load else None
    return WorkerReport(window, load["running"], asked - member["last_seen_s"] - LAST_SEEN_ROUNDING_S)


async def decoding_prompts(client: AsyncClient, prompts: list[list[int]], n: int, max_tokens: int) -> list[list[int]]:
    """The first n prompts whose greedy continuation runs max_tokens tokens without end-of-text (their runs
    warm the system up, too)."""
    chosen = []
    for prompt in prompts:
        if (await client.complete(token_ids=prompt, max_tokens=max_tokens)).finish_reason == "length":
            chosen.append(prompt)
            if len(chosen) == n:
                return chosen
    raise RuntimeError(f"only {len(chosen)} of {len(prompts)} prompts decode {max_tokens} tokens without "
                       f"end-of-text; {n} are needed")


async def profile_decode(endpoint: str, window_steps: int, concurrency: int, prompts: list[list[int]],
                         timeout_s: float = 600.0) -> dict[str, Any]:
    """Decode `concurrency` requests side by side, 2 x window_steps tokens each, on a system profiling windows of
    window_steps decode steps; returns the run's last window and the decode rate the requests saw."""
    max_tokens = 2 * window_steps + 1  # the first token comes from the prompt's step
    async with AsyncClient(endpoint, timeout_s=timeout_s) as client:
        chosen = await decoding_prompts(client, prompts, concurrency, max_tokens)
        completions = await asyncio.gather(*(client.complete(token_ids=p, max_tokens=max_tokens) for p in chosen))
        ended = time.monotonic()
        if any(c.finish_reason != "length" for c in completions):
            raise RuntimeError("a request ended early when run beside the others: its steps are not all decodes "
                               "of the whole batch")
        deadline = ended + timeout_s
        while (report := await worker_report(client)).heard_at <= ended or report.running:
            if time.monotonic() > deadline:
                raise RuntimeError("the gpu_worker sent no heartbeat after the run")
            await asyncio.sleep(POLL_S)
    window = report.window
    if window is None:
        raise RuntimeError("the gpu_worker reports no profile: is profile_steps set?")
    decode_tok_s = sum(c.timings["decode_tok_s"] for c in completions) / len(completions)
    return {"window_steps": window_steps, "concurrency": concurrency, "decode_tok_s": decode_tok_s,
            "window": window.to_dict(), "table": format_table(window)}


def profile_system(model: str, options: list[str], window_steps: int, concurrency: int, prompts: list[list[int]],
                   ready_timeout_s: float) -> dict[str, Any]:
    """`profile_decode` on a system started for it, its worker profiling windows of window_steps steps."""
    with RunningSystem(model, *options, "--profile-steps", str(window_steps),
                       ready_timeout_s=ready_timeout_s) as system:
        return run(profile_decode(system.endpoint, window_steps, concurrency, prompts))
