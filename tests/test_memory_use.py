"""Host memory as the kernel reports it, read from this machine's /proc with real processes and allocations."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from shared.config import Config
from shared.launcher import free_tcp_port
from shared.make_model import PRESETS, make_model
from shared.memory_use import UsedMemoryPeak, cgroup_memory, descendants, parse_status, process_memory, read_meminfo

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
    buffer = np.ones(1 << 30, dtype=np.uint8)  # written, so every page is resident
    time.sleep(0.3)
    del buffer
    # half of it: the machine's level moves with other processes too (a test before may still be freeing its own),
    # by up to a few hundred MB here
    assert peak.stop() >= 512 << 20


def _cgroup(tmp_path, proc_line: str, files: dict[str, str]) -> tuple[str, str]:
    tmp_path.mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    for name, text in files.items():
        path = tmp_path / "root" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(proc), str(tmp_path / "root")


def test_a_memory_cgroups_limit_caps_what_a_process_may_take(tmp_path):
    """A container or a unit's MemoryMax is invisible in /proc/meminfo: v2's memory.max, v1's limit_in_bytes;
    what is available is the limit less the working set, which leaves out page cache the kernel can reclaim."""
    v2 = _cgroup(tmp_path / "v2", "0::/system.slice/tierserve.service", {
        "system.slice/tierserve.service/memory.max": "8589934592\n",
        "system.slice/tierserve.service/memory.current": "3000000000\n",
        "system.slice/tierserve.service/memory.stat": "anon 2000000000\ninactive_file 1000000000\n"})
    assert cgroup_memory(*v2) == (8589934592, 6589934592)
    v1 = _cgroup(tmp_path / "v1", "12:pids:/\n4:memory:/docker/abc\n0::/", {
        "memory/docker/abc/memory.limit_in_bytes": "4294967296\n",
        "memory/docker/abc/memory.usage_in_bytes": "1500000000\n",
        "memory/docker/abc/memory.stat": "cache 600000000\ntotal_inactive_file 500000000\n"})
    assert cgroup_memory(*v1) == (4294967296, 3294967296)
    unlimited = _cgroup(tmp_path / "none", "0::/user.slice", {
        "user.slice/memory.max": "max\n", "user.slice/memory.current": "1\n", "user.slice/memory.stat": ""})
    assert cgroup_memory(*unlimited) is None
    v1_unlimited = _cgroup(tmp_path / "v1none", "4:memory:/", {
        "memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "1\n",
        "memory/memory.stat": ""})
    assert cgroup_memory(*v1_unlimited) is None
    # Docker on v1 without a cgroup namespace: /proc names the host's path, the container's mount is its own cgroup
    docker = _cgroup(tmp_path / "docker", "4:memory:/docker/0123abcd", {
        "memory/memory.limit_in_bytes": "2147483648\n", "memory/memory.usage_in_bytes": "700000000\n",
        "memory/memory.stat": "total_inactive_file 200000000\n"})
    assert cgroup_memory(*docker) == (2147483648, 1647483648)
    # a limit on a parent slice holds for every unit under it
    parent = _cgroup(tmp_path / "parent", "0::/tierserve.slice/host.service", {
        "tierserve.slice/memory.max": "6000000000\n",
        "tierserve.slice/memory.current": "1000\n",
        "tierserve.slice/memory.stat": "inactive_file 0\n",
        "tierserve.slice/host.service/memory.max": "max\n",
        "tierserve.slice/host.service/memory.current": "1000\n",
        "tierserve.slice/host.service/memory.stat": "inactive_file 0\n"})
    assert cgroup_memory(*parent) == (6000000000, 5999999000)


def _start_worker(tmp_path, **settings) -> subprocess.CompletedProcess:
    """A gpu worker on the CPU, alone (no coordinator: it refuses, or waits for a placement until the timeout)."""
    model = tmp_path / "tiny.gguf"
    make_model(model, preset="tiny", dtype="f32", seed=0)
    config = tmp_path / "config.toml"
    config.write_text(Config(model=str(model), run_dir=str(tmp_path / "run"), metrics_port=0, device="cpu",
                             expert_hosts=0, **settings).to_toml())
    return subprocess.run([sys.executable, "-m", "gpu_worker", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)


def test_a_cpu_workers_kv_cache_larger_than_ram_is_refused_by_name(tmp_path):
    """10**8 tokens of the tiny model's KV cache are 102 GB: the worker asked torch for them and died of its
    RuntimeError's traceback (on a machine that overcommits, it would have been OOM-killed writing the zeros)."""
    run = _start_worker(tmp_path, kv_cache_tokens=10**8)
    assert run.returncode == 1
    assert "cannot start: the KV cache needs 102.4 GB of RAM for kv_cache_tokens = 100000000" in run.stderr
    assert "lower kv_cache_tokens" in run.stderr and "host_memory_floor" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_cpu_worker_with_no_room_for_its_trunk_says_to_lower_the_floor_not_the_kv_cache(tmp_path):
    """The trunk went uncounted: with less free than the floor the refusal said "at most 0 tokens fit; lower
    kv_cache_tokens", which no value of it could satisfy."""
    run = _start_worker(tmp_path, host_memory_floor=str(read_meminfo().total))
    assert run.returncode == 1
    assert "cannot start: the model's dense trunk needs" in run.stderr
    assert "lower host_memory_floor, or free memory" in run.stderr and "Traceback" not in run.stderr


