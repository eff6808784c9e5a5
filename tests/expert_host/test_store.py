"""An expert host's store in each memory kind: the same numbers from every kind, copies that live in one
unlinked shared-memory segment, refusals before anything is loaded, and prefetch of mapped experts."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import time
import uuid

import pytest
import torch

from expert_host.memory import HostMemoryError
from expert_host.service import PREFETCH_ROWS, answer_lane, compute
from expert_host.store import ExpertStore
from shared.config import Config
from shared.expert_cache import CacheError
from shared.expert_source import open_expert_source
from shared.gguf_file import GGUFModel
from shared.mailbox import Mailbox
from shared.make_model import make_model
from shared.model_config import expert_tensor_name
from shared.pages import PAGE, advise
from shared.placement import round_robin_placement
from tests.expert_host.conftest import memory_status, segment_mappings, segment_names

LIBC = ctypes.CDLL(None, use_errno=True)


def outputs(store: ExpertStore, placement, seed: int = 0) -> list[torch.Tensor]:
    """Every expert the host owns, each layer's experts in one work item of uneven row counts."""
    cfg = store.model.config
    x = torch.randn(64, cfg.hidden, generator=torch.Generator().manual_seed(seed))
    results = []
    for layer in range(cfg.n_layers):
        experts = placement.on_host(layer, store.host_index)
        counts = [1 + i % 3 for i in range(len(experts))]
        results.append(store.compute(layer, experts, counts, x[: sum(counts)]))
    return results


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8_0"])
def test_pinned_experts_compute_bit_for_bit_what_mapped_ones_do(expert_models, dtype):
    model = GGUFModel(expert_models[dtype])
    before = round_robin_placement(model.config, 2, 2, version=1)
    after = round_robin_placement(model.config, 3, 1, version=2)  # host 0 keeps some experts, gains others
    source = open_expert_source(model, Config())
    mapped, pinned = ExpertStore(source, 0), ExpertStore(source, 0, "pinned")
    try:
        for placement in (before, after):
            mapped.apply(placement)
            pinned.apply(placement)
            assert pinned.placement_version == placement.version
            assert set(pinned.weights) == set(mapped.weights)
            for a, b in zip(outputs(mapped, placement), outputs(pinned, placement), strict=True):
                assert torch.equal(a, b)
            assert pinned.nbytes == mapped.nbytes
    finally:
        pinned.close()


def test_pinned_copies_live_in_one_unlinked_segment_not_in_the_file(expert_models):
    model = GGUFModel(expert_models["f32"])
    shm_before = segment_names()
    store = ExpertStore(open_expert_source(model, Config()), 0, "pinned")
    placement = round_robin_placement(model.config, 0, 1)
    store.apply(placement)
    file_start = model.raw(expert_tensor_name(0, "ffn_gate_exps")).base.ctypes.data
    pointers = [t.data_ptr() for weights in store.weights.values() for t in weights]
    assert not [p for p in pointers if file_start <= p < file_start + model.file_size]
    assert all(p % 64 == 0 for p in pointers)
    (segment,) = segment_mappings()
    assert segment.endswith("(deleted)") and " rw-s " in segment
    assert segment_names() == shm_before
    store.apply(round_robin_placement(model.config, 0, 1, version=2))  # a new placement makes a new segment
    gc.collect()
    assert len(segment_mappings()) == 1
    held, shmem = store.nbytes, memory_status()["RssShmem"]
    store.close()
    assert store.weights == {}
    assert memory_status()["RssShmem"] <= shmem - held  # the pages are given back at once


def test_a_placement_that_does_not_fit_is_refused_before_anything_is_loaded(expert_models):
    model = GGUFModel(expert_models["f32"])
    placement = round_robin_placement(model.config, 0, 2)
    store = ExpertStore(open_expert_source(model, Config()), 0, "pinned", floor="100%")
    with pytest.raises(HostMemoryError, match=r"placement needs 0.4 MB of pinned memory for 16 experts; .* "
                                              r"at most 0 experts fit, or use host_memory = mapped"):
        store.apply(placement)
    assert store.weights == {} and store.placement_version == 0 and segment_mappings() == []
    for dtype in ("f32", "q8_0"):  # views of the model file or of its expert cache file need no memory
        source = open_expert_source(GGUFModel(expert_models[dtype]), Config())
        ExpertStore(source, 0, "mapped", floor="100%").apply(placement)


def test_a_pinned_host_beside_a_cpu_worker_with_soft_slots_is_not_refused(expert_models):
    """Only a GPU worker page-locks its map of the file (tests/gpu/test_host_memory.py has the refusal)."""
    source = open_expert_source(GGUFModel(expert_models["f32"]), Config())
    store = ExpertStore.from_config(source, 0, Config(host_memory="pinned", soft_slots=4, device="cpu"))
    assert store.kind == "pinned"
    store.close()


def test_prefetch_reads_exactly_the_named_experts_into_the_page_cache(tmp_path):
    path, model, store = mapped_store(tmp_path, seed=1)
    drop_pages(path, model)
    wanted, other = store.weights[(1, 3)] + store.weights[(1, 7)], store.weights[(3, 20)]
    skip_unless_cold(wanted)
    store.prefetch(1, [3, 7])
    assert wait_until_resident(wanted) == 1
    assert resident(other) < 0.5


