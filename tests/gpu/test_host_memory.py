"""Host memory kinds on a CUDA machine: what the device says about reaching host memory, and the pinned
segment, page-locked, copied to the GPU intact; refused where the worker streams from its own map."""

from __future__ import annotations

import pytest
import torch

from expert_host.store import ExpertStore
from shared.config import Config
from shared.device_caps import HOST_DMA, decide, read_device_caps
from shared.expert_source import open_expert_source
from shared.gguf_file import GGUFModel
from shared.make_model import make_model
from shared.memory_use import HostMemoryError
from shared.placement import round_robin_placement

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA_MEMORY_TYPE_HOST = 1  # cudaPointerAttributes.type of page-locked (registered or allocated) host memory


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> GGUFModel:
    path = tmp_path_factory.mktemp("host_memory") / "tiny-bf16.gguf"
    make_model(path, preset="tiny", dtype="bf16", seed=4)
    return GGUFModel(path)


def host_memory_type(tensor: torch.Tensor) -> int:
    import cupy

    return cupy.cuda.runtime.pointerGetAttributes(tensor.data_ptr()).type


def test_device_caps_are_read_and_the_probe_leaves_no_error_behind():
    caps = read_device_caps()
    assert caps is not None
    assert caps.decision == decide(caps.host_register_supported, caps.pageable_uses_host_page_tables,
                                   caps.host_register_works)
    print(caps)
    assert (torch.ones(4, device="cuda") * 2).sum().item() == 8  # a kernel launch after the probe still works


def test_pinned_experts_are_page_locked_and_reach_the_gpu_intact(model):
    caps = read_device_caps()
    if caps is None or caps.decision != HOST_DMA:
        pytest.skip("pinned memory is registered for DMA only where the GPU DMAs from host memory")
    mapped = ExpertStore(open_expert_source(model, Config()), 0)
    store = ExpertStore.from_config(open_expert_source(model, Config()), 0, Config(host_memory="pinned"))
    try:
        for version, hot in ((1, 2), (2, 3)):  # a placement change builds new memory and frees the old
            placement = round_robin_placement(model.config, hot, 1, version=version)
            mapped.apply(placement)
            store.apply(placement)
            assert set(store.weights) == set(mapped.weights)
            for key, weights in store.weights.items():
                for held, view in zip(weights, mapped.weights[key], strict=True):
                    assert host_memory_type(held) == CUDA_MEMORY_TYPE_HOST
                    on_gpu = held.to("cuda", non_blocking=True)
                    torch.cuda.synchronize()
                    assert torch.equal(on_gpu.cpu(), view)
    finally:
        store.close()


def test_a_pinned_host_is_refused_where_the_worker_streams_from_its_own_map(model):
    """The worker's soft tier page-locks its own map of the file, every expert's pages: a pinned copy beside it, which
    only the host's CPU read, was a second copy of the host's experts in RAM."""
    caps = read_device_caps()
    if caps is None or caps.decision != HOST_DMA:
        pytest.skip("the worker page-locks its map only where the GPU DMAs from host memory")
    with pytest.raises(HostMemoryError, match="two copies of this host's experts"):
        ExpertStore.from_config(open_expert_source(model, Config()), 1, Config(host_memory="pinned", soft_slots=4))
