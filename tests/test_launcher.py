"""`tierserve up` restarting a child that exits: at once after a run of a while, with a growing wait while it keeps
failing soon after its start, and still stopping at once on SIGTERM while it waits."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest
import zmq

from shared.client import Client
from shared.config import Config, default_run_dir
from shared.launcher import (
    RESTART_MAX_DELAY_S,
    STABLE_UPTIME_S,
    Child,
    free_tcp_port,
    prepare_run,
    restart_exited,
)
from shared.make_model import make_model
from shared.protocol import Health, HealthReply, decode, encode
from shared.run_files import SUPERSEDED_EXIT_STATUS


@pytest.mark.parametrize("module", ["shared.launcher", "shared.client", "shared.cli"])
def test_the_launcher_and_clients_start_without_torch(module):
    """`tierserve up` loads torch nowhere but in its children, and a client nowhere: here the import took about a
    second of the 2-core machine ahead of every child's start."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_restart_delays_double_while_a_child_keeps_failing_and_reset_once_it_ran_a_while():
    child = Child("expert-host-0", [])
    quick = [child.restart_delay(uptime_s=2.0) for _ in range(8)]
    assert quick == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, RESTART_MAX_DELAY_S, RESTART_MAX_DELAY_S]
    assert child.restart_delay(uptime_s=STABLE_UPTIME_S) == 0.0
    assert child.restart_delay(uptime_s=2.0) == 1.0


def test_a_child_another_process_took_its_member_id_over_from_is_not_started_again(capsys):
    """Started again, it would take its id back, and the other would stop in turn: the two would fight for ever."""
    child = Child("expert-host-0", [sys.executable, "-c", f"raise SystemExit({SUPERSEDED_EXIT_STATUS})"])
    child.start()
    process = child.process
    process.wait(60)
    for _ in range(3):
        restart_exited([child], lambda: False)
    assert child.process is process and child.restart_at is None
    said = capsys.readouterr().err
    assert said == (f"tierserve: expert-host-0 exited with {SUPERSEDED_EXIT_STATUS}: another process took over its "
                    "member id; not restarting it\n")


EXITED = re.compile(r"tierserve: expert-host-0 exited with -?\d+ after [\d.]+ s; restarting (now|in ([\d.]+) s)")
FAILED_START = re.compile(r"expert-host-0\[\d+\] ERROR cannot start")


@pytest.mark.slow
def test_a_host_that_fails_at_start_is_restarted_ever_later_and_a_stop_does_not_wait(tmp_path):
    """Its model file gone, a host exits at start: `tierserve up` restarted it ten times in 15 s, for ever."""
    model = tmp_path / "m.gguf"
    make_model(model, arch="qwen3moe", preset="tiny", dtype="f32", seed=1)
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "up", "--model", str(model), "--expert-hosts", "1",
             "--hot-experts", "2", "--client-endpoint", "tcp://127.0.0.1:0", "--metrics-port", "0"],
            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        endpoint = next(line for line in process.stdout if "client endpoint" in line).split()[-1]
        with Client(endpoint) as client:
            host = next(m["pid"] for m in client.health().members if m["member_id"] == "expert-host-0")
        model.rename(tmp_path / "gone.gguf")
        os.kill(host, signal.SIGKILL)
        seen: list[tuple[float, str]] = []  # (when, the delay said) of each exit
        deadline = time.monotonic() + 60
        while len(seen) < 4:
            assert time.monotonic() < deadline, seen
            delays = [m.group(2) or "0" for m in EXITED.finditer(log_path.read_text())]
            seen += [(time.monotonic(), d) for d in delays[len(seen):]]
            time.sleep(0.05)
        assert [float(d) for _, d in seen] == [0.0, 1.0, 2.0, 4.0]
        for (at, delay), (next_at, _) in pairwise(seen):
            assert next_at - at >= float(delay)
        stop_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert time.monotonic() - stop_at < 4.0, "the stop waited for the restart"
        assert len(FAILED_START.findall(log_path.read_text())) == 3  # and did not start the host again
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize("gap_s", [0.0, 1.0])
def test_up_under_nohup_outlives_its_terminal_and_a_second_stop_signal_ends_the_drain(tmp_path, gap_s):
    """Started with SIGHUP ignored (nohup), `tierserve up` stopped the whole system when its terminal closed. And a
    second Ctrl-C or SIGTERM did nothing: the coordinator, in a session of its own, drained all its queued requests
    (up to drain_timeout_s) however often the user asked. gap_s: between the two signals (0: the second in before
    up has begun to stop)."""
    model = tmp_path / "m.gguf"
    make_model(model, arch="qwen3moe", preset="tiny", dtype="f32", seed=1)
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "up", "--model", str(model), "--expert-hosts", "1", "--max-running", "1",
         "--drain-timeout-s", "120", "--client-endpoint", "tcp://127.0.0.1:0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        endpoint = next(line for line in process.stdout if "client endpoint" in line).split()[-1]
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        with Client(endpoint, timeout_s=60) as client:
            assert process.poll() is None and client.health().status == "ready"
            # one at a time, 16 x 400 tokens (greedy, no end-of-text token after this prompt): the whole queue takes
            # far longer to drain than the stop below
            streams = [client.generate(prompt="hello", max_tokens=400) for _ in range(16)]
            next(iter(streams[0]))  # the first request runs
            process.send_signal(signal.SIGTERM)
            if gap_s:
                time.sleep(gap_s)
                assert process.poll() is None, "the first signal drains"
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGINT)
            finals = [list(stream)[-1].finish_reason for stream in streams]
        assert process.wait(60) == 0
        assert time.monotonic() - stopped_at < 30, "the second signal ends the drain"
        assert finals.count("cancelled") >= 10 and set(finals) <= {"cancelled", "length"}, finals
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()


