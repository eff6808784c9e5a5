"""Sizing from measured free memory (made-up /proc/meminfo numbers), the config fields that choose the
memory kind and the floor, and the layout of copied layers."""

from __future__ import annotations

import itertools
import logging
import os

import pytest
import torch

from expert_host.memory import HostMemoryError, check_fit, check_kind
from expert_host.service import open_mailbox
from shared.config import Config, load_config
from shared.expert_cache import ExpertLayout
from shared.gguf_file import GGUFModel
from shared.mailbox import remove_mailbox
from shared.memory_use import MemInfo, parse_meminfo, safety_floor
from shared.pages import PAGE
from shared.run_files import mailbox_path

GB = 10**9
MEMINFO = """MemTotal:       131072000 kB
MemFree:         1000000 kB
MemAvailable:   31347656 kB
Buffers:            2444 kB
SwapTotal:      16000000 kB
SwapFree:        8000000 kB
"""


def test_meminfo_is_read_in_bytes():
    assert parse_meminfo(MEMINFO) == MemInfo(total=131072000 * 1024, available=31347656 * 1024)
    with pytest.raises(ValueError, match="MemAvailable"):
        parse_meminfo("MemTotal: 100 kB\n")


def test_refusal_says_what_would_fit():
    mem = MemInfo(total=128 * GB, available=int(32.1 * GB))
    expert = 9_467_000  # a bf16 Qwen3-30B-A3B-sized expert
    with pytest.raises(HostMemoryError) as refused:
        check_fit("pinned", 4352 * expert, 4352, expert, mem, floor=2 * GB)
    assert str(refused.value) == (
        "placement needs 41.2 GB of pinned memory for 4,352 experts; 30.1 GB is available after the 2.0 GB "
        "host_memory_floor: at most 3,179 experts fit, or use host_memory = mapped")
    assert isinstance(refused.value, ValueError)
    check_fit("pinned", 3179 * expert, 3179, expert, mem, floor=2 * GB)


def test_swap_does_not_count_for_page_locked_memory():
    mem = MemInfo(total=64 * GB, available=10 * GB)
    with pytest.raises(HostMemoryError, match="8.0 GB is available after the 2.0 GB host_memory_floor: at most 666"):
        check_fit("pinned", 12 * GB, 1000, 12_000_000, mem, floor=2 * GB)


def test_memory_freed_by_the_migration_counts_and_dev_shm_can_be_the_limit():
    mem = MemInfo(total=64 * GB, available=10 * GB)
    check_fit("pinned", 12 * GB, 1000, 12_000_000, mem, floor=2 * GB, freed=5 * GB)  # the old segment goes
    with pytest.raises(HostMemoryError, match=r"3.0 GB is free in /dev/shm: at most 250 experts fit"):
        check_fit("pinned", 6 * GB, 500, 12_000_000, mem, floor=2 * GB, shm_free=3 * GB)
    check_fit("pinned", 0, 0, 12_000_000, MemInfo(1, 0), floor=2 * GB)  # holding nothing needs nothing


def test_floor_is_a_size_or_a_share_of_ram():
    mem = MemInfo(total=100 * GB, available=50 * GB)
    assert safety_floor("2GiB", mem) == 2 * 1024**3
    assert safety_floor("10%", mem) == 10 * GB
    assert safety_floor("0", mem) == 0


def test_config_chooses_a_kind_per_host_and_validates_the_floor(tmp_path):
    path = tmp_path / "tierserve.toml"
    path.write_text('host_memory = "mapped, pinned"\nhost_memory_floor = "5%"\nexpert_hosts = 3\n')
    config = load_config(path)
    assert [config.host_memory_for(i) for i in range(3)] == ["mapped", "pinned", "pinned"]
    assert Config().host_memory_for(1) == "mapped" and Config().host_memory_floor == "2GiB"
    with pytest.raises(ValueError, match="host_memory must be one of mapped, pinned "):
        Config(host_memory="pinned,huge")
    with pytest.raises(ValueError, match="host_memory must be one of mapped, pinned "):
        Config(host_memory="write-combined")  # a copy nothing would read: the worker streams from its own map
    with pytest.raises(ValueError, match="percentage must be in 0..100"):
        Config(host_memory_floor="150%")
    with pytest.raises(ValueError, match="not a size"):
        Config(host_memory_floor="lots")


