"""The whole system as separate processes (`tierserve up`) against the fp32 oracle.

Greedy tokens through coordinator + gpu_worker + expert hosts must be exactly the
oracle's, for every architecture and placement, alone and in a batch.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shared.client import Client
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.make_model import make_model
from shared.memory_use import descendants
from shared.reference import ReferenceModel
from shared.run_files import mailbox_path

ARCHS = ["qwen3moe", "qwen2moe", "mixtral", "olmoe"]
PROMPTS = [[1, 2, 3], list(range(40, 57)), [7]]
N_EXPERTS_TINY = 8

# (expert hosts, hot experts per layer, more options): all hot; all cold on one host; cold over two hosts;
# half hot; cold experts streamed into worker slots; the cost model splitting cold experts between paths.
PLACEMENTS = {
    "all-hot": (0, N_EXPERTS_TINY, ()),
    "one-host": (1, 0, ()),
    "two-hosts": (2, 0, ()),
    "half-hot": (2, 4, ()),
    "streamed": (1, 0, ("--soft-slots", "6", "--cold-path", "stream")),
    "cost-model": (2, 2, ("--soft-slots", "8", "--cold-path", "auto")),
}


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("models")
    paths = {}
    for arch in ARCHS:
        paths[arch] = out / f"{arch}.gguf"
        make_model(paths[arch], arch=arch, preset="tiny", dtype="f32", seed=1)
    return paths


@pytest.fixture(scope="session")
def oracles(models) -> dict[str, ReferenceModel]:
    return {arch: ReferenceModel(GGUFModel(path)) for arch, path in models.items()}


def start(model: Path, hosts: int, hot: int, *extra: str) -> RunningSystem:
    return RunningSystem(str(model), "--expert-hosts", str(hosts), "--hot-experts", str(hot), *extra)


@pytest.mark.slow
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_the_oracle(models, oracles, arch, placement):
    hosts, hot, options = PLACEMENTS[placement]
    with start(models[arch], hosts, hot, *options) as system, Client(system.endpoint) as client:
        for prompt in PROMPTS:
            result = client.complete(token_ids=prompt, max_tokens=8)
            assert result.token_ids == oracles[arch].greedy(prompt, 8), (arch, placement, prompt)
            assert result.finish_reason == "length"


@pytest.mark.slow
def test_concurrent_requests_with_small_prefill_chunks_change_nothing(models, oracles):
    """8 requests of different lengths at once, prompts prefilled 3 tokens at a time, through a half-hot
    placement: batching and chunking must not change a single token."""
    rng_prompts = [list(range(3 + i, 3 + i + 2 + 5 * i)) for i in range(8)]
    max_tokens = [4 + (i * 3) % 9 for i in range(8)]
    oracle = oracles["qwen3moe"]
    expected = [oracle.greedy(p, n) for p, n in zip(rng_prompts, max_tokens, strict=True)]
    with start(models["qwen3moe"], 2, 4, "--prefill-chunk", "3", "--max-batch-tokens", "16",
               "--max-running", "8") as system:

        def run(i: int) -> list[int]:
            with Client(system.endpoint) as client:
                return client.complete(token_ids=rng_prompts[i], max_tokens=max_tokens[i]).token_ids

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(run, range(8)))
    assert got == expected


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(models):
    request = dict(token_ids=[5, 6, 7, 8], max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    with start(models["qwen2moe"], 1, 4) as system:
        with Client(system.endpoint) as client:
            alone = client.complete(**request).token_ids
            again = client.complete(**request).token_ids
            other_seed = client.complete(**{**request, "seed": 99}).token_ids

        def run(i: int) -> list[int]:
            with Client(system.endpoint) as client:
                if i == 0:
                    return client.complete(**request).token_ids
                return client.complete(token_ids=[9, i], max_tokens=10, temperature=0.9, seed=i).token_ids

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            batched = list(pool.map(run, range(4)))[0]
    assert alone == again == batched
    assert other_seed != alone


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_metrics_of_every_process_move_when_requests_run(models):
    with start(models["olmoe"], 2, 4) as system, Client(system.endpoint) as client:
        members = {m["member_id"]: m for m in client.health().members}
        assert set(members) == {"coordinator", "gpu-worker", "expert-host-0", "expert-host-1"}
        before = {name: _scrape(m["metrics_port"]) for name, m in members.items()}
        client.complete(prompt="hello there", max_tokens=6)
        after = {name: _scrape(m["metrics_port"]) for name, m in members.items()}
    coordinator = ("tierserve_requests_total", "tierserve_generated_tokens_total", "tierserve_prompt_tokens_total",
                   "tierserve_time_to_first_token_seconds_count", "tierserve_inter_token_latency_seconds_count")
    for name in coordinator:
        assert _value(after["coordinator"], name) > _value(before["coordinator"], name), name
    for name in ("tierserve_running_requests", "tierserve_waiting_requests"):
        assert name in after["coordinator"]
    worker = ("tierserve_worker_steps_total", "tierserve_worker_batch_tokens_count",
              'tierserve_worker_expert_dispatch_total{path="hot"}',
              'tierserve_worker_expert_dispatch_total{path="cpu"}')
    for name in worker:
        assert _value(after["gpu-worker"], name) > _value(before["gpu-worker"], name), name
    for name in ("tierserve_worker_kv_cache_used_ratio", "tierserve_worker_running_requests",
                 "tierserve_worker_batch_size"):
        assert name in after["gpu-worker"]
    for host in ("expert-host-0", "expert-host-1"):
        assert _value(after[host], "tierserve_expert_host_compute_seconds_count") > _value(
            before[host], "tierserve_expert_host_compute_seconds_count")
        assert "tierserve_expert_host_queue_depth" in after[host]
    for text in after.values():
        assert _value(text, "process_resident_memory_bytes") > 0


def _tierserve_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(arg in (b"coordinator", b"gpu_worker", b"expert_host") for arg in cmdline) and b"-m" in cmdline:
                pids.add(int(entry))
    return pids


@pytest.mark.slow
def test_killing_up_leaves_no_process_shared_memory_or_socket_behind(models):
    shm_before = set(os.listdir("/dev/shm"))
    system = start(models["qwen3moe"], 2, 2)
    with Client(system.endpoint) as client:
        members = client.health().members
        run_dir = client.stats().stats.get("run_dir")
    pids = {m["pid"] for m in members}
    assert len(pids) == 4 and pids <= _tierserve_pids()
    system.process.send_signal(signal.SIGKILL)
    system.process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pids & _tierserve_pids():
        time.sleep(0.2)
    assert not pids & _tierserve_pids()
    assert set(os.listdir("/dev/shm")) <= shm_before
    if run_dir:
        assert not Path(run_dir).exists()


@pytest.mark.slow
def test_a_stop_removes_the_mailbox_and_socket_of_processes_killed_outright(models, tmp_path):
    """Killed with no restart to follow (here as `tierserve up` stops), a host left its mailbox in /dev/shm (up to
    64 MiB of RAM) and its socket in a run dir of the user's: only a later host's start removed them."""
    run_dir = tmp_path / "run"
    system = start(models["qwen3moe"], 1, 2, "--run-dir", str(run_dir))
    with Client(system.endpoint) as client:
        pids = {m["member_id"]: m["pid"] for m in client.health().members}
    mailbox = mailbox_path(Config(run_dir=str(run_dir)).expert_host_endpoint(0))
    assert os.path.exists(mailbox)
    system.process.send_signal(signal.SIGTERM)  # stopping: the launcher restarts no child from now on
    for member in ("gpu-worker", "expert-host-0"):  # the worker would remove a dead host's mailbox as it stops
        os.kill(pids[member], signal.SIGKILL)
    assert system.stop() == 0
    assert not os.path.exists(mailbox)
    assert list(run_dir.glob("*.sock")) == []


@pytest.mark.slow
def test_a_stop_that_outlasts_its_timeout_kills_up_and_every_process_under_it(models):
    """RunningSystem.stop raised TimeoutExpired out of the benchmark or demo that called it, in place of their own
    error, and left `tierserve up` running."""
    system = start(models["qwen3moe"], 1, 2)
    with Client(system.endpoint) as client:
        pids = {m["pid"] for m in client.health().members}
    assert system.stop(timeout_s=0.0) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pids & _tierserve_pids():
        time.sleep(0.2)
    assert not pids & _tierserve_pids()


STOP_SIGNALS = {
    "sigterm": lambda process: process.send_signal(signal.SIGTERM),
    # a terminal's Ctrl-C signals `tierserve up`'s whole process group, not the launcher alone
    "ctrl-c-in-a-terminal": lambda process: os.killpg(process.pid, signal.SIGINT),
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", list(STOP_SIGNALS))
def test_a_stop_drains_in_flight_requests(models, oracles, stop):
    system = start(models["mixtral"], 1, 4)
    prompt = [3, 1, 4, 1, 5]
    with Client(system.endpoint) as client:
        events = client.generate(token_ids=prompt, max_tokens=24)
        first = next(events)
        STOP_SIGNALS[stop](system.process)
        rest = list(events)
    assert system.process.wait(60) == 0
    tokens = [first.token_id] + [e.token_id for e in rest if e.KIND == "token"]
    assert tokens == oracles["mixtral"].greedy(prompt, 24)
    assert rest[-1].KIND == "final" and rest[-1].finish_reason == "length"


@pytest.mark.slow
def test_ctrl_c_during_start_up_stops_every_process_without_waiting_for_ready(models):
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up", "--model", str(models["qwen3moe"]), "--expert-hosts", "2",
         "--client-endpoint", "tcp://127.0.0.1:0", "--metrics-port", "0", "--ready-timeout", "120"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    while not descendants(process.pid):  # its children are starting: they take seconds to import and load
        time.sleep(0.01)
    kids = set(descendants(process.pid))
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert "ready" not in out  # the launcher waited for the system to be ready, then stopped it
    assert process.returncode == 0
    assert not kids & _tierserve_pids()