def test_a_failed_up_leaves_the_sockets_of_a_system_that_shares_its_run_dir(tmp_path):
    """`tierserve up` removes the socket files its children killed outright left: not those another system running
    in the same run dir listens on, whose processes could not connect again without them."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    context = zmq.Context.instance()
    other = context.socket(zmq.ROUTER)  # the other system's coordinator, on its control socket
    other.bind(f"ipc://{run_dir}/control.sock")
    stale = run_dir / "engine.sock"  # one no process listens on any more
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(stale))
    try:
        run = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--model", str(tmp_path / "no-such.gguf"),
                              "--run-dir", str(run_dir), "--client-endpoint", "tcp://127.0.0.1:0",
                              "--metrics-port", "0", "--ready-timeout", "5"], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode != 0, run.stderr
        assert (run_dir / "control.sock").exists() and not stale.exists()
    finally:
        other.close(linger=0)


@pytest.mark.parametrize("cache_dir", [False, True], ids=["beside-the-model", "expert-cache-dir"])
def test_a_system_not_ready_in_time_is_stopped_with_a_hint_at_the_cause(tmp_path, cache_dir):
    """It said only "not ready after 300 s": a first start converting a large model's expert cache never became
    ready, each stop throwing the conversion away, with nothing to say why or what to do. With expert_cache_dir set
    (as the services' example configuration has it) a cache converted beside the model is not looked for: the hint
    names the directory."""
    model = tmp_path / "m.gguf"
    make_model(model, arch="qwen3moe", preset="tiny", dtype="f32", seed=1)
    directory = tmp_path / "caches"
    chosen = ["--expert-cache-dir", str(directory)] if cache_dir else []
    run = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--model", str(model), "--run-dir",
                          str(tmp_path / "run"), "--client-endpoint", "tcp://127.0.0.1:0", "--metrics-port", "0",
                          "--ready-timeout", "0.5", *chosen], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    command = "tierserve convert-experts MODEL" + (f" --cache-dir {directory}" if cache_dir else "")
    assert "tierserve: not ready after 0.5 s. A first start of a quantized model converts its expert cache: " \
           f"`{command}` does that ahead, or give --ready-timeout more time" in run.stderr


def test_another_system_answering_ready_on_the_client_endpoint_is_not_taken_for_this_one(tmp_path):
    """Its coordinator failing to bind an endpoint another system served, `tierserve up` took that system's
    "ready" for its own, said it was ready and restarted its coordinator for ever."""
    model = tmp_path / "m.gguf"
    make_model(model, arch="qwen3moe", preset="tiny", dtype="f32", seed=1)
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    other = zmq.Context.instance().socket(zmq.ROUTER)  # the other system's coordinator, always ready
    other.bind(endpoint)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            if other.poll(50):
                client, *frames = other.recv_multipart()
                assert isinstance(decode(frames), Health)
                ready = HealthReply(status="ready", members=[{"member_id": "coordinator", "pid": os.getpid()}])
                other.send_multipart([client, *encode(ready)])

    answering = threading.Thread(target=answer)
    answering.start()
    try:
        run = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--model", str(model), "--client-endpoint",
                              endpoint, "--metrics-port", "0", "--ready-timeout", "60"], capture_output=True,
                             text=True, timeout=90)
    finally:
        stop.set()
        answering.join()
        other.close(linger=0)
    assert run.returncode != 0 and "ready" not in run.stdout, run.stdout
    assert "coordinator exited with 1 during start-up" in run.stderr, run.stderr


def test_a_run_dir_left_by_an_up_killed_during_start_up_is_removed_by_the_next(tmp_path, monkeypatch, capsys):
    """`kill -9` of `tierserve up` while its children were still starting left its run dir behind for good (the
    children, stopped before they had a handler, could not leave it). Those of live `up`s, and any holding more than
    the marker and the config, are kept."""
    make = ("import sys, time\n"
            "from shared.config import Config\n"
            "from shared.launcher import prepare_run\n"
            "config, run_dir, _ = prepare_run(Config(model='m.gguf'))\n"
            "(run_dir / 'config.toml').write_text(config.to_toml())\n"
            "if sys.argv[1] == 'busy': (run_dir / 'control.sock').touch()  # a system's children still inside\n"
            "print(run_dir, flush=True)\n"
            "if sys.argv[1] == 'live': time.sleep(60)\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def made(kind: str) -> tuple[subprocess.Popen, Path]:
        process = subprocess.Popen([sys.executable, "-c", make, kind], stdout=subprocess.PIPE, text=True, env=env)
        return process, Path(process.stdout.readline().strip())

    # in this order, each one's own sweep leaves those made before it
    (live, running), (stopped, busy), (dead, abandoned) = made("live"), made("busy"), made("dead")
    try:
        assert dead.wait(30) == 0
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        _, mine, _ = prepare_run(Config(model="m.gguf"))
        assert not abandoned.exists() and busy.exists() and running.exists() and mine.exists()
        assert f"tierserve: removed {abandoned}: the tierserve up that made it is gone" in capsys.readouterr().err
    finally:
        live.kill()
        for process in (live, stopped, dead):
            process.wait()
            process.stdout.close()
    _, again, _ = prepare_run(Config(model="m.gguf"))
    assert not running.exists() and mine.exists() and again.exists()  # this process's are held while it lives


def test_a_temporary_directory_too_long_for_the_socket_files_leaves_no_run_dir(tmp_path, monkeypatch):
    """The run dir made in it was refused as too long for its socket files' paths, and left behind empty."""
    long = tmp_path / ("t" * (100 - len(str(tmp_path))))
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # the default run dir's place, short enough
    with pytest.raises(ValueError, match="is too long for a socket file"):
        prepare_run(Config(model="m.gguf"))
    assert list(long.iterdir()) == []


def test_a_new_run_dir_is_made_private_and_an_existing_one_keeps_its_mode(tmp_path):
    """An existing run dir was made 0700 whatever it was: `--run-dir /tmp` took /tmp from every other user."""
    config, run_dir, ephemeral = prepare_run(Config(model="m.gguf", run_dir=str(tmp_path / "new" / "run")))
    assert not ephemeral and run_dir == tmp_path / "new" / "run" and run_dir.stat().st_mode & 0o777 == 0o700
    assert config.run_dir == str(run_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chmod(mine, 0o755)
    prepare_run(Config(model="m.gguf", run_dir=str(mine)))
    assert mine.stat().st_mode & 0o7777 == 0o755


def test_the_default_run_dir_given_explicitly_is_used(tmp_path, monkeypatch):
    """It was taken for no choice at all: `up --run-dir <the default>` (to share its sockets with roles started by
    hand) ran in a temporary directory of its own instead, saying nothing."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where `up` makes its own
    _, run_dir, ephemeral = prepare_run(Config(model="m.gguf", run_dir=default_run_dir()))
    assert not ephemeral and str(run_dir) == default_run_dir()
    _, run_dir, ephemeral = prepare_run(Config(model="m.gguf"))
    assert ephemeral and str(run_dir) != default_run_dir()


def test_a_run_dir_others_may_write_to_is_refused_by_name(tmp_path):
    """Another user could replace its socket files; `tierserve up` says so and starts nothing."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp is
    run = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--model", str(tmp_path / "m.gguf"),
                          "--run-dir", str(shared)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"tierserve up: run_dir {shared} is another user's or others may write to it (mode 1777): give " \
           "tierserve a directory of its own" in run.stderr
    assert shared.stat().st_mode & 0o7777 == 0o1777 and os.listdir(shared) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        prepare_run(Config(model="m.gguf", run_dir=str(tmp_path / "file")))
