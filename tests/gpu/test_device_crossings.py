"""The mailbox lanes driven by the device: a CUDA graph of several layers' exchanges (rows copied into the
mailbox, the request flag raised by cuStreamWriteValue32, cuStreamWaitValue32 on the host's flag, the answer
copied back) replayed step after step with new rows, and a host that stops answering drained with poison so the
stream runs on and the step fails."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.remote import ExpertHostError
from tests.gpu_worker.test_device_crossings import COLS, LAYERS, K, crossings_to, exchange, host, routed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
__all__ = ["host"]  # the fixture


def captured_step(crossings, h, weights, ids) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Every layer's exchange in one graph (its warm-up run first, as decode graphs capture); the stacked results."""
    out = torch.empty(LAYERS, *h.shape, device=CUDA)

    def body() -> None:
        out.copy_(torch.stack([exchange(crossings, layer, h, weights, ids) for layer in range(LAYERS)]))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(capture_error_mode="thread_local")
        body()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


def run(crossings, graph: torch.cuda.CUDAGraph, rows: int, padded: int) -> int:
    """A step as the worker makes one: its layers open the lanes (which is how the step knows whom the replay
    posts to), the graph replays, the device is waited on and the pairs counted."""
    crossings.begin_step()
    assert crossings.open([0], rows, padded, K, COLS, torch.float32)
    graph.replay()
    done = torch.cuda.Event()
    done.record()
    crossings.wait(done)
    return crossings.end_step()


def test_a_graph_of_lane_exchanges_replays_with_new_rows(host):
    crossings, remote = crossings_to(host(), CUDA)
    weights, ids = routed(4, CUDA)
    h = torch.randn(4, COLS, device=CUDA)
    crossings.begin_step()
    assert crossings.open([0], 3, 4, K, COLS, torch.float32)
    graph, out = captured_step(crossings, h, weights, ids)
    torch.cuda.synchronize()
    for _ in range(3):
        h.copy_(torch.randn(4, COLS, device=CUDA))
        assert run(crossings, graph, 3, 4) == 3 * LAYERS  # one even expert a real row, every layer
        for layer in range(LAYERS):
            assert torch.equal(out[layer, :3], h[:3] * (layer + 1))
            assert not out[layer, 3:].any()  # the padding row
    remote.close()


def test_a_host_that_stops_answering_is_drained_with_poison(host):
    crossings, remote = crossings_to(host(answers=2 * LAYERS + 1), CUDA, timeout_s=1.0)
    weights, ids = routed(2, CUDA)
    h = torch.randn(2, COLS, device=CUDA)
    crossings.begin_step()
    assert crossings.open([0], 2, 2, K, COLS, torch.float32)
    graph, _ = captured_step(crossings, h, weights, ids)  # warm-up answered: LAYERS requests
    torch.cuda.synchronize()
    assert run(crossings, graph, 2, 2) == 2 * LAYERS
    with pytest.raises(ExpertHostError, match="no lane answer"):
        run(crossings, graph, 2, 2)  # the host answers one layer, then stalls
    torch.cuda.synchronize()  # the stream ran on
    assert not crossings.open([0], 2, 2, K, COLS, torch.float32), "the lane is not used again"
    remote.close()
