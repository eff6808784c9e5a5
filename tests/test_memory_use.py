"""Host memory as the kernel reports it, read from this machine's /proc with real processes and allocations."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from shared.memory_use import UsedMemoryPeak, descendants, parse_status, process_memory

STATUS = """Name:\tpython3
VmPeak:\t 2000000 kB
VmHWM:\t  300000 kB
VmRSS:\t  250000 kB
RssAnon:\t  200000 kB
RssFile:\t   40000 kB
RssShmem:\t   10000 kB
Threads:\t4
"""


def test_status_lines_in_bytes():
    status = parse_status(STATUS)
    assert status["VmHWM"] == 300000 * 1024 and status["RssShmem"] == 10000 * 1024
    assert "Threads" not in status  # not a size


def test_descendants_and_their_memory():
    """A child that starts a grandchild: both are found under this process, with the module each runs."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); " \
           "time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while len(found := descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in found and len(found) >= 2
        memory = process_memory([child.pid])
        assert memory[0]["pid"] == child.pid and memory[0]["role"].startswith("python")
        assert memory[0]["peak_rss"] >= memory[0]["rssanon"] > 0
    finally:
        for pid in reversed(descendants(os.getpid())):
            os.kill(pid, 9)
        child.wait()


def test_used_memory_peak_sees_an_allocation_freed_before_it_stops():
    peak = UsedMemoryPeak(interval_s=0.02)
    buffer = np.ones(256 << 20, dtype=np.uint8)  # written, so every page is resident
    time.sleep(0.3)
    del buffer
    assert peak.stop() >= 128 << 20  # half of it: other processes on the machine move the level too