def test_a_cpu_workers_soft_slots_larger_than_its_ram_are_refused_by_name(tmp_path):
    """They were allocated unchecked and filled as experts streamed in, past the floor (or torch's allocator
    refused them with a traceback)."""
    run = _start_worker(tmp_path, soft_slots=10**7)
    assert run.returncode == 1
    assert f"cannot start: its {10**7 + 16} soft slots (soft_slots + soft_staging) need" in run.stderr
    assert "lower soft_slots and soft_staging, or host_memory_floor" in run.stderr and "Traceback" not in run.stderr


def test_a_cpu_workers_hot_experts_larger_than_its_ram_are_refused_by_name(tmp_path, monkeypatch):
    """A placement whose hot experts (float ones, copied into the worker's RAM) do not fit in what is free less
    host_memory_floor, though the KV cache does: the worker copied them all, and on a machine with that little
    room died of a traceback or was OOM-killed. 1.2 GB of f32 experts; the floor leaves about 0.9 GB, less what
    the worker's own start-up takes (a few hundred MB), so the room is well above the few MB of KV cache and
    hundreds of MB below the experts, however the machine's free memory moves meanwhile."""
    monkeypatch.setitem(PRESETS, "hot-ram", dict(PRESETS["small"], n_layers=6, hidden=512, head_dim=64, n_experts=64,
                                                 expert_ffn=512))
    model = tmp_path / "hot.gguf"
    make_model(model, preset="hot-ram", dtype="f32", seed=0)
    hot_bytes = 6 * 64 * 3 * 512 * 512 * 4
    floor = read_meminfo().available - hot_bytes * 3 // 4
    config = tmp_path / "config.toml"  # no expert hosts: every expert is hot
    config.write_text(Config(model=str(model), run_dir=str(tmp_path / "run"), metrics_port=0, device="cpu",
                             client_endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", expert_hosts=0, hot_experts=64,
                             kv_cache_tokens=512, host_memory_floor=str(floor)).to_toml())
    coordinator = subprocess.Popen([sys.executable, "-m", "coordinator", "--config", str(config)],
                                   stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, "-m", "gpu_worker", "--config", str(config)], stderr=subprocess.PIPE,
                              text=True)
    try:
        _, stderr = worker.communicate(timeout=30)  # holding the placement, it would serve until killed
    finally:
        for proc in (worker, coordinator):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert worker.returncode == 1, stderr
    assert "its hot experts need 1.2 GB of RAM" in stderr
    assert "gpu_expert_budget" in stderr and "hot_experts" in stderr and "host_memory_floor" in stderr
    assert "Traceback" not in stderr


def test_a_parent_cgroups_limit_counts_what_its_other_units_use(tmp_path):
    """A slice's MemoryMax holds for all of its units together: with 5.5 of its 6 GB taken by the units beside this
    one, 0.5 GB is left, not 6 GB less this unit's own use (three expert hosts in one slice each counted the
    whole limit as theirs)."""
    slice_ = _cgroup(tmp_path / "slice", "0::/tierserve.slice/host.service", {
        "tierserve.slice/memory.max": "6000000000\n",
        "tierserve.slice/memory.current": "5600000000\n",
        "tierserve.slice/memory.stat": "inactive_file 100000000\n",
        "tierserve.slice/host.service/memory.max": "max\n",
        "tierserve.slice/host.service/memory.current": "1000\n",
        "tierserve.slice/host.service/memory.stat": "inactive_file 0\n"})
    assert cgroup_memory(*slice_) == (6000000000, 500000000)
