"""Each role started alone, as systemd runs it: any start order works, and a process that dies and
restarts rejoins, gets the current placement and serves the oracle's tokens again."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import zmq

from shared.client import Client
from shared.config import Config
from shared.gguf_file import GGUFModel
from shared.launcher import free_tcp_port
from shared.mailbox import ORDERED_STORES
from shared.make_model import make_model
from shared.native_kernels import load_library
from shared.process import worker_device
from shared.reference import ReferenceModel
from shared.run_files import EPHEMERAL_MARKER, SUPERSEDED_EXIT_STATUS, listened_on, mailbox_path

pytestmark = pytest.mark.slow
PROMPT = [11, 12, 13, 14]


def wait_ready(endpoint: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(endpoint, timeout_s=1.0) as client:
        while time.monotonic() < deadline:
            try:
                if client.health().status == "ready":
                    return
            except TimeoutError:
                pass
            time.sleep(0.2)
    raise AssertionError("system did not become ready")


def test_any_start_order_and_restarts_rejoin(tmp_path):
    model = tmp_path / "m.gguf"
    make_model(model, arch="qwen2moe", preset="tiny", dtype="f32", seed=5)
    expected = ReferenceModel(GGUFModel(model)).greedy(PROMPT, 6)
    run_dir = tmp_path / "run"
    config = Config(model=str(model), run_dir=str(run_dir), client_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}",
                    expert_hosts=2, hot_experts=2, metrics_port=0, expert_timeout_s=3.0, heartbeat_timeout_s=2.0,
                    pin_host_threads=True)
    config_path = tmp_path / "tierserve.toml"
    config_path.write_text(config.to_toml())
    base = [sys.executable, "-m", "shared.cli"]
    commands = {
        "expert-host-1": [*base, "expert-host", "--config", str(config_path), "--host-id", "1"],
        "expert-host-0": [*base, "expert-host", "--config", str(config_path), "--host-id", "0"],
        "gpu-worker": [*base, "gpu-worker", "--config", str(config_path)],
        "coordinator": [*base, "coordinator", "--config", str(config_path)],
    }
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        procs[name] = subprocess.Popen(commands[name])

    def check() -> None:
        wait_ready(config.client_endpoint)
        with Client(config.client_endpoint) as client:
            assert client.complete(token_ids=PROMPT, max_tokens=6).token_ids == expected

    try:
        for name in commands:  # hosts first, coordinator last: the reverse of `tierserve up`
            start(name)
            time.sleep(0.3)
        check()
        pids_before = {m["member_id"]: m["pid"] for m in Client(config.client_endpoint).health().members}
        threads = config.threads_for("expert_host", worker_device(config).type == "cuda")
        for host in (0, 1):  # each host's main thread on its own CPUs (where there are enough and a C compiler)
            cores = config.host_cores(host, threads) if load_library() is not None else []
            assert os.sched_getaffinity(pids_before[f"expert-host-{host}"]) == set(cores or os.sched_getaffinity(0))
        for name in ("expert-host-1", "gpu-worker", "coordinator"):
            procs[name].send_signal(signal.SIGKILL)
            procs[name].wait()
            time.sleep(2.5)  # long enough for the heartbeat timeout to notice
            start(name)
            check()
        with Client(config.client_endpoint) as client:
            members = {m["member_id"]: m for m in client.health().members}
        for name in ("expert-host-1", "gpu-worker"):
            assert members[name]["pid"] == procs[name].pid != pids_before[name]
            assert members[name]["placement_version"] == members["coordinator"]["placement_version"]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(60) for name, proc in procs.items()}
    assert all(code == 0 for code in codes.values()), codes
    leftovers = [p for p in os.listdir(run_dir) if p.endswith(".sock")] if Path(run_dir).exists() else []
    assert leftovers == []


@pytest.fixture(scope="module")
def model_and_expected(tmp_path_factory) -> tuple[Path, list[int]]:
    """A tiny model, and the oracle's greedy tokens after PROMPT."""
    model = tmp_path_factory.mktemp("model") / "m.gguf"
    make_model(model, arch="qwen3moe", preset="tiny", dtype="f32", seed=7)
    return model, ReferenceModel(GGUFModel(model)).greedy(PROMPT, 6)