def test_a_prefill_sized_work_item_reads_the_next_layers_experts_in(tmp_path):
    path, model, store = mapped_store(tmp_path, seed=2)
    experts = list(range(model.config.n_experts))
    decode = (experts, [1] * len(experts), torch.randn(len(experts), model.config.hidden))
    compute(store, 1, *decode)  # layer 1 is read in now, so the reads below cause no readahead of layer 2
    next_layer = [t for (layer, _), w in store.weights.items() if layer == 2 for t in w]
    drop_pages(path, model, layer=2)
    skip_unless_cold(next_layer)
    compute(store, 1, *decode)  # a decode batch leaves the next layer alone
    time.sleep(0.2)
    assert resident(next_layer) < 0.5
    counts = [PREFETCH_ROWS // len(experts)] * len(experts)
    compute(store, 1, experts, counts, torch.randn(sum(counts), model.config.hidden))
    assert wait_until_resident(next_layer) == 1


def mapped_store(tmp_path, seed: int) -> tuple:
    """A small bf16 model and a store holding every expert of it mapped: (path, model, store)."""
    path = tmp_path / "small.gguf"
    make_model(path, preset="small", dtype="bf16", seed=seed)
    model = GGUFModel(path)
    store = ExpertStore(open_expert_source(model, Config()), 0)
    store.apply(round_robin_placement(model.config, 0, 1))
    return path, model, store


def skip_unless_cold(tensors) -> None:
    if resident(tensors) > 0.1:
        pytest.skip("this file system keeps the file in memory (tmpfs?): there is no cold page cache to measure")


def wait_until_resident(tensors, timeout_s: float = 5.0) -> float:
    """The tensors' resident share once it reaches 1, or when the reads in flight have had timeout_s."""
    deadline = time.monotonic() + timeout_s
    while resident(tensors) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    return resident(tensors)


def drop_pages(path, model: GGUFModel, layer: int | None = None) -> None:
    """Unmap the model's tensors (those of one layer, if given) here and drop them from the page cache."""
    names = [n for n in model.tensor_names() if layer is None or n.startswith(f"blk.{layer}.")]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        for name in names:
            whole = model.raw(name)
            advise(whole.ctypes.data, whole.nbytes, mmap.MADV_DONTNEED)
            os.posix_fadvise(fd, model.file_offset(name), model.nbytes(name), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(tensors) -> float:
    """Share of the tensors' pages that are in the page cache (mincore)."""
    pages = in_cache = 0
    for t in tensors:
        start = t.data_ptr() - t.data_ptr() % PAGE
        n = -(-(t.data_ptr() + t.numel() * t.element_size() - start) // PAGE)
        vec = (ctypes.c_ubyte * n)()
        assert LIBC.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * PAGE), vec) == 0
        pages += n
        in_cache += sum(v & 1 for v in vec)
    return in_cache / pages


def test_a_host_copying_a_damaged_expert_refuses_the_placement_naming_it(expert_models, tmp_path):
    """Copied experts are served from memory for as long as the host runs: one whose bytes in the cache file no
    longer match their digest is refused, named, instead of being served wrong. Mapped experts are the file's
    own pages (`convert-experts --verify` checks them)."""
    model = GGUFModel(expert_models["q8_0"])
    config = Config(expert_cache_dir=str(tmp_path))
    source = open_expert_source(model, config)
    cache_path, offset = source.cache.path, source.cache.file_offset(1, 3)
    source.close()
    with open(cache_path, "r+b") as f:
        f.seek(offset + 64)
        f.write(b"\xff\xee")
    placement = round_robin_placement(model.config, 0, 1)
    store = ExpertStore(open_expert_source(model, config), 0, "pinned")
    try:
        with pytest.raises(CacheError, match=r"layer 1 experts \[3\] do not match their digests, the file is damaged"):
            store.apply(placement)
        assert store.weights == {} and store.placement_version == 0
    finally:
        store.close()
    mapped = ExpertStore(open_expert_source(model, config), 0, "mapped")
    mapped.apply(placement)
    mapped.close()


@pytest.mark.parametrize("dtype, rows", [("f32", 3), ("q8_0", 20)])  # q8_0: 20 rows an expert, past the native call
def test_a_rows_nan_or_inf_stays_in_that_row_of_a_lane_answer(expert_models, tmp_path, dtype, rows):
    """A lane request summed by the grouped path (float experts; quantized ones at a GEMM's rows): a row whose
    activations hold NaN or inf answers non-finite, and every other row is what it is without that row's values."""
    model = GGUFModel(expert_models[dtype])
    cfg = model.config
    store = ExpertStore(open_expert_source(model, Config(expert_cache_dir=str(tmp_path))), 0)
    store.apply(round_robin_placement(cfg, 0, 1, version=1))
    box = Mailbox.create(f"/dev/shm/tierserve-test-{uuid.uuid4().hex}", 1 << 20, cfg.n_experts,
                         n_layers=cfg.n_layers)
    try:
        box.set_owners(torch.ones(cfg.n_layers, cfg.n_experts, dtype=torch.bool))
        k = cfg.n_experts_used
        hidden = torch.randn(rows, cfg.hidden, generator=torch.Generator().manual_seed(5))
        answers = []
        for generation, bad in enumerate([None, float("nan"), float("inf")], start=1):
            areas = box.lane_open(rows, rows, k, cfg.hidden, torch.float32)
            areas.ids.copy_(torch.arange(k, dtype=torch.int32).repeat(rows, 1))  # every row to experts 0..k-1
            areas.weights.fill_(1.0 / k)
            areas.hidden.copy_(hidden)
            if bad is not None:
                areas.hidden[0, 1] = bad
            box.lane_post(box.lane_value(generation, 0))
            answer_lane(store, box)
            assert box.lane_failure(generation) is None
            answers.append(areas.out.clone())
        clean, *spoiled = answers
        assert clean.isfinite().all()
        for answer in spoiled:
            assert not answer[0].isfinite().all()
            assert torch.equal(answer[1:], clean[1:])
    finally:
        box.close()
        os.unlink(box.path)
