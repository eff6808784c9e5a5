"""Migration into pinned memory one layer at a time: peak RSS stays near one copy of the owned experts
plus one layer, and the copied experts' file pages leave this process and the page cache."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import torch

from expert_host.store import ExpertStore
from shared.config import Config
from shared.expert_source import open_expert_source
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.model_config import EXPERT_TENSOR_KINDS
from shared.placement import Placement, round_robin_placement
from tests.expert_host.conftest import memory_status
from tests.expert_host.test_store import resident

SLACK = 8 << 20  # code pages of copy paths run for the first time, allocator bookkeeping


def reset_peak() -> int:
    """Set VmHWM back to the current RSS (Linux >= 4.0); the RSS it starts from."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset this process's peak RSS (/proc/self/clear_refs)")
    return memory_status()["VmRSS"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> GGUFModel:
    """The small preset in fp32: 128 experts of 786 KB, 25 MB per layer, clean in the page cache."""
    path = tmp_path_factory.mktemp("migration") / "small-f32.gguf"
    make_model(path, preset="small", dtype="f32", seed=2)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return GGUFModel(path)


def test_peak_rss_is_one_copy_plus_one_layer(small_model):
    cfg = small_model.config
    store = ExpertStore(open_expert_source(small_model, Config()), 0, "pinned")
    try:
        start = reset_peak()
        store.apply(round_robin_placement(cfg, 0, 1))  # this host owns every expert
        status = memory_status()
        owned = store.nbytes
        layer = owned // cfg.n_layers
        assert owned == cfg.n_layers * cfg.n_experts * cfg.expert_params * 4 > 100e6
        # Copying without dropping the file's pages would peak at two copies (~200 MB here).
        assert status["VmHWM"] - start <= owned + layer + SLACK
        assert status["VmRSS"] - start <= owned + SLACK
        assert status["RssShmem"] >= owned

        # Half the experts move to another host: the old segment is freed layer by layer as the new fills.
        start = reset_peak()
        store.apply(round_robin_placement(cfg, 0, 2, version=2))
        status = memory_status()
        assert store.nbytes == owned // 2
        assert status["VmHWM"] - start <= layer + SLACK
        assert status["VmRSS"] - start <= -owned // 2 + SLACK
    finally:
        store.close()



def test_experts_moving_to_other_layers_peak_at_one_copy_plus_one_layer(small_model):
    """A placement that moves the host's experts from the last layers to the first: the layers it gives up are
    freed before the ones it takes are filled, not after them (two copies at the peak)."""
    cfg = small_model.config
    half = cfg.n_layers // 2

    def owning(layers: range, version: int) -> Placement:
        owner = tuple(tuple(0 if layer in layers else 1 for _ in range(cfg.n_experts)) for layer in range(cfg.n_layers))
        return Placement(version, ("expert-host-0", "expert-host-1"), owner)

    store = ExpertStore(open_expert_source(small_model, Config()), 0, "pinned")
    try:
        store.apply(owning(range(half, cfg.n_layers), 1))
        owned = store.nbytes
        layer = owned // (cfg.n_layers - half)
        start = reset_peak()
        store.apply(owning(range(half), 2))
        status = memory_status()
        assert store.nbytes == owned and {key[0] for key in store.weights} == set(range(half))
        assert status["VmHWM"] - start <= layer + SLACK
    finally:
        store.close()

def test_mapped_float_experts_cost_no_process_memory_until_touched(small_model):
    store = ExpertStore(open_expert_source(small_model, Config()), 0)
    start = reset_peak()
    store.apply(round_robin_placement(small_model.config, 0, 1))
    assert memory_status()["VmHWM"] - start <= SLACK
    assert store.nbytes > 100e6


def test_copied_experts_leave_the_page_cache(small_model, tmp_path):
    if not page_cache_droppable(tmp_path):
        pytest.skip("this file system keeps files in memory (tmpfs?): its pages cannot be dropped")
    cfg = small_model.config
    mapped = {(layer, e): [small_model.expert_view(layer, kind, e) for kind in EXPERT_TENSOR_KINDS]
              for layer in range(cfg.n_layers) for e in range(cfg.n_experts)}
    for t in (t for views in mapped.values() for t in views):
        t.sum()  # page the experts in, as a host that ran mapped before would have
    assert resident([t for views in mapped.values() for t in views]) == 1
    store = ExpertStore(open_expert_source(small_model, Config()), 0, "pinned")
    try:
        store.apply(round_robin_placement(cfg, 0, 2))  # host 0 owns every other expert
        assert resident([t for key in store.weights for t in mapped[key]]) < 0.1
    finally:
        store.close()


def page_cache_droppable(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x" * (1 << 20))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with open(probe, "r+b") as f:
            view = mmap.mmap(f.fileno(), 0)
            try:
                return resident([torch.frombuffer(view, dtype=torch.uint8)]) < 0.5
            finally:
                view.close()
    finally:
        os.close(fd)
