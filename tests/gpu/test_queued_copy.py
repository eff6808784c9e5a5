"""gpu_worker.grouped.queued_copy: a launch plan's host-to-device copy is queued behind the stream's work, while
the plain copy from pageable memory makes the host wait for that work first (run: `pytest -m gpu tests/gpu`)."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.grouped import queued_copy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
BUSY_CYCLES = 2_000_000_000  # about a second of GPU time: far longer than queueing a copy takes


def busy_stream() -> torch.cuda.Event:
    """Queue a second of GPU work; the returned event completes when it is done."""
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)
    done = torch.cuda.Event()
    done.record()
    return done


def test_the_plan_copy_is_queued_and_the_pageable_copy_waits():
    plan = torch.arange(257, dtype=torch.int32)
    done = busy_stream()
    queued = queued_copy(plan, CUDA)
    assert not done.query()  # the host came back while the GPU was still busy
    assert torch.equal(queued.cpu(), plan)
    done = busy_stream()
    waited = plan.to(CUDA, non_blocking=True)
    assert done.query()  # what queued_copy avoids: pageable memory made the host wait for the sleep
    assert torch.equal(waited.cpu(), plan)

