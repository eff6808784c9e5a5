"""Decode steps whose layers cross to the expert hosts through their mailboxes' lanes (`decode_crossings`): the
worker's side posts a layer's rows, expert ids and routing weights and waits for each host's weighted sum, with
no per-layer work on the worker's host. On a GPU the device does it inside whole-layer CUDA graphs
(tests/gpu/test_decode_crossings.py); a CPU worker makes the same exchange from its thread, which these tests run
through the whole system: real processes, real shared memory."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from shared.client import Client
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.make_model import make_model
from shared.reference import ReferenceModel

PROMPTS = [[1, 2, 3], list(range(40, 57)), [7]]
ARCHS = ["qwen3moe", "qwen2moe", "mixtral", "olmoe"]  # qwen2moe: a shared expert beside the routed ones
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, ReferenceModel]]:
    out = tmp_path_factory.mktemp("models")
    models = {}
    for arch in ARCHS:
        path = out / f"{arch}.gguf"
        make_model(path, arch=arch, preset="tiny", dtype="f32", seed=1)
        models[arch] = path, ReferenceModel(GGUFModel(path))
    return models


def metrics(client: Client) -> dict[str, str]:
    pages = {}
    for member in client.health().members:
        with urllib.request.urlopen(f"http://127.0.0.1:{member['metrics_port']}/metrics", timeout=5) as r:
            pages[member["member_id"]] = r.read().decode()
    return pages


def value(page: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(name))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_through_the_lanes_equal_the_oracle_alone_and_batched(tiny, arch):
    check_greedy_tokens(*tiny[arch], "--device", "cpu")


def check_greedy_tokens(path: Path, oracle: ReferenceModel, *device: str) -> None:
    """Every expert on two hosts, fp32: each decode step's layers cross through both hosts' lanes (the prompts
    go through the usual exchange); three requests at once decode in a padded batch of four rows."""
    expected = [oracle.greedy(p, MAX_TOKENS) for p in PROMPTS]
    options = ("--expert-hosts", "2", "--hot-experts", "0", "--decode-crossings", "true", *device)
    with RunningSystem(str(path), *options) as system, Client(system.endpoint) as client:
        before = metrics(client)
        alone = [client.complete(token_ids=p, max_tokens=MAX_TOKENS).token_ids for p in PROMPTS]

        def run(prompt: list[int]) -> list[int]:
            with Client(system.endpoint) as c:
                return c.complete(token_ids=prompt, max_tokens=MAX_TOKENS).token_ids

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            batched = list(pool.map(run, PROMPTS))
        after = metrics(client)
    assert alone == expected and batched == expected
    cfg = oracle.cfg
    for host in ("expert-host-0", "expert-host-1"):
        def grew(name: str) -> float:
            return value(after[host], name) - value(before[host], name)  # noqa: B023 (called in this iteration)

        # a decode step's layer with pairs for the host is one lane item; posts with none are no work items (they
        # were counted as lane items, more of them than there were work items)
        lane, ok = grew("tierserve_expert_host_lane_work_total"), grew('tierserve_expert_host_work_total{outcome="ok"}')
        assert (MAX_TOKENS - 1) * cfg.n_layers <= lane <= ok - grew("tierserve_expert_host_mailbox_work_total")
    # every routed pair counted once, on the cpu path: prompts through the mailbox, decode steps through the lanes
    forwarded = 2 * sum(len(p) + MAX_TOKENS - 1 for p in PROMPTS)
    name = 'tierserve_worker_expert_dispatch_total{path="cpu"}'
    assert value(after["gpu-worker"], name) - value(before["gpu-worker"], name) == \
        forwarded * cfg.n_layers * cfg.n_experts_used
    assert value(after["gpu-worker"], 'tierserve_worker_expert_dispatch_total{path="hot"}') == 0


@pytest.mark.slow
@pytest.mark.parametrize("options, crossing", [((), True), (("--cold-path", "stream"), False),
                                               (("--decode-crossings", "off"), False)],
                         ids=["default", "cold-path-stream", "off"])
def test_decode_steps_cross_by_default_unless_cold_experts_are_streamed_or_crossings_are_off(tiny, options, crossing):
    path, oracle = tiny["qwen3moe"]
    prompt = PROMPTS[0]
    with RunningSystem(str(path), "--expert-hosts", "1", "--hot-experts", "0", "--device", "cpu",
                       *options) as system, Client(system.endpoint) as client:
        assert client.complete(token_ids=prompt, max_tokens=MAX_TOKENS).token_ids == oracle.greedy(prompt, MAX_TOKENS)
        lanes = value(metrics(client)["expert-host-0"], "tierserve_expert_host_lane_work_total")
    assert (lanes >= (MAX_TOKENS - 1) * oracle.cfg.n_layers) if crossing else lanes == 0


@pytest.mark.slow
def test_a_decode_step_of_more_rows_than_the_limit_takes_the_usual_path(tiny):
    """With `decode_crossings_max_rows` 2, a request alone crosses every decode step; three that reach the worker
    together are prefilled in one step and decode in steps of three rows through the usual exchange: no lane item,
    the oracle's tokens. The worker is stopped (SIGSTOP) while they arrive, so they are batched however slowly the
    clients start; its heartbeat timeout is long enough for the pause."""
    path, oracle = tiny["qwen3moe"]
    expected = [oracle.greedy(p, MAX_TOKENS) for p in PROMPTS]
    with RunningSystem(str(path), "--expert-hosts", "1", "--hot-experts", "0", "--device", "cpu",
                       "--decode-crossings-max-rows", "2", "--heartbeat-timeout-s", "60") as system, \
            Client(system.endpoint) as client:
        lanes = [value(metrics(client)["expert-host-0"], "tierserve_expert_host_lane_work_total")]
        assert client.complete(token_ids=PROMPTS[0], max_tokens=MAX_TOKENS).token_ids == expected[0]
        lanes.append(value(metrics(client)["expert-host-0"], "tierserve_expert_host_lane_work_total"))

        def run(prompt: list[int]) -> list[int]:
            with Client(system.endpoint) as c:
                return c.complete(token_ids=prompt, max_tokens=MAX_TOKENS).token_ids

        worker = next(m for m in client.health().members if m["member_id"] == "gpu-worker")
        os.kill(worker["pid"], signal.SIGSTOP)
        try:
            with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
                results = [pool.submit(run, p) for p in PROMPTS]
                deadline = time.monotonic() + 30
                while client.stats().stats["running"] < len(PROMPTS):  # all three sent on to the worker
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                os.kill(worker["pid"], signal.SIGCONT)
                assert [r.result() for r in results] == expected
        finally:
            os.kill(worker["pid"], signal.SIGCONT)
        lanes.append(value(metrics(client)["expert-host-0"], "tierserve_expert_host_lane_work_total"))
    assert lanes[1] - lanes[0] >= (MAX_TOKENS - 1) * oracle.cfg.n_layers
    assert lanes[2] == lanes[1]


@pytest.mark.slow
def test_hot_experts_on_the_worker_and_cold_ones_through_the_lanes(tiny):
    check_hot_and_crossing(*tiny["qwen3moe"], 4, "--device", "cpu")


def check_hot_and_crossing(path: Path, oracle: ReferenceModel, hot: int, *device: str) -> None:
    """A bf16 worker with `hot` experts per layer: each decode step's layer computes its hot share on the worker
    (grouped from counts on the device) and adds the hosts' lane answers; log-probabilities within bf16's reach
    of the fp32 oracle's, and the pairs split between the paths as routed."""
    prompt = PROMPTS[1]
    with RunningSystem(str(path), "--expert-hosts", "2", "--hot-experts", str(hot), "--dtype", "bfloat16",
                       "--decode-crossings", "true", *device) as system, Client(system.endpoint) as client:
        before = metrics(client)
        result = client.complete(token_ids=prompt, max_tokens=MAX_TOKENS, logprobs=1)
        after = metrics(client)
    reference = oracle.forward(prompt + result.token_ids).log_softmax(-1)
    want = [reference[len(prompt) - 1 + i, t].item() for i, t in enumerate(result.token_ids)]
    assert max(abs(a - b) for a, b in zip(result.logprobs, want, strict=True)) < 0.15
    for host in ("expert-host-0", "expert-host-1"):
        assert value(after[host], "tierserve_expert_host_lane_work_total") > value(
            before[host], "tierserve_expert_host_lane_work_total")
    cfg = oracle.cfg
    # on a GPU the prompt's cold experts may also go through VRAM slots (staged): every path counts
    pairs = {path: value(after["gpu-worker"], f'tierserve_worker_expert_dispatch_total{{path="{path}"}}')
             - value(before["gpu-worker"], f'tierserve_worker_expert_dispatch_total{{path="{path}"}}')
             for path in ("hot", "cpu", "soft_hit", "streamed", "staged")}
    assert (pairs["hot"] > 0) == (hot > 0) and pairs["cpu"] > 0
    # the prompt's tokens and each sampled one but the last went through the layers (bf16 may sample an end early)
    steps = len(prompt) + len(result.token_ids) - 1
    assert sum(pairs.values()) == steps * cfg.n_layers * cfg.n_experts_used


