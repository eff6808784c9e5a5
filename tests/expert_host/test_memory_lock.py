"""Hosts starting together take their copied memory one at a time: a host measures free memory only once
another that holds the host memory lock has filled its arena, and a host that fails lets go of the lock."""

from __future__ import annotations

import contextlib
import itertools
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from expert_host.memory import HostMemoryError
from expert_host.store import ExpertStore
from shared.config import Config
from shared.expert_source import open_expert_source
from shared.gguf_file import GGUFModel
from shared.placement import Placement, round_robin_placement
from shared.protocol import Heartbeat, Welcome, decode, encode

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys
from expert_host.memory import host_memory_lock

with host_memory_lock():
    print("held", flush=True)
    sys.stdin.readline()  # until the test closes the pipe
"""


def apply_in_thread(store: ExpertStore, placement: Placement) -> Future:
    """store.apply(placement) in a daemon thread, so one left waiting on the lock cannot hold up the tests' end."""
    applied: Future = Future()

    def run() -> None:
        try:
            store.apply(placement)
            applied.set_result(None)
        except BaseException as e:
            applied.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return applied


def test_a_host_fills_its_arena_only_after_the_host_holding_the_lock_is_done(expert_models, caplog):
    model = GGUFModel(expert_models["f32"])
    store = ExpertStore(open_expert_source(model, Config()), 0, "pinned")
    calls: list[float] = []
    store.keep_alive = lambda: calls.append(time.monotonic())
    try:
        with subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as holder:
            assert holder.stdout.readline() == "held\n"
            with caplog.at_level(logging.INFO, logger="expert_host.memory"):
                applied = apply_in_thread(store, round_robin_placement(model.config, 0, 1))
                with pytest.raises(TimeoutError):
                    applied.result(timeout=0.5)
                assert store.placement_version == 0
                waited = len(calls)
                holder.stdin.close()  # the holder lets go of the lock and exits
                applied.result(timeout=10)
        assert len(store.weights) == model.config.n_layers * model.config.n_experts
        assert waited >= 3, "the host's heartbeat was not kept up while it waited for the lock"
        assert len(calls) >= waited + len(store.weights), "nor between the regions it copied"
        assert "waiting for it before measuring what is free" in caplog.text
    finally:
        store.close()


@contextlib.contextmanager
def host_welcomed_behind_the_lock(config: Config, **popen) -> Iterator[tuple]:
    """A real expert host started with pinned memory while another process holds the host memory lock, welcomed
    with a placement (version 7) by the test's ROUTER, which stands in for the coordinator's control socket:
    (placement, control socket, the holder, the host). The host is stopped (SIGTERM) at the end, and killed if it
    has not stopped."""
    import zmq

    placement = round_robin_placement(GGUFModel(config.model).config, 0, 1, version=7)
    ctx = zmq.Context()
    control = ctx.socket(zmq.ROUTER)
    control.setsockopt(zmq.LINGER, 0)
    control.setsockopt(zmq.RCVTIMEO, 60_000)
    control.bind(config.control_endpoint)
    with subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as holder:
        assert holder.stdout.readline() == "held\n"
        host = subprocess.Popen([sys.executable, "-m", "expert_host", "--model", config.model, "--run-dir",
                                 config.run_dir, "--metrics-port", "0", "--host-id", "0", "--host-memory", "pinned",
                                 "--heartbeat-interval-s", str(config.heartbeat_interval_s),
                                 "--heartbeat-timeout-s", str(config.heartbeat_timeout_s)], cwd=ROOT, **popen)
        try:
            identity, *frames = control.recv_multipart()
            assert isinstance(decode(frames), Heartbeat)
            control.send_multipart([identity, *encode(Welcome(placement=placement.to_dict()))])
            yield placement, control, holder, host
        finally:
            host.terminate()
            try:
                host.wait(timeout=30)
            finally:
                host.kill()
                control.close()
                ctx.term()