class Roles:
    """Role processes started alone on one configuration, each writing its log to a file of its own."""

    def __init__(self, tmp_path: Path, model: Path, **settings) -> None:
        self.tmp_path = tmp_path
        self.config = Config(model=str(model), run_dir=str(tmp_path / "run"),
                             client_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", metrics_port=0, **settings)
        self.config_path = tmp_path / "tierserve.toml"
        self.config_path.write_text(self.config.to_toml())
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, role: str, *args: str) -> subprocess.Popen:
        with open(self.tmp_path / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", role, "--config", str(self.config_path), *args],
                stdout=log, stderr=subprocess.STDOUT)
        return self.procs[name]

    def start_serving(self, worker: str = "gpu-worker") -> subprocess.Popen:
        """The coordinator and a gpu worker (its log under `worker`), once they serve; the worker's process."""
        self.start("coordinator", "coordinator")
        process = self.start(worker, "gpu-worker")
        wait_ready(self.config.client_endpoint)
        return process

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    def stop(self) -> dict[str, int]:
        """SIGTERM to those still running; every exit status."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return {name: proc.wait(60) for name, proc in self.procs.items()}


def test_a_host_started_twice_hands_its_id_to_the_later_one_and_stops(tmp_path, model_and_expected):
    """A second `expert-host --host-id 0` beside a running one: the later one serves, and the first, which ran on
    unused and heartbeating into the void, says who took over and exits with a status its units do not restart.
    What it leaves behind on the way out is not the successor's socket file or mailbox."""
    model, expected = model_and_expected
    roles = Roles(tmp_path, model, expert_hosts=1, hot_experts=2)
    endpoint = roles.config.client_endpoint

    def complete() -> list[int]:
        wait_ready(endpoint)
        with Client(endpoint) as client:
            return client.complete(token_ids=PROMPT, max_tokens=6).token_ids

    try:
        roles.start("coordinator", "coordinator")
        roles.start("gpu-worker", "gpu-worker")
        first = roles.start("first", "expert-host", "--host-id", "0")
        assert complete() == expected
        second = roles.start("second", "expert-host", "--host-id", "0")
        assert first.wait(60) == SUPERSEDED_EXIT_STATUS
        assert complete() == expected
        with Client(endpoint) as client:
            members = {m["member_id"]: m for m in client.health().members}
        assert members["expert-host-0"]["pid"] == second.pid
        host_endpoint = roles.config.expert_host_endpoint(0)
        assert os.path.exists(host_endpoint[len("ipc://"):])
        assert os.path.exists(mailbox_path(host_endpoint)) == ORDERED_STORES
    finally:
        codes = roles.stop()
    assert codes == {"coordinator": 0, "gpu-worker": 0, "first": SUPERSEDED_EXIT_STATUS, "second": 0}
    here = socket.gethostname()
    said = roles.log("first")
    assert f"ERROR expert-host-0 was started twice: the coordinator now serves it with pid {second.pid} on {here}; " \
           f"this process (pid {first.pid} on {here}) stops" in said
    assert "stopped" in said  # by the way every stop goes: drained, and its sockets closed
    assert f"WARNING expert-host-0 was started twice: pid {second.pid} on {here} took it over from pid {first.pid} " \
           f"on {here}" in roles.log("coordinator")