@pytest.mark.slow
def test_a_host_killed_while_steps_cross_pauses_the_requests_in_flight_until_its_successor_serves(tiny):
    check_a_host_killed(*tiny["qwen3moe"], "--device", "cpu")


def check_a_host_killed(path: Path, oracle: ReferenceModel, *device: str, crossings: bool = True,
                        expert_timeout_s: float = 1) -> None:
    """The worker waits on a lane no longer answered (on a GPU, the device does, and the worker answers it with
    poison to drain the stream): the step fails once the launcher's new host has replaced the dead one's mailbox,
    or past the expert timeout, and the worker ends the request. The request waits for the new host and continues
    from the tokens it had streamed, through the new host's lane (its mailbox without crossings), with the
    oracle's tokens."""
    options = ("--expert-hosts", "2", "--hot-experts", "0", "--decode-crossings", str(crossings).lower(),
               "--expert-timeout-s", str(expert_timeout_s), *device)
    with RunningSystem(str(path), *options) as system, Client(system.endpoint, timeout_s=60) as client:
        host = next(m for m in client.health().members if m["member_id"] == "expert-host-0")
        stream = client.generate(token_ids=PROMPTS[0], max_tokens=200)
        head = next(stream)
        os.kill(host["pid"], signal.SIGKILL)
        got = [head.token_id] + [e.token_id for e in list(stream)[:-1]]
        assert client.stats().stats["resumed"] >= 1, "the host was killed after the request had ended"
        assert got == oracle.greedy(PROMPTS[0], 200)
        successor = next(m for m in client.health().members if m["member_id"] == "expert-host-0")
        assert successor["pid"] != host["pid"]
        before = metrics(client)["expert-host-0"]
        assert client.complete(token_ids=PROMPTS[1], max_tokens=MAX_TOKENS).token_ids == oracle.greedy(PROMPTS[1],
                                                                                                     MAX_TOKENS)
        after = metrics(client)["expert-host-0"]
        lane_work = [value(page, "tierserve_expert_host_lane_work_total") for page in (before, after)]
        assert lane_work[1] > lane_work[0] if crossings else lane_work == [0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("crossings", [True, False])
def test_a_wait_on_a_host_killed_mid_step_ends_when_its_successor_starts_not_at_the_expert_timeout(tiny, crossings):
    """The same with an expert timeout of 10 minutes, past the client's one: the worker's wait on the dead host
    ends once the successor's mailbox replaces its own. It waited out the whole timeout while the successor
    served."""
    check_a_host_killed(*tiny["qwen3moe"], "--device", "cpu", crossings=crossings, expert_timeout_s=600)


@pytest.mark.slow
def test_a_host_restarted_while_idle_is_followed_by_a_step_that_crosses_first(tiny):
    """Lanes open from an earlier request; the host is killed with nothing in flight and its successor serves.
    A one-token prompt's first step already crosses: it goes through the successor's lane at once, not through
    the dead host's old one (which would wait out the expert timeout, fail the step and resume the request)."""
    path, oracle = tiny["qwen3moe"]
    options = ("--expert-hosts", "2", "--hot-experts", "0", "--decode-crossings", "true", "--expert-timeout-s", "3",
               "--device", "cpu")
    with RunningSystem(str(path), *options) as system, Client(system.endpoint, timeout_s=60) as client:
        assert client.complete(token_ids=PROMPTS[0], max_tokens=MAX_TOKENS).token_ids == oracle.greedy(PROMPTS[0],
                                                                                                     MAX_TOKENS)
        host = next(m for m in client.health().members if m["member_id"] == "expert-host-0")
        os.kill(host["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "no successor"
            health = client.health()
            successor = next((m for m in health.members if m["member_id"] == "expert-host-0"), None)
            if health.status == "ready" and successor is not None and successor["pid"] != host["pid"]:
                break
            time.sleep(0.1)
        start = time.monotonic()
        assert client.complete(token_ids=PROMPTS[2], max_tokens=MAX_TOKENS).token_ids == oracle.greedy(PROMPTS[2],
                                                                                                     MAX_TOKENS)
        assert client.stats().stats["resumed"] == 0
        assert time.monotonic() - start < 3
