"""A GPU worker's mailboxes, page-locked for DMA: device rows go straight into the request area and answers
straight onto the device, exactly; the registration follows a host that restarts; and the whole system gives
the same tokens through a registered mailbox as over ZeroMQ (and the oracle's in fp32)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.remote import ExpertHostError, RemoteExperts
from shared.client import Client
from shared.gguf_file import GGUFModel
from shared.launcher import RunningSystem
from shared.make_model import make_model
from shared.reference import ReferenceModel
from tests import test_mailbox
from tests.test_mailbox import Host, expected, stop_host

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
remote = test_mailbox.remote  # the fixture: a RemoteExperts whose host answers only through the mailbox
CUDA_MEMORY_TYPE_HOST = 1  # cudaPointerAttributes.type of page-locked (registered or allocated) host memory


def host_memory_type(tensor: torch.Tensor) -> int:
    import cupy

    return cupy.cuda.runtime.pointerGetAttributes(tensor.data_ptr()).type


def exchange(remote: RemoteExperts, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Send device rows (gathered by token) for one layer; (what came back, what the host must have answered)."""
    remote.begin_step()
    h = torch.randn(6, 16, device=CUDA).mul(50).round().to(dtype)
    tokens = torch.tensor([5, 0, 0, 3], device=CUDA)
    remote.send(0, layer, [1, 4], [3, 1], h, tokens)
    output, compute_s = remote.receive(0, layer)
    assert compute_s == float(remote.step)
    return output, expected(h[tokens].cpu(), layer, [1, 4], [3, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_rows_cross_a_registered_mailbox_exactly(remote, dtype):
    remote, path = remote
    host = Host(path)
    answers = [exchange(remote, layer, dtype) for layer in range(4)]
    mailbox = remote.mailboxes[0]
    assert mailbox.dma is True
    assert host_memory_type(mailbox.request_rows(1, 16, dtype)) == CUDA_MEMORY_TYPE_HOST
    # Each answer was copied onto the device without waiting, and the host has since overwritten the response
    # area with the next layers' answers: what arrived must still be each layer's own.
    for output, want in answers:
        assert output.device.type == "cuda" and output.dtype == dtype
        assert torch.equal(output.cpu(), want)
    stop_host(mailbox, host)


def test_the_registration_follows_a_restarted_host(remote):
    remote, path = remote
    host = Host(path, answers=2)
    for layer in range(2):
        output, want = exchange(remote, layer, torch.float32)
        assert torch.equal(output.cpu(), want)
    first = remote.mailboxes[0]
    assert first.dma is True
    remote.begin_step()
    remote.send(0, 2, [1], [1], torch.ones(1, 16, device=CUDA))
    host.kill()
    with pytest.raises(ExpertHostError, match="no answer"):
        remote.receive(0, 2)
    successor = Host(path)  # a new mailbox file, registered; the old one unregistered once the step is over
    output, want = exchange(remote, 3, torch.float32)
    assert torch.equal(output.cpu(), want)
    assert remote.mailboxes[0] is not first and first.dma is True, "closed between steps, not while one runs"
    remote.close_retired()
    assert first.dma is None and remote.mailboxes[0].dma is True
    assert (torch.ones(4, device=CUDA) * 2).sum().item() == 8  # kernels still launch after the unregistration
    stop_host(remote.mailboxes[0], successor)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("dma") / "tiny.gguf"
    make_model(path, arch="qwen3moe", preset="tiny", dtype="f32", seed=3)
    return path


PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11]]


def served_tokens(model, data_plane: str, *options: str) -> list[list[int]]:
    """Every expert on two expert hosts: each layer of each token crosses to them, in the mailboxes' per-layer
    messages (their lanes are tests/gpu/test_decode_crossings.py's)."""
    with RunningSystem(str(model), "--device", "cuda", "--expert-hosts", "2", "--hot-experts", "0",
                       "--data-plane", data_plane, "--decode-crossings", "false", *options) as system, \
            Client(system.endpoint) as client:
        return [client.complete(token_ids=prompt, max_tokens=16).token_ids for prompt in PROMPTS]


def test_fp32_tokens_through_registered_mailboxes_are_the_oracles(tiny):
    oracle = ReferenceModel(GGUFModel(tiny))
    assert served_tokens(tiny, "shm", "--dtype", "float32") == [oracle.greedy(p, 16) for p in PROMPTS]


def test_bf16_tokens_are_the_same_through_registered_mailboxes_and_zeromq(tiny):
    assert served_tokens(tiny, "shm") == served_tokens(tiny, "zmq")