def test_a_host_waiting_for_the_lock_keeps_sending_heartbeats(expert_models, tmp_path):
    """A real host given a pinned placement while another holds the lock beats on through the wait (longer than
    the coordinator's heartbeat timeout here), instead of being taken for dead, and then reports the placement."""
    config = Config(model=str(expert_models["f32"]), run_dir=str(tmp_path), heartbeat_interval_s=0.2,
                    heartbeat_timeout_s=1.0)
    with host_welcomed_behind_the_lock(config) as (placement, control, holder, host):
        beats = []
        waiting_until = time.monotonic() + 3 * config.heartbeat_timeout_s
        while time.monotonic() < waiting_until:
            _, *frames = control.recv_multipart()
            beats.append(time.monotonic())
            assert decode(frames).placement_version != placement.version, "filled while the lock was held"
        assert max(b - a for a, b in itertools.pairwise(beats)) < config.heartbeat_timeout_s / 2
        holder.stdin.close()  # the other host is done: this one fills its arena and says so
        while decode(control.recv_multipart()[1:]).placement_version != placement.version:
            pass
        host.terminate()
        assert host.wait(timeout=30) == 0


def test_a_host_waiting_for_the_lock_stops_on_sigterm(expert_models, tmp_path):
    """SIGTERM reached a host waiting for the memory lock only once the other host was done and this one had
    filled its memory too: under `tierserve up`, a stop ran out its drain timeout and ended in SIGKILL."""
    config = Config(model=str(expert_models["f32"]), run_dir=str(tmp_path))
    with host_welcomed_behind_the_lock(config, stderr=subprocess.PIPE, text=True) as (_, control, _, host):
        control.recv_multipart()  # a heartbeat from the wait
        time.sleep(0.5)
        host.terminate()
        assert host.wait(timeout=10) == 0
        assert "stopped while taking placement v7 on: holding 0 experts of placement v0" in host.stderr.read()


def test_a_refused_placement_lets_go_of_the_lock(expert_models):
    model = GGUFModel(expert_models["f32"])
    source = open_expert_source(model, Config())
    placement = round_robin_placement(model.config, 0, 1)
    with pytest.raises(HostMemoryError):
        ExpertStore(source, 0, "pinned", floor="100%").apply(placement)  # refused with the lock held
    store = ExpertStore(source, 0, "pinned")
    try:
        apply_in_thread(store, placement).result(timeout=10)
    finally:
        store.close()


def test_another_users_lock_file_is_not_waited_on(tmp_path, monkeypatch, caplog):
    """/dev/shm is writable by every user: a file under this user's lock name that another user made (and holds
    locked) must not stop this user's hosts from starting. Made here by chown, so as root only."""
    import fcntl
    import os

    from expert_host import memory

    if os.getuid() != 0:
        pytest.skip("making a file of another user needs root")
    monkeypatch.setattr(memory, "SHM_DIR", str(tmp_path))
    path = tmp_path / f"tierserve-host-memory-{os.getuid()}.lock"
    path.touch(mode=0o644)
    os.chown(path, 4242, 4242)
    with open(path) as theirs:
        fcntl.flock(theirs, fcntl.LOCK_EX)  # another OFD: it conflicts with host_memory_lock's as another process's
        entered: Future = Future()

        def enter() -> None:
            with memory.host_memory_lock():
                entered.set_result(None)

        threading.Thread(target=enter, daemon=True).start()
        with caplog.at_level(logging.WARNING, logger="expert_host.memory"):
            entered.result(timeout=2)
    assert "another user's file" in caplog.text


def test_an_error_in_the_block_is_not_chained_to_an_unopenable_lock_file(tmp_path, monkeypatch):
    from expert_host import memory

    monkeypatch.setattr(memory, "SHM_DIR", str(tmp_path / "missing"))
    with pytest.raises(HostMemoryError) as info, memory.host_memory_lock():
        raise HostMemoryError("does not fit")
    assert info.value.__context__ is None