def test_a_second_host_stopped_before_it_joined_leaves_the_first_serving(tmp_path, model_and_expected):
    """A second `expert-host --host-id 0` stopped (Ctrl-C) before the coordinator heard from it, here while the
    coordinator is paused: it had bound the endpoint and made a mailbox over the running host's, and took both
    away as it exited, so the worker could no more reach the host it still saw heartbeating. Finding the endpoint
    served, it now touches them only once it has joined."""
    model, expected = model_and_expected
    roles = Roles(tmp_path, model, expert_hosts=1, hot_experts=2, heartbeat_timeout_s=60.0)
    endpoint = roles.config.client_endpoint
    socket_file = roles.config.expert_host_endpoint(0)[len("ipc://"):]

    def files() -> list[int | None]:
        return [os.stat(path).st_ino if os.path.exists(path) else None
                for path in (socket_file, mailbox_path(roles.config.expert_host_endpoint(0)))]

    def mailbox_work(port: int) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return next(float(line.split()[-1]) for line in r.read().decode().splitlines()
                        if line.startswith("tierserve_expert_host_mailbox_work_total"))

    try:
        coordinator = roles.start("coordinator", "coordinator")
        roles.start("gpu-worker", "gpu-worker")
        first = roles.start("first", "expert-host", "--host-id", "0")
        wait_ready(endpoint)
        with Client(endpoint) as client:
            assert client.complete(token_ids=PROMPT, max_tokens=6).token_ids == expected
            port = next(m["metrics_port"] for m in client.health().members if m["member_id"] == "expert-host-0")
        before, work_before = files(), mailbox_work(port)
        assert before[0] is not None and (before[1] is not None) == ORDERED_STORES
        coordinator.send_signal(signal.SIGSTOP)
        try:
            second = roles.start("second", "expert-host", "--host-id", "0")
            deadline = time.monotonic() + 60
            while "is served by another process: joining" not in roles.log("second"):
                assert second.poll() is None and time.monotonic() < deadline, roles.log("second")
                time.sleep(0.1)
            time.sleep(0.5)  # long past where it used to bind and make its mailbox
            second.send_signal(signal.SIGINT)
            assert second.wait(60) == 0
        finally:
            coordinator.send_signal(signal.SIGCONT)
        assert files() == before
        with Client(endpoint) as client:
            assert client.complete(token_ids=PROMPT, max_tokens=6).token_ids == expected
            assert next(m["pid"] for m in client.health().members if m["member_id"] == "expert-host-0") == first.pid
        assert mailbox_work(port) > work_before or not ORDERED_STORES
    finally:
        codes = roles.stop()
    assert codes == {"coordinator": 0, "gpu-worker": 0, "first": 0, "second": 0}
    assert "stopped before it took the endpoint over" in roles.log("second")


def test_a_second_worker_that_never_joins_leaves_the_first_serving(tmp_path, model_and_expected):
    """A second gpu worker refused at start (its KV cache cannot fit), before its first heartbeat: it took the
    engine connection over as it started, and once it exited nothing the first sent was read, while the first,
    still heartbeating, kept the system ready and every request waited for ever."""
    model, expected = model_and_expected
    roles = Roles(tmp_path, model, expert_hosts=0, hot_experts=8)
    try:
        roles.start_serving("first")
        second = roles.start("second", "gpu-worker", "--kv-cache-tokens", str(10**13))
        assert second.wait(60) == 1
        with Client(roles.config.client_endpoint, timeout_s=30) as client:
            assert client.complete(token_ids=PROMPT, max_tokens=6).token_ids == expected
    finally:
        codes = roles.stop()
    assert codes == {"coordinator": 0, "first": 0, "second": 1}
    assert "cannot start: the KV cache needs" in roles.log("second")


