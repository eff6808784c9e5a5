"""No shared-memory segment outlives its host: a segment is unlinked as soon as it is opened, so a host
killed by SIGTERM or SIGKILL leaves nothing in /dev/shm; the name carries the pid, so one left by a
process killed between open and unlink is removed by the next segment created."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from expert_host.memory import SEGMENT_PREFIX, SHM_DIR, SharedSegment, remove_stale_segments
from tests.expert_host.conftest import segment_mappings, segment_names

ROOT = Path(__file__).resolve().parents[2]
HOST = """
import sys, time
from expert_host.store import ExpertStore
from shared.config import Config
from shared.expert_source import open_expert_source
from shared.gguf_file import GGUFModel
from shared.placement import round_robin_placement

model = GGUFModel(sys.argv[1])
store = ExpertStore(open_expert_source(model, Config()), 0, "pinned")
store.apply(round_robin_placement(model.config, 2, 1))
print(len(store.weights), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_host_leaves_nothing_in_dev_shm(expert_models, sig):
    shm_before = segment_names()
    host = subprocess.Popen([sys.executable, "-c", HOST, str(expert_models["f32"])], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert int(host.stdout.readline()) == 24  # 6 cold experts in each of 4 layers
        (segment,) = segment_mappings(host.pid)
        assert f"{SHM_DIR}/{SEGMENT_PREFIX}" in segment and segment.endswith("(deleted)")
        assert segment_names() == shm_before  # held through its fd and mapping only
        host.send_signal(sig)
        assert host.wait(timeout=30) == -sig
    finally:
        host.kill()
        host.wait()
        host.stdout.close()
    assert segment_names() == shm_before


def test_segments_left_by_dead_processes_are_removed_and_live_ones_kept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(SHM_DIR) / f"{SEGMENT_PREFIX}{os.getuid()}-{dead.pid}-0"
    live = Path(SHM_DIR) / f"{SEGMENT_PREFIX}{os.getuid()}-{os.getppid()}-0"
    other = Path(SHM_DIR) / f"{SEGMENT_PREFIX}{os.getuid()}-{dead.pid}-mailbox"
    try:
        for path in (stale, live, other):
            path.write_bytes(b"\0" * 4096)
        segment = SharedSegment([4096], register=False)
        assert not stale.exists() and live.exists() and other.exists()
        segment.close()
        assert remove_stale_segments() == []
    finally:
        for path in (stale, live, other):
            path.unlink(missing_ok=True)


# A host in a PID namespace of its own (another container sharing /dev/shm), whose pid as it knows it is `pid` here,
# stalled between opening its segment and unlinking it, as a descheduled one can.
HOST_IN_ANOTHER_NAMESPACE = """
import os, sys, time
from expert_host.memory import SEGMENT_PREFIX, SharedSegment

pid = int(sys.argv[1])
os.getpid = lambda: pid
unlink = os.unlink


def stall_before_its_own(path):
    if os.path.basename(path).startswith(f"{SEGMENT_PREFIX}{os.getuid()}-{pid}-"):
        print(flush=True)
        time.sleep(60)
    unlink(path)


os.unlink = stall_before_its_own
SharedSegment([4096], register=False)
"""


def test_a_live_hosts_segment_is_kept_whatever_pid_its_name_holds():
    """The pid in a segment's name is its host's in the host's PID namespace, and may be no process's here: the
    host's lock on the segment is what says it lives, so another container's host starting meanwhile leaves it."""
    nobody = subprocess.Popen([sys.executable, "-c", "pass"])
    nobody.wait()
    held = Path(SHM_DIR) / f"{SEGMENT_PREFIX}{os.getuid()}-{nobody.pid}-0"
    abandoned = Path(SHM_DIR) / f"{SEGMENT_PREFIX}{os.getuid()}-{nobody.pid}-1"
    host = subprocess.Popen([sys.executable, "-c", HOST_IN_ANOTHER_NAMESPACE, str(nobody.pid)], cwd=ROOT,
                            stdout=subprocess.PIPE)
    try:
        host.stdout.readline()
        abandoned.write_bytes(b"\0" * 4096)
        assert held.exists()
        removed = remove_stale_segments()
        assert str(abandoned) in removed and str(held) not in removed and held.exists()
        host.kill()
        host.wait()
        assert str(held) in remove_stale_segments() and not held.exists()  # its lock went with its host
    finally:
        host.kill()
        host.wait()
        host.stdout.close()
        for path in (held, abandoned):
            path.unlink(missing_ok=True)