def test_an_unknown_kind_is_refused():
    check_kind("pinned")
    with pytest.raises(HostMemoryError, match="unknown host memory kind 'swap'"):
        check_kind("swap")


def test_each_host_binds_its_threads_to_cores_of_its_own(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    one, two = Config(expert_hosts=1, pin_host_threads=True), Config(expert_hosts=2, pin_host_threads=True)
    assert one.host_cores(0, 13) == list(range(3, 16))  # 0-2 left to the coordinator and worker
    assert [two.host_cores(host, 6) for host in (0, 1)] == [list(range(4, 10)), list(range(10, 16))]
    assert two.host_cores(0, 9) == []  # 18 threads on 16 cores: none bound
    assert two.host_cores(2, 6) == []  # no such host
    assert Config(expert_hosts=2).host_cores(0, 6) == []  # binding is off unless asked for
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {6, 0, 4, 2})  # a cpuset or taskset's cores
    assert one.host_cores(0, 3) == [2, 4, 6]


def test_expert_regions_are_whole_pages_and_matrices_start_on_cache_lines():
    layout = ExpertLayout.build(("float",) * 3,
                                [((7, 5), torch.bfloat16), ((7, 5), torch.bfloat16), ((5, 7), torch.float32)])
    assert [slots[0].offset for slots in layout.matrices] == [0, 128, 256]  # 70-byte bf16 and 140-byte fp32
    assert layout.region_nbytes == PAGE


def test_default_threads_never_ask_for_more_than_the_cores(monkeypatch):
    for cores, hosts, gpu in itertools.product((2, 3, 16, 64, 1), (0, 1, 2, 4), (False, True)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        config = Config(expert_hosts=hosts)
        total = config.threads_for("coordinator") + config.threads_for("gpu_worker", gpu) \
            + hosts * config.threads_for("expert_host", gpu)
        assert total <= max(cores, 2 + hosts), (cores, hosts, gpu, total)  # one thread each at the least
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert Config(expert_hosts=1).threads_for("expert_host") == 7
    # a worker on a GPU keeps two threads; the host's CPU kernels get the rest
    assert Config(expert_hosts=1).threads_for("gpu_worker", True) == 2
    assert Config(expert_hosts=1).threads_for("expert_host", True) == 13
    assert Config(expert_hosts=2).threads_for("expert_host", True) == 6
    assert Config(expert_hosts=0).threads_for("gpu_worker", True) == 15  # no host: every core but one, as on a CPU
    assert Config(expert_hosts=1, host_threads=12).threads_for("expert_host") == 12
    assert Config(expert_hosts=1, threads=3).threads_for("gpu_worker") == 3
    # more than the CPUs this process may run on (a cpuset's): held to them
    assert Config(expert_hosts=1, host_threads=100000).threads_for("expert_host") == 16
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert Config(expert_hosts=1, threads=12).threads_for("gpu_worker") == 4
    assert Config(expert_hosts=1).threads_for("expert_host") == 1  # the share of 4 CPUs, not of os.cpu_count()'s


@pytest.mark.parametrize("floor, made", [("100%", False), ("0", True)], ids=["above-the-floor", "room"])
def test_a_mailbox_that_would_leave_less_than_the_floor_free_is_not_made(expert_models, tmp_path, caplog, floor,
                                                                      made):
    """A mailbox's pages are RAM (/dev/shm): one that would leave less than host_memory_floor free is not made,
    said in the log, and activations go over ZeroMQ."""
    path = expert_models["f32"]
    config = Config(model=str(path), expert_hosts=1, run_dir=str(tmp_path), host_memory_floor=floor)
    log = logging.getLogger("test-mailbox-floor")
    mailbox = open_mailbox(config, 0, GGUFModel(path), log)
    try:
        assert (mailbox is not None) == made
        assert os.path.exists(mailbox_path(config.expert_host_endpoint(0))) == made
        assert ("would leave less than host_memory_floor" in caplog.text) != made
    finally:
        if mailbox is not None:
            mailbox.close()
        remove_mailbox(mailbox_path(config.expert_host_endpoint(0)))