def test_a_busy_worker_whose_engine_connection_a_later_one_took_is_told_to_stop(tmp_path, model_and_expected):
    """Another connection under the worker's identity takes the engine connection over: a second worker's as it
    joins, or (here, as a second worker's did as it started, before it waited to join) one made while the first
    still serves. The first's tokens are not read from then on: a busy one blocked on its full socket, silent for
    good, and never learnt that it was superseded. Waiting with its heartbeats going on, it is told once the second
    joins, and stops; the second serves the requests the first held, and new ones."""
    model, expected = model_and_expected
    roles = Roles(tmp_path, model, expert_hosts=0, hot_experts=8)
    # as the second worker's engine socket does as it starts: a DEALER under the worker's identity
    early = zmq.Context.instance().socket(zmq.DEALER)
    early.setsockopt(zmq.ROUTING_ID, b"gpu-worker")
    early.setsockopt(zmq.LINGER, 0)

    def scrape(port: int, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return next(float(line.split()[-1]) for line in r.read().decode().splitlines() if line.startswith(name))

    try:
        first = roles.start_serving("first")
        with Client(roles.config.client_endpoint) as client:
            port = next(m["metrics_port"] for m in client.health().members if m["member_id"] == "gpu-worker")
            # greedy on this model, [7] is followed by 480 tokens without an end-of-sequence token
            busy = [client.generate(token_ids=[7], max_tokens=480) for _ in range(16)]
            for stream in busy:
                next(stream)
            early.connect(roles.config.engine_endpoint)
            steps, still_since, deadline = -1.0, time.monotonic(), time.monotonic() + 60
            while time.monotonic() - still_since < 1.0:  # its socket full, the first steps no more
                assert time.monotonic() < deadline, "the first worker kept stepping"
                now_steps = scrape(port, "tierserve_worker_steps_total")
                if now_steps != steps:
                    steps, still_since = now_steps, time.monotonic()
                time.sleep(0.1)
            assert scrape(port, "tierserve_worker_running_requests") == 16, "the requests ended: it never blocked"
            second = roles.start("second", "gpu-worker")
            assert first.wait(60) == SUPERSEDED_EXIT_STATUS
            assert all(list(stream)[-1].completion_tokens == 480 for stream in busy)
            assert client.complete(token_ids=PROMPT, max_tokens=6).token_ids == expected
    finally:
        early.close()
        codes = roles.stop()
    assert codes == {"coordinator": 0, "first": SUPERSEDED_EXIT_STATUS, "second": 0}
    assert f"ERROR gpu-worker was started twice: the coordinator now serves it with pid {second.pid}" \
        in roles.log("first")


def test_the_client_port_is_not_one_a_sibling_binding_port_0_can_be_given():
    """A sibling's metrics server binds port 0 while the coordinator starts; the kernel's next port-0 pick
    must not be the client port just checked free and released."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    port = free_tcp_port()
    assert not low <= port <= high
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # and it is free


@pytest.mark.parametrize("host_id", ["2", "-1"])
def test_an_expert_host_id_outside_the_configured_hosts_is_refused(host_id):
    """A host that is no host of the placement would start, join and never be given an expert."""
    run = subprocess.run([sys.executable, "-m", "expert_host", "--host-id", host_id, "--expert-hosts", "2",
                          "--model", "unused.gguf"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"--host-id {host_id} must be >= 0 and below expert_hosts (2)" in run.stderr


def test_a_stopping_worker_whose_coordinator_is_gone_stops_when_its_drain_time_is_over(tmp_path, model_and_expected):
    """SIGTERM to a worker holding requests after its coordinator was killed: nothing reads its tokens, and it
    waited for the coordinator until killed in turn. It now gives up once drain_timeout_s is over, saying how many
    requests it ended, and exits as a stop does."""
    model, _ = model_and_expected
    roles = Roles(tmp_path, model, expert_hosts=0, hot_experts=8, drain_timeout_s=1.0)
    try:
        worker = roles.start_serving()
        coordinator = roles.procs["coordinator"]
        with Client(roles.config.client_endpoint) as client:
            busy = [client.generate(token_ids=[7], max_tokens=480) for _ in range(16)]
            for stream in busy:
                next(stream)
            coordinator.send_signal(signal.SIGKILL)
            coordinator.wait(60)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        roles.stop()
    said = re.search(r"WARNING stopping: drain_timeout_s \(1 s\) is over, (\d+) requests end unfinished",
                     roles.log("gpu-worker"))
    assert said is not None and int(said.group(1)) > 0, roles.log("gpu-worker")


def test_a_second_coordinator_on_one_run_dir_is_refused_and_leaves_the_first_serving(tmp_path, model_and_expected):
    """Coordinators are not members: a second one on the run dir (another client port) bound the control and engine
    sockets over the first's, and members that came after joined it."""
    model, expected = model_and_expected
    roles = Roles(tmp_path, model, expert_hosts=0, hot_experts=8)
    try:
        roles.start("coordinator", "coordinator")
        wait_for_file = time.monotonic() + 60
        while not listened_on(roles.config.control_endpoint):  # bound last
            assert time.monotonic() < wait_for_file
            time.sleep(0.1)
        second = roles.start("second", "coordinator", "--client-endpoint", f"tcp://127.0.0.1:{free_tcp_port()}")
        assert second.wait(60) == 1
        roles.start("gpu-worker", "gpu-worker")
        wait_ready(roles.config.client_endpoint)
        with Client(roles.config.client_endpoint) as client:
            assert client.complete(token_ids=PROMPT, max_tokens=6).token_ids == expected
    finally:
        codes = roles.stop()
    assert codes == {"coordinator": 0, "second": 1, "gpu-worker": 0}
    assert f"ERROR cannot start: another coordinator serves run_dir {roles.config.run_dir} (something accepts " \
           f"connections on {roles.config.control_endpoint})" in roles.log("second")


@pytest.mark.parametrize("role, args, offset", [("gpu-worker", (), 1), ("expert-host", ("--host-id", "1"), 3)])
def test_a_metrics_port_another_process_has_is_refused_by_name(tmp_path, model_and_expected, role, args, offset):
    """With a fixed metrics_port, a second process of one role on a machine (or anything else on its port) died
    of an uncaught "Address already in use" traceback; it now says what it could not do, and why, before loading."""
    model, _ = model_and_expected
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        roles = Roles(tmp_path, model, expert_hosts=2)
        fixed = roles.config.to_toml().replace("metrics_port = 0", f"metrics_port = {port - offset}")
        roles.config_path.write_text(fixed)
        run = subprocess.run([sys.executable, "-m", "shared.cli", role, "--config", str(roles.config_path), *args],
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert f"ERROR cannot start: cannot serve metrics on 127.0.0.1:{port}: Address already in use (another process " \
           f"has it: is this role already running here? metrics_port 0 picks free ports)" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch finds no CUDA device")
def test_a_worker_asked_for_cuda_where_there_is_none_says_so(tmp_path, model_and_expected):
    """It died of torch's "Torch not compiled with CUDA enabled" assertion, deep in the model's set-up (and under
    its systemd unit, again every 2 s)."""
    model, _ = model_and_expected
    roles = Roles(tmp_path, model, expert_hosts=0)
    roles.config_path.write_text(roles.config.to_toml().replace('device = "auto"', 'device = "cuda"'))
    run = subprocess.run([sys.executable, "-m", "shared.cli", "gpu-worker", "--config", str(roles.config_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "ERROR cannot start: device = cuda, and torch finds no CUDA device here" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def exited(pid: int) -> bool:
    """Whether a process that is not this one's child has ended (a zombie no one reaps counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("role, args", [("coordinator", ()), ("gpu-worker", ()), ("expert-host", ("--host-id", "0"))])
def test_a_role_that_cannot_start_after_up_died_removes_the_run_dir_up_left(tmp_path, role, args):
    """`tierserve up` makes a private run dir and removes it as it stops; if it died, the last of its roles out
    removes it. One that could not start (here: no model file) left it behind."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / EPHEMERAL_MARKER).touch()
    (run_dir / "config.toml").touch()
    # the role blocks reading its config from this pipe until `up` (the process that started it) is gone
    config_pipe = tmp_path / "config.toml"
    os.mkfifo(config_pipe)
    command = [sys.executable, "-m", "shared.cli", role, "--config", str(config_pipe), *args]
    with open(tmp_path / "role.log", "w") as log:
        up = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "print(subprocess.Popen(sys.argv[1:]).pid, flush=True)\ntime.sleep(600)", *command],
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        pid = int(up.stdout.readline())
        deadline = time.monotonic() + 60
        while True:  # a writer's non-blocking open succeeds once the role has opened the pipe to read it
            try:
                pipe = os.open(config_pipe, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert time.monotonic() < deadline and not exited(pid), "the role never read its config"
                time.sleep(0.05)
    finally:
        up.kill()
        up.wait()
    config = Config(model=str(tmp_path / "missing.gguf"), run_dir=str(run_dir),
                    client_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", metrics_port=0, expert_hosts=1)
    os.write(pipe, config.to_toml().encode())
    os.close(pipe)
    deadline = time.monotonic() + 60
    while not exited(pid):
        assert time.monotonic() < deadline, "the role did not stop"
        time.sleep(0.05)
    assert not run_dir.exists()


def test_a_coordinator_that_cannot_bind_every_socket_removes_the_socket_files_it_made(tmp_path, model_and_expected):
    """The client socket is bound first: when the engine's then could not be, its file was left behind."""
    model, _ = model_and_expected
    roles = Roles(tmp_path, model, expert_hosts=0, hot_experts=8)
    roles.config = dataclasses.replace(roles.config, client_endpoint=f"ipc://{tmp_path}/client.sock")
    roles.config_path.write_text(roles.config.to_toml())
    Path(roles.config.run_dir).mkdir()
    os.mkdir(roles.config.engine_endpoint[len("ipc://"):])  # no socket can be bound there
    assert roles.start("coordinator", "coordinator").wait(60) == 1
    refused = f"ERROR cannot start: Address already in use (addr='{roles.config.engine_endpoint}')"
    assert refused in roles.log("coordinator")
    assert not (tmp_path / "client.sock").exists()


def test_a_host_of_another_configuration_is_refused_by_name_and_stops(tmp_path, model_and_expected):
    """Started with a config of four hosts beside a system of none, expert-host-3 was listed among the members, for
    ever, and welcomed with the placement. Now the coordinator names it in its log once and answers that it is no
    member: it says why and exits 78, which the units do not restart."""
    model, expected = model_and_expected
    roles = Roles(tmp_path, model, expert_hosts=0, hot_experts=8)
    other = tmp_path / "other.toml"
    other.write_text(dataclasses.replace(roles.config, expert_hosts=4).to_toml())
    try:
        roles.start_serving()
        with open(tmp_path / "stray.log", "w") as log:
            stray = subprocess.Popen([sys.executable, "-m", "shared.cli", "expert-host", "--config", str(other),
                                      "--host-id", "3"], stdout=log, stderr=subprocess.STDOUT)
        assert stray.wait(60) == SUPERSEDED_EXIT_STATUS
        with Client(roles.config.client_endpoint) as client:
            assert [m["member_id"] for m in client.health().members] == ["coordinator", "gpu-worker"]
            assert client.complete(token_ids=PROMPT, max_tokens=6).token_ids == expected
    finally:
        codes = roles.stop()
    assert codes == {"coordinator": 0, "gpu-worker": 0}
    reason = ("'expert-host-3' as 'expert_host' is not a member of this system: its members are gpu-worker "
              "(gpu_worker)")
    assert roles.log("coordinator").count(f"WARNING refusing the heartbeats of pid {stray.pid} on ") == 1
    assert reason in roles.log("coordinator")
    assert f"ERROR the coordinator refuses this process: {reason}. Give every role the same configuration" in \
        (tmp_path / "stray.log").read_text()
